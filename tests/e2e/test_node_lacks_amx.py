"""A worker on a node whose labels say AMX but whose CPU lacks it (stale or wrong Node Feature
Discovery labels): the job leaves that node without spending a restart.

This one test still runs its pods on tests/support/local_kubelet.py (a stand-in kubelet running
pods as local processes): the older CPU is the CPU mask (tests/support/cpumask.py), an
LD_PRELOAD library given to one node's pods only, which a real kubelet has no way to add.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_finetune_to_samples import events, manifest
from tests.support.controlplane import WaitAborted
from tests.support.jobs import describe, status, volume, wait_phase
from tests.support.local_kubelet import LOCAL_NODE_LABEL, LocalKubelet
from tests.support.operator import OperatorProcess, install_crds

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_cluster(cp, namespace, tmp_path, node_env=None, nodes=2):
    """Concepts and output volumes, `nodes` local nodes, and the operator as a process."""
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
        doc = manifest(1, 4, 2, export=False, require_amx=True,
                       node_selector={LOCAL_NODE_LABEL: "true"})
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
