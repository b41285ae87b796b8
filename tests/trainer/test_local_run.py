"""`amxtune run`: a manifest on this machine, two ranks, Ctrl-C, and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

pytestmark = pytest.mark.trainer
ROOT = Path(__file__).resolve().parents[2]


def manifest(tmp_path: Path, steps: int) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    doc["spec"]["model"] = {"name": "tiny"}  # plumbing: the random-weight model is enough
    doc["spec"]["textualInversion"] = {"placeholderToken": "<robot-toy>", "initializerToken": "toy"}
    doc["spec"]["training"].update(maxTrainSteps=steps, checkpointingSteps=4, loggingSteps=1,
                                   conceptSimilarityImages=0)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    (tmp_path / "concepts").symlink_to(ROOT / "examples" / "concepts")
    return path


def amxtune_run(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "amxtune.cli", "run", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_run_trains_with_two_ranks_and_resumes_after_ctrl_c(tmp_path):
    job = manifest(tmp_path, steps=400)
    process = amxtune_run(tmp_path, str(job), "--no-export", "--ranks", "2")
    checkpoints = tmp_path / "amxtune-output" / "robot-toy" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    ranks = psutil.Process(process.pid).children(recursive=True)
    assert len([r for r in ranks if "textual-inversion" in " ".join(r.cmdline())]) >= 2
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    _, alive = psutil.wait_procs(ranks, timeout=30)
    assert alive == [], "ranks still running after Ctrl-C"

    # Ranks may have saved several checkpoints before Ctrl-C arrived; resume with steps left.
    saved = max(int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*"))
    steps = saved + 8
    job = manifest_with_steps(job, steps)
    finished = amxtune_run(tmp_path, str(job), "--no-export")
    _, stderr = finished.communicate(timeout=600)
    assert finished.returncode == 0, stderr
    results = tmp_path / "amxtune-output" / "robot-toy"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == saved
    assert metrics["steps"] == steps and metrics["world_size"] == 2
    assert (results / "learned_embeds.safetensors").is_file()
    assert f"training: {steps}/{steps}" in stderr  # progress reached the user
    expected = metrics["mixed_precision"]["used"]
    assert f"amxtune run: training in {expected} (" in stderr  # and what the trainer chose


def manifest_with_steps(path: Path, steps: int) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["training"]["maxTrainSteps"] = steps
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_explains_a_missing_data_folder(tmp_path):
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob.yaml").read_text())
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [sys.executable, "-m", "amxtune.cli", "run", str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "spec.data.pvc: claim 'concepts'" in result.stderr
    assert "--volume concepts=DIR or --data DIR" in result.stderr
    assert not (tmp_path / "amxtune-output").exists()


def test_run_of_the_lora_example_trains_fuses_exports_and_renders(tmp_path):
    doc = yaml.safe_load((ROOT / "examples" / "lora.yaml").read_text())
    doc["spec"]["model"] = {"name": "tiny"}  # plumbing: the random-weight model is enough
    doc["spec"]["training"].update(maxTrainSteps=4, checkpointingSteps=2,
                                   conceptSimilarityImages=0)
    doc["spec"]["export"]["numInferenceSteps"] = 2
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    (tmp_path / "concepts").symlink_to(ROOT / "examples" / "concepts")
    stdout, stderr = amxtune_run(tmp_path, str(job), "--ranks", "2").communicate(timeout=900)
    out = tmp_path / "amxtune-output" / "robot-lora"
    assert (out / "pytorch_lora_weights.safetensors").is_file(), stderr[-3000:]
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file()
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    export = [e for e in lines if e.get("event") == "completed" and "openvino" in e]
    assert export and export[0]["source"] == "lora", stdout[-2000:]
    assert export[0]["weights"] == str(out / "pytorch_lora_weights.safetensors")
    assert export[0]["images"] == 4 and (out / "samples" / "grid.png").is_file()
    metadata = json.loads((out / "openvino" / "amxtune_export.json").read_text())
    assert metadata["lora_weights"] == export[0]["weights"]
