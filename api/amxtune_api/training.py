"""Trainer options: the single definition shared by the FineTuneJob spec and the trainer.

Field names follow the diffusers scripts' arguments (`textual_inversion.py`,
`train_dreambooth_lora.py`; snake_case), so that the trainer's command-line flags can be
derived from them and commands written for the reference scripts keep working; on the wire
(CRD, config JSON) they are camelCase.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from amxtune_api.base import ApiModel, NonBlank, cel

# Files the trainer leaves in its output folder that the operator points at (status.outputs).
EMBEDDINGS_FILE = "learned_embeds.safetensors"  # textual inversion
LORA_FILE = "pytorch_lora_weights.safetensors"  # LoRA

# The CRD checks it too (the validator below gives the clearer message in Python).
MULTIPLE_OF_8 = {"multipleOf": 8}
DEFAULT_IMAGE_EXTENSIONS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]


class LearnableProperty(StrEnum):
    object = "object"
    style = "style"


class MixedPrecision(StrEnum):
    auto = "auto"
    no = "no"
    bf16 = "bf16"


class LrScheduler(StrEnum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Accelerator(StrEnum):
    none = "none"
    ipex = "ipex"


class DistributedBackend(StrEnum):
    auto = "auto"
    gloo = "gloo"
    ccl = "ccl"


class TextualInversionOptions(ApiModel):
    """What concept to learn and how it is represented."""

    model_config = cel("self.placeholderToken != self.initializerToken",
                       "placeholderToken must differ from initializerToken: the new token "
                       "starts from the initializer's embedding and must not replace it")

    # the schema's pattern is for the apiserver; offline, the validator below words it better
    placeholder_token: Annotated[str, Field(min_length=1, max_length=64,
                                            json_schema_extra={"pattern": r"^\S+$"})] = Field(
        description="New token that stands for the concept in prompts, e.g. '<dicoo>'. It must "
        "not already be in the tokenizer's vocabulary."
    )
    initializer_token: Annotated[str, Field(min_length=1, max_length=256)] = Field(
        description="Word (or phrase of several tokens) whose embedding starts the new vectors; "
        "a phrase is spread over the vectors in order."
    )
    num_vectors: int = Field(
        default=1, ge=1, le=64, description="Number of embedding vectors learned for the token."
    )
    learnable_property: LearnableProperty = Field(
        default=LearnableProperty.object,
        description="'object' uses object prompt templates, 'style' style templates.",
    )
    initial_embedding: str | None = Field(
        default=None,
        description="Path to an existing learned_embeds.safetensors (or .bin/.pt) to start from "
        "instead of the initializer token.",
    )

    @field_validator("placeholder_token")
    @classmethod
    def _no_whitespace(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("must be a single token without whitespace, e.g. '<dicoo>'")
        return value

    @model_validator(mode="after")
    def _new_token(self) -> TextualInversionOptions:
        if self.placeholder_token == self.initializer_token:
            raise ValueError("placeholderToken must differ from initializerToken: the new token "
                             "starts from the initializer's embedding and must not replace it")
        return self


class LoraTarget(StrEnum):
    """Linear layers of the UNet's transformer blocks that can carry an adapter (every Stable
    Diffusion 1.x/2.x UNet has them)."""

    to_q = "to_q"
    to_k = "to_k"
    to_v = "to_v"
    to_out = "to_out.0"
    ff_in = "ff.net.0.proj"
    ff_out = "ff.net.2"


DEFAULT_LORA_TARGETS = [LoraTarget.to_k, LoraTarget.to_q, LoraTarget.to_v, LoraTarget.to_out]


class LoraOptions(ApiModel):
    """LoRA adapters on the UNet's attention projections (and optionally the text encoder's)."""

    rank: int = Field(default=4, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: float | None = Field(
        default=None, gt=0, le=4096,
        description="Scale numerator (the update is scaled by alpha/rank); the rank by default, "
        "as in diffusers' train_dreambooth_lora.py.",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[LoraTarget] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1, max_length=6,
        description="UNet layers that get adapters (names as in diffusers' attention blocks).",
    )
    train_text_encoder: bool = Field(
        default=False,
        description="Also put adapters on the text encoder's attention projections.",
    )
    initial_weights: str | None = Field(
        default=None, min_length=1, max_length=1024,
        description="A pytorch_lora_weights.safetensors (or the folder holding it) to start "
        "from instead of fresh adapters; its rank and layers must match these options.",
    )
    instance_prompt: NonBlank | None = Field(
        default=None,
        description="Prompt of every training image, DreamBooth style ('a photo of sks toy'); "
        "without it each image needs a caption file (training.useCaptions).",
    )

    @field_validator("target_modules")
    @classmethod
    def _distinct(cls, values: list[LoraTarget]) -> list[LoraTarget]:
        if len(set(values)) != len(values):
            raise ValueError("must not name a module twice")
        return values

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class TrainingOptions(ApiModel):
    """Data handling, optimisation schedule, checkpoints and validation."""

    resolution: int = Field(
        default=512, ge=8, le=2048,
        description="Training image size in pixels (square); a multiple of 8.",
        json_schema_extra=MULTIPLE_OF_8,
    )
    center_crop: bool = Field(default=False, description="Center-crop instead of resizing.")
    random_flip: bool = Field(default=False, description="Randomly flip images horizontally.")
    repeats: int = Field(default=100, ge=1, description="How often the images repeat per epoch.")
    use_captions: bool = Field(
        default=False,
        description="Use NAME.txt beside NAME.jpg as the image's prompt. Textual inversion: the "
        "placeholder token replaces '{}' or is prepended (instead of the prompt templates). "
        "LoRA: the caption is the whole prompt, '{}' in it is replaced by the instance prompt, "
        "and an image without a caption (or with an empty one) uses the instance prompt.",
    )
    image_extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IMAGE_EXTENSIONS),
        min_length=1,
        description="File name endings (case-insensitive) that count as training images.",
    )
    train_batch_size: int = Field(default=1, ge=1, le=256, description="Images per rank per step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    max_train_steps: int = Field(default=5000, ge=1, description="Optimizer steps in total.")
    learning_rate: float = Field(default=1e-4, gt=0, le=10)
    scale_lr: bool = Field(
        default=False,
        description="Multiply the learning rate by accumulation steps x batch size x ranks.",
    )
    lr_scheduler: LrScheduler = Field(default=LrScheduler.constant)
    lr_warmup_steps: int = Field(default=500, ge=0)
    lr_num_cycles: int = Field(default=1, ge=1, description="Cycles of cosine_with_restarts.")
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(default=1e-2, ge=0)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    mixed_precision: MixedPrecision = Field(
        default=MixedPrecision.auto,
        description="'auto' is bf16 where every rank's CPU computes bf16 natively (AMX or "
        "AVX512-BF16) and fp32 elsewhere; 'bf16' runs the frozen networks in bfloat16 autocast "
        "on any CPU (emulated, slower than fp32, without AMX/AVX512-BF16); 'no' is fp32.",
    )
    seed: int | None = Field(default=None, ge=0, description="Seed for reproducible training.")
    checkpointing_steps: int = Field(
        default=500, ge=1, description="Save resumable state every N steps."
    )
    checkpoints_total_limit: int | None = Field(
        default=None, ge=1, description="Keep at most this many checkpoints (oldest pruned)."
    )
    resume_from_checkpoint: str | None = Field(
        default=None,
        description="'latest' or a checkpoint folder to continue from; 'latest' with no "
        "checkpoint yet starts from scratch.",
    )
    save_steps: int = Field(
        default=500, ge=1, description="Also save the weights so far every N steps "
        "(learned_embeds-steps-N.safetensors, or pytorch_lora_weights-steps-N.safetensors)."
    )
    logging_steps: int = Field(default=1, ge=1, description="Emit a progress line every N steps.")
    validation_prompt: str | None = Field(
        default=None, description="Prompt rendered every validation_steps to watch progress."
    )
    num_validation_images: int = Field(default=4, ge=1, le=64)
    validation_steps: int = Field(default=100, ge=1)
    validation_inference_steps: int = Field(
        default=25, ge=1, le=200, description="Denoising steps per validation image."
    )
    eval_samples: int = Field(
        default=4, ge=0, le=256,
        description="Size of a fixed evaluation set of (image, timestep, noise); its loss is "
        "measured before and after training and reported in metrics.json. 0 disables it.",
    )
    save_as_full_pipeline: bool = Field(
        default=False, description="Also save the whole pipeline (fp32) with the new token "
        "added, or with the LoRA adapters fused in."
    )
    concept_similarity_images: int = Field(
        default=0, ge=0, le=64,
        description="After training, render this many images of the concept prompt before and "
        "after training ('a photo of a TOKEN' with the initial and the learned embedding, and "
        "the initializer word alone; for LoRA the instance prompt without and with the "
        "adapters) and score how much they look like the training images (metrics.json "
        "concept_similarity, concept_samples.png). The score is made of toy-world image "
        "statistics: meaningful for the built-in toyworld model, not for photographs. 0 skips "
        "it.",
    )
    save_a1111: bool = Field(
        default=False, description="Textual inversion: also save an Automatic1111-compatible "
        "learned_embeds.pt (the single-file learned_embeds_a1111.safetensors is always written). "
        "LoRA writes its kohya-named file always and ignores this."
    )

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value})")
        return value

    @field_validator("image_extensions")
    @classmethod
    def _dotted_lowercase(cls, values: list[str]) -> list[str]:
        return [(v if v.startswith(".") else f".{v}").lower() for v in values]

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be 'latest' or a checkpoint path, not empty")
        return value


class TrainerRuntimeOptions(ApiModel):
    """How the trainer uses the CPU; the operator's runtime spec extends this."""

    accelerator: Accelerator = Field(
        default=Accelerator.none,
        description="'none' uses plain PyTorch (oneDNN uses AMX directly); 'ipex' uses "
        "intel-extension-for-pytorch (legacy image variant).",
    )
    torch_compile: bool = Field(default=False, description="Compile the UNet with torch.compile.")
    channels_last: bool = Field(default=True, description="Use channels_last memory layout.")
    distributed_backend: DistributedBackend = Field(
        default=DistributedBackend.auto,
        description="'auto' picks ccl when oneccl_bindings_for_pytorch is importable and "
        "asked for by the environment, else gloo.",
    )


