"""End to end on real nodes: the chart's operator pod, worker pods and the export pod run as
containers from the images `make images` builds (tests/support/node.py: kubelet + containerd
+ CNI bridge per node, kube-proxy, CoreDNS), against the real control plane.

The operator runs in its image with the ServiceAccount token the apiserver issued to the pod,
so the chart's RBAC is what it gets; it reaches the apiserver through the `kubernetes`
Service. Two worker pods on two nodes rendezvous at the rendered MASTER_ADDR, which cluster
DNS resolves to worker 0's pod address.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_finetune_to_samples import manifest
from tests.support.controlplane import wait_for
from tests.support.images import OPERATOR_IMAGE, TRAINER_IMAGE, ensure_images
from tests.support.jobs import describe, volume, wait_phase
from tests.support.node import NODE_LABEL, RealCluster

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "amxtune"
RELEASE_NS = "amxtune-system"
UID = 1000  # the images' user


@pytest.fixture(scope="module")
def real_cluster():
    images = ensure_images()
    cluster = RealCluster(images, nodes=2)
    with cluster:
        yield cluster


def pods(cp, namespace: str) -> dict[str, dict]:
    listed = cp.kubectl_json("get", "pods", "-n", namespace)["items"]
    return {p["metadata"]["name"]: p for p in listed}


def test_helm_installed_operator_trains_on_two_real_nodes_exports_and_renders(
        real_cluster, tmp_path):
    cluster = real_cluster
    cp = cluster.cp
    namespace = cp.create_namespace("robots")
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    cp.helm("install", "amxtune", str(CHART), "--namespace", RELEASE_NS, "--create-namespace",
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never", "--set", f"trainerImage={TRAINER_IMAGE}",
            "--set", "hubEndpoint=", "--wait", "--timeout=5m", timeout=360)
    operator_pod = next(iter(pods(cp, RELEASE_NS).values()))
    assert operator_pod["spec"]["serviceAccountName"] == "amxtune"
    assert operator_pod["status"]["phase"] == "Running"

    # hostPath volumes get no fsGroup: the folder the workers write is the images' user's
    data, output = tmp_path / "concepts", tmp_path / "output"
    shutil.copytree(ROOT / "examples" / "concepts" / "robot", data / "robot")
    output.mkdir()
    os.chown(output, UID, UID)
    volume(cp, namespace, "concepts", host_path=data)
    volume(cp, namespace, "robot-output", make_claim=False, host_path=output)

    doc = manifest(2, 6, 1000, export=True)
    doc["spec"]["workers"]["nodeSelector"] = {NODE_LABEL: "true"}
    cp.apply_yaml(yaml.safe_dump(doc), namespace=namespace)
    try:
        final = wait_phase(cp, namespace, "Succeeded", name="robot", timeout=1500)
    except BaseException:
        print(describe(cp, namespace, "robot"))
        for name in pods(cp, namespace):
            print(f"--- {name}:\n"
                  + cp.kubectl("logs", name, "-n", namespace, check=False).stdout[-3000:])
        print("--- operator:\n" + cp.kubectl("logs", operator_pod["metadata"]["name"], "-n",
                                             RELEASE_NS, check=False).stdout[-4000:])
        for name, tail in cluster.logs().items():
            print(f"--- {name}:\n{tail}")
        raise

    # one worker per node, each a container on its own node
    running = pods(cp, namespace)
    workers = {n: p for n, p in running.items() if "-worker-" in n}
    assert sorted(p["spec"]["nodeName"] for p in workers.values()) == ["real-0", "real-1"]
    results = output / "robot"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 6
    assert (results / "learned_embeds.safetensors").stat().st_uid == UID
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
    operator_log = cp.kubectl("logs", operator_pod["metadata"]["name"], "-n", RELEASE_NS).stdout
    assert "robot" in operator_log
    assert not [line for line in operator_log.splitlines() if " 403" in line or "Forbidden" in line]

    # deleting the job removes its pods (owner references) and keeps the output claim
    cp.kubectl("delete", "ftj", "robot", "-n", namespace, "--wait=true", timeout=120)
    wait_for(lambda: not pods(cp, namespace), timeout=120, what="the job's pods gone")
    assert cp.get("pvc", "robot-output", namespace) is not None
    cp.helm("uninstall", "amxtune", "--namespace", RELEASE_NS, "--wait", timeout=180)
