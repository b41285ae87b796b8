"""The operator against a real control plane: CRDs, scheduling, restarts, export, GC.

kwok plays the kubelet: worker pods run until a test annotates them to succeed or fail
(tools/controlplane/kwok-stages.yaml). The operator runs as a real process.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
import yaml

from amxtune.controller.leader import LEASE_SECONDS
from tests.support.controlplane import AMX_LABEL, ControlPlane, KubectlError, free_port
from tests.support.jobs import (
    EXAMPLE,
    finish_all,
    job,
    reasons,
    running_workers,
    simulate,
    status,
    submit,
    wait_phase,
    worker_pods,
)
from tests.support.operator import OperatorProcess, install_crds

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane) -> ControlPlane:
    install_crds(control_plane)
    return control_plane


@pytest.fixture
def operator(crds: ControlPlane, namespace: str):
    process = OperatorProcess(crds, namespace).start()
    yield process
    process.stop()


def test_job_runs_on_amx_nodes_exports_and_becomes_ready(crds, operator, namespace):
    cp = crds
    submit(cp, namespace, job())
    pods = running_workers(cp, namespace, 3)
    amx_nodes = {
        n["metadata"]["name"]
        for n in cp.kubectl_json("get", "nodes", "-l", f"{AMX_LABEL}=true")["items"]
    }
    assert {p["spec"]["nodeName"] for p in pods} <= amx_nodes
    assert len({p["spec"]["nodeName"] for p in pods}) == 3  # one worker per node
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["OMP_NUM_THREADS"] == "13"  # 56 cores / 4 ranks - 1 oneCCL core
    assert env["MASTER_ADDR"] == f"dicoo-worker-0.dicoo-workers.{namespace}.svc.cluster.local"
    assert "libtcmalloc" in env["LD_PRELOAD"] and env["CCL_WORKER_COUNT"] == "1"
    assert pods[0]["status"]["qosClass"] == "Guaranteed"
    wait = cp.wait_for(
        lambda: status(cp, namespace).get("workers", {}).get("display") == "3/3",
        what="3/3 workers ready",
    )
    assert wait

    finish_all(cp, namespace, pods)
    exporting = wait_phase(cp, namespace, "Exporting")
    assert exporting["outputs"]["inferenceJob"] == "dicoo-export"
    infj = cp.get("infj", "dicoo-export", namespace)
    assert infj["metadata"]["ownerReferences"][0]["name"] == "dicoo"
    assert infj["spec"]["prompts"] == EXAMPLE["spec"]["export"]["prompts"]
    runner = cp.wait_for(lambda: cp.get("pod", "dicoo-export-runner", namespace), what="export pod")
    assert runner["spec"]["containers"][0]["image"] == "amxtune-trainer:test"
    simulate(cp, namespace, "dicoo-export-runner", "succeed")
    cp.kubectl("wait", "--for=condition=Ready", "ftj/dicoo", "-n", namespace, "--timeout=60s")
    final = status(cp, namespace)
    assert final["phase"] == "Succeeded"
    assert final["observedGeneration"] == 1
    assert {"WorkersCreated", "ExportStarted", "Succeeded"} <= set(reasons(cp, namespace))
    table = cp.kubectl("get", "ftj", "-n", namespace).stdout
    assert "Succeeded" in table and "3/3" not in table.splitlines()[0]
    header, row = (line.split() for line in
                   cp.kubectl("get", "ftj", "-n", namespace, "-o", "wide").stdout.splitlines())
    assert header[-2:] == ["RANKS", "BATCH"] and row[-2:] == ["12", "12"]  # 3 pods x 4, batch 1


def test_worker_failure_restarts_then_fails_after_backoff_limit(crds, operator, namespace):
    cp = crds
    submit(cp, namespace, job(backoffLimit=1))
    running_workers(cp, namespace, 3)
    simulate(cp, namespace, "dicoo-worker-1", "fail", code=1)
    cp.wait_for(lambda: status(cp, namespace).get("restarts") == 1, what="one restart")
    running_workers(cp, namespace, 3, attempt="1")
    simulate(cp, namespace, "dicoo-worker-2", "fail", code=137)
    failed = wait_phase(cp, namespace, "Failed")
    stalled = next(c for c in failed["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "BackoffLimitExceeded"
    assert "dicoo-worker-2 exited with code 137" in stalled["message"]
    events = reasons(cp, namespace)
    assert events.count("WorkerFailed") == 2 and events.count("Restarting") == 1
    cp.wait_for(
        lambda: all(
            p["status"]["phase"] == "Failed" or p["metadata"].get("deletionTimestamp")
            for p in worker_pods(cp, namespace)
        ),
        what="no worker left running",
    )


def test_a_node_whose_cpu_lacks_amx_is_avoided_without_spending_restarts(crds, operator,
                                                                         namespace):
    """A worker exits 3 (its CPU has no AMX, yet the node is labelled AMX): the real scheduler
    places the next attempt elsewhere, and no restart is counted. (ranksPerNode: auto, which
    the apiserver accepts and 8Gi holds one of: status.layout says so.)"""
    cp = crds
    submit(cp, namespace, job(backoffLimit=0, workers={
        "nodes": 2, "ranksPerNode": "auto", "resources": {"cpu": "8", "memory": "8Gi"}}))
    pods = running_workers(cp, namespace, 2)
    layout = status(cp, namespace)["layout"]
    assert (layout["ranksPerNode"], layout["worldSize"]) == (1, 2)
    assert "memory" in layout["reason"]
    bad = next(p for p in pods if p["metadata"]["name"] == "dicoo-worker-1")["spec"]["nodeName"]
    simulate(cp, namespace, "dicoo-worker-1", "fail", code=3)
    cp.wait_for(lambda: status(cp, namespace).get("attempt") == 1, what="a new attempt")
    current = status(cp, namespace)
    assert current["excludedNodes"] == [bad] and current["restarts"] == 0
    assert current["phase"] == "Running"
    pods = running_workers(cp, namespace, 2, attempt="1")
    assert bad not in {p["spec"]["nodeName"] for p in pods}
    events = cp.events_for(kind="FineTuneJob", name="dicoo", namespace=namespace)
    lacks = [e for e in events if e["reason"] == "NodeLacksAmx"]
    assert len(lacks) == 1 and f"node {bad}" in lacks[0]["message"]
    # A second bad node leaves one AMX node for two workers: unschedulable, and it says why.
    second = pods[0]["spec"]["nodeName"]
    simulate(cp, namespace, pods[0]["metadata"]["name"], "fail", code=3)
    cp.wait_for(
        lambda: any(c["type"] == "WorkersReady" and c["reason"] == "Unschedulable"
                    for c in status(cp, namespace).get("conditions", [])),
        what="Unschedulable once two AMX nodes are excluded",
    )
    current = status(cp, namespace)
    assert sorted(current["excludedNodes"]) == sorted([bad, second])
    assert "their CPUs lacked AMX" in current["message"] and current["restarts"] == 0


def test_no_amx_capacity_is_reported_then_times_out(crds, operator, namespace):
    cp = crds
    submit(
        cp,
        namespace,
        job(
            workers={
                "nodes": 4,
                "ranksPerNode": 4,
                "resources": {"cpu": "56", "memory": "64Gi"},
                "schedulingTimeoutSeconds": 15,
            }
        ),
    )
    cp.wait_for(
        lambda: any(
            c["type"] == "WorkersReady" and c["reason"] == "Unschedulable"
            for c in status(cp, namespace).get("conditions", [])
        ),
        what="Unschedulable condition",
    )
    condition = next(c for c in status(cp, namespace)["conditions"] if c["type"] == "WorkersReady")
    assert "node affinity" in condition["message"] or "didn't match" in condition["message"]
    assert "Unschedulable" in reasons(cp, namespace)
    failed = wait_phase(cp, namespace, "Failed", timeout=90)
    assert "schedulingTimeoutSeconds=15" in failed["message"]


def test_operator_restart_mid_job_creates_nothing_twice(crds, operator, namespace):
    cp = crds
    submit(cp, namespace, job())
    running_workers(cp, namespace, 3)
    before = {p["metadata"]["uid"] for p in worker_pods(cp, namespace)}
    operator.kill()
    operator.start()
    cp.wait_for(
        lambda: status(cp, namespace).get("workers", {}).get("display") == "3/3",
        what="operator back and reporting",
    )
    finish_all(cp, namespace, worker_pods(cp, namespace))
    wait_phase(cp, namespace, "Exporting")
    assert {p["metadata"]["uid"] for p in worker_pods(cp, namespace)} == before
    events = reasons(cp, namespace)
    assert events.count("WorkersCreated") == 1 and events.count("ExportStarted") == 1
    assert len(cp.kubectl_json("get", "infj", "-n", namespace)["items"]) == 1


def lease_holder(cp, namespace: str) -> str | None:
    lease = cp.get("lease", "amxtune-operator", namespace) or {}
    return (lease.get("spec") or {}).get("holderIdentity")


def test_two_replicas_one_leads_and_the_other_takes_over_when_it_is_killed(crds, namespace):
    cp = crds

    def replica(name: str) -> OperatorProcess:
        return OperatorProcess(
            cp, namespace, extra_env={"POD_NAME": name}, log_name=f"{namespace}-{name}",
            flags=["--liveness", "", "--metrics-port", "0", "--log-format", "plain",
                   "--leader-election-namespace", namespace],
        ).start()

    first = replica("replica-a")
    cp.wait_for(lambda: lease_holder(cp, namespace) == "replica-a", what="replica-a leads")
    second = replica("replica-b")
    third = None
    try:
        submit(cp, namespace, job())
        running_workers(cp, namespace, 3)
        before = {p["metadata"]["uid"] for p in worker_pods(cp, namespace)}
        assert lease_holder(cp, namespace) == "replica-a"
        assert "reconciling with" not in second.log()  # the follower only watches
        first.kill()
        cp.wait_for(lambda: lease_holder(cp, namespace) == "replica-b", timeout=60,
                    what="replica-b takes the Lease over")
        finish_all(cp, namespace, worker_pods(cp, namespace))
        wait_phase(cp, namespace, "Exporting")
        assert {p["metadata"]["uid"] for p in worker_pods(cp, namespace)} == before
        events = reasons(cp, namespace)
        assert events.count("WorkersCreated") == 1 and events.count("ExportStarted") == 1
        assert "ExportStarted" in second.log()
        third = replica("replica-c")
        cp.wait_for(lambda: "campaigns for the Lease" in third.log(), what="replica-c up")
        stopped = time.monotonic()
        second.stop()  # SIGTERM, as a rolling update sends: the Lease is handed over at once
        cp.wait_for(lambda: lease_holder(cp, namespace) == "replica-c", timeout=60,
                    what="replica-c takes the released Lease")
        assert time.monotonic() - stopped < LEASE_SECONDS, "the Lease ran out instead"
        assert "released the Lease" in second.log()
    finally:
        first.stop()
        second.stop()
        if third is not None:
            third.stop()


def test_a_deleted_worker_restarts_the_group_without_spending_a_restart(crds, operator,
                                                                         namespace):
    cp = crds
    submit(cp, namespace, job(backoffLimit=0))
    running_workers(cp, namespace, 3)
    cp.kubectl("delete", "pod", "dicoo-worker-2", "-n", namespace, "--wait=false")
    workers = running_workers(cp, namespace, 3, attempt="1")
    final = status(cp, namespace)
    assert (final["phase"], final["restarts"], final["disruptions"]) == ("Running", 0, 1)
    assert "WorkersLost" in reasons(cp, namespace)
    finish_all(cp, namespace, workers)
    wait_phase(cp, namespace, "Exporting")


def test_suspend_then_resume(crds, operator, namespace):
    cp = crds
    submit(cp, namespace, job())
    running_workers(cp, namespace, 3)
    cp.kubectl(
        "patch", "ftj", "dicoo", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}'
    )
    wait_phase(cp, namespace, "Suspended")
    cp.wait_for(lambda: not worker_pods(cp, namespace), what="workers deleted")
    assert cp.get("configmap", "dicoo-config", namespace) is not None
    cp.kubectl(
        "patch", "ftj", "dicoo", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    running_workers(cp, namespace, 3)
    assert status(cp, namespace)["phase"] == "Running"
    assert {"Suspended", "Resumed"} <= set(reasons(cp, namespace))


def test_delete_removes_children_and_keeps_the_output_volume(crds, operator, namespace):
    cp = crds
    submit(cp, namespace, job())
    running_workers(cp, namespace, 3)
    cp.delete("ftj", "dicoo", namespace)
    cp.wait_for(
        lambda: (
            not worker_pods(cp, namespace)
            and cp.get("service", "dicoo-workers", namespace) is None
            and cp.get("configmap", "dicoo-config", namespace) is None
        ),
        timeout=60,
        what="garbage collection of pods, service and config map",
    )
    assert cp.get("pvc", "dicoo-output", namespace) is not None


def wait_stalled(cp: ControlPlane, namespace: str, reason: str) -> dict:
    """The job's Stalled condition, once it is True with `reason`."""

    def stalled() -> dict | None:
        conditions = status(cp, namespace).get("conditions", [])
        return next(
            (c for c in conditions
             if c["type"] == "Stalled" and c["status"] == "True" and c["reason"] == reason),
            None,
        )

    return cp.wait_for(stalled, what=f"Stalled condition with reason {reason}")


