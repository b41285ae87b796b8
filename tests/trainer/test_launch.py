"""`amxtune-train launch`: what a failing or stopped group of ranks looks like to a user."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from trainer_helpers import BASE_ARGS, trainer_env

pytestmark = pytest.mark.trainer


def launch(tmp_path, concept_dir, *launch_args: str, steps: int = 4, **env: str):
    command = [sys.executable, "-m", "amxtune_trainer", "launch", "--nproc-per-node", "2",
               *launch_args, "--", "textual-inversion", *BASE_ARGS,
               "--train-data-dir", str(concept_dir), "--output-dir", str(tmp_path / "out"),
               "--max-train-steps", str(steps), "--seed", "1", "--eval-samples", "0",
               "--resume-from-checkpoint", "latest"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=trainer_env(**env), start_new_session=True)


def test_a_crash_reads_as_one_line_per_rank_with_the_traceback_in_the_log_dir(
        tmp_path, tiny_model, concept_dir):
    logs = tmp_path / "logs"
    process = launch(tmp_path, concept_dir, "--log-dir", str(logs),
                     AMXTUNE_TEST_CRASH_AFTER_STEP="2")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    lines = stderr.strip().splitlines()
    crash = "RuntimeError: simulated crash after step 2 (AMXTUNE_TEST_CRASH_AFTER_STEP)"
    for rank in (0, 1):
        assert (f"amxtune-train textual-inversion: rank {rank} failed: {crash} (traceback in "
                f"{logs}/rank-{rank}.log)") in lines
        assert "Traceback (most recent call last)" in (logs / f"rank-{rank}.log").read_text()
    assert lines[-1] == "amxtune-train launch: ranks 0, 1 exited with code 1"


def test_without_a_log_dir_the_traceback_stays_above_the_line(tmp_path, tiny_model,
                                                              concept_dir):
    process = launch(tmp_path, concept_dir, AMXTUNE_TEST_CRASH_AFTER_STEP="1", steps=2)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert stderr.count("Traceback (most recent call last)") == 2
    assert "rank 1 failed: RuntimeError: simulated crash after step 1" in stderr
    assert "(traceback above)" in stderr


@pytest.mark.parametrize("rank_signalled", [None, 1])
def test_sigterm_saves_the_current_step_and_stops_every_rank(tmp_path, tiny_model, concept_dir,
                                                             rank_signalled):
    """SIGTERM to the launcher (a pod's eviction) or to one rank only (the ranks of several
    pods hear of a drain at different moments): every rank ends the same step, rank 0 saves
    it, and the same command resumes from it."""
    process = launch(tmp_path, concept_dir, steps=10_000)
    assert process.stdout is not None
    for line in process.stdout:  # wait until training runs
        if '"event": "progress"' in line:
            break
    ranks = sorted(psutil.Process(process.pid).children(),
                   key=lambda p: int(p.environ().get("RANK", "0")))
    assert len(ranks) == 2
    began = time.monotonic()
    if rank_signalled is None:
        process.send_signal(signal.SIGTERM)
    else:
        ranks[rank_signalled].send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert time.monotonic() - began < 30
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == []
    stopped = [json.loads(x) for x in stdout.splitlines() if '"event": "stopped"' in x]
    assert len(stopped) == 1, stdout[-2000:]
    step = stopped[0]["step"]
    assert stopped[0]["checkpoint"] == str(tmp_path / "out" / "checkpoints" / f"checkpoint-{step}")
    assert f"stopped by signal {int(signal.SIGTERM)} after step {step}" in stderr
    assert (tmp_path / "out" / "checkpoints" / f"checkpoint-{step}" / "state.pt").is_file()

    resumed = launch(tmp_path, concept_dir, steps=step + 2)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"at step {step}" in stderr
    progress = [json.loads(x)["step"] for x in stdout.splitlines() if '"event": "progress"' in x]
    assert progress == [step + 1, step + 2]


def test_launch_needs_a_subcommand_and_a_master_for_several_nodes():
    result = subprocess.run(
        [sys.executable, "-m", "amxtune_trainer", "launch", "--nnodes", "2", "--", "doctor"],
        capture_output=True, text=True, timeout=60, env=trainer_env(MASTER_ADDR=""))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "amxtune-train launch: error: 2 nodes need --master-addr and --master-port "
        "(or MASTER_ADDR and MASTER_PORT)")
    result = subprocess.run([sys.executable, "-m", "amxtune_trainer", "launch"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "name the subcommand to launch after --" in result.stderr
