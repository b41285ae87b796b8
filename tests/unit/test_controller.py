"""The reconcilers' decisions, with an in-memory API in place of the cluster.

The cluster tier runs the same controllers against a real kube-apiserver; these tests pin the
state machine (restarts, backoff, suspend, export, blocked starts) quickly and exactly.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from amxtune import names
from amxtune.controller.finetunejob import FineTuneJobController
from amxtune.controller.inferencejob import InferenceJobController
from amxtune.controller.kube import Refused
from amxtune.settings import Settings
from tests.support.hub import shared_hub

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


class FakeKube:
    """Objects by (kind, namespace, name); records status patches and events."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.events: list[tuple[str, str, str, str]] = []
        self.logs: dict[str, str] = {}
        self.creates = 0
        self.refuse: dict[str, str] = {}  # kind -> the apiserver's message

    def put(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta.setdefault("namespace", "ns")
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return obj

    def get_job(self, kind, namespace, name):
        return copy.deepcopy(self.objects.get((kind, namespace, name)))

    def list_jobs(self, kind, namespace):
        return [copy.deepcopy(o) for (k, ns, _), o in self.objects.items() if k == kind]

    def list_pods(self, namespace, job, kind):
        return [
            copy.deepcopy(o)
            for (k, ns, _), o in self.objects.items()
            if k == "Pod"
            and ns == namespace
            and o["metadata"]["labels"].get(names.JOB_LABEL) == job
            and o["metadata"]["labels"].get(names.KIND_LABEL) == kind.lower()
        ]

    def read(self, kind, namespace, name):
        found = self.objects.get((kind, namespace, name))
        if found is not None and kind == "Secret":
            return {"metadata": found["metadata"], "keys": sorted(found.get("data", {}))}
        return copy.deepcopy(found)

    def log_tail(self, namespace, pod, lines=20):
        return "\n".join(self.logs.get(pod, "").splitlines()[-lines:])

    def log_head(self, namespace, pod, limit_bytes=65536):
        return self.logs.get(pod, "")[:limit_bytes]

    def create(self, obj):
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if key in self.objects:
            return False
        if obj["kind"] in self.refuse:  # as the apiserver answers an invalid object
            body = json.dumps({"message": self.refuse[obj["kind"]]}).encode()
            raise Refused(obj, ApiException(status=422, reason="Unprocessable Entity",
                                            body=body))
        self.creates += 1
        self.put(obj)
        return True

    def delete(self, kind, namespace, name):
        self.objects.pop((kind, namespace, name), None)

    def patch_status(self, kind, namespace, name, status):
        """A JSON merge patch (RFC 7386), as the apiserver applies it: keys it does not name
        stay, null removes."""
        from tests.support.malformed import merge

        body = self.objects[(kind, namespace, name)]
        body["status"] = merge(body.get("status") or {}, status)

    def event(self, obj, type_, reason, message):
        self.events.append((obj["metadata"]["name"], type_, reason, message))

    # --- what kubelet / scheduler would do -------------------------------------------------

    def pods(self, job="dicoo"):
        return sorted(
            (
                o
                for (k, _, _), o in self.objects.items()
                if k == "Pod" and o["metadata"]["labels"][names.JOB_LABEL] == job
            ),
            key=lambda p: p["metadata"]["name"],
        )

    def set_pod(self, name, phase, exit_code=None, ready=True, node=None, finished_at=None):
        pod = self.objects[("Pod", "ns", name)]
        if node is not None:
            pod["spec"]["nodeName"] = node
        status = {"phase": phase, "containerStatuses": [{"name": "trainer", "ready": ready}]}
        if exit_code is not None:
            status["containerStatuses"][0]["state"] = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Error" if exit_code else "Completed",
                }
            }
            if finished_at is not None:
                status["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = (
                    finished_at.strftime("%Y-%m-%dT%H:%M:%SZ"))
        pod["status"] = status

    def unschedulable(self, name, message):
        self.objects[("Pod", "ns", name)]["status"] = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                }
            ],
        }

    def status(self, kind="FineTuneJob", name="dicoo"):
        return self.objects[(kind, "ns", name)].get("status", {})

    def reasons(self):
        return [e[2] for e in self.events]


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def example(**spec_changes) -> dict:
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    doc["metadata"]["namespace"] = "ns"
    doc["spec"]["model"] = {"name": "tiny"}
    doc["spec"]["workers"] = {"nodes": 2, "ranksPerNode": 1, "resources": {"cpu": "4"}}
    doc["spec"].update(spec_changes)
    return doc


