"""`python -m amxtune_trainer.bench`: how fast a training step is (not a test).

Runs the real trainer (a subprocess per configuration: `python -m amxtune_trainer` for one rank,
`amxtune-train launch` for several) on synthetic images and prints the CPU (the trainer's
probe) and, per configuration, the median seconds per step after warm-up, samples per second,
peak RSS per rank and the bytes all-reduced per step; with --flops also the FLOPs of one step
(counted by torch's FlopCounterMode) and the achieved FLOP/s against the CPU's AMX bf16 peak.
The load average is printed too: other processes on the node skew the figures.

--method lora times LoRA steps (rank 4 on the attention projections) instead of textual
inversion. --against-reference SCRIPT also runs the diffusers script for the method (a copy
the user points at, see bench_reference.py) on the same configuration, in alternating order
over --passes passes, and prints both and their ratio. With --ranks, each count runs both with
that many processes on the node (the reference under torchrun, data-parallel through accelerate),
and the samples/s per node of each one's best layout are compared too.

--memory samples every rank's PSS (proportional set size: pages mapped by several ranks
count 1/P in each) four times a second and prints each rank's peak and the pod's (the
peak of the ranks' summed PSS, what one worker pod holds), and the pod's PSS after the last
step (what training holds, without the transients of loading); --frozen-weights shared private
compares one copy of the frozen networks per node (frozen.py) with one per rank.

--same-learning trains the tiny model twice, with and without the speed-ups (bf16 weights +
autocast + channels_last vs fp32), and evaluates both embeddings with the same fp32
evaluator on the fixed evaluation set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runtime.quiet_openmp_waits

TOKEN = "<bench-concept>"


def make_images(folder: Path, count: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = Image.new("RGB", (size + 40, size), (235, 225 - 10 * i, 200))
        draw = ImageDraw.Draw(image)
        draw.ellipse((size // 8 + 5 * i, size // 8, size * 3 // 4, size * 7 // 8),
                     fill=(200, 60 + 30 * i, 40))
        image.save(folder / f"concept-{i}.png")
    return folder


LORA_RANK = 4


def trainer_args(model: str, data: Path, out: Path, resolution: int, precision: str,
                 steps: int, extra: list[str] | None = None,
                 method: str = "textual-inversion") -> list[str]:
    if method == "lora":
        concept = ["--instance-prompt", "a photo of sks toy", "--rank", str(LORA_RANK),
                   "--learning-rate", "1e-4"]
    else:
        concept = ["--placeholder-token", TOKEN, "--initializer-token", "toy",
                   "--learning-rate", "5e-3"]
    return [
        "--model", model, "--train-data-dir", str(data), "--output-dir", str(out), *concept,
        "--resolution", str(resolution), "--mixed-precision", "no" if precision == "fp32"
        else precision, "--max-train-steps", str(steps),
        "--lr-warmup-steps", "0", "--seed", "0", "--eval-samples", "0",
        "--checkpointing-steps", str(10 ** 6), "--save-steps", str(10 ** 6),
        "--logging-steps", "1", *(extra or []),
    ]


class MemorySampler(threading.Thread):
    """Peak PSS of each rank process under `pid` (the rank itself, or the launcher's
    children), and the peak of their sum: what the pod holds."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss: dict[int, float] = {}
        self.peak_pod_pss = 0.0
        self.done = threading.Event()

    def _ranks(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [c.pid for c in root.children()
                    if "amxtune_trainer" in " ".join(c.cmdline())] or [self.pid]
        except psutil.Error:
            return []

    def run(self) -> None:
        from amxtune_trainer.runtime import pss_mb

        while not self.done.wait(self.interval):
            total = 0.0
            for pid in self._ranks():
                pss = pss_mb(pid)
                if pss is not None:
                    self.peak_pss[pid] = max(self.peak_pss.get(pid, 0.0), pss)
                    total += pss
            self.peak_pod_pss = max(self.peak_pod_pss, total)

    def result(self) -> dict:
        return {"peak_pss_mb": max(self.peak_pss.values(), default=0.0),
                "peak_pod_pss_mb": self.peak_pod_pss}


def run_config(model: str, resolution: int, precision: str, ranks: int, steps: int,
               warmup: int, workdir: Path, extra: list[str],
               method: str = "textual-inversion", memory: bool = False,
               frozen_weights: str = "shared") -> dict:
    from amxtune_trainer import frozen

    name = f"{method}-{model}-{resolution}-{precision}-r{ranks}-{frozen_weights}"
    data = make_images(workdir / f"data-{resolution}", 4, max(resolution, 64))
    out = workdir / name
    if out.exists():  # a previous pass: start fresh, not from its checkpoint
        import shutil

        shutil.rmtree(out)
    args = trainer_args(model, data, out, resolution, precision, steps, extra, method)
    if ranks == 1:
        command = [sys.executable, "-m", "amxtune_trainer", method, *args]
    else:
        command = [sys.executable, "-m", "amxtune_trainer", "launch", "--nproc-per-node",
                   str(ranks), "--", method, *args]
    env = {**os.environ, frozen.SHARE_ENV: "1" if frozen_weights == "shared" else "0"}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    sampler = MemorySampler(process.pid) if memory else None
    if sampler is not None:
        sampler.start()
    _, stderr = process.communicate()
    if sampler is not None:
        sampler.done.set()
        sampler.join()
    if process.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{name} failed (exit {process.returncode}):\n{tail}")
    metrics = json.loads((out / "metrics.json").read_text())
    times = metrics["step_seconds"][warmup:] or metrics["step_seconds"]
    median = statistics.median(times)
    return {
        "name": name, "method": method, "model": model, "resolution": resolution,
        "precision": precision,
        "ranks": ranks, "used_precision": metrics["mixed_precision"]["used"],
        "frozen_weights": "shared" if all(metrics["frozen_weights_mapped_mb_per_rank"])
        else "private" if not any(metrics["frozen_weights_mapped_mb_per_rank"]) else "partly",
        "steps_timed": len(times), "seconds_per_step": median,
        "min_seconds_per_step": min(times),
        "samples_per_second": metrics["samples_per_step"] / median,
        "threads_per_rank": metrics["threads_per_rank"],
        "peak_rss_mb": max(metrics["peak_rss_mb_per_rank"]),
        "allreduce_bytes_per_step": metrics["allreduce_bytes_per_step"],
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "wall_seconds": time.perf_counter() - started,
        **(sampler.result() if sampler is not None else {}),
        # after the last step, every rank (what training holds, without loading's transients)
        "end_pss_mb_per_rank": metrics.get("pss_mb_per_rank"),
    }


def count_step_flops(model: str, resolution: int, workdir: Path) -> float:
    """FLOPs of one training step (forward + backward), counted in fp32 in this process."""
    import torch
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    from amxtune_trainer import distributed, options
    from amxtune_trainer.cli import build_parser
    from amxtune_trainer.recipes.textual_inversion import TextualInversion as Trainer

    data = make_images(workdir / f"data-{resolution}", 4, max(resolution, 64))
    parsed = build_parser("textual-inversion").parse_args(
        ["textual-inversion", *trainer_args(model, data, workdir / "flops", resolution, "fp32", 1)]
    )
    trainer = Trainer(options.config_from_args(parsed), distributed.DistInfo())
    trainer.prepare()
    # torch counts the CUDA attention kernels only; the CPU flash kernel has the same FLOPs
    cpu_attention = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(
                grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        trainer.train_step(1)
    return float(counter.get_total_flops())


def measure_matmul_peak(seconds: float = 3.0) -> float:
    """bf16 FLOP/s of a 2048^2 matmul on this process's cores (what oneDNN/AMX reaches)."""
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    return 2 * 2048 ** 3 * count / (time.perf_counter() - started)


def amx_theoretical_peak() -> tuple[float, str]:
    """Cores x 1024 bf16 FLOP/cycle (AMX TMUL) x nominal clock from /proc/cpuinfo."""
    cores = len(os.sched_getaffinity(0))
    mhz = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("bogomips"):
                mhz = float(line.split(":")[1]) / 2
                break
    except OSError:
        pass
    return cores * 1024 * mhz * 1e6, f"{cores} cores x 1024 bf16 FLOP/cycle x {mhz / 1000:.2f} GHz"


def same_learning(steps: int, workdir: Path) -> list[dict]:
    """Train tiny twice (speed-ups on/off) and evaluate both embeddings in fp32."""
    from amxtune_trainer import distributed, options
    from amxtune_trainer.cli import build_parser
    from amxtune_trainer.recipes.textual_inversion import TextualInversion as Trainer

    data = make_images(workdir / "data-64", 4, 64)
    rows = []
    variants = {
        "speed-ups (bf16 weights, autocast, channels_last)": ("bf16", []),
        "without (fp32, contiguous)": ("fp32", ["--no-channels-last"]),
    }
    for label, (precision, extra) in variants.items():
        out = workdir / f"learn-{precision}"
        args = trainer_args("tiny", data, out, 64, precision, steps,
                            ["--learning-rate", "0.1", "--seed", "3", *extra])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run([sys.executable, "-m", "amxtune_trainer", "textual-inversion",
                                 *args], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise SystemExit(f"{label} failed: {result.stderr[-2000:]}")
        losses = []
        for embeds in (None, out / "learned_embeds.safetensors"):
            eval_args = trainer_args("tiny", data, workdir / "eval", 64, "fp32", 1,
                                     ["--eval-samples", "16"])
            if embeds is not None:
                eval_args += ["--initial-embedding", str(embeds)]
            parsed = build_parser("textual-inversion").parse_args(["textual-inversion",
                                                                    *eval_args])
            trainer = Trainer(options.config_from_args(parsed), distributed.DistInfo())
            trainer.prepare()
            losses.append(trainer.eval_loss())
        rows.append({"variant": label, "eval_loss_before": losses[0],
                     "eval_loss_after": losses[1], "steps": steps,
                     "embeds": str(out / "learned_embeds.safetensors")})
    import torch
    from safetensors.torch import load_file

    fast, slow = (next(iter(load_file(r["embeds"]).values())) for r in rows)
    initial = trainer.embedding.base.weight[  # the initializer row both started from
        trainer.tokenizer.encode("toy", add_special_tokens=False)[0]].float()
    cosine = torch.nn.functional.cosine_similarity(fast - initial, slow - initial, dim=-1)
    for row in rows:
        row["update_cosine_fast_vs_fp32"] = float(cosine.min())
    return rows


def against_reference(args, workdir: Path, extra: list[str]) -> list[dict]:
    """Ours and the reference script on each configuration, alternating which runs first."""
    from amxtune_trainer import cpu
    from amxtune_trainer.bench_reference import reference_command, run_reference
    from amxtune_trainer.builtin.models import ensure_builtin_model

    # the reference knows no "auto": it gets what our trainer chooses on this CPU ("no": fp32)
    auto = cpu.choose_precision("auto", [cpu.probe()])[0]
    rows = []
    for model, resolution, precision, ranks in itertools.product(
            args.model, args.resolution, args.precision, args.ranks):
        data = make_images(workdir / f"data-{resolution}", 4, max(resolution, 64))
        command = reference_command(Path(args.against_reference), args.method,
                                    ensure_builtin_model(model), data, workdir / "reference",
                                    resolution, auto if precision == "auto" else precision,
                                    args.steps, LORA_RANK, processes=ranks)
        passes = []
        for number in range(args.passes):
            order = ["reference", "amxtune"] if number % 2 == 0 else ["amxtune", "reference"]
            result = {}
            for who in order:
                if who == "reference":
                    result[who] = run_reference(command, args.warmup, processes=ranks)
                else:
                    result[who] = run_config(model, resolution, precision, ranks, args.steps,
                                             args.warmup, workdir, extra, args.method)
                print(json.dumps({"pass": number, "who": who, "model": model,
                                  "resolution": resolution, "precision": precision,
                                  "ranks": ranks, **result[who]}), file=sys.stderr, flush=True)
            passes.append(result)
        rows.append({"model": model, "resolution": resolution, "precision": precision,
                     "ranks": ranks, "passes": passes})
    # ranks: processes of both on this node; samples/s is per node
    print("| method | model | px | precision | ranks × threads | reference s/step "
          "| amxtune s/step | speed-up | reference samples/s | amxtune samples/s "
          "| reference peak RSS MB | amxtune peak RSS MB | passes |")
    print("|" + "---|" * 13)
    for row in rows:
        ref = [p["reference"]["seconds_per_step"] for p in row["passes"]]
        ours = [p["amxtune"]["seconds_per_step"] for p in row["passes"]]
        ratio = statistics.median(r / o for r, o in zip(ref, ours, strict=True))
        row["speedup"] = ratio
        row["reference_samples_per_second"] = row["ranks"] / statistics.median(ref)  # batch 1
        row["amxtune_samples_per_second"] = statistics.median(
            p["amxtune"]["samples_per_second"] for p in row["passes"])
        print(f"| {args.method} | {row['model']} | {row['resolution']} | {row['precision']} | "
              f"{row['ranks']} × {row['passes'][0]['amxtune']['threads_per_rank']} | "
              f"{statistics.median(ref):.3f} ({min(ref):.2f}–{max(ref):.2f}) | "
              f"{statistics.median(ours):.3f} ({min(ours):.2f}–{max(ours):.2f}) | "
              f"**{ratio:.2f}×** | {row['reference_samples_per_second']:.3f} | "
              f"{row['amxtune_samples_per_second']:.3f} | "
              f"{max(p['reference']['peak_rss_mb'] for p in row['passes']):,.0f} | "
              f"{max(p['amxtune']['peak_rss_mb'] for p in row['passes']):,.0f} | "
              f"{len(row['passes'])} |")
    if len(args.ranks) > 1:  # each at the layout that suits it best on this node
        for key, group in itertools.groupby(
                rows, key=lambda r: (r["model"], r["resolution"], r["precision"])):
            group = list(group)
            ref_best = max(group, key=lambda r: r["reference_samples_per_second"])
            ours_best = max(group, key=lambda r: r["amxtune_samples_per_second"])
            theirs, ours = (ref_best["reference_samples_per_second"],
                            ours_best["amxtune_samples_per_second"])
            print(f"best layouts, {key[0]} {key[1]} px {key[2]}: reference {theirs:.3f} "
                  f"samples/s with {ref_best['ranks']} rank(s), amxtune {ours:.3f} with "
                  f"{ours_best['ranks']}: **{ours / theirs:.2f}×**")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amxtune_trainer.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sd15-arch"],
                        choices=["tiny", "sd15-arch", "toyworld"])
    parser.add_argument("--resolution", nargs="+", type=int, default=[256])
    parser.add_argument("--precision", nargs="+", default=["auto"],
                        choices=["auto", "fp32", "bf16"],
                        help="auto: what the trainer would choose on this CPU")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1])
    parser.add_argument("--method", choices=["textual-inversion", "lora"],
                        default="textual-inversion")
    parser.add_argument("--against-reference", metavar="SCRIPT",
                        help="a copy of the diffusers script for --method (textual_inversion.py "
                        "or train_dreambooth_lora.py) to run on the same configurations")
    parser.add_argument("--passes", type=int, default=2,
                        help="with --against-reference: passes, alternating which runs first")
    parser.add_argument("--frozen-weights", nargs="+", choices=["shared", "private"],
                        default=["shared"], help="one copy of the frozen networks per node "
                        "(several local ranks) or one per rank")
    parser.add_argument("--memory", action="store_true",
                        help="sample every rank's PSS; print the peaks per rank and pod")
    parser.add_argument("--steps", type=int, default=6, help="steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    parser.add_argument("--flops", action="store_true", help="count FLOPs, compare to peak")
    parser.add_argument("--same-learning", type=int, metavar="STEPS", default=0,
                        help="also compare learning with and without the speed-ups")
    parser.add_argument("--no-timing", action="store_true",
                        help="skip the speed runs (e.g. with --same-learning only)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER,
                        help="after --: extra flags for the trainer (e.g. -- --torch-compile)")
    parser.add_argument("--count-flops", nargs=2, metavar=("MODEL", "RESOLUTION"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.count_flops:
        model, resolution = args.count_flops[0], int(args.count_flops[1])
        print(count_step_flops(model, resolution, Path(args.workdir or tempfile.mkdtemp())))
        return 0
    extra = [f for f in args.trainer_flags if f != "--"]
    context = (tempfile.TemporaryDirectory(prefix="amxtune-bench-") if not args.workdir
               else None)
    workdir = Path(args.workdir or context.name)
    workdir.mkdir(parents=True, exist_ok=True)
    from amxtune_trainer.builtin.models import ensure_builtin_model

    for model in ["tiny"] if args.no_timing else args.model:
        ensure_builtin_model(model)
    from amxtune_trainer.cpu import machine_line, probe

    cpu = probe()
    results, flops = [], {}
    print(f"# {machine_line(cpu)} (before)", flush=True)
    if args.against_reference:
        if not Path(args.against_reference).is_file():
            parser.error(f"--against-reference {args.against_reference}: no such file")
        extras_ref = against_reference(args, workdir, extra)
        print(f"# load average after: {os.getloadavg()[0]:.2f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"cpu": cpu.to_dict(), "method": args.method,
                                                   "against_reference": extras_ref},
                                                  indent=2) + "\n")
        if context is not None:
            context.cleanup()
        return 0
    grid = [] if args.no_timing else list(itertools.product(
        args.model, args.resolution, args.precision, args.ranks, args.frozen_weights))
    if "private" in args.frozen_weights:  # one local rank has nothing to share: run it once
        grid = [row for row in grid if row[3] > 1 or row[4] == "private"]
    for model, resolution, precision, ranks, frozen_weights in grid:
        row = run_config(model, resolution, precision, ranks, args.steps, args.warmup,
                         workdir, extra, args.method, args.memory, frozen_weights)
        if args.flops:
            key = (model, resolution)
            if key not in flops:  # in a child process: keeps this one small
                counted = subprocess.run(
                    [sys.executable, "-m", "amxtune_trainer.bench", "--count-flops", model,
                     str(resolution), "--workdir", str(workdir)],
                    capture_output=True, text=True, check=True,
                )
                flops[key] = float(counted.stdout.strip().splitlines()[-1])
            row["step_gflop"] = flops[key] / 1e9
            row["achieved_tflops"] = flops[key] * ranks / row["seconds_per_step"] / 1e12
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    header = ("| model | px | precision | ranks | frozen weights | s/step (median) | samples/s "
              "| peak RSS MB/rank | all-reduced B/step | load 1m before→after |")
    if args.memory:
        header += " peak PSS MB/rank | peak PSS MB/pod | PSS MB/pod at the end |"
    if args.flops:
        header += " GFLOP/step | TFLOP/s |"
    if results:
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        precision = r["precision"] if r["precision"] == r["used_precision"] else (
            f"{r['precision']} → {r['used_precision']}")
        line = (f"| {r['model']} | {r['resolution']} | {precision} | {r['ranks']} | "
                f"{r['frozen_weights']} | "
                f"{r['seconds_per_step']:.3f} | {r['samples_per_second']:.3f} | "
                f"{r['peak_rss_mb']:.0f} | {r['allreduce_bytes_per_step']} | "
                f"{r['load_before']:.1f}→{r['load_after']:.1f} |")
        if args.memory:
            end = sum(pss or 0 for pss in r["end_pss_mb_per_rank"] or [])
            line += f" {r['peak_pss_mb']:.0f} | {r['peak_pod_pss_mb']:.0f} | {end:.0f} |"
        if args.flops:
            line += f" {r['step_gflop']:.0f} | {r['achieved_tflops']:.3f} |"
        print(line)
    extras: dict = {"cpu": cpu.to_dict(), "results": results}
    if args.flops and results:
        peak, how = amx_theoretical_peak()
        matmul = measure_matmul_peak()
        extras.update(amx_peak_tflops=peak / 1e12, amx_peak_how=how,
                      matmul_bf16_tflops=matmul / 1e12)
        print(f"\nAMX bf16 peak: {peak / 1e12:.2f} TFLOP/s ({how}); "
              f"2048² bf16 matmul here: {matmul / 1e12:.2f} TFLOP/s")
    if args.same_learning:
        rows = same_learning(args.same_learning, workdir)
        extras["same_learning"] = rows
        print("\n| tiny, 64 px | eval loss before | eval loss after |")
        print("|---|---|---|")
        for row in rows:
            print(f"| {row['variant']} ({row['steps']} steps) | {row['eval_loss_before']:.6f} "
                  f"| {row['eval_loss_after']:.6f} |")
        print(f"cosine between the two runs' embedding updates: "
              f"{rows[0]['update_cosine_fast_vs_fp32']:.4f}")
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(extras, indent=2) + "\n")
    if context is not None:
        context.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
