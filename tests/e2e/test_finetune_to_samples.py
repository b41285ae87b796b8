"""End to end on real nodes: FineTuneJobs really train, restart, export and render, with the
operator, worker and export pods as containers from the built images.

The chart's operator pod (helm install, its own ServiceAccount token and RBAC, the apiserver
through the `kubernetes` Service) runs the jobs; kubelets with containerd run their pods on two
nodes (tests/support/node.py). Two worker pods make a two-rank job that rendezvouses at the
rendered MASTER_ADDR, the headless Service's name, which cluster DNS resolves to worker 0.
The claims are hostPath volumes on folders of the test, so it reads the results directly.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml

from tests.support.controlplane import AMX_LABELS, WaitAborted
from tests.support.images import OPERATOR_IMAGE
from tests.support.jobs import describe, status, wait_phase
from tests.support.node import MASKED_NODE, NODE_LABEL

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
OUTPUT_MOUNT = Path("/output")  # where the pods see the output claim


def manifest(nodes: int, steps: int, checkpoint_every: int, export: bool,
             require_amx: bool = False, node_selector: dict | None = None) -> dict:
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
        "nodeSelector": node_selector or {NODE_LABEL: "true"},
        "requireAmx": require_amx,
    }
    doc["spec"]["runtime"] = {"ccl": {"workerCount": 0}}
    doc["spec"]["output"] = {"pvc": {"claimName": "robot-output", "create": {"size": "1Gi"}}}
    if export:
        doc["spec"]["export"]["numInferenceSteps"] = 4
    else:
        del doc["spec"]["export"]
    return doc


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


def pods(cp, namespace: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p
            for p in cp.kubectl_json("get", "pods", "-n", namespace)["items"]}


def test_helm_installed_operator_trains_on_two_real_nodes_exports_and_renders(
        real_cluster, operator_pod, job_volumes):
    """The operator as the chart installs it; two worker pods of one rank each on two nodes;
    the export pod; the samples on the output volume; `kubectl logs`; deletion."""
    cp = real_cluster.cp
    namespace, output = job_volumes
    assert operator_pod["spec"]["serviceAccountName"] == "amxtune"
    assert operator_pod["status"]["phase"] == "Running"

    cp.apply_yaml(yaml.safe_dump(manifest(2, 6, 1000, export=True)), namespace=namespace)
    final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=900)

    # one worker per node, each a container on its node
    running = pods(cp, namespace)
    workers = [p for name, p in running.items() if "-worker-" in name]
    assert sorted(p["spec"]["nodeName"] for p in workers) == ["real-0", "real-1"]
    results = output / "robot"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert (results / "learned_embeds.safetensors").stat().st_uid == 1000  # the pods' user
    # exported and rendered by the export pod, onto the output volume
    inference = cp.get("infj", "robot-export", namespace)["status"]
    assert inference["phase"] == "Succeeded" and inference["images"] == 1
    assert (results / "openvino" / "model_index.json").is_file()
    assert (results / "samples" / "grid.png").is_file()
    assert final["outputs"]["samples"] == inference["grid"]

    # `kubectl logs` reaches every pod's container through its node's kubelet
    logs = {name: cp.kubectl("logs", name, "-n", namespace).stdout for name in running}
    assert '"event": "started"' in logs["robot-worker-0"]
    assert all(text.strip() for text in logs.values()), logs
    assert any(name.startswith("robot-export") for name in logs), sorted(logs)
    operator_log = cp.kubectl("logs", operator_pod["metadata"]["name"], "-n",
                              operator_pod["metadata"]["namespace"]).stdout
    assert namespace in operator_log
    assert not [line for line in operator_log.splitlines() if "Forbidden" in line]

    # deleting the job removes its pods (owner references) and keeps the output claim
    cp.kubectl("delete", "ftj", "robot", "-n", namespace, "--wait=true", timeout=120)
    cp.wait_for(lambda: not pods(cp, namespace), timeout=120, what="the job's pods gone")
    assert cp.get("pvc", "robot-output", namespace) is not None


def test_finetunejob_survives_a_killed_worker_then_exports_and_renders(real_cluster,
                                                                       job_volumes):
    from amxtune_trainer.cpu import probe

    cp = real_cluster.cp
    namespace, output = job_volumes
    cp.apply_yaml(yaml.safe_dump(manifest(2, 300, 20, export=True)), namespace=namespace)
    checkpoints = output / "robot" / "checkpoints"
    cp.wait_for(lambda: checkpoints.is_dir() and any(checkpoints.iterdir()), timeout=300,
                what="a first checkpoint")
    assert pods(cp, namespace)["robot-worker-1"]["status"]["phase"] == "Running"
    real_cluster.kill(namespace, "robot-worker-1")  # the node lost the worker
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
    # the paths are the pods' own, on the output claim
    assert (output / Path(inference["imagePaths"][0]).relative_to(OUTPUT_MOUNT)).is_file()
    assert '"event": "progress"' in logs and '"event": "started"' in logs


def training_past(cp, namespace: str, step: int) -> int:
    """Wait until the job reports a step at or past `step`; that step."""
    return cp.wait_for(
        lambda: (status(cp, namespace, "robot").get("progress") or {}).get("step", 0) >= step
        and status(cp, namespace, "robot")["progress"]["step"], timeout=300,
        what=f"training past step {step}")


def test_suspending_saves_the_current_step_and_resuming_loses_nothing(real_cluster,
                                                                       job_volumes):
    """Suspend deletes the worker pods (as a drain or a preemption would): the kubelet's
    SIGTERM makes every rank end its step and rank 0 save it, so the resumed run redoes no
    step, although no periodic checkpoint was due (checkpointingSteps > maxTrainSteps)."""
    cp = real_cluster.cp
    namespace, output = job_volumes
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
        real_cluster, job_volumes):
    """One worker pod deleted (as a drain or an eviction does): its rank gets SIGTERM, the
    ranks agree to stop and rank 0 saves the current step; the operator restarts the whole
    group (WorkersLost, no restart counted) and it resumes from that step."""
    cp = real_cluster.cp
    namespace, output = job_volumes
    cp.apply_yaml(yaml.safe_dump(manifest(2, 300, 1000, export=False)), namespace=namespace)
    reached = training_past(cp, namespace, 20)
    cp.kubectl("delete", "pod", "robot-worker-1", "-n", namespace, "--wait=false")
    final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=600)

    metrics = json.loads((output / "robot" / "metrics.json").read_text())
    assert reached <= metrics["resumed_from_step"] < 300  # the step of the stop, not step 0
    assert [h["step"] for h in metrics["history"]] == list(range(1, 301))
    assert (final["restarts"], final["disruptions"], final["attempt"]) == (0, 1, 1)


def test_a_worker_on_a_node_without_amx_moves_to_another_node(real_cluster, job_volumes):
    """The masked node is labelled AMX but its pods see a CPU with AVX2 only (stale or wrong
    Node Feature Discovery labels); the worker stops at once and the job goes on on real-1,
    without spending a restart. On a machine without AMX real-1 lacks it too: then both are
    left and the job says it cannot be scheduled, and why."""
    from amxtune_trainer.cpu import probe

    cp = real_cluster.cp
    namespace, output = job_volumes
    bad, good = MASKED_NODE, "real-1"
    selector = "amxtune.io/test-amx"
    labels = [f"{key}={value}" for key, value in AMX_LABELS.items()] + [f"{selector}=true"]
    for node in (bad, good):
        cp.kubectl("label", "node", node, *labels, "--overwrite")
    try:
        cp.kubectl("cordon", good)  # the first attempt can only land on the bad node
        doc = manifest(1, 4, 2, export=False, require_amx=True,
                       node_selector={selector: "true"})
        doc["spec"]["backoffLimit"] = 0
        cp.apply_yaml(yaml.safe_dump(doc), namespace=namespace)
        wait_event(cp, namespace, "NodeLacksAmx")
        cp.kubectl("uncordon", good)
        if probe().amx:
            final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=600)
        else:
            final = cp.wait_for(
                lambda: (s := status(cp, namespace, "robot")).get("excludedNodes") == [bad, good]
                and "their CPUs lacked AMX" in s.get("message", "") and s,
                timeout=300, what="both nodes excluded")
    finally:
        cp.kubectl("uncordon", good, check=False)
        unlabel = [f"{key}-" for key in AMX_LABELS] + [f"{selector}-"]
        for node in (bad, good):
            cp.kubectl("label", "node", node, *unlabel, check=False)

    lacks = [e for e in events(cp, namespace) if e["reason"] == "NodeLacksAmx"]
    assert f"ran on node {bad}" in lacks[0]["message"]
    # the masked node's pods see an AVX2-only CPU whatever this machine is: an unmasked pod on
    # a CPU above AVX2 without AMX would also lack AMX, but would not show AVX2 alone
    assert ": AVX2) has no amx_bf16, amx_tile" in lacks[0]["message"], describe(
        cp, namespace, "robot")
    assert final["restarts"] == 0
    if probe().amx:
        assert final["excludedNodes"] == [bad] and final["attempt"] == 1
        assert final["trainer"]["node"] == good
        metrics = json.loads((output / "robot" / "metrics.json").read_text())
        assert metrics["steps"] == 4
    else:
        assert final["phase"] == "Running" and final["attempt"] == 2
        assert f"ran on node {good}" in lacks[1]["message"]


PROBE = """
import json, socket
seen = {"cluster": socket.gethostbyname("kubernetes.default.svc.cluster.local")}
try:
    seen["outside_name"] = socket.gethostbyname("pypi.org")
