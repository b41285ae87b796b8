"""OpenVINO export and sample-generation options: one definition for the FineTuneJob's
`spec.export`, the InferenceJob spec and the trainer image's `export-openvino` / `generate` flags.

Rules worth knowing (they are validated here, so the CRD, the operator and the CLI agree):

- height and width are multiples of 8 (the VAE downsamples by 8); SD-1.x UNets also want
  multiples of 64 for their own downsampling, which a real model enforces when it is exported.
- the exported pipeline has a *static* shape: `batch_size` prompts per call, each rendered
  `num_images_per_prompt` times, at `height` x `width`. Prompts are rendered in consecutive
  groups of `batch_size`, so the number of prompts must be a multiple of `batch_size`
  (equal to it in the common case).
- guidance_scale must be > 1: the static UNet is shaped for classifier-free guidance (it sees
  the conditional and the unconditional batch together, 2 x batch_size x images per prompt).

No torch, diffusers or openvino here: the operator imports these models.
"""

from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from amxtune_api.base import ApiModel, NonBlank, cel
from amxtune_api.kube import Name, check_sub_path, sub_path_rule
from amxtune_api.training import MULTIPLE_OF_8


class WeightFormat(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"
    int8_full = "int8-full"


class OpenVINOExportOptions(ApiModel):
    """Static shape and weight format of the exported OpenVINO pipeline."""

    batch_size: int = Field(
        default=1, ge=1, le=64, description="Prompts rendered per pipeline call (static)."
    )
    height: int = Field(
        default=512, ge=64, le=2048, description="Image height in pixels; a multiple of 8.",
        json_schema_extra=MULTIPLE_OF_8,
    )
    width: int = Field(
        default=512, ge=64, le=2048, description="Image width in pixels; a multiple of 8.",
        json_schema_extra=MULTIPLE_OF_8,
    )
    num_images_per_prompt: int = Field(
        default=1, ge=1, le=16, description="Images rendered for each prompt per call (static)."
    )
    weight_format: WeightFormat = Field(
        default=WeightFormat.fp32,
        description="'fp32' keeps the weights as trained; 'fp16' stores them in half "
        "precision (half the size; the CPU computes in its own precision); 'int8' compresses "
        "the weights of every model to 8-bit asymmetric per-channel integers with NNCF "
        "(activations stay floating point); 'int8-full' also computes the UNet in int8 "
        "(weights and activations: NNCF post-training quantization, calibrated on the UNet's "
        "inputs while the export renders a few generic prompts at its shape): the fastest to "
        "render on CPUs with AMX (1.25-1.3x 'fp32' for SD-1.5 at 512 px), but the export takes "
        "minutes longer and about twice the memory (7 min and 15.4 GB instead of 1.3 min and "
        "8.3 GB on 2 cores; with the export cache, once per base model and shape), and images "
        "differ slightly from 'fp32' (docs/performance.md).",
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value


class Baseline(ApiModel):
    """A second rendering of every prompt that contains `token`, with `token` replaced by
    `text`, from the same seeds: for a textual inversion, the initializer word shows what the
    token drew before training."""

    token: NonBlank = Field(description="The learned token as the prompts write it.")
    text: NonBlank = Field(description="What replaces it, e.g. the initializer word.")


class GenerationOptions(ApiModel):
    """What to render with the exported (or PyTorch) pipeline and how."""

    prompts: list[NonBlank] = Field(
        min_length=1,
        max_length=256,
        description="Prompts to render; use the learned placeholder token (or, for LoRA, the "
        "instance prompt's trigger word) in them, e.g. 'a photo of <dicoo> on the beach'. "
        "Rendered in groups of the batch size.",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=1000, description="What to steer away from, for every prompt."
    )
    num_inference_steps: int = Field(
        default=25, ge=1, le=500, description="Denoising steps per image."
    )
    guidance_scale: float = Field(
        default=7.5,
        gt=1.0,
        le=50.0,
        description="Classifier-free guidance strength; must be > 1 (the static OpenVINO UNet "
        "is shaped for guided generation).",
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the initial noise; call k (prompts k*batch..) uses seed + k.",
    )
    baseline: Baseline | None = Field(
        default=None,
        description="Also render the prompts with the token replaced (e.g. by the initializer "
        "word: the token before training), from the same seeds; grid.png shows each baseline "
        "image left of its result.",
    )

    @field_validator("negative_prompt")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None


class ExportCache(ApiModel):
    """Where base-model exports are kept for reuse. A textual inversion changes only the text
    encoder's token table, so its export copies the cached export of the base model (made once
    per model content, export options and library versions) with the token added, instead of
    converting the whole pipeline again; the images are the same as a fresh export's. A LoRA
    changes the UNet and is always exported in full."""

    model_config = cel(sub_path_rule("path"), "path must be a relative path inside the volume, "
                       "without '..'")

    enabled: bool = Field(default=True, description="false: export every job in full.")
    claim_name: Name | None = Field(
        default=None,
        description="Claim holding the cache; by default the claim of the trained output "
        "(so jobs writing to one claim share it). Name a ReadWriteMany claim to share one "
        "cache between jobs with claims of their own.",
    )
    path: str = Field(
        default=".amxtune-cache/openvino", min_length=1, max_length=1024,
        description="Folder inside the claim.",
    )

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        check_sub_path(value)
        return value


class ExportSpec(GenerationOptions):
    """`spec.export` of a FineTuneJob (and the work of an InferenceJob): export the result to
    OpenVINO with `openvino`, then render `prompts` with it into samples/."""

    model_config = cel(
        "size(self.prompts) % self.openvino.batchSize == 0",
        "the number of prompts must be a multiple of openvino.batchSize: prompts are rendered "
        "in groups of batch size",
    )

    openvino: OpenVINOExportOptions = Field(
        default_factory=OpenVINOExportOptions,
        description="Static shape and weight format of the exported pipeline.",
    )
    cache: ExportCache = Field(
        default_factory=ExportCache,
        description="Reuse one export of the base model for every textual inversion of it.",
    )

    @model_validator(mode="after")
    def _prompts_fill_batches(self) -> "ExportSpec":
        check_prompts_fill_batches(len(self.prompts), self.openvino.batch_size)
        return self


def check_prompts_fill_batches(num_prompts: int, batch_size: int) -> None:
    """Raise ValueError unless `num_prompts` is a positive multiple of `batch_size`."""
    if num_prompts < 1 or num_prompts % batch_size:
        raise ValueError(
            f"the number of prompts ({num_prompts}) must be a multiple of the batch size "
            f"({batch_size}): prompts are rendered in groups of batch size"
        )
