"""Two ranks (torchrun, gloo, two local processes) and resume after a crash."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import BASE_ARGS, TOKEN, events, run_trainer, trainer_env

pytestmark = pytest.mark.trainer


def _embeds(out):
    return load_file(str(out / "learned_embeds.safetensors"))[TOKEN]


def test_two_ranks_end_with_identical_embeddings_and_report_allreduced_bytes(
        tmp_path, tiny_model, concept_dir):
    out = tmp_path / "out"
    result = run_trainer([
        *BASE_ARGS, "--train-data-dir", str(concept_dir), "--output-dir", str(out),
        "--max-train-steps", "6", "--learning-rate", "0.05", "--seed", "5", "--num-vectors", "3",
        "--distributed-backend", "gloo",
    ], ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["backend"] == "gloo"
    digests = metrics["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    cores = metrics["cores_per_rank"]
    if len(os.sched_getaffinity(0)) >= 2:  # each rank pinned to its own share of the CPU set
        assert cores[0] and cores[1] and not set(cores[0]) & set(cores[1])
    # Only the new vectors' gradient (3 x 32 fp32), the loss and the stop flag cross ranks.
    assert metrics["allreduce_bytes_per_step"] == (3 * 32 + 2) * 4
    # Only rank 0 reports progress: one line per step, not two.
    steps = [e["step"] for e in events(result.stdout) if e["event"] == "progress"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _embeds(out).shape == (3, 32)


@pytest.mark.parametrize("model", ["tiny", "toyworld"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_model, concept_dir,
                                                          model):
    common = [
        *BASE_ARGS, "--model", model, "--train-data-dir", str(concept_dir),
        "--max-train-steps", "8", "--learning-rate", "0.05", "--seed", "11",
        "--checkpointing-steps", "4",
        "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--random-flip",
        "--train-batch-size", "2", "--resume-from-checkpoint", "latest",
    ]
    whole = tmp_path / "whole"
    assert run_trainer([*common, "--output-dir", str(whole)]).returncode == 0

    resumed = tmp_path / "resumed"
    crashed = run_trainer([*common, "--output-dir", str(resumed)],
                          env=trainer_env(AMXTUNE_TEST_CRASH_AFTER_STEP="5"))
    assert crashed.returncode != 0
    assert (resumed / "checkpoints" / "checkpoint-4").is_dir()
    assert not (resumed / "learned_embeds.safetensors").exists()
    again = run_trainer([*common, "--output-dir", str(resumed)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and "at step 4" in again.stderr
    first = next(e for e in events(again.stdout) if e["event"] == "progress")
    assert first["step"] == 5
    torch.testing.assert_close(_embeds(resumed), _embeds(whole), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_embeds(resumed), load_file(
        str(resumed / "checkpoints" / "checkpoint-4" / "learned_embeds.safetensors"))[TOKEN])
    whole_m = json.loads((whole / "metrics.json").read_text())
    resumed_m = json.loads((resumed / "metrics.json").read_text())
    assert resumed_m["resumed_from_step"] == 4
    assert [h["step"] for h in resumed_m["history"]] == list(range(1, 9))
    assert resumed_m["final_loss"] == pytest.approx(whole_m["final_loss"], rel=1e-5)


def test_two_ranks_started_like_mpirun_with_pmi_variables(tmp_path, tiny_model, concept_dir):
    """Intel MPI gives PMI_RANK/PMI_SIZE/MPI_LOCALRANKID; rank 1 gets no data folder."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    processes = []
    for rank in (0, 1):
        env = trainer_env(PMI_RANK=str(rank), PMI_SIZE="2", MPI_LOCALRANKID=str(rank),
                          MPI_LOCALNRANKS="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(name, None)
        data = str(concept_dir) if rank == 0 else str(tmp_path / "no-data-on-this-node")
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "amxtune_trainer", "textual-inversion", *BASE_ARGS,
             "--train-data-dir", data, "--output-dir", str(out), "--max-train-steps", "3",
             "--seed", "2", "--learning-rate", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], results[0][1][-2000:]
    assert results[1][0] == ""  # only rank 0 reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["rank_weights_sha256"][0] == metrics["rank_weights_sha256"][1]
    assert metrics["allreduce_bytes_per_step"] == (32 + 2) * 4
