"""`amxtune operator | crds | render FILE | run FILE`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


def _crds(args: argparse.Namespace) -> int:
    from amxtune import crd

    if args.reference:
        sys.stdout.write(crd.reference_markdown())
    elif args.output:
        for path in crd.write_all(Path(args.output)):
            print(path)
    else:
        sys.stdout.write("---\n".join(crd.render_all().values()))
    return 0


def _render(args: argparse.Namespace) -> int:
    from amxtune import manifest
    from amxtune.render import render_finetunejob
    from amxtune.render.inferencejob import render_inferencejob
    from amxtune.settings import Settings

    settings = Settings.from_env()
    if args.trainer_image:
        settings = settings.model_copy(update={"trainer_image": args.trainer_image})
    objects: list[dict] = []
    for item in manifest.load(args.file):
        identity = item.identity
        if args.namespace:
            identity = type(identity)(identity.name, args.namespace, identity.uid, identity.kind)
        if identity.kind == "FineTuneJob":
            objects += render_finetunejob(identity, item.spec, settings).all()
        else:
            objects += render_inferencejob(identity, item.spec, settings).all()
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def _operator(args: argparse.Namespace) -> int:
    from amxtune.controller.main import run_operator

    return run_operator(
        namespaces=args.namespace,
        all_namespaces=args.all_namespaces,
        liveness=args.liveness,
        metrics_port=args.metrics_port,
        log_format=args.log_format,
        verbose=args.verbose,
        lease_namespace=args.leader_election_namespace,
    )


def _run(args: argparse.Namespace) -> int:
    from amxtune.local import run_local

    return run_local(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amxtune", description="Fine-tune Stable Diffusion on Intel Xeon CPUs with AMX."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("crds", help="print (or write) the CustomResourceDefinitions")
    p.add_argument("--output", "-o", help="folder to write one YAML file per CRD into")
    p.add_argument("--reference", action="store_true", help="print the field reference (Markdown)")
    p.set_defaults(handler=_crds)

    p = sub.add_parser("render", help="print the Kubernetes objects a manifest turns into")
    p.add_argument("file", help="FineTuneJob / InferenceJob YAML")
    p.add_argument("--namespace", "-n", help="namespace to render into")
    p.add_argument("--trainer-image", help="trainer image when the manifest names none")
    p.set_defaults(handler=_render)

    p = sub.add_parser("operator", help="run the operator (kopf) against the current cluster")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", help="watch only this namespace")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port (0: off)")
    p.add_argument("--log-format", choices=["json", "plain"], default="json")
    p.add_argument("--leader-election-namespace", default="", metavar="NAMESPACE",
                   help="run as one of several replicas: only the holder of the Lease "
                   "amxtune-operator in NAMESPACE reconciles (default: no election)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(handler=_operator)

    p = sub.add_parser("run", help="run a FineTuneJob manifest on this machine, no cluster")
    p.add_argument("file", help="FineTuneJob YAML")
    from amxtune.local import add_arguments

    add_arguments(p)
    p.set_defaults(handler=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from amxtune.manifest import ManifestError
    from amxtune.render import RenderError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ManifestError, RenderError) as error:
        print(f"amxtune {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