@pytest.fixture
def world():
    kube, clock = FakeKube(), Clock()
    kube.put({"kind": "PersistentVolumeClaim", "metadata": {"name": "concepts", "namespace": "ns"}})
    settings = Settings(progress_interval_seconds=5, hub_endpoint=shared_hub().url)
    return (
        kube,
        clock,
        FineTuneJobController(kube, settings, clock),
        InferenceJobController(kube, settings, clock),
    )


def test_start_creates_shared_objects_and_one_pod_per_node(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    assert [p["metadata"]["name"] for p in kube.pods()] == ["dicoo-worker-0", "dicoo-worker-1"]
    assert ("ConfigMap", "ns", "dicoo-config") in kube.objects
    assert ("Service", "ns", "dicoo-workers") in kube.objects
    assert ("PersistentVolumeClaim", "ns", "dicoo-output") in kube.objects
    status = kube.status()
    assert status["phase"] == "Running"
    assert status["workers"] == {"ready": 0, "total": 2, "display": "0/2"}
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Stalled": "False",
        "WorkersReady": "False",
        "Ready": "False",
        "Reconciling": "True",
    }
    assert kube.reasons() == ["OutputVolumeCreated", "WorkersCreated"]


def test_auto_ranks_are_decided_at_start_and_shown_in_status(world):
    kube, _clock, ftj, _ = world
    doc = example()
    doc["spec"]["workers"] = {"nodes": 2, "ranksPerNode": "auto", "resources": {"cpu": "4"}}
    doc["spec"]["runtime"] = {"ccl": {"workerCount": 1}}
    doc["spec"]["training"].update(trainBatchSize=2, gradientAccumulationSteps=1)
    kube.put(doc)
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["layout"] == {
        "ranksPerNode": 2, "threadsPerRank": 1, "cclWorkersPerRank": 1, "worldSize": 4,
        "globalBatchSize": 8, "reason": "auto: one rank per 2 cores (compute and oneCCL) of 4",
    }
    for pod in kube.pods():
        assert "--nproc-per-node=2" in pod["spec"]["containers"][0]["command"]
    created = [e[3] for e in kube.events if e[2] == "WorkersCreated"]
    assert created and created[0].endswith("2 x 2 ranks")


