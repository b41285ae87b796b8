"""Two InferenceJobs on the same base model: the first exports it into the cache, the second
reuses that export (export_cache.py).

    python -m amxtune_trainer.bench_export_cache [--model sd15-arch] [--size 512] [--steps 20]

Not a test: it prints a Markdown table for docs/performance.md. Each job is what an
InferenceJob's pod runs (`python -m amxtune_trainer inference --config TASK`, a process of its
own, imports included), for a textual inversion of the base model (a random 1-vector embedding,
a different one per job) with one prompt rendered; the table gives each job's wall time, its
export time, and the second job's share of the first's. Then it checks that the second job's
images equal those of a fresh export of the same embedding without the cache (--no-compare
skips that third export).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amxtune_api.export import WeightFormat

PROMPT = "a photo of a <job-{n}> on the beach"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amxtune_trainer.bench_export_cache",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch", help="Base model (default: sd15-arch).")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--weight-format", default="fp32",
                        choices=[f.value for f in WeightFormat])
    parser.add_argument("--no-compare", action="store_true",
                        help="Skip the fresh export that the second job's images are compared to.")
    parser.add_argument("--workdir", help="Keep everything here (default: a temporary folder).")
    args = parser.parse_args(argv)

    from amxtune_trainer.cpu import machine_line
    from amxtune_trainer.export_sources import resolve_model

    base = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="amxtune-bench-cache-") as tmp:
        workdir = Path(args.workdir or tmp).absolute()
        cache = workdir / "cache"
        jobs = [run_job(workdir, n, base, cache, args) for n in (1, 2)]
        difference = None
        if not args.no_compare:
            fresh = run_job(workdir, 2, base, None, args, name="job-2-fresh")
            difference = max_pixel_difference(jobs[1]["samples"], fresh["samples"])
    print("| job | export cache | export s | job s (wall) | share of job 1 |\n"
          "|---|---|---|---|---|")
    for n, job in enumerate(jobs, 1):
        print(f"| {n} | {job['export_cache']} | {job['export_seconds']:.1f} | "
              f"{job['seconds']:.1f} | {job['seconds'] / jobs[0]['seconds']:.1%} |")
    print(f"\nmodel {args.model}, {args.size} px, {args.weight_format} weights, 1 prompt × "
          f"{args.steps} steps\n{machine_line()}")
    if difference is not None:
        print(f"job 2 vs a fresh export of the same embedding: max pixel difference "
              f"{difference:.6f} (0..1 scale)")
    return 0


def run_job(workdir: Path, n: int, base: str, cache: Path | None, args,
            name: str | None = None) -> dict:
    """One InferenceJob pod's work; its wall time and what it reported."""
    from amxtune_api.events import EVENT_COMPLETED, ExportCompleted
    from amxtune_api.inferencejob import InferenceTask

    folder = workdir / (name or f"job-{n}")
    folder.mkdir(parents=True, exist_ok=True)
    write_embedding(folder / "learned_embeds.safetensors", f"<job-{n}>", base, seed=n)
    task = InferenceTask(
        prompts=[PROMPT.format(n=n)], num_inference_steps=args.steps, seed=0,
        openvino={"height": args.size, "width": args.size, "weight_format": args.weight_format},
        source_dir=str(folder), base_model=base, output_dir=str(folder),
        cache_dir=str(cache) if cache else None,
    )
    (folder / "task.json").write_text(json.dumps(task.to_wire()))
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "amxtune_trainer", "inference", f"--config={folder / 'task.json'}"],
        capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    if completed.returncode:
        sys.exit(f"job {folder.name} failed:\n{completed.stderr[-3000:]}")
    line = next(line for line in reversed(completed.stdout.splitlines())
                if EVENT_COMPLETED in line)
    result = ExportCompleted.model_validate_json(line)
    print(f"{folder.name}: {seconds:.1f} s, export {result.export_seconds} s "
          f"({result.export_cache or 'no cache'})", file=sys.stderr, flush=True)
    return {"seconds": seconds, "export_seconds": result.export_seconds or 0.0,
            "export_cache": result.export_cache or "not used", "samples": result.image_paths}


def write_embedding(path: Path, token: str, base: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    width = json.loads((Path(base) / "text_encoder" / "config.json").read_text())["hidden_size"]
    vector = torch.randn(1, width, generator=torch.Generator().manual_seed(seed)) * 0.02
    save_file({token: vector}, str(path))


def max_pixel_difference(first: list[str], second: list[str]) -> float:
    import numpy as np
    from PIL import Image

    return max(
        float(np.abs(np.asarray(Image.open(a), dtype=np.float32)
                     - np.asarray(Image.open(b), dtype=np.float32)).max()) / 255
        for a, b in zip(first, second, strict=True)
    )


if __name__ == "__main__":
    sys.exit(main())
