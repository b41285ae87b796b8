"""Command-line flags derived from the pydantic option models in `amxtune.api`.

Every field `some_option` becomes `--some-option` (and `--some_option`, so that commands written
for the diffusers scripts keep working); the help text is the field's description. Flags default
to "not given" so that the model supplies its own defaults and all validation (bounds, multiples
of 8, cross-field rules) happens in one place, the model. Validation errors become a one-line
`UserError` that names the flag.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Iterable

from pydantic import BaseModel, ValidationError

from amxtune_trainer.errors import UserError


def _unwrap_optional(annotation):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_model_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    help_suffix: dict[str, str] | None = None,
) -> list[str]:
    """Add one flag per scalar/list field of `model`; return the field names added."""
    added = []
    help_suffix = help_suffix or {}
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        annotation = _unwrap_optional(field.annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue  # nested models are the caller's business
        flags = [flag_name(name)]
        if "_" in name:
            flags.append("--" + name)
        kwargs: dict = {"dest": name, "default": None}
        if typing.get_origin(annotation) is list:
            kwargs["action"] = "append"
            kwargs["metavar"] = name.rstrip("s").upper()
            if name.endswith("s"):  # --prompts A --prompts B, or --prompt A --prompt B
                flags.insert(1, flag_name(name[:-1]))
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            kwargs["choices"] = [member.value for member in annotation]
        elif annotation in (int, float):
            kwargs["type"] = annotation
            kwargs["metavar"] = "N" if annotation is int else "X"
        help_text = field.description or ""
        if field.is_required():
            help_text += " (required)"
        elif field.default is not None and not callable(field.default_factory):
            default = field.default.value if isinstance(field.default, enum.Enum) else field.default
            help_text += f" (default: {default})"
        help_text += help_suffix.get(name, "")
        kwargs["help"] = help_text.replace("%", "%%")
        parser.add_argument(*flags, **kwargs)
        added.append(name)
    return added


def values_from_args(model: type[BaseModel], args: argparse.Namespace) -> dict:
    """The fields of `model` that were given on the command line."""
    return {
        name: getattr(args, name)
        for name in model.model_fields
        if getattr(args, name, None) is not None
    }


def model_from_args(model: type[BaseModel], args: argparse.Namespace, **extra):
    """Validate the given flags (plus `extra` values) into `model`, or raise a UserError."""
    try:
        return model.model_validate({**values_from_args(model, args), **extra})
    except ValidationError as error:
        raise UserError(describe_validation_error(error)) from None


def describe_validation_error(error: ValidationError) -> str:
    """One line: the first problem, named by its flag."""
    first = error.errors()[0]
    loc = [part for part in first["loc"] if isinstance(part, str)]
    where = flag_name(loc[-1]) if loc else "options"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {message}{suffix}"