def test_missing_secret_blocks_and_creates_no_pods(crds, operator, namespace):
    cp = crds
    doc = job()
    doc["spec"]["model"] = {"name": "org/gated-model", "tokenSecretRef": {"name": "hf-token"}}
    submit(cp, namespace, doc)
    stalled = wait_stalled(cp, namespace, "SecretNotFound")
    assert "hf-token" in stalled["message"]
    assert worker_pods(cp, namespace) == []
    cp.kubectl(
        "create",
        "secret",
        "generic",
        "hf-token",
        "-n",
        namespace,
        "--from-literal=token=hf_not_a_real_token",
    )
    running_workers(cp, namespace, 3)
    assert "hf_not_a_real_token" not in operator.log()
    assert "hf_not_a_real_token" not in json.dumps(
        cp.events_for(kind="FineTuneJob", name="dicoo", namespace=namespace)
    )


def refuse_pods_of(cp: ControlPlane, namespace: str, message: str) -> str:
    """A ValidatingAdmissionPolicy, as a cluster admin writes them (memory caps, required
    labels, ...): the apiserver refuses every pod created in `namespace` with `message`."""
    name = f"refuse-pods-{namespace}"[:63]
    cp.apply_yaml(yaml.safe_dump_all([
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": name},
         "spec": {"failurePolicy": "Fail",
                  "matchConstraints": {"resourceRules": [{
                      "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                      "resources": ["pods"]}]},
                  "validations": [{"expression": "false", "message": message,
                                   "reason": "Invalid"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1",
         "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name},
         "spec": {"policyName": name, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {
                      "kubernetes.io/metadata.name": namespace}}}}},
    ]))
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"},
             "spec": {"containers": [{"name": "c", "image": "x"}]}}

    def refusing() -> bool:  # the policy takes a moment to take effect
        try:
            cp.apply_yaml(yaml.safe_dump(probe), namespace=namespace)
        except KubectlError as error:
            return message in error.stderr
        cp.kubectl("delete", "pod", "probe", "-n", namespace, "--wait=false")
        return False

    cp.wait_for(refusing, what="the admission policy to refuse pods")
    return name


def test_a_pod_the_apiserver_refuses_fails_the_job_at_once_with_its_message(crds, operator,
                                                                            namespace):
    """Pods the apiserver refuses (here an admission policy; also anything the CRD cannot
    check, such as node-selector keys) fail the job at once with the apiserver's message,
    instead of a silent retry loop."""
    cp = crds
    message = "worker pods need a memory limit of at most 8Gi in this namespace"
    policy = refuse_pods_of(cp, namespace, message)
    try:
        submit(cp, namespace, job())
        failed = wait_phase(cp, namespace, "Failed")
    finally:
        cp.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy",
                   policy)
    stalled = next(c for c in failed["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ObjectRefused"
    assert "the API server refused Pod dicoo-worker-" in stalled["message"]
    assert message in stalled["message"]
    assert "Failed" in reasons(cp, namespace)
    assert worker_pods(cp, namespace) == []


def test_a_model_the_hub_does_not_know_blocks_and_creates_no_pods(crds, operator, namespace):
    cp = crds
    doc = job()
    doc["spec"]["model"] = {"name": "stable-diffusion-v1-5/no-such-model"}
    submit(cp, namespace, doc)
    stalled = wait_stalled(cp, namespace, "ModelNotFound")
    assert "spec.model.name" in stalled["message"] and "no-such-model" in stalled["message"]
    assert worker_pods(cp, namespace) == []
    events = cp.events_for(kind="FineTuneJob", name="dicoo", namespace=namespace)
    assert any(e["reason"] == "ModelNotFound" for e in events)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"workers": {"nodes": 0}}, "spec.workers.nodes"),
        ({"training": {"resolution": 500}}, "spec.training.resolution"),
        ({"export": {"prompts": ["a", "b", "c"], "openvino": {"batchSize": 2}}}, "batch size"),
        ({"model": {"name": "tiny", "pvc": {"claimName": "m"}}}, "set exactly one of name and pvc"),
        ({"training": {"lrScheduler": "warp"}}, "spec.training.lrScheduler"),
        ({"textualInversion": {"initializerToken": "toy"}}, "placeholderToken"),
        ({"workers": {"resources": {"cpu": "lots"}}}, None),
    ],
)
def test_invalid_manifests_are_rejected_by_the_apiserver(crds, namespace, change, expected):
    doc = job()
    doc["spec"].update(change)
    with pytest.raises(KubectlError) as info:
        crds.apply_yaml(yaml.safe_dump(doc), namespace=namespace)
    if expected:
        assert expected in info.value.stderr
    assert crds.get("ftj", "dicoo", namespace) is None


