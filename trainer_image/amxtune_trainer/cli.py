"""`amxtune-train SUBCOMMAND ...` (also `python -m amxtune_trainer`).

Each subcommand lives in its own module exposing `configure_parser(parser)` and
`run(args) -> int`. Those modules import torch/diffusers/openvino inside `run`, not at module
level, so that parsing and `--help` stay fast and bad flags fail before heavy imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from amxtune_trainer.errors import UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "textual-inversion": ("amxtune_trainer.textual_inversion", "learn a new concept's embedding"),
    "export-openvino": ("amxtune_trainer.export", "export a pipeline to OpenVINO"),
    "generate": ("amxtune_trainer.generate", "render prompts with an OpenVINO/PyTorch pipeline"),
    "inference": ("amxtune_trainer.inference", "export + generate, as an InferenceJob pod does"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amxtune-train", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            importlib.import_module(module_name).configure_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as error:
        print(f"amxtune-train {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amxtune-train {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
