"""Command-line flags derived from the pydantic option models in `amxtune_api`.

Every field `some_option` becomes `--some-option` and `--some_option` (the diffusers scripts'
spelling, so that their commands keep working); booleans also get `--no-some-option`; list
fields take one or more values and may repeat (`--prompt A --prompt B`). The help text is the
field's description. Flags default to "not given", so that the model (or a config file) supplies
the defaults and all validation (bounds, multiples of 8, cross-field rules) happens in one place,
the model. Validation errors become a one-line `UserError` that names the flag.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from amxtune_trainer.errors import UserError


def unwrap_optional(annotation: Any) -> Any:
    """`X | None` and `Annotated[X, ...]` -> X."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return unwrap_optional(args[0])
    if origin is typing.Annotated:
        return unwrap_optional(typing.get_args(annotation)[0])
    return annotation


def is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def field_for_key(
    model: type[BaseModel], key: str
) -> tuple[str, type[BaseModel] | None, bool]:
    """(field name, nested model or None, whether it is a field) for a key that may be the
    field's camelCase alias; pydantic and config files use either spelling."""
    names = {field.alias or name: name for name, field in model.model_fields.items()}
    name = names.get(key, key)
    field = model.model_fields.get(name)
    nested = unwrap_optional(field.annotation) if field else None
    return name, nested if is_model(nested) else None, field is not None


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def flag_names(field: str) -> list[str]:
    """The dashed spelling first, then the underscored one when it differs."""
    dashed, underscored = flag_name(field), f"--{field}"
    return [dashed] if dashed == underscored else [dashed, underscored]


def _help(field) -> str:
    text = field.description or ""
    if field.is_required():
        text += " (required)"
    else:
        default = field.get_default(call_default_factory=True)
        if default is not None and default != []:
            shown = default.value if isinstance(default, enum.Enum) else default
            text += f" (default: {shown})"
    return text.strip().replace("%", "%%")


def add_model_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    dest_prefix: str = "",
    exclude: Iterable[str] = (),
    extra_flags: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """Add one flag per scalar/list field of `model` (nested models are skipped: the caller adds
    their sections); return the field names added. Values land in `dest_prefix + field`."""
    added = []
    extra_flags = extra_flags or {}
    for name, field in model.model_fields.items():
        annotation = unwrap_optional(field.annotation)
        if name in exclude or is_model(annotation):
            continue
        flags = flag_names(name) + list(extra_flags.get(name, []))
        kwargs: dict[str, Any] = {
            "dest": dest_prefix + name, "default": argparse.SUPPRESS, "help": _help(field),
        }
        if typing.get_origin(annotation) is list:
            kwargs.update(action="extend", nargs="+", metavar=name.removesuffix("s").upper())
            if name.endswith("s"):  # --prompts A B, or --prompt A --prompt B
                flags.insert(1, flag_name(name[:-1]))
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            kwargs["choices"] = [member.value for member in annotation]
        elif annotation in (int, float):
            kwargs.update(type=annotation, metavar="N" if annotation is int else "X")
        else:
            kwargs["metavar"] = "TEXT"
        parser.add_argument(*flags, **kwargs)
        added.append(name)
    return added


def values_from_args(
    model: type[BaseModel], args: argparse.Namespace, dest_prefix: str = ""
) -> dict:
    """The fields of `model` that were given on the command line."""
    given = vars(args)
    return {
        name: given[dest_prefix + name]
        for name in model.model_fields
        if dest_prefix + name in given
    }


def validate(model: type[BaseModel], data: dict) -> Any:
    """`model.model_validate(data)`, or a UserError that names the flags."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error, model)) from None


def model_from_args(model: type[BaseModel], args: argparse.Namespace, **extra) -> Any:
    """Validate the given flags (plus `extra` values) into `model`, or raise a UserError."""
    return validate(model, {**values_from_args(model, args), **extra})


def _field_path(model: type[BaseModel] | None, loc: tuple) -> tuple[list[str], bool]:
    """Field names along `loc` (pydantic reports some by their camelCase alias), and whether
    the last one is a flag rather than a section or a list index."""
    path, is_flag = [], False
    for part in loc:
        if not isinstance(part, str) or model is None:
            continue
        name, model, known = field_for_key(model, part)
        path.append(name)
        is_flag = known and model is None
    return path, is_flag


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> str:
    """One line: every problem, named by its flag (and its path in a nested config)."""
    parts = []
    for item in error.errors():
        path, is_flag = _field_path(model, item["loc"])
        where = ".".join(path) or "options"
        if is_flag:
            flag = flag_name(path[-1])
            where = flag if len(path) == 1 else f"{where} ({flag})"
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
