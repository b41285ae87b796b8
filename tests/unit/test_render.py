"""Rendering: golden files for whole manifests, and the resource math for several sizes."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from amxtune import manifest
from amxtune.render import JobIdentity, RenderError, rank_layout, render_finetunejob
from amxtune.render.inferencejob import inference_job_for, render_inferencejob
from amxtune.settings import Settings
from amxtune_api.export import ExportCache, ExportSpec
from amxtune_api.finetunejob import FineTuneJobSpec
from amxtune_api.inferencejob import InferenceJobSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
GOLDEN = HERE / "golden"
UPDATE = os.environ.get("AMXTUNE_UPDATE_GOLDEN") == "1"


def render_file(path: Path) -> list[dict]:
    objects = []
    for item in manifest.load(path):
        identity = JobIdentity(
            item.identity.name, item.identity.namespace, "uid-1", item.identity.kind
        )
        if identity.kind == "FineTuneJob":
            objects += render_finetunejob(identity, item.spec, Settings()).all()
        else:
            objects += render_inferencejob(identity, item.spec, Settings()).all()
    return objects


@pytest.mark.parametrize(
    ("source", "golden"),
    [
        (ROOT / "examples" / "finetunejob.yaml", "dicoo.yaml"),
        (ROOT / "examples" / "lora.yaml", "robot-lora.yaml"),
        (HERE / "manifests" / "small.yaml", "small.yaml"),
        (HERE / "manifests" / "inferencejob.yaml", "inferencejob.yaml"),
    ],
)
def test_render_matches_golden_file(source, golden):
    text = yaml.safe_dump_all(render_file(source), sort_keys=False)
    path = GOLDEN / golden
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"rerun with AMXTUNE_UPDATE_GOLDEN=1 if {golden} should change"


def spec(**workers) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"name": "tiny"},
            "data": {"configMap": {"name": "images"}},
            "textualInversion": {"placeholderToken": "<x>", "initializerToken": "toy"},
            "workers": workers.pop("workers"),
            "runtime": {"ccl": {"workerCount": workers.pop("ccl", 1)}},
        }
    )


@pytest.mark.parametrize(
    ("cpu", "ranks", "ccl", "threads"),
    [
        ("56", 4, 1, 13),  # the recipe: 4 ranks on a 56-core socket pair half
        ("112", 4, 1, 27),
        ("112", 8, 2, 12),
        (8, 2, 1, 3),
        ("4", 1, 1, 3),
        ("2500m", 1, 1, 1),  # fractional CPUs round down to whole cores
    ],
)
def test_omp_threads_are_cores_per_rank_minus_ccl_workers(cpu, ranks, ccl, threads):
    layout = rank_layout(spec(workers={"resources": {"cpu": cpu}, "ranksPerNode": ranks}, ccl=ccl))
    assert layout.omp_threads == threads


def test_too_few_cpus_for_the_ranks_names_the_field():
    bad = spec(workers={"resources": {"cpu": "4"}, "ranksPerNode": 4}, ccl=1)
    with pytest.raises(RenderError) as info:
        render_finetunejob(JobIdentity("x", "ns", "u"), bad, Settings())
    assert info.value.field == "spec.workers.resources.cpu"
    assert "at least 8 CPUs" in str(info.value)


@pytest.mark.parametrize(
    ("resources", "ccl", "ranks", "threads", "reason"),
    [
        ({"cpu": "2"}, 0, 2, 1, "one rank per core of 2"),  # measured best on 2 cores
        ({"cpu": "2"}, 1, 1, 1, "one rank per 2 cores (compute and oneCCL) of 2"),
        ({"cpu": "8", "memory": "64Gi"}, 1, 4, 1, "one rank per 2 cores"),
        ({"cpu": "56"}, 1, 4, 13, "the most without spec.workers.resources.memory"),
        ({"cpu": "56", "memory": "128Gi"}, 1, 28, 1, "one rank per 2 cores"),
        ({"cpu": "56", "memory": "20Gi"}, 1, 3, 17, "what the pod's memory holds"),
        ({"cpu": "56", "memory": "8Gi"}, 1, 1, 55, "what the pod's memory holds"),  # always one
    ],
)
def test_auto_ranks_one_per_free_core_as_far_as_memory_holds(resources, ccl, ranks, threads,
                                                               reason):
    job = spec(workers={"resources": resources, "ranksPerNode": "auto"}, ccl=ccl)
    layout = rank_layout(job)
    assert (layout.ranks_per_node, layout.omp_threads) == (ranks, threads)
    assert reason in layout.reason
    pod = render_finetunejob(JobIdentity("j", "ns", "u"), job, Settings()).pods[0]
    container = pod["spec"]["containers"][0]
    assert f"--nproc-per-node={ranks}" in container["command"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["AMXTUNE_RANKS_PER_NODE"], env["OMP_NUM_THREADS"]) == (str(ranks), str(threads))
    memory = resources.get("memory", f"{8 + 4 * ranks}Gi")  # the default follows the ranks
    assert container["resources"]["limits"]["memory"] == memory


def test_layout_status_gives_the_global_batch():
    job = spec(workers={"nodes": 3, "resources": {"cpu": "4"}, "ranksPerNode": "auto"}, ccl=1)
    job = job.model_copy(update={"training": job.training.model_copy(
        update={"train_batch_size": 2, "gradient_accumulation_steps": 4})})
    assert rank_layout(job).status(job) == {
        "ranksPerNode": 2, "threadsPerRank": 1, "cclWorkersPerRank": 1, "worldSize": 6,
        "globalBatchSize": 48, "reason": "auto: one rank per 2 cores (compute and oneCCL) of 4",
    }
    fixed = spec(workers={"resources": {"cpu": "4"}, "ranksPerNode": 1})
    assert rank_layout(fixed).status(fixed)["reason"] == "spec.workers.ranksPerNode"


@pytest.mark.parametrize(("workers", "memory"), [
    ({"resources": {"cpu": "8"}}, "12Gi"),  # one copy of the weights + one rank's own
    ({"resources": {"cpu": "8"}, "ranksPerNode": 4}, "24Gi"),  # still one copy, 4 ranks' own
    ({"resources": {"cpu": "8", "memory": "20Gi"}, "ranksPerNode": 4}, "20Gi"),  # as asked
])
def test_worker_memory_defaults_to_one_copy_of_the_weights_plus_each_ranks_own(workers, memory):
    job = spec(workers=workers).model_copy(update={"export": ExportSpec(prompts=["a <x>"])})
    written = job.to_wire()["workers"]["resources"]  # the default is not written into the spec
    assert ("memory" in written) == ("memory" in workers["resources"])
    pods = render_finetunejob(JobIdentity("j", "ns", "u"), job, Settings()).pods
    resources = pods[0]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == memory
    inference = inference_job_for(JobIdentity("j", "ns", "u"), job, "j-output", "j")
    exporting = InferenceJobSpec.model_validate(inference["spec"]).runtime.resources
    assert exporting.memory == workers["resources"].get("memory", "16Gi")  # not the ranks' sum


def test_every_worker_gets_its_rank_and_only_worker_0_mounts_data_and_output():
    job = spec(workers={"nodes": 3, "resources": {"cpu": "8"}})
    pods = render_finetunejob(JobIdentity("j", "ns", "u"), job, Settings()).pods
    assert [p["metadata"]["labels"]["amxtune.io/rank"] for p in pods] == ["0", "1", "2"]
    for rank, pod in enumerate(pods):
        command = pod["spec"]["containers"][0]["command"]
        assert f"--node-rank={rank}" in command and "--nnodes=3" in command
        mounted = {m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert ({"data", "output"} <= mounted) == (rank == 0)
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MASTER_ADDR"] == "j-worker-0.j-workers.ns.svc.cluster.local"


def test_token_comes_from_the_secret_never_inline():
    job = FineTuneJobSpec.model_validate(
        {
            "model": {"name": "org/model", "tokenSecretRef": {"name": "hf", "key": "tok"}},
            "data": {"configMap": {"name": "images"}},
            "textualInversion": {"placeholderToken": "<x>", "initializerToken": "toy"},
        }
    )
    pod = render_finetunejob(JobIdentity("j", "ns", "u"), job, Settings()).pods[0]
    token = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "HF_TOKEN"]
    assert token == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}
    ]


def test_output_claim_is_not_owned_so_it_outlives_the_job():
    job = spec(workers={})
    objects = render_finetunejob(JobIdentity("j", "ns", "u"), job, Settings())
    assert objects.output_claim["metadata"]["name"] == "j-output"
    assert "ownerReferences" not in objects.output_claim["metadata"]
    for owned in (objects.config_map, objects.service, *objects.pods):
        assert owned["metadata"]["ownerReferences"][0]["uid"] == "u"


def test_inference_job_for_a_finetunejob_uses_its_output_and_prompts():
    item = manifest.load(ROOT / "examples" / "finetunejob.yaml")[0]
    identity = JobIdentity("dicoo", "default", "u")
    body = inference_job_for(identity, item.spec, "dicoo-output")
    assert body["metadata"]["name"] == "dicoo-export"
    assert body["spec"]["source"]["pvc"] == {"claimName": "dicoo-output", "path": "dicoo"}
    assert body["spec"]["prompts"] == item.spec.export.prompts
    # a textual inversion is exported from the base model's cached export, pipeline/ or not
    assert body["spec"]["source"]["model"] == item.spec.model.to_wire()
    # without the cache, saveAsFullPipeline: the export starts from pipeline/, no base model
    export = item.spec.export.model_copy(update={"cache": ExportCache(enabled=False)})
    body = inference_job_for(identity, item.spec.model_copy(update={"export": export}),
                             "dicoo-output")
    assert "model" not in body["spec"]["source"]


def test_export_cache_on_the_source_claim_or_a_claim_of_its_own():
    item = manifest.load(HERE / "manifests" / "inferencejob.yaml")[0]
    identity = JobIdentity(item.identity.name, "default", "u", "InferenceJob")

    def rendered(**cache):
        spec = item.spec.model_copy(update={"cache": ExportCache(**cache)})
        objects = render_inferencejob(identity, spec, Settings())
        task = json.loads(objects.config_map["data"]["inference.json"])
        container = objects.pod["spec"]["containers"][0]
        claims = {v["persistentVolumeClaim"]["claimName"]: v["name"]
                  for v in objects.pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        return task, claims, mounts

    task, claims, mounts = rendered()
    assert task["cacheDir"] == "/output/.amxtune-cache/openvino" and "cache" not in task
    assert "export-cache" not in mounts
    task, claims, mounts = rendered(claimName="openvino-cache", path="sd15")
    assert task["cacheDir"] == "/cache/sd15"
    assert claims["openvino-cache"] == "export-cache" and mounts["export-cache"] == "/cache"
    task, claims, mounts = rendered(enabled=False)
    assert "cacheDir" not in task and "export-cache" not in mounts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"workers": {"nodes": "4"}}, "spec.workers.nodes: Input should be a valid integer"),
        ({"suspend": "yes"}, "spec.suspend: Input should be a valid boolean"),
        ({"training": {"learningRate": "0.1"}},
         "spec.training.learningRate: Input should be a valid number"),
    ],
)
def test_offline_validation_does_not_coerce_what_the_apiserver_refuses(change, message):
    """kubectl refuses `nodes: "4"` (a string for an integer); `amxtune run` must too."""
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    for key, value in change.items():
        if isinstance(value, dict):
            doc["spec"].setdefault(key, {}).update(value)
        else:
            doc["spec"][key] = value
    with pytest.raises(manifest.ManifestError, match=re.escape(message)):
        manifest.parse(doc)
    assert manifest.parse(yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text()))


def test_numbers_read_as_kubectl_reads_them_and_an_empty_storage_class(tmp_path):
    """YAML 1.1 would make `5e-4` a string, which strict validation then refuses; kubectl
    reads a number. An empty storageClassName means "no dynamic provisioning"."""
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    doc["spec"]["output"]["pvc"]["create"]["storageClassName"] = ""
    text = yaml.safe_dump(doc).replace("learningRate: 0.002", "learningRate: 5e-4")
    assert "learningRate: 5e-4" in text
    (tmp_path / "job.yaml").write_text(text)
    spec = manifest.load(tmp_path / "job.yaml")[0].spec
    assert spec.training.learning_rate == 5e-4
    assert spec.output.pvc.create.storage_class_name == ""


def test_a_quantity_that_validates_can_be_computed_with():
    """"2e1" (a string) is a Kubernetes quantity the operator cannot compute with: refused."""
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    doc["spec"]["workers"]["resources"]["cpu"] = "2e1"
    with pytest.raises(manifest.ManifestError, match=r"spec\.workers\.resources\.cpu"):
        manifest.parse(doc)
