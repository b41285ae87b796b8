"""`amxtune-train doctor`: this CPU as the trainer sees it, and the paths training would take.

Run it on a node (or `kubectl exec` into a worker) to see why a job chose fp32, or whether a
node labelled AMX really has it: `--require-amx` exits with code 3 when it does not, like a
worker of a job with workers.requireAmx.
"""

from __future__ import annotations

import argparse
import json

from amxtune_api.training import MixedPrecision


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixed-precision", "--mixed_precision", default="auto",
                        choices=[m.value for m in MixedPrecision],
                        help="the precision a job would ask for (default auto)")
    parser.add_argument("--torch-compile", "--torch_compile", action="store_true",
                        help="as if the job asked for torch.compile")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="as if the job turned channels_last off")
    parser.add_argument("--require-amx", "--require_amx", action="store_true",
                        help="exit with code 3 when this CPU has no AMX")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from amxtune_trainer import cpu
    from amxtune_trainer.errors import NodeLacksAmx

    info = cpu.probe()
    chosen = cpu.plan([info], 0, args.mixed_precision, args.channels_last, args.torch_compile,
                      compiler=cpu.cpp_compiler())
    chosen.attention, notice = cpu.attention_backend(chosen.bf16)
    if notice:
        chosen.notices.append(notice)
    if args.json:
        print(json.dumps({"cpu": info.to_dict(), "plan": chosen.to_dict()}, indent=2))
    else:
        present = sorted(info.features)
        rows = [
            ("CPU", info.summary()),
            ("class", f"{info.cpu_class} (PyTorch dispatches to its {info.torch_capability} "
                      "kernels)"),
            ("features", " ".join(present) or "none of interest"),
            ("missing", " ".join(f for f in cpu.FEATURES if f not in info.features) or "none"),
            ("precision", f"{chosen.label} ({chosen.precision_reason})"),
            ("packed convolutions", "on" if chosen.packed_convolutions else "off"),
            ("channels_last", "on" if chosen.channels_last else "off"),
            ("torch.compile", "on" if chosen.torch_compile else "off"),
            ("attention", chosen.attention),
        ]
        rows += [("disagreement", d) for d in info.disagreements]
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
        for line in chosen.notices:
            print(f"notice: {line}")
    if args.require_amx and (problem := cpu.amx_missing(info)):
        raise NodeLacksAmx(problem)
    return 0

