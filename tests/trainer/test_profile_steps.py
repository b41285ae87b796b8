"""`python -m amxtune_trainer.profile_steps` splits a training step's time by kind of op, for a
plain PyTorch script as a user runs it and for our trainer as it runs itself."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from trainer_helpers import BASE_ARGS, trainer_env

from amxtune_trainer.profile_steps import OUTSIDE_OPS, category
from amxtune_trainer.runtime import find_allocator

pytestmark = pytest.mark.trainer

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import helper  # next to the script, as `python job/train.py` finds it
    import torch.nn.functional as F

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    proj = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW([*conv.parameters(), *proj.parameters()], lr=1e-3)
    for _ in range(int(sys.argv[1])):
        x = conv(torch.randn(2, 4, 16, 16)).flatten(2).transpose(1, 2)
        q = proj(x.reshape(-1, 8)).reshape(2, -1, 2, 4).transpose(1, 2)
        F.scaled_dot_product_attention(q, q, q).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
""")


def profile(tmp_path: Path, target: list[str], *options: str, env: dict | None = None,
            ) -> tuple[subprocess.CompletedProcess, dict | None]:
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "amxtune_trainer.profile_steps", *options,
         "--json", str(summary), "--", *target],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env or trainer_env())
    return done, json.loads(summary.read_text()) if summary.exists() else None


def write_script(tmp_path: Path) -> str:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "helper.py").write_text("")
    (tmp_path / "job" / "train.py").write_text(SCRIPT)
    return "job/train.py"


def env_without_allocator_settings() -> dict:
    env = trainer_env()
    for name in ("LD_PRELOAD", "AMXTUNE_ALLOCATOR", "AMXTUNE_ALLOCATOR_EXEC"):
        env.pop(name, None)
    return env


def test_a_script_is_split_by_kind_of_op(tmp_path):
    env = env_without_allocator_settings()
    allocator = find_allocator()
    if allocator:  # the caller's allocator goes: the script runs as its user runs it
        env["LD_PRELOAD"] = allocator
    done, summary = profile(tmp_path, [write_script(tmp_path), "6"], "--warmup", "2",
                            "--steps", "3", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert summary["steps"] == 3
    categories = summary["categories"]
    for kind in ("attention backward", "attention forward", "convolutions",
                 "matrix multiplies"):
        assert categories[kind] > 0, (kind, categories)
    # the recorded ops fit in the recorded steps: nothing from the unrecorded steps is counted
    assert categories[OUTSIDE_OPS] >= 0
    # every convolution kernel this PyTorch ran (slow 2-D kernels included) counts as one
    kernels = {op["op"] for op in summary["ops"] if re.search(r"conv(?!ert)", op["op"])}
    assert kernels and all(category(op) == "convolutions" for op in kernels), kernels
    assert summary["ld_preload"] == ""
    assert "| attention backward |" in done.stdout


def test_too_few_steps_is_an_error_naming_the_counts(tmp_path):
    done, summary = profile(tmp_path, [write_script(tmp_path), "2"])
    assert done.returncode == 2 and summary is None
    assert "made 2 optimizer steps" in done.stderr and "need 6" in done.stderr


def test_a_script_exiting_with_a_message_keeps_its_message(tmp_path):
    (tmp_path / "fails.py").write_text("import sys\nsys.exit('no images in /data')\n")
    done, summary = profile(tmp_path, ["fails.py"])
    assert done.returncode == 1 and summary is None
    assert "no images in /data" in done.stderr


def test_our_trainer_is_profiled_with_its_own_allocator(tmp_path, tiny_model, concept_dir):
    done, summary = profile(tmp_path, [
        "-m", "amxtune_trainer", "textual-inversion", *BASE_ARGS,
        "--train-data-dir", str(concept_dir), "--output-dir", str(tmp_path / "out"),
        "--max-train-steps", "5", "--eval-samples", "0"], "--warmup", "2", "--steps", "2",
        env=env_without_allocator_settings())
    assert done.returncode == 0, done.stderr[-2000:]
    assert summary["steps"] == 2 and summary["categories"]["convolutions"] > 0
    allocator = find_allocator()
    preloaded = summary["ld_preload"].split(":")
    assert (allocator in preloaded) if allocator else preloaded == [""]
    assert (tmp_path / "out" / "learned_embeds.safetensors").exists()
