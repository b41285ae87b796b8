"""`python -m amxtune_trainer.bench_learning`: does the trainer learn as it should? (not a test)

Trains textual inversion (or, with --method lora, LoRA adapters) on a concept folder (default:
the drawn robot of examples/concepts on the built-in `toyworld` model) and evaluates every
result with one evaluator:
- the diffusion loss on the fixed evaluation set (fp32, the trainer's own set), before and after;
- the concept similarity (toyworld.similarity) of 'a photo of a TOKEN' rendered with it
  (PyTorch fp32, fixed seeds), and of the initializer word alone.

Variants, each from the same images, seed and hyper-parameters:
- `amxtune`: our trainer with its speed-ups (precision auto: bf16 on AMX);
- `amxtune-fp32`: our trainer in fp32 without channels_last (--same-learning);
- `reference`: diffusers' examples/textual_inversion/textual_inversion.py (LoRA:
  examples/dreambooth/train_dreambooth_lora.py), when --reference PATH names a copy of it (it
  is never part of this repository).
Prints one table row per variant and, with --json, writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOKEN = "<robot-toy>"
PROMPT = "a photo of a {}"
INSTANCE_PROMPT = "a photo of sks toy"  # LoRA
LORA_RANK = 4


def robot_images() -> Path:
    """examples/concepts/robot of this checkout."""
    return Path(__file__).resolve().parents[2] / "examples" / "concepts" / "robot"


def _concept_flags(args) -> list[str]:
    if args.method == "lora":
        return ["--instance-prompt", INSTANCE_PROMPT, "--rank", str(LORA_RANK)]
    return ["--placeholder-token", TOKEN, "--initializer-token", args.initializer]


def weights_file(folder: Path, args) -> Path:
    name = "pytorch_lora_weights" if args.method == "lora" else "learned_embeds"
    return folder / f"{name}.safetensors"


def ours(model: str, data: Path, out: Path, args, precision: str, extra: list[str]) -> float:
    command = [
        sys.executable, "-m", "amxtune_trainer", args.method, "--model", model,
        "--train-data-dir", str(data), "--output-dir", str(out), *_concept_flags(args),
        "--resolution", str(args.resolution),
        "--train-batch-size", str(args.batch), "--max-train-steps", str(args.steps),
        "--learning-rate", str(args.learning_rate), "--lr-scheduler", "constant",
        "--lr-warmup-steps", "0", "--seed", str(args.seed),
        *(["--random-flip"] if args.method != "lora" else []),  # the LoRA script has no flips
        "--mixed-precision", precision, "--eval-samples", "0",
        "--checkpointing-steps", str(10**6), "--save-steps", str(10**6), *extra,
    ]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"our trainer failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def reference(script: Path, model: str, data: Path, out: Path, args) -> float:
    """The diffusers script, run from a temporary folder with the same settings."""
    from amxtune_trainer.models import resolve_model_path

    if args.method == "lora":
        concept = ["--instance_data_dir", str(data), "--instance_prompt", INSTANCE_PROMPT,
                   "--rank", str(LORA_RANK)]
    else:
        concept = ["--train_data_dir", str(data), "--placeholder_token", TOKEN,
                   "--initializer_token", args.initializer, "--learnable_property", "object",
                   "--save_steps", str(10**6), "--validation_steps", str(10**6)]
    command = [
        sys.executable, str(script), "--pretrained_model_name_or_path",
        str(resolve_model_path(model)), *concept, "--resolution", str(args.resolution),
        "--train_batch_size", str(args.batch), "--gradient_accumulation_steps", "1",
        "--max_train_steps", str(args.steps), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", str(args.seed),
        "--mixed_precision", "no", "--checkpointing_steps", str(10**6),
        "--dataloader_num_workers", "0", "--output_dir", str(out),
    ]
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=out.parent,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        raise SystemExit(f"the reference script failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - began


def evaluate(model: str, data: Path, embeds: Path | None, args) -> dict:
    """Eval loss and concept similarity of one result (None: before training)."""
    import torch

    from amxtune_trainer import distributed, options, samples
    from amxtune_trainer.cli import build_parser
    from amxtune_trainer.generate import concept_images
    from amxtune_trainer.recipes.lora import Lora
    from amxtune_trainer.recipes.textual_inversion import TextualInversion
    from amxtune_trainer.toyworld.similarity import concept_similarity

    flags = [args.method, "--model", model, "--train-data-dir", str(data),
             "--output-dir", str(Path(tempfile.mkdtemp()) / "eval"), *_concept_flags(args),
             "--resolution", str(args.resolution), "--mixed-precision", "no",
             "--no-channels-last", "--eval-samples", str(args.eval_samples),
             "--max-train-steps", "1", "--seed", "0", "--validation-inference-steps", "25"]
    if embeds is not None:
        flags += ["--initial-weights" if args.method == "lora" else "--initial-embedding",
                  str(embeds)]
    recipe = Lora if args.method == "lora" else TextualInversion
    trainer = recipe(options.config_from_args(build_parser(args.method).parse_args(flags),
                                              args.method), distributed.DistInfo())
    trainer.prepare()
    loss = trainer.eval_loss()
    references = concept_images(data)
    torch.manual_seed(0)
    prompt = INSTANCE_PROMPT if args.method == "lora" else PROMPT.format(TOKEN)
    images = samples.render(trainer, prompt, args.images, seed=1234)
    row = {"eval_loss": loss, "concept_similarity": concept_similarity(images, references)}
    if embeds is None and args.method != "lora":
        words = samples.render(trainer, PROMPT.format(args.initializer), args.images, seed=1234)
        row["initializer_similarity"] = concept_similarity(words, references)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amxtune_trainer.bench_learning",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["textual-inversion", "lora"],
                        default="textual-inversion")
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--data", type=Path, default=None,
                        help="concept images (default: examples/concepts/robot)")
    parser.add_argument("--initializer", default="toy")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--images", type=int, default=8, help="images per prompt scored")
    parser.add_argument("--reference", type=Path,
                        help="a copy of diffusers' examples/textual_inversion/textual_inversion.py")
    parser.add_argument("--same-learning", action="store_true",
                        help="also train in fp32 without channels_last")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data = (args.data or robot_images()).resolve()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="amxtune-learning-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from amxtune_trainer.cpu import machine_line

    print(f"# {machine_line()}", flush=True)
    rows = {"before training": {**evaluate(args.model, data, None, args), "seconds": 0.0}}
    variants = {"amxtune (auto precision)": ("auto", [])}
    if args.same_learning:
        variants["amxtune (fp32, contiguous)"] = ("no", ["--no-channels-last"])
    for name, (precision, extra) in variants.items():
        out = workdir / name.split()[0] / precision
        seconds = ours(args.model, data, out, args, precision, extra)
        rows[name] = {**evaluate(args.model, data, weights_file(out, args), args),
                      "seconds": seconds}
    if args.reference:
        out = workdir / "reference"
        out.mkdir(parents=True, exist_ok=True)
        seconds = reference(args.reference.resolve(), args.model, data, out, args)
        script = "train_dreambooth_lora.py" if args.method == "lora" else "textual_inversion.py"
        rows[f"diffusers {script} (fp32)"] = {
            **evaluate(args.model, data, weights_file(out, args), args), "seconds": seconds}
    print(f"\n{args.model}, {args.resolution} px, {args.steps} steps, batch {args.batch}, "
          f"lr {args.learning_rate}, seed {args.seed}, concept {data.name}; "
          f"{args.images} images per prompt, {args.eval_samples} evaluation samples\n")
    what = INSTANCE_PROMPT if args.method == "lora" else PROMPT.format("TOKEN")
    print(f"\n{args.method}; concept similarity of '{what}'\n")
    print("| variant | eval loss | concept similarity | wall s |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['eval_loss']:.5f} | {row['concept_similarity']:.3f} | "
              f"{row['seconds']:.0f} |")
    initial = rows["before training"].get("initializer_similarity")
    if initial is not None:
        print(f"\nthe initializer word alone ('{PROMPT.format(args.initializer)}'): "
              f"{initial:.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
