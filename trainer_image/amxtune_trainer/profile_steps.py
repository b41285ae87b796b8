"""Where a training step's time goes, for our trainer or any PyTorch training script.

    python -m amxtune_trainer.profile_steps [--warmup N] [--steps N] [--rows N] [--json FILE] \\
        -- (SCRIPT | -m MODULE) ARGS...

Runs the script in this process under torch.profiler: the first `--warmup` optimizer steps
are not recorded (the last of them is the profiler's own warm-up), the next `--steps` are.
Steps are counted by a global optimizer step hook, so the diffusers scripts (through
accelerate) and `python -m amxtune_trainer textual-inversion ...` are profiled alike,
unchanged. Prints the time per step split into attention forward / backward (PyTorch's fused
SDPA kernels), convolutions, matrix multiplies, other ops and time outside any op, then the
ops with the most self time. One process only: profile one rank (`ranksPerNode: 1`, or the
reference without torchrun).

Each side runs with the allocator it runs with anyway: our trainer with tcmalloc/jemalloc (it
re-execs itself with one), a script with glibc malloc as a user runs it (a preloaded allocator
is dropped; other preloads, such as a CPU mask, stay). OpenMP threads sleep when idle, as in
the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import sys
from pathlib import Path

from amxtune_trainer.runtime import (
    drop_preloaded_allocator,
    preload_allocator,
    quiet_openmp_waits,
    runs_trainer,
)

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
# every convolution kernel's name: aten::convolution, mkldnn::_convolution_pointwise,
# aten::_slow_conv2d_forward, aten::thnn_conv2d, aten::conv_transpose2d, ... (not "convert")
CONVOLUTION = re.compile(r"conv(olution|\d|_)")
OUTSIDE_OPS = "outside any op (Python, autograd bookkeeping, data loading)"
CATEGORIES = ["attention backward", "attention forward", "convolutions", "matrix multiplies",
              "other ops (norms, activations, element-wise, copies, optimizer math)",
              OUTSIDE_OPS]


def is_op(name: str) -> bool:
    """A kernel of a library namespace (aten::, mkldnn::, ...), not a span the profiler or
    Python code records (ProfilerStep#, Optimizer.step#, ConvolutionBackward0, autograd::engine
    ..., data loader): spans' own time is Python and bookkeeping, counted as outside any op."""
    return "::" in name and not name.startswith(("autograd::", "profiler::"))


def category(name: str) -> str:
    if "scaled_dot_product" in name:
        return "attention backward" if "backward" in name else "attention forward"
    if CONVOLUTION.search(name):
        return "convolutions"
    if name in MATMULS:
        return "matrix multiplies"
    return CATEGORIES[4]


def summarize(events, steps: int) -> dict:
    """Seconds per step by category: the ops' self time; what is left of the step (the sum of
    the recorded ProfilerStep spans) is time outside any op."""
    by_category = dict.fromkeys(CATEGORIES, 0.0)
    step_total = 0.0
    ops = []
    for event in events:
        if event.key.startswith("ProfilerStep"):
            step_total += event.cpu_time_total / 1e6 / steps
        if not is_op(event.key):
            continue
        seconds = event.self_cpu_time_total / 1e6 / steps
        by_category[category(event.key)] += seconds
        ops.append({"op": event.key, "seconds_per_step": seconds,
                    "calls_per_step": event.count / steps})
    by_category[OUTSIDE_OPS] = step_total - sum(by_category.values())
    ops.sort(key=lambda op: -op["seconds_per_step"])
    return {"steps": steps, "seconds_per_step": step_total,
            "ld_preload": os.environ.get("LD_PRELOAD", ""),  # as metrics.json has it
            "categories": by_category, "ops": ops}


def print_summary(summary: dict, rows: int) -> None:
    total = summary["seconds_per_step"]
    print(f"{summary['steps']} steps profiled, {total:.3f} s per step; "
          f"LD_PRELOAD: {summary['ld_preload'] or 'none'}")
    print("| where | s/step | share |\n|---|---|---|")
    for name, seconds in summary["categories"].items():
        print(f"| {name} | {seconds:.3f} | {seconds / total:.0%} |")
    print("\n| op (self time) | s/step | calls/step |\n|---|---|---|")
    for op in summary["ops"][:rows]:
        print(f"| {op['op']} | {op['seconds_per_step']:.3f} | {op['calls_per_step']:g} |")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python -m amxtune_trainer.profile_steps [options] -- "
                         "(SCRIPT | -m MODULE) ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m amxtune_trainer.profile_steps")
    parser.add_argument("--warmup", type=int, default=3,
                        help="optimizer steps not recorded, at least 1 (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="steps recorded (default 3)")
    parser.add_argument("--rows", type=int, default=25, help="top ops printed (default 25)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv[:split])
    target = argv[split + 1:]
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if not target or (target[0] == "-m" and len(target) < 2):
        parser.error("after --: a script path, or -m and a module name")
    module = target[1] if target[0] == "-m" else None
    if runs_trainer(target):
        preload_allocator(launched=True)
    else:
        drop_preloaded_allocator()
    quiet_openmp_waits()

    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    profiler = profile(activities=[ProfilerActivity.CPU], schedule=schedule(
        wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1))
    seen = 0

    def after_step(*_) -> None:
        nonlocal seen
        seen += 1
        profiler.step()

    hook = register_optimizer_step_post_hook(after_step)
    profiler.start()
    code = 0
    try:
        if module is not None:
            sys.argv = [module, *target[2:]]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            sys.argv = target
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))  # as `python SCRIPT`
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if not isinstance(exit_.code, int | None):
            print(exit_.code, file=sys.stderr)
    finally:
        hook.remove()
        profiler.stop()
    needed = args.warmup + args.steps
    if seen < needed:
        print(f"profile_steps: the script made {seen} optimizer steps; --warmup "
              f"{args.warmup} and --steps {args.steps} need {needed}", file=sys.stderr)
        return code or 2
    summary = summarize(profiler.key_averages(), args.steps)
    print_summary(summary, args.rows)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
