"""Shared fixtures of the trainer tier: the tiny built-in model, concept images, one trained run.

Everything runs on the CPU with the tiny model at 64 px and one thread per rank (the machine
is shared and small models only lose from threading). The built model lives in the default
cache (~/.cache/amxtune) and is reused across runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import BASE_ARGS, TOKEN, make_images, run_trainer


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from amxtune_trainer.builtin.models import ensure_builtin_model

    return ensure_builtin_model("tiny")


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("concept") / "images")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model, concept_dir) -> dict:
    """One complete one-rank run with every optional output switched on."""
    out = tmp_path_factory.mktemp("trained") / "out"
    args = [
        *BASE_ARGS, "--train-data-dir", str(concept_dir), "--output-dir", str(out),
        "--max-train-steps", "40", "--learning-rate", "0.1", "--seed", "3",
        "--checkpointing-steps", "10", "--checkpoints-total-limit", "2", "--logging-steps", "5",
        "--eval-samples", "8", "--save-as-full-pipeline", "--save-a1111",
        "--validation-prompt", f"a photo of a {TOKEN}", "--num-validation-images", "2",
        "--validation-steps", "40", "--validation-inference-steps", "2",
        "--resume-from-checkpoint", "latest", "--num-vectors", "2",
    ]
    result = run_trainer(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "stdout": result.stdout, "stderr": result.stderr,
            "metrics": json.loads((out / "metrics.json").read_text())}
