"""Seconds per image: OpenVINO static (fp32 / int8 / int8-full) vs PyTorch (fp32 / bf16 autocast).

    python -m amxtune_trainer.bench_inference [--model sd15-arch] [--sizes 512 256] [--steps 20]

Not a test: it prints a Markdown table for docs/performance.md. The model defaults to the
built-in random-weight SD-1.5 architecture (speed does not depend on the weight values). Each
OpenVINO weight format is exported once (at the first size) into --workdir and re-shaped
statically for the other sizes; every configuration runs one untimed warm-up call of 2 steps
(compilation, oneDNN kernel selection), then --repeats timed calls of --steps steps, batch 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "ov-fp32": ("OpenVINO static, fp32 weights (CPU plugin default precision)", "openvino",
                "fp32", "auto"),
    "ov-fp32-f32": ("OpenVINO static, fp32 weights, f32 inference precision", "openvino",
                    "fp32", "fp32"),
    "ov-int8": ("OpenVINO static, int8 weights (CPU plugin default precision)", "openvino",
                "int8", "auto"),
    "ov-int8-full": ("OpenVINO static, int8-full (int8 UNet activations, CPU plugin default "
                     "precision)", "openvino", "int8-full", "auto"),
    "pt-fp32": ("PyTorch fp32", "pytorch", None, "fp32"),
    "pt-bf16": ("PyTorch bf16 autocast", "pytorch", None, "bf16"),
}
PROMPT = "a photo of an astronaut riding a horse on mars, high quality"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amxtune_trainer.bench_inference",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-arch", help="Base model (default: sd15-arch).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument(
        "--workdir", default=None,
        help="Where the OpenVINO exports are kept and reused (default: a temporary folder).",
    )
    parser.add_argument(
        "--export-size", type=int, default=None,
        help="Size the OpenVINO exports are made at (and reused from --workdir); other sizes "
        "are re-shaped statically from it (default: the first of --sizes).",
    )
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    from amxtune_trainer.export import quiet_libraries
    from amxtune_trainer.export_sources import resolve_model

    quiet_libraries()
    source = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="amxtune-bench-") as tmp:
        workdir = Path(args.workdir or tmp).absolute()
        results = []
        for size in args.sizes:
            for key in args.configs:
                result = measure(
                    key, source, size, args.steps, args.repeats, workdir,
                    args.export_size or args.sizes[0],
                )
                results.append(result)
                print(json.dumps(result), file=sys.stderr, flush=True)
    from amxtune_trainer.cpu import machine_line

    print(markdown_table(results, args))
    print(machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(key, source, size, steps, repeats, workdir, export_size) -> dict:
    import torch

    from amxtune_api.export import GenerationOptions
    from amxtune_trainer.generate import render

    label, backend, weight_format, precision = CONFIGS[key]
    shape = {"batch_size": 1, "height": size, "width": size, "num_images_per_prompt": 1}
    started = time.perf_counter()
    if backend == "openvino":
        pipe, precision = _openvino(source, weight_format, precision, shape, workdir, export_size)
    else:
        from amxtune_trainer.generate import load_pytorch_pipeline

        pipe = load_pytorch_pipeline(source)
    load_seconds = time.perf_counter() - started
    warmup = GenerationOptions(prompts=[PROMPT], num_inference_steps=2)
    render(pipe, warmup, shape, backend=backend, precision=precision)
    timings = []
    for repeat in range(repeats):
        options = GenerationOptions(prompts=[PROMPT], num_inference_steps=steps, seed=repeat)
        timings.append(render(pipe, options, shape, backend=backend,
                              precision=precision).seconds_per_image)
    del pipe
    gc.collect()
    return {
        "config": key,
        "label": label,
        "size": size,
        "steps": steps,
        "precision": precision,
        "seconds_per_image": round(statistics.median(timings), 2),
        "seconds_per_step": round(statistics.median(timings) / steps, 3),
        "load_seconds": round(load_seconds, 1),
        "threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _openvino(source, weight_format, precision, shape, workdir, export_size):
    from amxtune_api.export import OpenVINOExportOptions
    from amxtune_trainer.export import export_openvino, load_openvino_pipeline, make_static
    from amxtune_trainer.generate import openvino_precision

    folder = workdir / f"openvino-{weight_format}-{export_size}"
    if not (folder / "model_index.json").is_file():
        started = time.perf_counter()
        options = OpenVINOExportOptions(height=export_size, width=export_size,
                                        weight_format=weight_format)
        export_openvino(source, folder, options)
        print(f"exported {weight_format} in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    pipe = load_openvino_pipeline(folder, precision=precision, compile=False)
    if shape["height"] != export_size:
        make_static(pipe, OpenVINOExportOptions(height=shape["height"], width=shape["width"]))
    pipe.compile()
    return pipe, openvino_precision(pipe)


def markdown_table(results: list[dict], args) -> str:
    sizes = sorted({r["size"] for r in results}, reverse=True)
    by_config: dict[str, dict[int, dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], {})[r["size"]] = r
    header = "| configuration | compute | " + " | ".join(f"{s}×{s} s/image" for s in sizes)
    header += " | vs PyTorch fp32 |" if "pt-fp32" in by_config else " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for key, per_size in by_config.items():
        cells = [f"{per_size[s]['seconds_per_image']:.2f}" if s in per_size else "–"
                 for s in sizes]
        row = f"| {CONFIGS[key][0]} | {next(iter(per_size.values()))['precision']} | "
        row += " | ".join(cells)
        if "pt-fp32" in by_config:
            baseline = by_config["pt-fp32"]
            ratios = [
                f"{baseline[s]['seconds_per_image'] / per_size[s]['seconds_per_image']:.1f}×"
                for s in sizes if s in per_size and s in baseline
            ]
            row += " | " + " / ".join(ratios)
        lines.append(row + " |")
    lines.append("")
    lines.append(f"model {args.model}, {args.steps} steps, batch 1, guidance 7.5, "
                 f"median of {args.repeats} run(s) after a 2-step warm-up")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
