"""InferenceJob (amxtune.io/v1alpha1): export a trained pipeline to OpenVINO, render samples.

A FineTuneJob with `spec.export` creates one (owned by it) when training succeeds; users can
also create one directly for any trained output folder.
"""

from __future__ import annotations

from pydantic import Field

from amxtune_api.base import ApiModel
from amxtune_api.export import ExportSpec
from amxtune_api.finetunejob import Condition, ModelSource, Phase
from amxtune_api.kube import EnvVar, PvcPath, Resources, Toleration


class InferenceSource(ApiModel):
    pvc: PvcPath = Field(
        description="The training output folder. Its pipeline/ is exported when present; "
        "otherwise model plus the learned embeddings in it, or with its LoRA weights fused in "
        "(lora)."
    )
    model: ModelSource | None = Field(
        default=None, description="Base model: needed when the folder has no pipeline/; with "
        "the export cache, a textual inversion is exported from it (and the cached export of "
        "it) even when there is a pipeline/."
    )
    embeddings: str = Field(
        default="learned_embeds.safetensors", min_length=1,
        description="Learned embedding file, relative to the source folder.",
    )
    lora: str | None = Field(
        default=None, min_length=1, max_length=1024,
        description="LoRA weights file relative to the source folder (a LoRA training's "
        "pytorch_lora_weights.safetensors): fused into the base model before export, and "
        "`embeddings` is not read.",
    )


class InferenceRuntime(ApiModel):
    image: str | None = Field(default=None, min_length=1)
    image_pull_policy: str = Field(default="IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)


class InferenceJobSpec(ExportSpec):
    """Export `source` with `openvino` options into SOURCE/openvino, render `prompts` into
    SOURCE/samples."""

    source: InferenceSource
    runtime: InferenceRuntime = Field(default_factory=InferenceRuntime)
    backoff_limit: int = Field(default=1, ge=0, le=20, description="Retries of the export pod.")


class InferenceTask(ExportSpec):
    """What the export pod runs (`amxtune-train inference --config`), paths resolved."""

    source_dir: str = Field(min_length=1)
    base_model: str | None = None
    revision: str | None = None
    embeddings: str = "learned_embeds.safetensors"
    lora: str | None = None
    output_dir: str = Field(min_length=1)
    cache: None = Field(default=None, exclude=True,
                        description="The spec's cache is given as cache_dir.")
    cache_dir: str | None = Field(
        default=None, description="Folder of cached base exports (spec.export.cache, as a "
        "path in the pod); none: export in full. Used for a base model plus embeddings.")
    concept_dir: str | None = Field(
        default=None, description="Images of the concept (amxtune run has them at hand): "
        "generation.json then scores how much the samples look like them.")


class InferenceJobStatus(ApiModel):
    observed_generation: int | None = None
    phase: Phase | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)
    restarts: int = 0
    exported_model: str | None = None
    exported_from: str | None = Field(
        default=None, description="What was exported: 'pipeline' (the trained full pipeline), "
        "'embeddings' (the base model with the learned token added) or 'lora' (the base model "
        "with the LoRA adapters fused in).")
    weights: str | None = Field(
        default=None, description="The embedding or LoRA file added to the base model.")
    export_cache: str | None = Field(
        default=None, description="'hit': the base model's cached export was reused; "
        "'stored': it was exported now and cached for the next job; unset: exported in full.")
    export_seconds: float | None = Field(
        default=None, description="Wall time of the export (not the rendering).")
    grid: str | None = None
    images: int | None = None
    image_paths: list[str] = Field(
        default_factory=list, description="Rendered images (the first 64) on the volume."
    )
    seconds_per_image: float | None = None
    start_time: str | None = None
    completion_time: str | None = None