def test_training_options_cannot_change_once_started(crds, operator, namespace):
    cp = crds
    submit(cp, namespace, job())
    running_workers(cp, namespace, 3)
    with pytest.raises(KubectlError) as info:
        cp.kubectl(
            "patch",
            "ftj",
            "dicoo",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"spec":{"training":{"maxTrainSteps":999}}}',
        )
    assert "spec.training cannot change once the job has started" in info.value.stderr
    # nor where the results go, how the pods run, or what the export renders: a retry would
    # mount the new claim while trainer.json still names the old path
    for body, path in (('{"spec":{"output":{"path":"elsewhere"}}}', "output"),
                       ('{"spec":{"runtime":{"masterPort":29600}}}', "runtime"),
                       ('{"spec":{"export":{"prompts":["a new prompt"]}}}', "export")):
        with pytest.raises(KubectlError) as info:
            cp.kubectl("patch", "ftj", "dicoo", "-n", namespace, "--type=merge", "-p", body)
        assert f"spec.{path} cannot change once the job has started" in info.value.stderr
    cp.kubectl(
        "patch",
        "ftj",
        "dicoo",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"backoffLimit":5}}',
    )  # run-control fields stay editable


def test_a_running_lora_job_takes_status_and_run_control_edits_but_not_lora_edits(
        crds, operator, namespace):
    cp = crds
    doc = job()
    doc["spec"]["method"] = "lora"
    doc["spec"]["lora"] = {"rank": 4, "instancePrompt": "a photo of sks toy"}
    del doc["spec"]["textualInversion"]
    submit(cp, namespace, doc)
    running_workers(cp, namespace, 3)
    # the operator's status writes after Pending pass the immutability rules
    cp.wait_for(lambda: status(cp, namespace).get("workers", {}).get("display") == "3/3",
                what="status written by the operator after the job left Pending")

    def patch(body: str):
        return cp.kubectl("patch", "ftj", "dicoo", "-n", namespace, "--type=merge", "-p", body)

    patch('{"spec":{"backoffLimit":5}}')
    with pytest.raises(KubectlError) as info:
        patch('{"spec":{"lora":{"rank":8}}}')
    assert "spec.lora cannot change once the job has started" in info.value.stderr
    with pytest.raises(KubectlError) as info:
        patch('{"spec":{"textualInversion":{"placeholderToken":"<x>","initializerToken":"y"}}}')
    assert "spec.textualInversion" in info.value.stderr


