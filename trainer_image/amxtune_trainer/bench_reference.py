"""The diffusers reference scripts, run unchanged from a copy the user points at, timed per step.

Used by `python -m amxtune_trainer.bench --against-reference SCRIPT`: textual inversion is
compared with `examples/textual_inversion/textual_inversion.py`, LoRA with
`examples/dreambooth/train_dreambooth_lora.py`, on the same model folder, images, resolution,
precision and batch. Nothing of the scripts is copied into this project.

A step's time is read from the script's own progress bar: the moment tqdm reports step k is
taken as the end of step k (stderr is read as it is written), and the median of the
differences after the warm-up steps is the step time; peak RSS is the child's own (wait4).
"""

from __future__ import annotations

import itertools
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from amxtune_trainer.runtime import preloads_without_allocator

STEP = re.compile(rb"^Steps:.*?(\d+)/(\d+) \[")  # the training bar, not the loading bars


def reference_command(script: Path, method: str, model_path: Path, data: Path, out: Path,
                      resolution: int, precision: str, steps: int, rank: int,
                      processes: int = 1) -> list[str]:
    """The script's command line; with several processes it runs under torchrun, as a user
    spreads it over a node's cores (accelerate then trains data-parallel with gloo)."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(processes)]
    common = [
        *launcher, str(script), "--pretrained_model_name_or_path", str(model_path),
        "--output_dir", str(out), "--resolution", str(resolution),
        "--mixed_precision", "no" if precision == "fp32" else precision,
        "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(steps), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--seed", "0", "--checkpointing_steps", str(10 ** 6), "--dataloader_num_workers", "0",
    ]
    if method == "lora":
        return [*common, "--instance_data_dir", str(data), "--instance_prompt",
                "a photo of sks toy", "--rank", str(rank), "--learning_rate", "1e-4"]
    return [*common, "--train_data_dir", str(data), "--placeholder_token", "<cat-toy>",
            "--initializer_token", "toy", "--learnable_property", "object",
            "--learning_rate", "5e-4", "--save_steps", str(10 ** 6),
            "--validation_steps", str(10 ** 6)]


def reference_environment(environ: dict[str, str], processes: int = 1) -> dict[str, str]:
    """The script's environment: as a user runs it, with glibc malloc (our allocator preload
    dropped; others, such as a CPU mask, stay), offline; with several processes each gets an
    equal share of the cores as its threads."""
    env = dict(environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    kept = preloads_without_allocator(env.pop("LD_PRELOAD", ""))
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    if processes > 1:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // processes))
    return env


def run_reference(command: list[str], warmup: int, processes: int = 1) -> dict:
    """Run the script; seconds per step (median after `warmup`) and the largest process's
    peak RSS."""
    env = reference_environment(dict(os.environ), processes)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env)
    assert child.stderr is not None
    seen: dict[int, float] = {0: time.perf_counter()}
    tail, pending = b"", b""
    for chunk in iter(lambda: child.stderr.read1(65536), b""):
        now = time.perf_counter()
        tail = (tail + chunk)[-20000:]
        *segments, pending = re.split(rb"[\r\n]", pending + chunk)  # tqdm redraws with \r
        for segment in segments:
            match = STEP.match(segment.strip())
            if match and int(match.group(1)) and int(match.group(1)) not in seen:
                seen[int(match.group(1))] = now
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        lines = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()
        raise SystemExit(f"reference failed (exit {child.returncode}):\n" + "\n".join(lines[-15:]))
    steps = sorted(seen)
    durations = [seen[b] - seen[a] for a, b in itertools.pairwise(steps) if b == a + 1]
    timed = durations[warmup:] or durations
    if not timed:
        raise SystemExit("reference: no step progress seen on stderr (is it a tqdm script?)")
    return {"seconds_per_step": statistics.median(timed), "steps_timed": len(timed),
            "peak_rss_mb": usage.ru_maxrss / 1024, "load_before": load_before,
            "load_after": os.getloadavg()[0], "wall_seconds": time.perf_counter() - started}