def test_reconciling_again_creates_nothing_twice(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    creates = kube.creates
    events = len(kube.events)
    for _ in range(3):
        ftj.reconcile("ns", "dicoo")
    assert kube.creates == creates
    assert len(kube.events) == events


def test_progress_comes_from_rank_0_json_lines(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    for pod in kube.pods():
        kube.set_pod(pod["metadata"]["name"], "Running")
    kube.logs["dicoo-worker-0"] = "\n".join(
        [
            "loading model",
            json.dumps(
                {
                    "event": "progress",
                    "step": 10,
                    "max_steps": 200,
                    "loss": 0.25,
                    "lr": 0.002,
                    "samples_per_second": 3.5,
                    "eta_seconds": 54.0,
                }
            ),
            json.dumps(
                {
                    "event": "progress",
                    "step": 120,
                    "max_steps": 200,
                    "loss": 0.112,
                    "lr": 0.002,
                    "samples_per_second": 9.8,
                    "eta_seconds": 8.2,
                }
            ),
            "some warning",
        ]
    )
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["progress"]["display"] == "120/200"
    assert status["progress"]["loss"] == pytest.approx(0.112)
    assert status["progress"]["samplesPerSecond"] == pytest.approx(9.8)
    assert status["workers"]["display"] == "2/2"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Training"] == "True"


def test_a_failed_worker_restarts_all_then_fails_after_backoff_limit(world):
    kube, _clock, ftj, _ = world
    kube.put(example(backoffLimit=1))
    ftj.reconcile("ns", "dicoo")
    kube.set_pod("dicoo-worker-1", "Failed", exit_code=137)
    kube.logs["dicoo-worker-1"] = "step 3\nRuntimeError: connection reset by peer"
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["restarts"] == 1
    assert "Restarting" in kube.reasons() and "WorkerFailed" in kube.reasons()
    failed_event = next(e for e in kube.events if e[2] == "WorkerFailed")
    assert "exited with code 137" in failed_event[3] and "connection reset" in failed_event[3]
    # the remaining worker was deleted with the failed one's attempt; new attempt created next
    ftj.reconcile("ns", "dicoo")
    ftj.reconcile("ns", "dicoo")
    pods = kube.pods()
    assert {p["metadata"]["labels"][names.ATTEMPT_LABEL] for p in pods} == {"1"}
    assert len(pods) == 2
    kube.set_pod("dicoo-worker-0", "Failed", exit_code=1)
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Failed"
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "BackoffLimitExceeded"
    ftj.reconcile("ns", "dicoo")  # the status first, then the others stop
    assert kube.pods() == [p for p in kube.pods() if p["status"]["phase"] == "Failed"]


def test_a_trainer_input_error_fails_at_once_without_restarts(world):
    kube, _clock, ftj, _ = world
    kube.put(example(backoffLimit=3))
    ftj.reconcile("ns", "dicoo")
    kube.set_pod("dicoo-worker-0", "Failed", exit_code=2)
    kube.logs["dicoo-worker-0"] = (
        "amxtune-train textual-inversion: error: placeholder token 'toy' is already in the "
        "vocabulary; choose a new token such as '<toy>'\n"
        "amxtune-train launch: rank 0 exited with code 2"
    )
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Failed" and status.get("restarts", 0) == 0
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "InvalidInput"
    assert "placeholder token 'toy' is already in the vocabulary" in stalled["message"]


def test_a_failed_rank_is_quoted_by_its_one_line_not_the_last_lines(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    kube.set_pod("dicoo-worker-1", "Failed", exit_code=1)
    kube.logs["dicoo-worker-1"] = "\n".join([
        "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
        "RuntimeError: boom",
        "amxtune-train textual-inversion: rank 1 failed: RuntimeError: boom (traceback above)",
        "amxtune-train launch: rank 1 exited with code 1",
    ])
    ftj.reconcile("ns", "dicoo")
    failed = next(e for e in kube.events if e[2] == "WorkerFailed")
    assert failed[3] == ("dicoo-worker-1 exited with code 1, Error: amxtune-train "
                         "textual-inversion: rank 1 failed: RuntimeError: boom (traceback above)")
    assert kube.status()["restarts"] == 1 and kube.status()["attempt"] == 1


def test_a_node_without_amx_is_left_without_spending_a_restart(world):
    kube, _clock, ftj, _ = world
    kube.put(example(backoffLimit=0))
    ftj.reconcile("ns", "dicoo")
    kube.set_pod("dicoo-worker-0", "Running", node="amx-0")
    kube.set_pod("dicoo-worker-1", "Failed", exit_code=3, node="amx-1")
    kube.logs["dicoo-worker-1"] = (
        "amxtune-train textual-inversion: node lacks AMX: this CPU (AMD EPYC 7763 "
        "(AuthenticAMD): AVX2) has no amx_bf16, amx_tile, but the job requires AMX "
        "(workers.requireAmx): the node's AMX labels are wrong or stale\n"
        "amxtune-train launch: rank 1 exited with code 3")
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Running"  # backoffLimit 0, yet no restart was spent
    assert status["restarts"] == 0 and status["attempt"] == 1
    assert status["excludedNodes"] == ["amx-1"]
    lacks = next(e for e in kube.events if e[2] == "NodeLacksAmx")
    assert lacks[1] == "Warning" and "node amx-1" in lacks[3] and "AMD EPYC 7763" in lacks[3]
    workers_ready = next(c for c in status["conditions"] if c["type"] == "WorkersReady")
    assert workers_ready["reason"] == "NodeLacksAmx" and "amx-1" in workers_ready["message"]
    ftj.reconcile("ns", "dicoo")
    ftj.reconcile("ns", "dicoo")
    pods = kube.pods()
    assert {p["metadata"]["labels"][names.ATTEMPT_LABEL] for p in pods} == {"1"}
    terms = pods[0]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["amx-1"]} in (
        terms[0]["matchExpressions"])
    # The same node again (its labels ignored by some scheduler): an ordinary failure now.
    kube.set_pod("dicoo-worker-1", "Failed", exit_code=3, node="amx-1")
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Failed"
    assert kube.status()["excludedNodes"] == ["amx-1"]


def test_rank_0s_started_line_reports_cpu_and_precision_once_per_attempt(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    for pod in kube.pods():
        kube.set_pod(pod["metadata"]["name"], "Running", node="amx-0")
    started = {"event": "started", "cpu": "Intel(R) Xeon(R) Platinum 8480+ (GenuineIntel): "
               "AMX, AVX512-BF16, AVX-512, AVX2", "cpu_class": "AMX", "precision": "bf16",
               "precision_reason": "auto: AMX computes bf16 natively", "notices": []}
    progress = [json.dumps({"event": "progress", "step": s, "max_steps": 500, "loss": 0.2})
                for s in range(1, 80)]
    kube.logs["dicoo-worker-0"] = "\n".join([json.dumps(started), *progress])
    ftj.reconcile("ns", "dicoo")
    trainer = kube.status()["trainer"]
    assert trainer == {"attempt": 0, "node": "amx-0", "cpu": started["cpu"], "cpuClass": "AMX",
                       "mixedPrecision": "bf16",
                       "precisionReason": "auto: AMX computes bf16 natively", "notices": []}
    assert kube.status()["progress"]["display"] == "79/500"  # from the tail, as before


def test_success_creates_the_inference_job_then_succeeds_with_it(world):
    kube, _clock, ftj, infj = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    kube.set_pod("dicoo-worker-0", "Succeeded", exit_code=0)
    kube.logs["dicoo-worker-0"] = json.dumps(
        {"event": "completed", "steps": 200, "final_loss": 0.05, "output_dir": "/output/dicoo"}
    )
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Exporting"
    assert status["outputs"]["inferenceJob"] == "dicoo-export"
    assert status["progress"]["display"] == "200/200"
    child = kube.objects[("InferenceJob", "ns", "dicoo-export")]
    assert child["metadata"]["ownerReferences"][0]["name"] == "dicoo"

    infj.reconcile("ns", "dicoo-export")
    runner = kube.objects[("Pod", "ns", "dicoo-export-runner")]
    assert runner["spec"]["containers"][0]["command"][:4] == [
        "python",
        "-m",
        "amxtune_trainer",
        "inference",
    ]
    kube.set_pod("dicoo-export-runner", "Succeeded", exit_code=0)
    kube.logs["dicoo-export-runner"] = json.dumps(
        {
            "event": "completed",
            "openvino": "/output/dicoo/openvino",
            "images": 1,
            "image_paths": ["/output/dicoo/samples/000-a-yellow.png"],
            "grid": "/output/dicoo/samples/grid.png",
            "seconds_per_image": 1.5,
        }
    )
    infj.reconcile("ns", "dicoo-export")
    assert kube.status("InferenceJob", "dicoo-export")["phase"] == "Succeeded"
    assert kube.status("InferenceJob", "dicoo-export")["secondsPerImage"] == 1.5
    assert kube.status("InferenceJob", "dicoo-export")["imagePaths"] == [
        "/output/dicoo/samples/000-a-yellow.png"
    ]
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Succeeded"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert status["outputs"]["samples"] == "/output/dicoo/samples/grid.png"


def test_the_other_ranks_get_time_to_exit_after_rank_0_and_are_deleted_only_after_it(world):
    """A real kubelet reports rank 1's success seconds after rank 0's: its pod (logs, exit
    code) stays until it exits by itself, or is deleted once the grace is over."""
    kube, clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    for rank in (0, 1):
        kube.set_pod(f"dicoo-worker-{rank}", "Running", node=f"amx-{rank}")
    kube.set_pod("dicoo-worker-0", "Succeeded", exit_code=0, finished_at=clock())
    kube.logs["dicoo-worker-0"] = json.dumps({"event": "completed", "steps": 200})
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Running" and "rank(s) 1 to exit" in status["message"]
    assert ("InferenceJob", "ns", "dicoo-export") not in kube.objects
    assert ("Pod", "ns", "dicoo-worker-1") in kube.objects

    kube.set_pod("dicoo-worker-1", "Succeeded", exit_code=0)  # exits by itself: both stay
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Exporting"
    assert ("Pod", "ns", "dicoo-worker-1") in kube.objects

    kube.put(example() | {"metadata": {"name": "other", "namespace": "ns"}})
    ftj.reconcile("ns", "other")
    for rank in (0, 1):
        kube.set_pod(f"other-worker-{rank}", "Running", node=f"amx-{rank}")
    kube.set_pod("other-worker-0", "Succeeded", exit_code=0, finished_at=clock())
    ftj.reconcile("ns", "other")
    assert kube.status(name="other")["phase"] == "Running"
    clock.advance(61)  # rank 1 hangs: deleted once the grace is over, the job goes on
    ftj.reconcile("ns", "other")
    assert kube.status(name="other")["phase"] == "Exporting"
    assert ("Pod", "ns", "other-worker-1") not in kube.objects


def test_a_lora_job_runs_the_lora_trainer_and_its_export_fuses_the_adapters(world):
    kube, _clock, ftj, infj = world
    doc = example(method="lora", lora={"rank": 8, "instancePrompt": "a photo of sks toy"})
    del doc["spec"]["textualInversion"]
    doc["spec"]["training"]["saveAsFullPipeline"] = False  # the export fuses the adapters
    kube.put(doc)
    ftj.reconcile("ns", "dicoo")
    command = kube.pods()[0]["spec"]["containers"][0]["command"]
    assert command[command.index("--") + 1] == "lora"
    config = json.loads(kube.objects[("ConfigMap", "ns", "dicoo-config")]["data"]["trainer.json"])
    assert config["lora"]["rank"] == 8 and "textualInversion" not in config
    kube.set_pod("dicoo-worker-0", "Succeeded", exit_code=0)
    kube.logs["dicoo-worker-0"] = json.dumps({"event": "completed", "method": "lora",
                                              "steps": 200, "final_loss": 0.05})
    ftj.reconcile("ns", "dicoo")
    outputs = kube.status()["outputs"]
    assert outputs["lora"] == "dicoo/pytorch_lora_weights.safetensors"
    assert "embeddings" not in outputs
    child = kube.objects[("InferenceJob", "ns", "dicoo-export")]
    assert child["spec"]["source"]["lora"] == "pytorch_lora_weights.safetensors"
    infj.reconcile("ns", "dicoo-export")
    task = json.loads(kube.objects[("ConfigMap", "ns", "dicoo-export-config")]["data"][
        "inference.json"])
    assert task["lora"] == "pytorch_lora_weights.safetensors"


def test_a_pod_the_apiserver_refuses_fails_the_job_at_once_and_stops_its_pods(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    message = ('Pod "dicoo-worker-1" is invalid: spec.containers[0].resources.requests'
               '[memory]: Invalid value: "-1Gi": must be greater than or equal to 0')
    created = []
    original = kube.create

    def create(obj):  # worker 0 goes through, worker 1 is refused
        if obj["kind"] == "Pod" and obj["metadata"]["name"].endswith("-1"):
            kube.refuse["Pod"] = message
        created.append(obj["metadata"]["name"])
        return original(obj)

    kube.create = create
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Failed"
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ObjectRefused"
    assert stalled["message"] == f"the API server refused Pod dicoo-worker-1: {message}"
    assert kube.pods() == []  # worker 0, created before the refusal, is gone
    assert kube.reasons() == ["OutputVolumeCreated", "Failed"]
    ftj.reconcile("ns", "dicoo")
    assert kube.reasons() == ["OutputVolumeCreated", "Failed"]


def test_a_shared_object_the_apiserver_refuses_blocks_the_start_until_fixed(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    kube.refuse["Service"] = 'Service "dicoo-workers" is invalid: metadata.name: Invalid value'
    ftj.reconcile("ns", "dicoo")
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Pending" and kube.pods() == []
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "ObjectRefused" and "Service dicoo-workers" in stalled["message"]
    assert kube.reasons().count("ObjectRefused") == 1  # said once, not on every pass
    del kube.refuse["Service"]
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Running" and len(kube.pods()) == 2


def test_missing_secret_blocks_without_creating_anything(world):
    kube, _clock, ftj, _ = world
    kube.put(example(model={"name": "org/model", "tokenSecretRef": {"name": "hf-token"}}))
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert status["phase"] == "Pending"
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "SecretNotFound" and "hf-token" in stalled["message"]
    assert kube.pods() == [] and ("ConfigMap", "ns", "dicoo-config") not in kube.objects
    ftj.reconcile("ns", "dicoo")
    assert kube.reasons() == ["SecretNotFound"]  # reported once, not on every pass
    kube.put(
        {
            "kind": "Secret",
            "metadata": {"name": "hf-token", "namespace": "ns"},
            "data": {"token": "c2VjcmV0"},
        }
    )
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Running"
    assert "c2VjcmV0" not in json.dumps(kube.events) + json.dumps(kube.status())


def test_a_model_the_hub_does_not_know_blocks_until_the_spec_is_fixed(world):
    kube, _clock, ftj, _ = world
    kube.put(example(model={"name": "stable-diffusion-v1-5/stable-diffusion-v1.5"}))
    ftj.reconcile("ns", "dicoo")
    stalled = next(c for c in kube.status()["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ModelNotFound"
    assert "spec.model.name" in stalled["message"] and "v1.5" in stalled["message"]
    assert kube.pods() == [] and kube.reasons() == ["ModelNotFound"]
    job = kube.objects[("FineTuneJob", "ns", "dicoo")]
    job["spec"]["model"] = {"name": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Running" and len(kube.pods()) == 2


def test_unschedulable_quotes_the_scheduler_and_times_out(world):
    kube, clock, ftj, _ = world
    kube.put(
        example(workers={"nodes": 1, "resources": {"cpu": "4"}, "schedulingTimeoutSeconds": 60})
    )
    ftj.reconcile("ns", "dicoo")
    message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    kube.unschedulable("dicoo-worker-0", message)
    clock.now = datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)
    ftj.reconcile("ns", "dicoo")
    workers_ready = next(c for c in kube.status()["conditions"] if c["type"] == "WorkersReady")
    assert workers_ready["reason"] == "Unschedulable" and message in workers_ready["message"]
    assert "Unschedulable" in kube.reasons()
    clock.advance(60)
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Failed"
    assert kube.pods() == []


def test_suspend_deletes_workers_and_resume_recreates_them(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    job = kube.objects[("FineTuneJob", "ns", "dicoo")]
    job["spec"]["suspend"] = True
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Suspended" and kube.pods() == []
    assert ("ConfigMap", "ns", "dicoo-config") in kube.objects
    job["spec"]["suspend"] = False
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Running" and len(kube.pods()) == 2
    assert kube.reasons()[-3:] == ["Suspended", "Resumed", "WorkersCreated"]


def test_active_deadline_fails_the_job(world):
    kube, clock, ftj, _ = world
    kube.put(example(activeDeadlineSeconds=100))
    ftj.reconcile("ns", "dicoo")
    clock.advance(101)
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["phase"] == "Failed"
    assert kube.status()["message"].startswith("the job ran longer")
    assert kube.pods() == []


def _operator(kube, now, wall=None, **settings):
    from amxtune.controller.main import Operator

    settings = Settings(**{"progress_interval_seconds": 5, "hub_endpoint": shared_hub().url,
                           **settings})
    return Operator(kube, settings, None, clock=lambda: now[0],
                    wall_clock=(lambda: wall[0]) if wall else (lambda: now[0]))


def test_a_job_that_keeps_failing_to_reconcile_is_retried_with_exponential_backoff(world):
    from amxtune.controller.main import BACKOFF_CAP_SECONDS

    kube, _clock, _, _ = world
    body = kube.put(example())
    now = [0.0]
    operator = _operator(kube, now)
    operator.observe("FineTuneJob", body)  # the watch's first event
    calls = []
    original = kube.list_pods

    def broken(*args, **kwargs):  # e.g. the apiserver answering 500
        calls.append(now[0])
        raise RuntimeError("apiserver unavailable")

    kube.list_pods = broken
    operator.drain()
    for second in range(1, 80):  # a resync pass every 5 s for 80 s
        now[0] = float(second)
        if second % 5 == 0:
            operator.resync_once()
            operator.drain()
    # tried at 0, then after 5, 10, 20, 40 s: not on every pass
    assert calls == [0.0, 5.0, 15.0, 35.0, 75.0]
    operator.enqueue("FineTuneJob", "ns", "dicoo")  # a watch event retries at once
    operator.drain()
    assert len(calls) == 6
    assert operator._failures[("FineTuneJob", "ns", "dicoo")][0] == 6
    operator.enqueue("FineTuneJob", "ns", "dicoo")  # the 7th failure: 5 * 2**6 > the cap
    operator.drain()
    assert operator._failures[("FineTuneJob", "ns", "dicoo")][1] == now[0] + BACKOFF_CAP_SECONDS
    kube.list_pods = original
    now[0] = 1000.0
    operator.resync_once()
    operator.drain()
    assert ("FineTuneJob", "ns", "dicoo") not in operator._failures  # healed: backoff reset
    assert kube.status()["phase"] == "Running"


def test_many_events_of_one_job_make_one_pass_and_the_period_grows_with_running_jobs(world):
    kube = world[0]
    now = [0.0]
    operator = _operator(kube, now, periodic_reconciles_per_second=2)
    passes = []
    reconcile = operator.controllers["FineTuneJob"].reconcile
    operator.controllers["FineTuneJob"].reconcile = lambda ns, name: (
        passes.append(name), reconcile(ns, name))
    bodies = [kube.put(example() | {"metadata": {"name": f"job-{i}", "namespace": "ns"}})
              for i in range(40)]
    for body in bodies:
        operator.observe("FineTuneJob", body)
        for _ in range(5):  # its pods' events
            operator.enqueue("FineTuneJob", "ns", body["metadata"]["name"])
    operator.drain()
    assert sorted(passes) == sorted(b["metadata"]["name"] for b in bodies)  # one pass each
    for body in bodies:  # the watch reports them Running
        operator.observe("FineTuneJob", kube.get_job("FineTuneJob", "ns", body["metadata"]["name"]))
    operator.drain()
    passes.clear()
    # 40 running jobs at 2 periodic passes/s: each job every 20 s, not every 5 s
    for second in range(5, 205, 5):
        now[0] = float(second)
        operator.resync_once()
        operator.drain()
    assert operator.period == 20.0
    assert len(passes) == 40 * 200 // 20
    assert all(passes.count(b["metadata"]["name"]) == 10 for b in bodies)


def test_a_job_past_its_deadline_is_queued_at_once_whatever_the_period(world):
    kube, clock = world[0], world[1]
    now, wall = [0.0], [clock.now.timestamp()]
    operator = _operator(kube, now, wall, periodic_reconciles_per_second=0.01)
    operator.controllers["FineTuneJob"].clock = clock
    body = kube.put(example(activeDeadlineSeconds=30))
    operator.observe("FineTuneJob", body)
    operator.drain()
    operator.observe("FineTuneJob", kube.get_job("FineTuneJob", "ns", "dicoo"))
    operator.drain()
    now[0] += 1
    operator.resync_once()
    assert operator.period == 100 and len(operator.queue) == 0
    clock.advance(31)
    wall[0] += 31
    now[0] += 1  # the periodic pass is still 3 s away
    operator.resync_once()
    operator.drain()
    assert kube.status()["phase"] == "Failed"
    assert kube.status()["message"].startswith("the job ran longer")


def test_per_job_gauges_follow_the_running_jobs_progress():
    from amxtune.controller import metrics

    body = {"metadata": {"name": "gauged", "namespace": "ns"},
            "status": {"phase": "Running",
                       "progress": {"step": 40, "maxSteps": 200, "loss": 0.25,
                                    "samplesPerSecond": 3.5}}}
    metrics.observe_job("FineTuneJob", body)
    assert metrics.JOB_STEP.labels("ns", "gauged")._value.get() == 40
    assert metrics.JOB_SAMPLES_PER_SECOND.labels("ns", "gauged")._value.get() == 3.5
    metrics.observe_job("FineTuneJob", body | {"status": {"phase": "Succeeded"}})
    jobs = {s.labels.get("finetunejob") for m in metrics.JOB_LOSS.collect() for s in m.samples}
    assert "gauged" not in jobs


def test_a_key_queued_while_it_is_processed_is_processed_once_more_after():
    from amxtune.controller.workqueue import WorkQueue

    queue = WorkQueue()
    queue.add("a")
    assert queue.get(timeout=0) == "a"
    queue.add("a")  # an event while a worker reconciles "a": not given to a second worker
    queue.add("a")
    assert queue.get(timeout=0) is None
    queue.done("a")
    assert queue.get(timeout=0) == "a" and len(queue) == 0


@pytest.mark.parametrize("how", ["deleted", "evicted"])
def test_a_lost_worker_restarts_the_group_without_spending_the_backoff_limit(world, how):
    kube, _clock, ftj, _ = world
    kube.put(example(backoffLimit=0))
    ftj.reconcile("ns", "dicoo")
    for pod in kube.pods():
        kube.set_pod(pod["metadata"]["name"], "Running")
    ftj.reconcile("ns", "dicoo")
    assert kube.status()["podsCreatedForAttempt"] == 0
    if how == "deleted":
        kube.delete("Pod", "ns", "dicoo-worker-1")
    else:  # what the kubelet or the eviction API leaves
        pod = kube.objects[("Pod", "ns", "dicoo-worker-1")]
        pod["status"] = {"phase": "Failed", "reason": "Evicted",
                         "conditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ftj.reconcile("ns", "dicoo")
    status = kube.status()
    assert (status["phase"], status["attempt"], status["restarts"], status["disruptions"]) == (
        "Running", 1, 0, 1)
    assert "WorkersLost" in kube.reasons() and "Failed" not in kube.reasons()
    assert ("Pod", "ns", "dicoo-worker-0") in kube.objects  # the new attempt is written first
    ftj.reconcile("ns", "dicoo")
    assert ("Pod", "ns", "dicoo-worker-0") not in kube.objects  # then the others stop
    ftj.reconcile("ns", "dicoo")
    assert {p["metadata"]["labels"][names.ATTEMPT_LABEL] for p in kube.pods()} == {"1"}
    assert len(kube.pods()) == 2


def test_suspending_and_resuming_loses_no_worker(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    kube.objects[("FineTuneJob", "ns", "dicoo")]["spec"]["suspend"] = True
    ftj.reconcile("ns", "dicoo")
    kube.objects[("FineTuneJob", "ns", "dicoo")]["spec"]["suspend"] = False
    ftj.reconcile("ns", "dicoo")
    assert kube.status().get("disruptions", 0) == 0 and kube.status()["attempt"] == 0
    assert len(kube.pods()) == 2


def test_the_inference_job_reads_the_folder_the_run_recorded_not_the_spec(world):
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    recorded = {"claimName": "recorded-claim", "path": "dicoo-first-run"}
    kube.status()["outputs"] = dict(recorded)  # what the run started with
    for pod in kube.pods():
        kube.set_pod(pod["metadata"]["name"], "Succeeded", exit_code=0)
    ftj.reconcile("ns", "dicoo")
    infj = kube.objects[("InferenceJob", "ns", "dicoo-export")]
    assert infj["spec"]["source"]["pvc"] == recorded
    assert kube.status()["outputs"]["embeddings"].startswith("dicoo-first-run/")


def suspend_then_resume_while_the_pods_terminate(kube, ftj, exit_code=None) -> list[dict]:
    """Suspend, the worker pods still terminating (the kubelet has not confirmed their end;
    with `exit_code` they already report Failed with it), then resume; those pods."""
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    terminating = copy.deepcopy(kube.pods())
    kube.objects[("FineTuneJob", "ns", "dicoo")]["spec"]["suspend"] = True
    ftj.reconcile("ns", "dicoo")
    for pod in terminating:
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:05Z"
        kube.put(pod)
        if exit_code is not None:
            kube.set_pod(pod["metadata"]["name"], "Failed", exit_code=exit_code)
    kube.objects[("FineTuneJob", "ns", "dicoo")]["spec"]["suspend"] = False
    ftj.reconcile("ns", "dicoo")
    ftj.reconcile("ns", "dicoo")
    return terminating


def test_resuming_while_the_suspended_pods_still_terminate_loses_no_worker(world):
    kube, _clock, ftj, _ = world
    terminating = suspend_then_resume_while_the_pods_terminate(kube, ftj)
    assert "WorkersLost" not in kube.reasons() and kube.status()["attempt"] == 0
    for pod in terminating:
        kube.delete("Pod", "ns", pod["metadata"]["name"])
    ftj.reconcile("ns", "dicoo")
    assert len(kube.pods()) == 2 and kube.status()["podsCreatedForAttempt"] == 0


def test_suspended_pods_that_failed_on_their_sigterm_are_no_failure(world):
    """A real kubelet reports a deleted pod Failed (exit 143: the SIGTERM it sent) before the
    pod is gone; resuming meanwhile must not count that as the workload failing."""
    kube, _clock, ftj, _ = world
    suspend_then_resume_while_the_pods_terminate(kube, ftj, exit_code=143)
    assert "WorkerFailed" not in kube.reasons() and "WorkersLost" not in kube.reasons()
    assert kube.status().get("restarts", 0) == 0 and kube.status()["attempt"] == 0


def test_a_deleted_worker_that_failed_on_its_sigterm_is_lost_not_failed(world):
    """One worker pod deleted (a drain): Failed with 143 while it terminates is a lost worker
    (restart from its checkpoint, not counted), not a failure."""
    kube, _clock, ftj, _ = world
    kube.put(example())
    ftj.reconcile("ns", "dicoo")
    for pod in kube.pods():
        kube.set_pod(pod["metadata"]["name"], "Running")
    ftj.reconcile("ns", "dicoo")
    victim = kube.pods()[1]
    victim["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:05Z"
    kube.set_pod(victim["metadata"]["name"], "Failed", exit_code=143)
    ftj.reconcile("ns", "dicoo")
    assert "WorkerFailed" not in kube.reasons() and "WorkersLost" in kube.reasons()
    assert kube.status().get("restarts", 0) == 0 and kube.status()["disruptions"] == 1
