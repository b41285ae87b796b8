"""`amxtune-train inference --config TASK`: the InferenceJob pod's work, in one command.

Exports the trained result (SOURCE/pipeline, or the base model plus the learned embeddings, or
with the LoRA weights fused in) to SOURCE/openvino with `export-openvino` (a base model plus
embeddings through the export cache when the task has one), renders the prompts
into SOURCE/samples with `generate`, and prints one JSON line `{"event": "completed", ...}`
that the operator reads into the InferenceJob's status. The task file is
amxtune_api.inferencejob.InferenceTask, written by the operator (and by `amxtune run`).
"""

from __future__ import annotations

import argparse
import enum
import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from amxtune_trainer.errors import UserError
from amxtune_trainer.model_flags import flag_name


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="InferenceTask JSON/YAML file.")


def model_to_flags(model: BaseModel) -> list[str]:
    """The command-line form of an options model (the inverse of add_model_flags)."""
    argv: list[str] = []
    for name, value in model.model_dump().items():
        if value is None or isinstance(value, dict):
            continue
        flag = flag_name(name)
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value.value if isinstance(value, enum.Enum) else value)]
    return argv


def _run_subcommand(command: str, argv: list[str]) -> None:
    from amxtune_trainer import cli

    args = cli.build_parser(only=command).parse_args([command, *argv])
    module = __import__(cli.SUBCOMMANDS[command][0], fromlist=["run"])
    code = module.run(args)
    if code:
        raise UserError(f"{command} failed with exit code {code}")


def run(args: argparse.Namespace) -> int:
    from amxtune_api.events import ExportCompleted
    from amxtune_api.export import GenerationOptions
    from amxtune_api.inferencejob import InferenceTask
    from amxtune_trainer.export import read_export_metadata
    from amxtune_trainer.generate import METADATA_NAME
    from amxtune_trainer.options import read_config_file

    try:
        task = InferenceTask.model_validate(read_config_file(args.config, InferenceTask))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{args.config}: {where}: {first['msg']}") from None
    source = Path(task.source_dir).absolute()
    output = Path(task.output_dir).absolute()
    openvino, samples = output / "openvino", output / "samples"
    pipeline = source / "pipeline"
    export_argv = ["--output", str(openvino), "--overwrite", *model_to_flags(task.openvino)]
    source_kind, weights_file = "pipeline", None
    # A textual inversion over a known base model is exported from the base (its cached export)
    # when there is a cache, even if the trainer also saved a full pipeline: same pixels, and
    # only the text encoder's token table is new.
    from_cached_base = bool(task.cache_dir and task.base_model and not task.lora
                            and (source / task.embeddings).is_file())
    if (pipeline / "model_index.json").is_file() and not from_cached_base:
        export_argv += ["--model", str(pipeline)]
    else:
        if not task.base_model:
            raise UserError(f"{source} has no pipeline/ folder and the task names no base model")
        weights = source / (task.lora or task.embeddings)
        if not weights.is_file():
            raise UserError(f"{weights} not found: has the training finished?")
        export_argv += ["--model", task.base_model,
                        "--lora-weights" if task.lora else "--learned-embeds", str(weights)]
        source_kind, weights_file = ("lora" if task.lora else "embeddings"), str(weights)
        if task.revision:
            export_argv += ["--revision", task.revision]
        if from_cached_base:
            export_argv += ["--cache", str(task.cache_dir)]
    _run_subcommand("export-openvino", export_argv)

    generation = GenerationOptions.model_validate(
        task.model_dump(include=set(GenerationOptions.model_fields))
    )
    _run_subcommand(
        "generate",
        ["--model", str(openvino), "--output", str(samples), "--overwrite",
         *model_to_flags(generation),  # (nested options such as the baseline are not flags)
         *(["--baseline-token", generation.baseline.token, "--baseline-text",
            generation.baseline.text] if generation.baseline else []),
         *(["--concept-dir", task.concept_dir] if task.concept_dir else [])],
    )
    exported = read_export_metadata(openvino) or {}
    cache = exported.get("cache")
    rendered = json.loads((samples / METADATA_NAME).read_text())
    similarity = rendered.get("concept_similarity")
    print(ExportCompleted(
        openvino=str(openvino), source=source_kind, weights=weights_file,
        export_cache=("hit" if cache["hit"] else "stored") if cache else None,
        export_seconds=exported.get("seconds"),
        samples=str(samples), grid=str(samples / rendered["grid"]),
        image_paths=[str(samples / image["file"]) for image in rendered["images"]],
        images=rendered["num_images"], seconds_per_image=rendered["seconds_per_image"],
        concept_similarity={k: similarity[k] for k in ("images", "baseline") if k in similarity}
        if similarity else None,
    ).line(), flush=True)
    return 0
