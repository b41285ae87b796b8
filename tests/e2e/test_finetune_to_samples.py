"""End to end: FineTuneJobs on the real control plane really train, restart, export and render.

The operator runs as in production; the worker and export pods are bound by the real scheduler
to nodes played by tests/support/local_kubelet.py, which runs them as local processes with the
tiny built-in model. Two worker pods on two nodes make a two-rank job that rendezvouses
through the rendered MASTER_ADDR (the headless Service's DNS name, mapped to loopback). One
node can be given an older CPU (tests/support/cpumask.py) while its labels still say AMX.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.controlplane import WaitAborted, free_port
from tests.support.jobs import describe, status, volume, wait_phase
from tests.support.local_kubelet import LOCAL_NODE_LABEL, LocalKubelet
from tests.support.operator import OperatorProcess, install_crds

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]



def manifest(nodes: int, steps: int, checkpoint_every: int, export: bool,
             require_amx: bool = False) -> dict:
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text()))
    doc["metadata"]["name"] = "robot"
    # plumbing: the random-weight model is enough, with one vector and one sample
    doc["spec"]["model"] = {"name": "tiny"}
    doc["spec"]["textualInversion"] = {"placeholderToken": "<robot-toy>", "initializerToken": "toy"}
    doc["spec"]["training"]["conceptSimilarityImages"] = 0
    doc["spec"]["export"] = {"openvino": {"height": 64, "width": 64, "weightFormat": "fp32"},
                             "prompts": ["a photo of a <robot-toy> on the beach"], "seed": 7}
    doc["spec"]["training"].update(maxTrainSteps=steps, checkpointingSteps=checkpoint_every,
                                   loggingSteps=2)
    doc["spec"]["workers"] = {
        "nodes": nodes,
        "ranksPerNode": 1,
        "resources": {"cpu": "1", "memory": "4Gi"},
        "nodeSelector": {LOCAL_NODE_LABEL: "true"},
        "requireAmx": require_amx,  # the local nodes carry the AMX labels, whatever their CPU
    }
    doc["spec"]["runtime"] = {"ccl": {"workerCount": 0}, "masterPort": free_port()}
    doc["spec"]["output"] = {"pvc": {"claimName": "robot-output", "create": {"size": "1Gi"}}}
    if export:
        doc["spec"]["export"]["numInferenceSteps"] = 4
    else:
        del doc["spec"]["export"]
    return doc


@contextlib.contextmanager
def local_cluster(cp, namespace, tmp_path, node_env=None, nodes=2):
    """Concepts and output volumes, `nodes` local nodes, and the operator."""
    install_crds(cp)
    data, output = tmp_path / "concepts", tmp_path / "output"
    shutil.copytree(ROOT / "examples" / "concepts" / "robot", data / "robot")
    output.mkdir()
    volume(cp, namespace, "concepts", host_path=data)
    volume(cp, namespace, "robot-output", make_claim=False, host_path=output)
    suffix = uuid.uuid4().hex[:6]
    names = [f"local-{suffix}-{i}" for i in range(nodes)]
    env = {names[i]: extra for i, extra in (node_env or {}).items()}
    kubelet = LocalKubelet(cp, names, tmp_path / "kubelet", node_env=env).start()
    operator = OperatorProcess(cp, namespace).start()
    try:
        yield kubelet, output, names
    finally:
        print("operator log:\n" + operator.log()[-4000:])
        for (ns, name), pod in kubelet.pods.items():
            print(f"--- {ns}/{name}:\n{pod.log_path.read_text(errors='replace')[-3000:]}")
        print("kubelet errors:", kubelet.errors)
        operator.stop()
        kubelet.stop()


def events(cp, namespace, name="robot") -> list[dict]:
    return cp.events_for(kind="FineTuneJob", name=name, namespace=namespace)


def wait_event(cp, namespace, reason, timeout=300) -> None:
    """Wait for an Event of the job; fail at once when the job ends without it."""

    def seen():
        if reason in [e["reason"] for e in events(cp, namespace)]:
            return True
        if status(cp, namespace, "robot").get("phase") in ("Succeeded", "Failed"):
            raise WaitAborted(f"no {reason} event before the job ended:\n"
                              + describe(cp, namespace, "robot"))
        return None

    cp.wait_for(seen, timeout=timeout, what=f"a {reason} event")


def test_finetunejob_survives_a_killed_worker_then_exports_and_renders(control_plane, namespace,
                                                                       tmp_path):
    from amxtune_trainer.cpu import probe

    cp = control_plane
    with local_cluster(cp, namespace, tmp_path) as (kubelet, output, _):
        cp.apply_yaml(yaml.safe_dump(manifest(2, 300, 20, export=True)), namespace=namespace)
        checkpoints = output / "robot" / "checkpoints"
        cp.wait_for(lambda: checkpoints.is_dir() and any(checkpoints.iterdir()), timeout=300,
                    what="a first checkpoint")
        victim = kubelet.pods[(namespace, "robot-worker-1")]
        assert victim.process is not None and victim.process.poll() is None, "finished early"
        os.killpg(victim.process.pid, signal.SIGKILL)  # the node lost the worker
        killed_at = time.monotonic()
        final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=900)
        assert time.monotonic() - killed_at < 900
        logs = cp.kubectl("logs", "robot-worker-0", "-n", namespace).stdout  # via the node

    assert final["restarts"] == 1 and final["attempt"] == 1
    failed = [e["message"] for e in events(cp, namespace) if e["reason"] == "WorkerFailed"]
    assert len(failed) == 1 and "robot-worker-1 exited with code 137" in failed[0]
    assert "Restarting" in [e["reason"] for e in events(cp, namespace)]
    # the second attempt resumed from the checkpoint instead of starting again
    results = output / "robot"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 300
    assert 20 <= metrics["resumed_from_step"] < 300
    assert (results / "learned_embeds.safetensors").is_file()
    # the precision this CPU supports, reported by rank 0 and shown in the job's status
    expected = "bf16" if probe().native_bf16 else "fp32"
    assert metrics["mixed_precision"]["used"] == expected
    assert final["trainer"]["mixedPrecision"] == expected and final["trainer"]["attempt"] == 1
    assert final["trainer"]["cpu"] == metrics["cpu"]["summary"]
    table = cp.kubectl("get", "ftj", "robot", "-n", namespace).stdout
    assert expected in table.splitlines()[1]
    # exported and rendered onto the output volume
    assert (results / "openvino" / "model_index.json").is_file()
    assert (results / "samples" / "grid.png").is_file()
    assert final["progress"]["display"] == "300/300"
    inference = cp.get("infj", "robot-export", namespace)["status"]
    assert inference["phase"] == "Succeeded"
    assert inference["images"] == 1 and inference["secondsPerImage"] > 0
    # the base model's export went into the cache on the output volume, the token onto it
    assert inference["exportedFrom"] == "embeddings" and inference["exportCache"] == "stored"
    assert inference["exportSeconds"] > 0
    assert [p for p in (output / ".amxtune-cache" / "openvino").iterdir() if p.is_dir()]
    # the job points at the export and the samples (kept by the apiserver's schema)
    assert final["outputs"]["embeddings"] == "robot/learned_embeds.safetensors"
    assert final["outputs"]["openvino"] == inference["exportedModel"]
    assert final["outputs"]["samples"] == inference["grid"]
    # (the local kubelet maps /output to the volume's folder, so paths are local here)
    assert Path(inference["imagePaths"][0]).is_file()
    assert '"event": "progress"' in logs and '"event": "started"' in logs


def test_a_worker_on_a_node_without_amx_moves_to_another_node(control_plane, namespace,
                                                              tmp_path, avx2_cpu):
    """Node 0 is labelled AMX but its CPU has only AVX2; the worker stops at once and the
    job goes on on node 1, without spending a restart. On a machine without AMX node 1 lacks
    it too: then both are left and the job says it cannot be scheduled, and why."""
    from amxtune_trainer.cpu import probe

    cp = control_plane
    with local_cluster(cp, namespace, tmp_path, node_env={0: avx2_cpu}) as (_, output, nodes):
        bad, good = nodes
        cp.kubectl("cordon", good)  # the first attempt can only land on the bad node
        doc = manifest(1, 4, 2, export=False, require_amx=True)
        doc["spec"]["backoffLimit"] = 0
        cp.apply_yaml(yaml.safe_dump(doc), namespace=namespace)
        wait_event(cp, namespace, "NodeLacksAmx")
        cp.kubectl("uncordon", good)
        if probe().amx:
            final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=600)
        else:
            final = cp.wait_for(
                lambda: (s := status(cp, namespace, "robot")).get("excludedNodes") == nodes
                and "their CPUs lacked AMX" in s.get("message", "") and s,
                timeout=300, what="both nodes excluded")

    lacks = [e for e in events(cp, namespace) if e["reason"] == "NodeLacksAmx"]
    assert f"ran on node {bad}" in lacks[0]["message"]
    assert "has no amx_bf16, amx_tile" in lacks[0]["message"], describe(cp, namespace, "robot")
    assert final["restarts"] == 0
    if probe().amx:
        assert final["excludedNodes"] == [bad] and final["attempt"] == 1
        assert final["trainer"]["node"] == good
        metrics = json.loads((output / "robot" / "metrics.json").read_text())
        assert metrics["steps"] == 4
    else:
        assert final["phase"] == "Running" and final["attempt"] == 2
        assert f"ran on node {good}" in lacks[1]["message"]


def training_past(cp, namespace: str, step: int) -> int:
    """Wait until the job reports a step at or past `step`; that step."""
    return cp.wait_for(
        lambda: (status(cp, namespace, "robot").get("progress") or {}).get("step", 0) >= step
        and status(cp, namespace, "robot")["progress"]["step"], timeout=300,
        what=f"training past step {step}")


def test_suspending_saves_the_current_step_and_resuming_loses_nothing(control_plane, namespace,
                                                                       tmp_path):
    """Suspend deletes the worker pods (as a drain or a preemption would): the kubelet's
    SIGTERM makes every rank end its step and rank 0 save it, so the resumed run redoes no
    step, although no periodic checkpoint was due (checkpointingSteps > maxTrainSteps)."""
    cp = control_plane
    with local_cluster(cp, namespace, tmp_path) as (_, output, _):
        cp.apply_yaml(yaml.safe_dump(manifest(2, 400, 1000, export=False)), namespace=namespace)
        reached = training_past(cp, namespace, 20)
        cp.kubectl("patch", "ftj", "robot", "-n", namespace, "--type=merge",
                   "-p", '{"spec": {"suspend": true}}')
        wait_phase(cp, namespace, "Suspended", name="robot", timeout=120)
        checkpoints = output / "robot" / "checkpoints"
        saved = cp.wait_for(lambda: sorted(checkpoints.glob("checkpoint-*")), timeout=60,
                            what="the checkpoint of the stop")
        assert len(saved) == 1, saved
        stopped_at = int(saved[0].name.split("-")[1])
        assert reached <= stopped_at < 400
        cp.kubectl("patch", "ftj", "robot", "-n", namespace, "--type=merge",
                   "-p", '{"spec": {"suspend": false}}')
        final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=600)

    metrics = json.loads((output / "robot" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at  # not one step redone
    assert [h["step"] for h in metrics["history"]] == list(range(1, 401))
    assert final["restarts"] == 0  # a stop is not a failure


def test_a_deleted_worker_stops_the_group_which_resumes_from_the_step_it_saved(
        control_plane, namespace, tmp_path):
    """One worker pod deleted (as a drain or an eviction does): its rank gets SIGTERM, the
    ranks agree to stop and rank 0 saves the current step; the operator restarts the whole
    group (WorkersLost, no restart counted) and it resumes from that step."""
    cp = control_plane
    with local_cluster(cp, namespace, tmp_path) as (_, output, _):
        cp.apply_yaml(yaml.safe_dump(manifest(2, 300, 1000, export=False)), namespace=namespace)
        reached = training_past(cp, namespace, 20)
        cp.kubectl("delete", "pod", "robot-worker-1", "-n", namespace, "--wait=false")
        final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=600)

    metrics = json.loads((output / "robot" / "metrics.json").read_text())
    assert reached <= metrics["resumed_from_step"] < 300  # the step of the stop, not step 0
    assert [h["step"] for h in metrics["history"]] == list(range(1, 301))
    assert (final["restarts"], final["disruptions"], final["attempt"]) == (0, 1, 1)