def test_reapplying_the_same_manifest_shows_no_drift(crds, operator, namespace):
    cp = crds
    doc = job()
    submit(cp, namespace, doc, server_side=True)
    running_workers(cp, namespace, 3)
    cp.wait_for(
        lambda: status(cp, namespace).get("workers", {}).get("display") == "3/3",
        what="status written by the operator",
    )
    generation = cp.get("ftj", "dicoo", namespace)["metadata"]["generation"]
    text = yaml.safe_dump(doc)
    diff = cp.kubectl("diff", "--server-side", "-n", namespace, "-f", "-", input=text, check=False)
    assert diff.returncode == 0, diff.stdout
    cp.apply_yaml(text, namespace=namespace, server_side=True)
    after = cp.get("ftj", "dicoo", namespace)
    assert after["metadata"]["generation"] == generation
    assert not after["metadata"].get("finalizers")
    assert not [k for k in after["metadata"].get("annotations", {}) if "kopf" in k]



def test_operator_serves_liveness_metrics_and_json_logs(crds, namespace):
    cp = crds
    health, metrics = free_port(), free_port()
    process = OperatorProcess(
        cp,
        namespace,
        flags=[
            "--liveness",
            f"http://127.0.0.1:{health}/healthz",
            "--metrics-port",
            str(metrics),
            "--log-format",
            "json",
        ],
    ).start()
    try:
        submit(cp, namespace, job())
        running_workers(cp, namespace, 3)

        def get(url: str) -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()

        cp.wait_for(lambda: get(f"http://127.0.0.1:{health}/healthz"), what="liveness")
        text = cp.wait_for(
            lambda: (
                (t := get(f"http://127.0.0.1:{metrics}/metrics"))
                and 'amxtune_jobs{kind="FineTuneJob",phase="Running"} 1.0' in t
                and t
            ),
            what="jobs-by-phase metric",
        )
        assert "amxtune_reconcile_seconds_count" in text
        records = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
        assert any("WorkersCreated" in r.get("message", "") for r in records)
    finally:
        process.stop()
