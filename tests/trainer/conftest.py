"""Shared fixtures of the trainer tier: the tiny built-in model, concept images, one trained run.

Everything runs on the CPU with the tiny model at 64 px and one thread per rank (the machine
is shared and small models only lose from threading). The built model lives in the default
cache (~/.cache/amxtune) and is reused across runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOKEN = "<cat-toy>"
BASE_ARGS = [
    "--model", "tiny", "--placeholder-token", TOKEN, "--initializer-token", "toy",
    "--resolution", "64", "--mixed-precision", "no", "--lr-warmup-steps", "0",
]


def trainer_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("AMXTUNE_TEST_CRASH_AFTER_STEP", None)
    env.update(extra)
    return env


def run_trainer(args: list[str], *, ranks: int = 1, env: dict | None = None,
                timeout: float = 300, method: str = "textual-inversion",
                ) -> subprocess.CompletedProcess:
    if ranks == 1:
        command = [sys.executable, "-m", "amxtune_trainer", method, *args]
    else:
        command = [sys.executable, "-m", "amxtune_trainer", "launch", "--nproc-per-node",
                   str(ranks), "--", method, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=env or trainer_env())


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def make_images(folder: Path, count: int = 4, size: tuple[int, int] = (80, 72)) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", size, (240, 230, 200 - 20 * i))
        draw = ImageDraw.Draw(image)
        draw.ellipse((8 + 4 * i, 10, 60, 62), fill=(200, 40 + 30 * i, 30))
        draw.rectangle((30, 5 + 3 * i, 70, 20), fill=(20, 90, 160))
        image.save(folder / f"toy-{i}.{'png' if i % 2 else 'jpg'}")
    return folder


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