except OSError as exc:
    seen["outside_name"] = type(exc).__name__
try:
    socket.create_connection(("192.0.2.1", 443), timeout=3)
    seen["outside_address"] = "connected"
except OSError as exc:
    seen["outside_address"] = exc.strerror or type(exc).__name__
print(json.dumps(seen))
"""


def test_pods_reach_the_cluster_and_nothing_outside(real_cluster, job_volumes):
    """Cluster DNS answers for Services; outside names do not resolve and outside addresses
    have no route (a pod never sends a packet off this machine)."""
    cp = real_cluster.cp
    namespace, _ = job_volumes
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
           "spec": {"restartPolicy": "Never", "nodeSelector": {NODE_LABEL: "true"},
                    "containers": [{"name": "probe", "image": OPERATOR_IMAGE,
                                    "imagePullPolicy": "Never",
                                    "command": ["python3", "-c", PROBE]}]}}
    cp.apply_yaml(yaml.safe_dump(pod), namespace=namespace)
    cp.wait_for_jsonpath("pod/probe", "{.status.phase}", "Succeeded", namespace=namespace,
                         timeout=120)
    seen = json.loads(cp.kubectl("logs", "probe", "-n", namespace).stdout)
    assert seen["cluster"] == "10.96.0.1"
    assert seen["outside_name"] == "gaierror"
    assert seen["outside_address"] == "Network is unreachable"