# Models that need no download: built with random weights ("tiny", "sd15-arch") or shipped
# pretrained ("toyworld"); see amxtune_trainer.builtin.
BUILTIN_MODELS = ("tiny", "sd15-arch", "toyworld")


class TrainerConfig(ApiModel):
    """Everything one trainer process needs; the operator renders it into a ConfigMap."""

    pretrained_model_name_or_path: str = Field(
        min_length=1,
        description="Hub id, local diffusers folder, or a built-in model ('toyworld', 'tiny', "
        "'sd15-arch').",
    )
    revision: str | None = Field(default=None, description="Hub revision of the base model.")
    train_data_dir: str | None = Field(
        default=None, description="Folder with the concept images (needed on rank 0 only)."
    )
    output_dir: str = Field(default="textual_inversion_output", min_length=1)
    require_amx: bool = Field(
        default=False,
        description="Stop at start, before loading anything, when this CPU has no AMX "
        "(the operator sets it from workers.requireAmx, so a mislabelled node fails fast).",
    )
    textual_inversion: TextualInversionOptions | None = Field(
        default=None, description="Learn a new token's embedding (method textual-inversion)."
    )
    lora: LoraOptions | None = Field(
        default=None, description="Train LoRA adapters (method lora)."
    )
    training: TrainingOptions = Field(default_factory=TrainingOptions)
    runtime: TrainerRuntimeOptions = Field(default_factory=TrainerRuntimeOptions)

    @model_validator(mode="after")
    def _one_method(self) -> TrainerConfig:
        given = [name for name in METHOD_SECTIONS.values() if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one method section, textual_inversion or lora"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        return self

    @property
    def method(self) -> str:
        """The trainer subcommand this config is for ('textual-inversion' or 'lora')."""
        return next(m for m, name in METHOD_SECTIONS.items() if getattr(self, name) is not None)


# Trainer subcommand -> its section of TrainerConfig.
METHOD_SECTIONS = {"textual-inversion": "textual_inversion", "lora": "lora"}
