"""Generate the CustomResourceDefinitions from the pydantic models.

Pydantic writes JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3.0 schema: no $ref,
no `anyOf` with null, boolean exclusive bounds, int-or-string marked as such. Defaults made by
default factories are written too (objects as the fields their factory sets, so the apiserver's
nested defaults fill in the rest), because defaults must live in the schema, not the operator.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema, to_jsonable_python

from amxtune.names import MAX_INFERENCE_JOB_NAME, MAX_JOB_NAME
from amxtune_api import finetunejob, inferencejob

INT_OR_STRING = "x-kubernetes-int-or-string"
VALIDATIONS = "x-kubernetes-validations"


class _CrdSchemaGenerator(GenerateJsonSchema):
    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().default_schema(schema)
        value = factory()
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json", by_alias=True, exclude_unset=True)
        else:
            value = to_jsonable_python(value)
        inner = self.generate_inner(schema["schema"])
        return {**inner, "default": value}


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `model` (camelCase field names)."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_CrdSchemaGenerator)
    definitions = raw.pop("$defs", {})
    return _structural(raw, definitions)


def _structural(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, definitions) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            target = copy.deepcopy(definitions[node.pop("$ref").rsplit("/", 1)[-1]])
            node = {**target, **node}
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o != {"type": "null"}]
            if len(options) == 1:
                node = {**options[0], **node}
            elif {o.get("type") for o in options} == {"string", "integer"}:
                node[INT_OR_STRING] = True
                # a pattern applies to the string form only, a minimum to the integer form,
                # as in core types
                for option in options:
                    node.update({k: v for k, v in option.items() if k != "type"})
            else:
                raise ValueError(f"cannot express anyOf {options} in a structural schema")
    if node.get(INT_OR_STRING):
        node.pop("type", None)
        node.pop("anyOf", None)
    node.pop("title", None)
    if node.get("default", 0) is None:
        node.pop("default")
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), int | float) and not isinstance(node[bound], bool):
            node[plain] = node[bound]
            node[bound] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    return {
        key: (value if key in ("default", "enum", VALIDATIONS) else _structural(value, definitions))
        for key, value in node.items()
    }


@dataclass
class Kind:
    kind: str
    plural: str
    short_names: list[str]
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: list[dict[str, str | int]]
    root_rules: list[dict[str, str]] = field(default_factory=list)
    description: str = ""


def _started(path: str, optional: bool = False) -> dict[str, str]:
    """A transition rule: `spec.PATH` may not change once the job has left Pending.

    An `optional` path may be absent (a method's section in a job of another method); reading
    an absent field is an error in CEL, which would refuse every update of the job."""
    same = f"self.spec.{path} == oldSelf.spec.{path}"
    if optional:
        same = (f"(has(self.spec.{path}) == has(oldSelf.spec.{path}) && "
                f"(!has(self.spec.{path}) || {same}))")
    return {
        "rule": "!has(oldSelf.status) || !has(oldSelf.status.phase) || "
        f"oldSelf.status.phase == 'Pending' || {same}",
        "message": f"spec.{path} cannot change once the job has started; create a new job",
        "fieldPath": f".spec.{path}",
        "reason": "FieldValueForbidden",
    }


KINDS = [
    Kind(
        kind="FineTuneJob",
        plural="finetunejobs",
        short_names=["ftj"],
        spec=finetunejob.FineTuneJobSpec,
        status=finetunejob.FineTuneJobStatus,
        description="Fine-tunes a Stable Diffusion model on AMX CPU nodes (textual inversion "
        "or LoRA).",
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Step", "type": "string", "jsonPath": ".status.progress.display"},
            {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
            {"name": "Workers", "type": "string", "jsonPath": ".status.workers.display"},
            {"name": "Precision", "type": "string",
             "jsonPath": ".status.trainer.mixedPrecision"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            # -o wide: what ranksPerNode (auto or not) made of the job
            {"name": "Ranks", "type": "integer", "jsonPath": ".status.layout.worldSize",
             "priority": 1},
            {"name": "Batch", "type": "integer", "jsonPath": ".status.layout.globalBatchSize",
             "priority": 1},
        ],
        root_rules=[
            {
                "rule": f"size(self.metadata.name) <= {MAX_JOB_NAME}",
                "message": f"metadata.name must be at most {MAX_JOB_NAME} characters: worker "
                "pods are named NAME-worker-N and pod host names are DNS labels (63)",
            },
            {
                "rule": "self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS label (lowercase letters, digits, '-'; "
                "no dots): the workers' Service and host names are made from it",
            },
            *[_started(path) for path in ("method", "model", "data", "training", "workers")],
            # output, runtime and export too: a retry re-renders the pods from the spec while
            # trainer.json keeps the first attempt's paths, and the InferenceJob follows them
            *[_started(path, optional=True)
              for path in ("textualInversion", "lora", "output", "runtime", "export")],
        ],
    ),
    Kind(
        kind="InferenceJob",
        plural="inferencejobs",
        short_names=["infj"],
        spec=inferencejob.InferenceJobSpec,
        status=inferencejob.InferenceJobStatus,
        description="Exports a fine-tuned pipeline to OpenVINO and renders sample images.",
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Export", "type": "string", "jsonPath": ".status.exportCache",
             "description": "hit: the base model's cached export was reused"},
            {"name": "Export s", "type": "number", "jsonPath": ".status.exportSeconds"},
            {"name": "Images", "type": "integer", "jsonPath": ".status.images"},
            {"name": "Sec/Image", "type": "number", "jsonPath": ".status.secondsPerImage"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        root_rules=[
            {
                "rule": f"size(self.metadata.name) <= {MAX_INFERENCE_JOB_NAME}",
                "message": f"metadata.name must be at most {MAX_INFERENCE_JOB_NAME} characters: "
                "it is the value of the amxtune.io/job label of its pod",
            },
        ],
    ),
]


def crd(kind: Kind) -> dict[str, Any]:
    group, version = finetunejob.GROUP, finetunejob.VERSION
    root: dict[str, Any] = {
        "type": "object",
        "description": kind.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(kind.spec),
            "status": model_schema(kind.status),
        },
    }
    if kind.root_rules:
        root[VALIDATIONS] = kind.root_rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{group}",
            "labels": {"app.kubernetes.io/name": "amxtune", "app.kubernetes.io/part-of": "amxtune"},
        },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.kind.lower(),
                "shortNames": kind.short_names,
                "categories": ["amxtune"],
            },
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": kind.columns,
                }
            ],
        },
    }


HEADER = "# Generated by `amxtune crds` from the pydantic models in amxtune_api; do not edit.\n"


def render_all() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    return {
        f"{k.plural}.{finetunejob.GROUP}.yaml": HEADER
        + yaml.safe_dump(crd(k), sort_keys=False, width=100)
        for k in KINDS
    }


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


def _rows(schema: dict, path: str, required: bool) -> list[tuple[str, str, str, str]]:
    kind = "int-or-string" if schema.get(INT_OR_STRING) else schema.get("type", "")
    if kind == "array" and "items" in schema:
        kind = f"[]{schema['items'].get('type', 'object')}"
    if "enum" in schema:
        kind = " \\| ".join(f"`{v}`" for v in schema["enum"])
    default = schema.get("default")
    shown = json.dumps(default) if isinstance(default, str | dict | list) else default
    default_text = "required" if required else ("" if default is None else f"`{shown}`")
    rows = [(path, kind, default_text, schema.get("description", "").replace("\n", " "))]
    children = schema.get("properties", {})
    if kind.startswith("[]") and "properties" in schema.get("items", {}):
        children, path = schema["items"]["properties"], f"{path}[]"
        required_children = schema["items"].get("required", [])
    else:
        required_children = schema.get("required", [])
    for name, child in children.items():
        rows += _rows(child, f"{path}.{name}", name in required_children)
    return rows


def reference_markdown() -> str:
    """docs/reference.md: every spec field with its type, default and description."""
    out = ["# API reference (amxtune.io/v1alpha1)", "",
           "Generated by `amxtune crds --reference` from the same models as the CRDs; do not "
           "edit.", ""]
    for kind in KINDS:
        out += [f"## {kind.kind}", "", kind.description, "",
                "| field | type | default | description |", "|---|---|---|---|"]
        spec = model_schema(kind.spec)
        for path, type_, default, description in _rows(spec, "spec", True)[1:]:
            out.append(f"| `{path}` | {type_} | {default} | {description} |")
        out.append("")
    return "\n".join(out)
