"""Pydantic models of amxtune's external inputs: the one source of truth for CRDs and trainer."""

from amxtune_api.base import ApiModel
from amxtune_api.training import (
    Accelerator,
    DistributedBackend,
    LearnableProperty,
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
    "LrScheduler",
    "MixedPrecision",
    "TextualInversionOptions",
    "TrainerConfig",
    "TrainerRuntimeOptions",
    "TrainingOptions",
]
