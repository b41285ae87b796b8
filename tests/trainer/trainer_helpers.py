"""Helpers of the trainer tier: run the trainer, read its events, draw concept images.

Test modules import them from here, not from conftest: with several tiers' conftest.py files
loaded in one session, `import conftest` finds whichever was loaded last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
