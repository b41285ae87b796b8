"""Read FineTuneJob / InferenceJob manifests outside the apiserver (render, local run).

The checks match what the CRD schema enforces, so a manifest that fails here would also be
rejected by `kubectl apply`, with the same field path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from amxtune import names
from amxtune.render.common import JobIdentity
from amxtune_api.finetunejob import GROUP, VERSION, FineTuneJobSpec
from amxtune_api.inferencejob import InferenceJobSpec

SPECS: dict[str, type[BaseModel]] = {
    "FineTuneJob": FineTuneJobSpec,
    "InferenceJob": InferenceJobSpec,
}
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the field and what was expected."""


@dataclass(frozen=True)
class Manifest:
    identity: JobIdentity
    spec: BaseModel
    body: dict


def describe_validation_error(error: ValidationError, prefix: str = "spec") -> str:
    """One line per problem: `spec.training.resolution: Input should be a multiple of 8`."""
    lines = []
    for item in error.errors():
        path = prefix
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}")
    return "\n".join(lines)


def parse(doc: object, source: str = "manifest") -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: expected a Kubernetes object (a mapping), got {doc!r}")
    kind = doc.get("kind")
    if kind not in SPECS:
        raise ManifestError(f"{source}: kind must be one of {sorted(SPECS)}, got {kind!r}")
    api_version = doc.get("apiVersion")
    if api_version != f"{GROUP}/{VERSION}":
        raise ManifestError(f"{source}: apiVersion must be {GROUP}/{VERSION}, got {api_version!r}")
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS_NAME.match(name):
        raise ManifestError(
            f"{source}: metadata.name must be a DNS label (lowercase letters, digits, '-'), "
            f"got {name!r}"
        )
    limit = names.MAX_JOB_NAME if kind == "FineTuneJob" else names.MAX_INFERENCE_JOB_NAME
    if len(name) > limit:
        raise ManifestError(f"{source}: metadata.name must be at most {limit} characters")
    if not isinstance(doc.get("spec"), dict):
        raise ManifestError(f"{source}: spec is required and must be a mapping")
    try:
        # strict JSON validation, as the apiserver's schema check: "4" is not an integer and
        # "yes" not a boolean (lax Python validation would coerce both)
        spec = SPECS[kind].model_validate_json(json.dumps(doc["spec"], default=str),
                                               strict=True)
    except ValidationError as error:
        raise ManifestError(f"{source}: {describe_validation_error(error)}") from None
    identity = JobIdentity(name, meta.get("namespace") or "default", meta.get("uid", ""), kind)
    return Manifest(identity, spec, doc)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's YAML 1.1 reads `5e-4` (no dot) as a string; kubectl reads it as a number.
    Read numbers as kubectl does, so that strict validation judges the same values."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load(path: str | Path) -> list[Manifest]:
    path = Path(path)
    try:
        docs = [d for d in yaml.load_all(path.read_text(), Loader=_YamlLoader) if d is not None]
    except OSError as error:
        raise ManifestError(f"{path}: cannot read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ManifestError(f"{path}: not valid YAML: {error}") from None
    if not docs:
        raise ManifestError(f"{path}: no objects in the file")
    return [parse(doc, f"{path}#{i}" if len(docs) > 1 else str(path)) for i, doc in enumerate(docs)]
