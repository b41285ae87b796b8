"""Pydantic models of amxtune's external inputs: the one source of truth for CRDs and trainer.

The `amxtune-api` distribution: the operator and the trainer both depend on it, and it depends
on pydantic only (docs/architecture.md)."""

from amxtune_api.base import ApiModel
from amxtune_api.training import (
    Accelerator,
    DistributedBackend,
    LearnableProperty,
    LoraOptions,
    LrScheduler,
    MixedPrecision,
    TextualInversionOptions,
    TrainerConfig,
    TrainerRuntimeOptions,
    TrainingOptions,
)

__all__ = [
    "Accelerator",
    "ApiModel",
    "DistributedBackend",
    "LearnableProperty",
    "LoraOptions",
    "LrScheduler",
    "MixedPrecision",
    "TextualInversionOptions",
    "TrainerConfig",
    "TrainerRuntimeOptions",
    "TrainingOptions",
]
