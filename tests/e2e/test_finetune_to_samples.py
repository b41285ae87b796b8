"""End to end: a FineTuneJob on the real control plane really trains, exports and renders.

The operator runs as in production; the worker and export pods are bound by the real scheduler
to nodes played by tests/support/local_kubelet.py, which runs them as local processes with the
tiny built-in model. Two worker pods on two nodes make a two-rank job that rendezvouses
through the rendered MASTER_ADDR (the headless Service's DNS name, mapped to loopback).
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.jobs import volume
from tests.support.local_kubelet import LOCAL_NODE_LABEL, LocalKubelet
from tests.support.operator import OperatorProcess, install_crds

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def manifest(port: int) -> dict:
    doc = copy.deepcopy(yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text()))
    doc["metadata"]["name"] = "robot"
    doc["spec"]["training"].update(maxTrainSteps=12, checkpointingSteps=6, loggingSteps=2)
    doc["spec"]["workers"] = {
        "nodes": 2,
        "ranksPerNode": 1,
        "resources": {"cpu": "1", "memory": "4Gi"},
        "nodeSelector": {LOCAL_NODE_LABEL: "true"},
    }
    doc["spec"]["runtime"] = {"ccl": {"workerCount": 0}, "masterPort": port}
    doc["spec"]["output"] = {"pvc": {"claimName": "robot-output", "create": {"size": "1Gi"}}}
    doc["spec"]["export"]["numInferenceSteps"] = 4
    return doc


def test_finetunejob_trains_exports_and_renders_samples(control_plane, namespace, tmp_path):
    cp = control_plane
    install_crds(cp)
    data, output = tmp_path / "concepts", tmp_path / "output"
    shutil.copytree(ROOT / "examples" / "concepts" / "robot", data / "robot")
    output.mkdir()
    volume(cp, namespace, "concepts", host_path=data)
    volume(cp, namespace, "robot-output", make_claim=False, host_path=output)
    suffix = uuid.uuid4().hex[:6]
    kubelet = LocalKubelet(
        cp, [f"local-{suffix}-0", f"local-{suffix}-1"], tmp_path / "kubelet"
    ).start()
    operator = OperatorProcess(cp, namespace).start()
    try:
        cp.apply_yaml(yaml.safe_dump(manifest(free_port())), namespace=namespace)
        try:
            cp.wait_for(
                lambda: (
                    (cp.get("ftj", "robot", namespace).get("status") or {}).get("phase")
                    in ("Succeeded", "Failed")
                ),
                timeout=900,
                interval=2,
                what="the FineTuneJob to finish",
            )
        finally:
            print("operator log:\n" + operator.log()[-4000:])
            for (ns, name), pod in kubelet.pods.items():
                print(f"--- {ns}/{name}:\n{pod.log_path.read_text(errors='replace')[-3000:]}")
            print("kubelet errors:", kubelet.errors)
        status = cp.get("ftj", "robot", namespace)["status"]
        assert status["phase"] == "Succeeded", status.get("message")
        # trained by two ranks, exported and rendered onto the output volume
        results = output / "robot"
        metrics = json.loads((results / "metrics.json").read_text())
        assert metrics["world_size"] == 2
        assert (results / "learned_embeds.safetensors").is_file()
        assert (results / "openvino" / "model_index.json").is_file()
        assert (results / "samples" / "grid.png").is_file()
        # progress and results came from the pods' logs through the apiserver
        assert status["progress"]["display"] == "12/12"
        inference = cp.get("infj", "robot-export", namespace)["status"]
        assert inference["phase"] == "Succeeded"
        assert inference["images"] == 1 and inference["secondsPerImage"] > 0
        # (the local kubelet maps /output to the volume's folder, so paths are local here)
        assert Path(inference["imagePaths"][0]).is_file()
        logs = cp.kubectl("logs", "robot-worker-0", "-n", namespace).stdout
        assert '"event": "progress"' in logs
    finally:
        operator.stop()
        kubelet.stop()
