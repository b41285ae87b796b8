"""InferenceJob -> ConfigMap (the export task) and one export Pod. Pure: no API calls."""

from __future__ import annotations

import json
from dataclasses import dataclass

from amxtune import names
from amxtune.render.common import (
    JobIdentity,
    object_meta,
    pod,
    resource_list,
    volume_for_pvc,
)
from amxtune.render.finetunejob import (
    BUILTIN_MODEL_CACHE,
    CONFIG_MOUNT,
    HF_HOME,
    MODEL_MOUNT,
    OUTPUT_MOUNT,
    output_path,
)
from amxtune.settings import Settings
from amxtune_api.finetunejob import LORA_FILE, FineTuneJobSpec, Method
from amxtune_api.inferencejob import InferenceJobSpec, InferenceTask

TASK_FILE = "inference.json"


@dataclass
class InferenceJobObjects:
    config_map: dict
    pod: dict

    def all(self) -> list[dict]:
        return [self.config_map, self.pod]


def inference_task(spec: InferenceJobSpec) -> InferenceTask:
    source_dir = f"{OUTPUT_MOUNT}/{spec.source.pvc.path.strip('/')}".rstrip("/")
    base = None
    if spec.source.model is not None:
        base = (
            f"{MODEL_MOUNT}/{spec.source.model.pvc.path}".rstrip("/")
            if spec.source.model.pvc is not None
            else spec.source.model.name
        )
    export_fields = set(InferenceTask.model_fields) & set(InferenceJobSpec.model_fields) - {"cache"}
    return InferenceTask(
        **spec.model_dump(include=export_fields),
        source_dir=source_dir,
        cache_dir=cache_dir(spec),
        base_model=base,
        revision=spec.source.model.revision if spec.source.model else None,
        embeddings=spec.source.embeddings,
        lora=spec.source.lora,
        output_dir=source_dir,
    )


CACHE_MOUNT = "/cache"


def cache_claim(spec: InferenceJobSpec) -> str | None:
    """The export cache's claim when it is not the source claim (then mounted at CACHE_MOUNT)."""
    if spec.cache.enabled and spec.cache.claim_name not in (None, spec.source.pvc.claim_name):
        return spec.cache.claim_name
    return None


def cache_dir(spec: InferenceJobSpec) -> str | None:
    """The export cache's folder in the pod: on the source claim, or on a claim of its own."""
    if not spec.cache.enabled:
        return None
    return f"{CACHE_MOUNT if cache_claim(spec) else OUTPUT_MOUNT}/{spec.cache.path.strip('/')}"


def render_inferencejob(
    job: JobIdentity, spec: InferenceJobSpec, settings: Settings, attempt: int = 0
) -> InferenceJobObjects:
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(job, names.config_map(job.name), "config"),
        "data": {TASK_FILE: json.dumps(inference_task(spec).to_wire(), indent=2, sort_keys=True)},
    }
    mounts = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "output", "mountPath": OUTPUT_MOUNT},
        {"name": "hf-cache", "mountPath": HF_HOME},
    ]
    volumes = [
        {"name": "config", "configMap": {"name": names.config_map(job.name)}},
        volume_for_pvc("output", spec.source.pvc.claim_name),
        {"name": "hf-cache", "emptyDir": {}},
    ]
    env = [
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "AMXTUNE_CACHE", "value": BUILTIN_MODEL_CACHE},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if claim := cache_claim(spec):
        mounts.append({"name": "export-cache", "mountPath": CACHE_MOUNT})
        volumes.append(volume_for_pvc("export-cache", claim))
    model = spec.source.model
    if model is not None and model.pvc is not None:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
        volumes.append(volume_for_pvc("model", model.pvc.claim_name, read_only=True))
    if model is not None and model.token_secret_ref is not None:
        ref = model.token_secret_ref
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    env += [{"name": e.name, "value": e.value} for e in spec.runtime.env]
    meta = object_meta(job, names.export_pod(job.name), "export")
    meta["labels"][names.ATTEMPT_LABEL] = str(attempt)
    container = {
        "name": "export",
        "image": spec.runtime.image or settings.trainer_image,
        "imagePullPolicy": spec.runtime.image_pull_policy,
        "command": [
            "python", "-m", "amxtune_trainer", "inference", f"--config={CONFIG_MOUNT}/{TASK_FILE}",
        ],
        "env": env,
        "resources": resource_list(spec.runtime.resources),
        "volumeMounts": mounts,
    }
    export_pod = pod(meta, {"containers": [container], "volumes": volumes}, settings,
                     spec.runtime.node_selector, spec.runtime.tolerations)
    return InferenceJobObjects(config_map, export_pod)


def inference_job_for(job: JobIdentity, spec: FineTuneJobSpec, claim_name: str,
                      path: str | None = None) -> dict:
    """The InferenceJob a FineTuneJob with spec.export creates when training succeeds, reading
    the claim and folder the run recorded in status.outputs (`path`; else the spec's)."""
    assert spec.export is not None
    source: dict = {"pvc": {"claimName": claim_name, "path": path or output_path(job, spec)}}
    if spec.method == Method.lora:
        if not spec.training.save_as_full_pipeline:
            source["model"] = spec.model.to_wire()
            source["lora"] = LORA_FILE
    elif spec.export.cache.enabled or not spec.training.save_as_full_pipeline:
        source["model"] = spec.model.to_wire()  # the cache works from the base model
    # the workers' cpu, and their memory only when set: the export's needs are not the ranks'
    runtime: dict = {"resources": spec.workers.resources.to_wire()}
    if spec.runtime.image:
        runtime["image"] = spec.runtime.image
    runtime["imagePullPolicy"] = spec.runtime.image_pull_policy
    if spec.workers.node_selector:
        runtime["nodeSelector"] = dict(spec.workers.node_selector)
    if spec.workers.tolerations:
        runtime["tolerations"] = [t.to_wire() for t in spec.workers.tolerations]
    if spec.runtime.env:
        runtime["env"] = [e.to_wire() for e in spec.runtime.env]
    body_spec = {**spec.export.to_wire(), "source": source, "runtime": runtime}
    InferenceJobSpec.model_validate(body_spec)  # what we create must pass our own schema
    return {
        "apiVersion": f"{names.GROUP}/v1alpha1",
        "kind": "InferenceJob",
        "metadata": object_meta(job, names.inference_job(job.name), "export"),
        "spec": body_spec,
    }
