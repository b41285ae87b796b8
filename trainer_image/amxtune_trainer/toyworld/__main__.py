"""python -m amxtune_trainer.toyworld pretrain|check|evaluate|reconstruct ..."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from amxtune_trainer.errors import UserError
from amxtune_trainer.toyworld.pretrain import (
    PretrainConfig,
    check_manifest,
    pretrain,
    record_evaluation,
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m amxtune_trainer.toyworld")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("pretrain", help="pretrain the toyworld model into --output")
    train.add_argument("--output", type=Path, required=True)
    for item in dataclasses.fields(PretrainConfig):
        if item.name == "losses":
            continue
        default = item.default
        if isinstance(default, tuple):
            train.add_argument(f"--{item.name.replace('_', '-')}", type=int, nargs="+",
                               default=list(default))
        else:
            train.add_argument(f"--{item.name.replace('_', '-')}", type=type(default),
                               default=default)
    check = commands.add_parser("check", help="compare a model folder with its manifest")
    check.add_argument("folder", type=Path)
    judge = commands.add_parser("evaluate", help="render the check prompts and count what "
                                "matches their colour, shape and background")
    judge.add_argument("folder", type=Path)
    judge.add_argument("--per-prompt", type=int, default=4)
    judge.add_argument("--grid", type=Path, help="also write the images as one grid PNG")
    judge.add_argument("--record", action="store_true",
                       help="write the fractions into the folder's manifest.json")
    carry = commands.add_parser("reconstruct", help="encode and decode a concept's images "
                                "with the model's VAE: what no fine-tuning can draw better")
    carry.add_argument("folder", type=Path)
    carry.add_argument("concept_dir", type=Path)
    carry.add_argument("--grid", type=Path,
                       help="also write the images (top) and their reconstructions (bottom)")
    args = parser.parse_args(argv)
    try:
        return run(args, argv)
    except UserError as error:  # bad input is one line naming it, for every command
        print(f"{args.command}: {error}", file=sys.stderr)
        return error.exit_code


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.command == "reconstruct":
        from amxtune_trainer.images import make_grid
        from amxtune_trainer.toyworld.evaluate import reconstruction

        result = reconstruction(args.folder, args.concept_dir)
        if args.grid:
            make_grid(result["grid"], columns=result["concept_images"],
                      min_size=256).save(args.grid)
        print({k: v for k, v in result.items() if k != "grid"})
        return 0
    if args.command == "evaluate":
        from amxtune_trainer.images import make_grid
        from amxtune_trainer.toyworld.evaluate import evaluate

        result = evaluate(args.folder, args.per_prompt)
        if args.grid:
            make_grid(result["grid"], columns=args.per_prompt).save(args.grid)
        for row in result["rows"]:
            print(f"{row['prompt']:<32} -> {row['color']} {row['shape']} {row['background']}")
        summary = {k: v for k, v in result.items() if k not in ("rows", "grid")}
        print(summary)
        if args.record:
            record_evaluation(args.folder, summary)
        return 0
    if args.command == "pretrain":
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)
                  if f.name != "losses"}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        pretrain(args.output, PretrainConfig(**values),
                 ["python", "-m", "amxtune_trainer.toyworld", *argv])
        return 0
    problems = check_manifest(args.folder)
    for line in problems:
        print(line, file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
