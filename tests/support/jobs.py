"""Helpers for tests that run FineTuneJobs on the test control plane (kwok workers)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tests.support.controlplane import ControlPlane, WaitAborted

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())


def volume(
    cp: ControlPlane,
    namespace: str,
    claim: str,
    make_claim: bool = True,
    host_path: Path | None = None,
) -> None:
    """A PersistentVolume pre-bound to `claim` (no provisioner here), and the claim."""
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{claim}"[:63]},
        "spec": {
            "capacity": {"storage": "100Gi"},
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(host_path or f"/tmp/amxtune-test-pv/{namespace}/{claim}")},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }
    cp.apply_yaml(yaml.safe_dump(pv))
    if make_claim:
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        cp.apply_yaml(yaml.safe_dump(pvc))


def job(name: str = "dicoo", **spec_changes) -> dict:
    doc = copy.deepcopy(EXAMPLE)
    doc["metadata"]["name"] = name
    doc["spec"]["model"] = {"name": "tiny"}
    doc["spec"]["workers"] = {
        "nodes": 3,
        "ranksPerNode": 4,
        "resources": {"cpu": "56", "memory": "64Gi"},
    }
    doc["spec"]["output"] = {"pvc": {"claimName": f"{name}-output", "create": {"size": "1Gi"}}}
    doc["spec"].update(spec_changes)
    return doc


def submit(cp: ControlPlane, namespace: str, doc: dict, server_side: bool = False) -> None:
    volume(cp, namespace, "concepts")
    volume(cp, namespace, doc["spec"]["output"]["pvc"]["claimName"], make_claim=False)
    cp.apply_yaml(yaml.safe_dump(doc), namespace=namespace, server_side=server_side)


def status(cp: ControlPlane, namespace: str, name: str = "dicoo", kind: str = "ftj") -> dict:
    found = cp.get(kind, name, namespace) or {}
    return found.get("status") or {}


def describe(cp: ControlPlane, namespace: str, name: str, kind: str = "ftj") -> str:
    """The job's status and Events, for an assertion message."""
    found = cp.get(kind, name, namespace) or {}
    events = cp.events_for(kind=found.get("kind"), name=name, namespace=namespace)
    lines = [f"  {e.get('type')} {e.get('reason')}: {e.get('message')}" for e in events]
    return (f"status: {yaml.safe_dump(found.get('status') or {}, width=120)}"
            "events:\n" + "\n".join(lines))


def wait_phase(cp, namespace, phase, name="dicoo", kind="ftj", timeout=60) -> dict:
    """Wait for `phase`; fail at once, with the status and Events, when the job ends in
    another phase or stalls instead."""

    def reached():
        current = status(cp, namespace, name, kind)
        if current.get("phase") == phase:
            return current
        stalled = any(c["type"] == "Stalled" and c["status"] == "True"
                      for c in current.get("conditions", []))
        if current.get("phase") in ("Succeeded", "Failed") or stalled:
            raise WaitAborted(f"{kind}/{name} is {current.get('phase')} "
                              f"({current.get('message')}), not {phase}:\n"
                              + describe(cp, namespace, name, kind))
        return None

    return cp.wait_for(reached, timeout=timeout, what=f"{kind}/{name} phase {phase}")


def worker_pods(cp: ControlPlane, namespace: str, job_name: str = "dicoo") -> list[dict]:
    pods = cp.kubectl_json("get", "pods", "-n", namespace, "-l", f"amxtune.io/job={job_name}")
    return sorted(pods["items"], key=lambda p: p["metadata"]["name"])


def running_workers(cp, namespace, count, attempt="0", job_name="dicoo",
                    timeout=60) -> list[dict]:
    def ready():
        pods = [
            p
            for p in worker_pods(cp, namespace, job_name)
            if p["metadata"]["labels"].get("amxtune.io/attempt") == attempt
            and p.get("status", {}).get("phase") == "Running"
        ]
        return pods if len(pods) == count else None

    return cp.wait_for(ready, timeout=timeout,
                       what=f"{count} running workers (attempt {attempt})")


def finish_all(cp: ControlPlane, namespace: str, pods: list[dict]) -> None:
    """Let every worker succeed, rank 0 last (its success ends the job; the operator then
    removes workers that are still running)."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"], reverse=True):
        simulate(cp, namespace, pod["metadata"]["name"], "succeed")


def simulate(cp: ControlPlane, namespace: str, pod: str, outcome: str, code: int = 0) -> None:
    args = ["annotate", "pod", pod, "-n", namespace, f"amxtune.io/simulate={outcome}"]
    if outcome == "fail":
        args.append(f"amxtune.io/simulate-exit-code={code}")
    cp.kubectl(*args, "--overwrite")


def reasons(cp: ControlPlane, namespace: str, name: str = "dicoo", kind: str = "FineTuneJob"):
    return [e["reason"] for e in cp.events_for(kind=kind, name=name, namespace=namespace)]
