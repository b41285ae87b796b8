"""`amxtune-train SUBCOMMAND ...` (also `python -m amxtune_trainer`).

Each subcommand lives in its own module exposing `configure_parser(parser)` and
`run(args) -> int`. Those modules import torch/diffusers/openvino inside `run`, not at module
level, so that parsing and `--help` stay fast and bad flags fail before heavy imports.

A failure ends in one line on stderr (amxtune_api.events): `...: error: ...` for bad input
(exit 2), `...: node lacks AMX: ...` (exit 3), `...: rank N failed: ExceptionType: message`
for anything else (exit 1), with the traceback in $AMXTUNE_LOG_DIR/rank-N.log when that is set
(else printed above the line).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from amxtune_api.events import EXIT_FAILED, failure_line
from amxtune_trainer.errors import Stopped, UserError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "textual-inversion": ("amxtune_trainer.recipes.textual_inversion",
                          "learn a new concept's embedding"),
    "lora": ("amxtune_trainer.recipes.lora", "train LoRA adapters on a concept (DreamBooth style)"),
    "export-openvino": ("amxtune_trainer.export", "export a pipeline to OpenVINO"),
    "generate": ("amxtune_trainer.generate", "render prompts with an OpenVINO/PyTorch pipeline"),
    "inference": ("amxtune_trainer.inference", "export + generate, as an InferenceJob pod does"),
    "launch": ("amxtune_trainer.launch", "start the ranks of a subcommand on this node"),
    "doctor": ("amxtune_trainer.doctor", "what this CPU can do and what training would use"),
}
LOG_DIR_ENV = "AMXTUNE_LOG_DIR"


class VersionAction(argparse.Action):
    """--version: the package versions and this CPU in one line each (imports torch)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print versions and this CPU, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from amxtune_trainer.cpu import probe

        def installed(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        print(f"amxtune-train {installed('amxtune-trainer')} (torch {installed('torch')}, "
              f"diffusers {installed('diffusers')}, openvino {installed('openvino')})")
        print(f"CPU: {probe().summary()}")
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amxtune-train", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if only in (None, name):
            importlib.import_module(module_name).configure_parser(sub)
    return parser


def say(line: str) -> None:
    """One line on stderr in one write: ranks share the stream, and print() writes the text
    and its newline separately, so unbuffered lines of two ranks could interleave (and the
    operator reads these lines)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _env_rank(*names: str) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def report_crash(command: str, error: BaseException) -> int:
    """One line for an unexpected exception; the traceback goes to the rank's log file."""
    rank = _env_rank("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
    text = "".join(traceback.format_exception(error))
    where = "traceback above"
    folder = os.environ.get(LOG_DIR_ENV)
    if folder:
        path = Path(folder) / f"rank-{rank}.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            with path.open("a", encoding="utf-8") as log:
                log.write(f"--- {stamp} amxtune-train {command}, rank {rank}\n{text}")
            where = f"traceback in {path}"
        except OSError:
            pass
    if where == "traceback above":
        sys.stderr.write(text)
    last = traceback.format_exception_only(error)[-1].strip()
    summary = (last.splitlines() or [type(error).__name__])[0]
    say(failure_line(command, f"rank {rank} failed", f"{summary} ({where})"))
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UserError as error:
        # An error every rank raised is printed by the first rank of each node only.
        if not error.every_rank or _env_rank("LOCAL_RANK", "MPI_LOCALRANKID") == 0:
            say(failure_line(args.command, error.kind, str(error)))
        return error.exit_code
    except Stopped as stop:
        if _env_rank("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK") == 0:
            say(f"amxtune-train {args.command}: {stop}")
        return 128 + stop.signum
    except KeyboardInterrupt:
        say(f"amxtune-train {args.command}: interrupted")
        return 130
    except Exception as error:
        return report_crash(args.command, error)


if __name__ == "__main__":
    sys.exit(main())
