"""Command-line flags derived from the shared option models, and config-file loading.

The trainer's options are defined once, in `amxtune_api.training` (pydantic). Every field of
`TrainerConfig`, of the method's section (textual_inversion or lora) and of the shared sections
becomes a flag spelled with dashes (`--max-train-steps`) and also with underscores
(`--max_train_steps`, the diffusers scripts' spelling), so that commands written for the
reference scripts keep working. `--config FILE` loads a JSON or YAML file (the
ConfigMap the operator mounts; camelCase or snake_case keys); flags given on the command line
override it. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from amxtune_api.training import (
    METHOD_SECTIONS,
    LoraOptions,
    TextualInversionOptions,
    TrainerConfig,
    TrainerRuntimeOptions,
    TrainingOptions,
)
from amxtune_trainer.errors import UserError
from amxtune_trainer.model_flags import (
    add_model_flags,
    field_for_key,
    flag_names,
    validate,
    values_from_args,
)

METHOD_MODELS: dict[str, type[BaseModel]] = {
    "textual_inversion": TextualInversionOptions,
    "lora": LoraOptions,
}
# Extra spellings: field -> flags (the reference scripts' and our short names).
EXTRA_FLAGS = {
    "textual-inversion": {"pretrained_model_name_or_path": ["--model"]},
    # train_dreambooth_lora.py calls the image folder instance_data_dir
    "lora": {"pretrained_model_name_or_path": ["--model"],
             "train_data_dir": ["--instance-data-dir", "--instance_data_dir"],
             "alpha": ["--lora-alpha", "--lora_alpha"],
             "dropout": ["--lora-dropout", "--lora_dropout"]},
}
# Flags of the diffusers script that have no effect here; accepted so its commands still run.
IGNORED_REFERENCE_FLAGS = {
    "dataloader_num_workers": 1,
    "report_to": 1,
    "logging_dir": 1,
    "local_rank": 1,
    "no_safe_serialization": 0,
    "enable_xformers_memory_efficient_attention": 0,
    "gradient_checkpointing": 0,
    "allow_tf32": 0,
}
DEST_SEP = "__"


def _dest_prefix(section: str) -> str:
    return f"{section}{DEST_SEP}" if section else ""


def sections(method: str) -> dict[str, type[BaseModel]]:
    """Section name in TrainerConfig -> its model, for one method; "" is the top level."""
    section = METHOD_SECTIONS[method]
    return {"": TrainerConfig, section: METHOD_MODELS[section], "training": TrainingOptions,
            "runtime": TrainerRuntimeOptions}


def configure_parser(parser: argparse.ArgumentParser, method: str) -> None:
    """Add --config and one flag per option field (dash and underscore spellings).

    Booleans are `--flag` / `--no-flag`. Every flag's default is "not given", so that a value
    from --config is only overridden by flags that are actually on the command line.
    """
    parser.usage = f"{parser.prog} [--config FILE] [--model MODEL] [OPTIONS]"
    parser.add_argument(
        "--config", metavar="FILE",
        help="JSON or YAML file with the options (camelCase or snake_case); flags override it",
    )
    for section, model in sections(method).items():
        title = f"{section.replace('_', ' ')} options" if section else "model, data and output"
        group = parser.add_argument_group(title, (model.__doc__ or "").strip().splitlines()[0])
        add_model_flags(group, model, dest_prefix=_dest_prefix(section),
                        exclude=set(METHOD_MODELS) if not section else (),
                        extra_flags=EXTRA_FLAGS[method])
    compat = parser.add_argument_group("compatibility with the diffusers script")
    if method == "textual-inversion":
        compat.add_argument(
            *flag_names("only_save_embeds"), dest="only_save_embeds", action="store_true",
            default=argparse.SUPPRESS, help="do not save the full pipeline (our default already)",
        )
    for name, nargs in IGNORED_REFERENCE_FLAGS.items():
        compat.add_argument(
            *flag_names(name), dest=f"ignored{DEST_SEP}{name}", default=argparse.SUPPRESS,
            action="store_true" if nargs == 0 else "store", help=argparse.SUPPRESS,
        )


def _field_names(value: Any, model: type[BaseModel] | None) -> Any:
    """Rename wire keys (camelCase aliases) to the model's field names, recursively.

    The aliases come from the model itself: a generic camel-to-snake conversion is not the
    inverse of the aliases ("adamBeta1" is the field adam_beta1, not adam_beta_1). Unknown keys
    are kept, so that the model reports them.
    """
    if not isinstance(value, dict) or model is None:
        return value
    renamed = {}
    for key, item in value.items():
        name, nested, _ = field_for_key(model, key)
        renamed[name] = _field_names(item, nested)
    return renamed


def read_config_file(path: str | Path, model: type[BaseModel] = TrainerConfig) -> dict:
    """Read a JSON or YAML config of `model` with its field names as keys (UserError when
    unreadable)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except (ValueError, ImportError) as error:
        raise UserError(f"config file {path} is not valid JSON/YAML: {error}") from None
    except Exception as error:  # yaml.YAMLError
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"config file {path} is not valid JSON/YAML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of options")
    return _field_names(data, model)


def config_from_args(args: argparse.Namespace,
                     method: str = "textual-inversion") -> TrainerConfig:
    """Merge --config FILE and flags into a validated TrainerConfig for `method` (UserError if
    invalid, or if the file is for another method)."""
    data: dict[str, Any] = read_config_file(args.config) if getattr(args, "config", None) else {}
    own = METHOD_SECTIONS[method]
    for other in set(METHOD_MODELS) - {own}:
        if data.get(other) is not None:
            raise UserError(f"config file {args.config} has a {other} section, but this is "
                            f"amxtune-train {method}: use `amxtune-train "
                            f"{other.replace('_', '-')}`")
    data.setdefault(own, {})
    for section, model in sections(method).items():
        given = values_from_args(model, args, _dest_prefix(section))
        if section and given:
            if not isinstance(data.get(section), dict):
                data[section] = {}
            data[section].update(given)
        elif given:
            data.update(given)
    if getattr(args, "only_save_embeds", False):
        data.setdefault("training", {})["save_as_full_pipeline"] = False
    return validate(TrainerConfig, data)
