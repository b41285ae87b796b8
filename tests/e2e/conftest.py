"""e2e tier: the chart's operator pod and the jobs' pods as containers on real nodes
(tests/support/node.py), one cluster for the session."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.support.images import OPERATOR_IMAGE, TRAINER_IMAGE, ensure_images
from tests.support.jobs import volume
from tests.support.node import RealCluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "amxtune"
RELEASE_NS = "amxtune-system"
UID = 1000  # the trainer image's user, which the worker pods run as


@pytest.fixture(scope="session")
def real_cluster(avx2_cpu):
    """Two nodes, and a third whose pods see a CPU with AVX2 and nothing newer."""
    with RealCluster(ensure_images(), nodes=2, masked_cpu=avx2_cpu) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def operator_pod(real_cluster) -> dict:
    """`helm install` of the chart with the built images; the operator pod, Running."""
    cp = real_cluster.cp
    repository, tag = OPERATOR_IMAGE.rsplit(":", 1)
    cp.helm("install", "amxtune", str(CHART), "--namespace", RELEASE_NS, "--create-namespace",
            "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
            "--set", "image.pullPolicy=Never", "--set", f"trainerImage={TRAINER_IMAGE}",
            "--set", "hubEndpoint=", "--wait", "--timeout=5m", timeout=360)
    pods = cp.kubectl_json("get", "pods", "-n", RELEASE_NS)["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    yield pods[0]
    cp.helm("uninstall", "amxtune", "--namespace", RELEASE_NS, "--wait", timeout=180,
            check=False)


@pytest.fixture
def job_volumes(real_cluster, operator_pod, tmp_path):
    """A namespace with the robot concept's claim and a pre-bound output volume, as folders
    here; yields (namespace, output folder). Afterwards the pods' and the operator's logs are
    printed (pytest shows them when the test failed)."""
    cp = real_cluster.cp
    namespace = cp.create_namespace(f"e2e-{uuid.uuid4().hex[:6]}")
    data, output = tmp_path / "concepts", tmp_path / "output"
    shutil.copytree(ROOT / "examples" / "concepts" / "robot", data / "robot")
    output.mkdir()
    os.chown(output, UID, UID)  # hostPath volumes get no fsGroup
    volume(cp, namespace, "concepts", host_path=data)
    volume(cp, namespace, "robot-output", make_claim=False, host_path=output)
    try:
        yield namespace, output
    finally:
        for pod in cp.kubectl_json("get", "pods", "-n", namespace)["items"]:
            name = pod["metadata"]["name"]
            text = cp.kubectl("logs", name, "-n", namespace, check=False).stdout
            print(f"--- {name} ({pod['status'].get('phase')}):\n{text[-3000:]}")
        text = cp.kubectl("logs", operator_pod["metadata"]["name"], "-n", RELEASE_NS,
                          check=False).stdout
        print(f"--- operator:\n{text[-4000:]}")
        for name, tail in real_cluster.logs().items():
            print(f"--- {name}:\n{tail}")
        cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
