"""The operator SIGKILLed at ten points of a job's life and started again: every job finishes,
nothing is created twice and no restart is counted twice.

Each case runs one job through its whole life (start, a failed worker and the restart of the
group, training done, the InferenceJob and its export pod) with an operator that kills itself
right after one exact API request (tests/support/killed_operator.py); a supervisor starts a
plain operator as soon as it is gone. Cases run a few at a time, each in its own namespace.
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.controlplane import ControlPlane
from tests.support.jobs import job, reasons, running_workers, simulate, submit, wait_phase
from tests.support.operator import OperatorProcess, install_crds

pytestmark = pytest.mark.cluster

# (method, path pattern, n): killed right after the n-th such request was answered
KILL_POINTS = {
    "after the ConfigMap": ("POST", r"/configmaps$", 1),
    "after the Service": ("POST", r"/services$", 1),
    "between the worker pods": ("POST", r"/pods$", 1),
    "after the first status write": ("PATCH", r"/finetunejobs/[^/]+/status$", 1),
    "after the first Event": ("POST", r"/events$", 1),
    "after a worker failed, stopping the others": ("DELETE", r"/pods/", 1),
    "between the restarted worker pods": ("POST", r"/pods$", 3),
    "just after creating the InferenceJob": ("POST", r"/inferencejobs$", 1),
    "after the export pod": ("POST", r"/pods$", 5),
    "after the InferenceJob's first status write": ("PATCH", r"/inferencejobs/[^/]+/status$", 1),
}
TIMEOUT = 180


class Supervisor:
    """Starts a plain operator as soon as the killed one is gone (as a Deployment would)."""

    def __init__(self, cp: ControlPlane, namespace: str, kill_after: str) -> None:
        self.cp, self.namespace = cp, namespace
        self.first = OperatorProcess(cp, namespace, module="tests.support.killed_operator",
                                     extra_env={"AMXTUNE_TEST_KILL_AFTER": kill_after},
                                     log_name=f"{namespace}-killed")
        self.second: OperatorProcess | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Supervisor:
        self.first.start()
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.stopping.wait(0.3):
            if self.second is None and self.first.process.poll() is not None:
                self.second = OperatorProcess(self.cp, self.namespace,
                                              log_name=f"{self.namespace}-restarted").start()

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        for process in (self.first, self.second):
            if process is not None:
                process.stop()


def life_of_a_job(cp: ControlPlane, namespace: str) -> dict:
    doc = job(backoffLimit=2)
    doc["spec"]["workers"] = {"nodes": 2, "ranksPerNode": 1,
                              "resources": {"cpu": "2", "memory": "1Gi"}}
    submit(cp, namespace, doc)
    running_workers(cp, namespace, 2, timeout=TIMEOUT)
    simulate(cp, namespace, "dicoo-worker-1", "fail", code=1)
    for pod in reversed(running_workers(cp, namespace, 2, attempt="1", timeout=TIMEOUT)):
        simulate(cp, namespace, pod["metadata"]["name"], "succeed")
    wait_phase(cp, namespace, "Exporting", timeout=TIMEOUT)
    cp.wait_for(lambda: cp.get("pod", "dicoo-export-runner", namespace), timeout=TIMEOUT,
                what="export pod")
    simulate(cp, namespace, "dicoo-export-runner", "succeed")
    return wait_phase(cp, namespace, "Succeeded", timeout=TIMEOUT)


def count(cp: ControlPlane, kind: str, namespace: str) -> int:
    items = cp.kubectl_json("get", kind, "-n", namespace, "-l", "amxtune.io/job")["items"]
    return len(items)


def run_case(cp: ControlPlane, point: str) -> str:
    method, pattern, n = KILL_POINTS[point]
    namespace = f"killed-{uuid.uuid4().hex[:8]}"
    cp.create_namespace(namespace)
    with Supervisor(cp, namespace, f"{method} {pattern} {n}") as supervisor:
        try:
            final = life_of_a_job(cp, namespace)
        except Exception as error:  # reported with the case's name
            return f"{point}: {type(error).__name__}: {error}"
        killed = "killing the operator after" in supervisor.first.log()
    problems = []
    if not killed or supervisor.second is None:
        problems.append("the operator was never killed")
    if (final.get("restarts"), final.get("attempt")) != (1, 1):
        problems.append(f"restarts {final.get('restarts')}, attempt {final.get('attempt')}")
    objects = {kind: count(cp, kind, namespace) for kind in ("configmaps", "services")}
    objects["inferencejobs"] = len(cp.kubectl_json("get", "infj", "-n", namespace)["items"])
    # the FineTuneJob's and the InferenceJob's ConfigMaps
    if objects != {"configmaps": 2, "services": 1, "inferencejobs": 1}:
        problems.append(f"objects {objects}")
    events = reasons(cp, namespace)
    if events.count("Restarting") > 1 or events.count("WorkersCreated") > 2:
        problems.append(f"events {events}")
    cp.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    return f"{point}: " + ("; ".join(problems) if problems else "ok")


def test_killed_at_ten_points_every_job_finishes_and_nothing_is_done_twice(control_plane):
    install_crds(control_plane)
    with ThreadPoolExecutor(max_workers=5) as pool:
        results = list(pool.map(lambda point: run_case(control_plane, point), KILL_POINTS))
    print("\n" + "\n".join(results))
    assert all(result.endswith(": ok") for result in results), results
