"""Small Kubernetes value types used inside our specs (typed, so the CRD schema is structural)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints, model_validator

from amxtune_api.base import ApiModel, cel

# The patterns are written for both regex engines (Python's and the apiserver's RE2), so that
# offline validation (`amxtune run`, `amxtune render`) and `kubectl apply` agree.

# A resource quantity greater than zero, as Kubernetes writes it ("56", "500m", "128Gi"):
# int-or-string in the schema; amxtune.quantity parses it where the operator needs numbers.
# Kubernetes' grammar restricted to the suffixes amxtune.quantity reads (no sign, no zero, no
# exponents or n/u/E suffixes), so whatever validates here can also be computed with.
POSITIVE_QUANTITY_PATTERN = (
    r"^\+?([0-9]*[1-9][0-9]*(\.[0-9]*)?|[0-9]*\.[0-9]*[1-9][0-9]*)([KMGTP]i|[mkMGTP])?$"
)
Quantity = Annotated[
    Annotated[str, StringConstraints(pattern=POSITIVE_QUANTITY_PATTERN)]
    | Annotated[int, Field(ge=1)],
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
# DNS-1123 subdomain (claims, ConfigMaps, Secrets): dot-separated labels, none empty
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
Name = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
]
# Label keys: an optional DNS-subdomain prefix and "/", then a name of at most 63 characters
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, StringConstraints(max_length=317, pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(max_length=63, pattern=LABEL_VALUE_PATTERN)]
# A folder inside a volume (a subPath): relative, and never climbing out with ".."
CLIMBS = r"(^|/)\.\.(/|$)"


def cel_string(pattern: str) -> str:
    """`pattern` as a CEL string literal (backslashes escaped)."""
    return "'" + pattern.replace("\\", "\\\\") + "'"


def sub_path_rule(field: str) -> str:
    """The CEL rule for the sub-path `field` (unset or relative without '..')."""
    return (f"!has(self.{field}) || (!self.{field}.startsWith('/') && "
            f"!self.{field}.matches({cel_string(CLIMBS)}))")


def check_sub_path(value: str | None) -> str | None:
    if value and (value.startswith("/") or re.search(CLIMBS, value)):
        raise ValueError(f"{value!r} must be a relative path inside the volume, without '..'")
    return value


class SecretKeyRef(ApiModel):
    name: Name = Field(description="Secret in the job's namespace.")
    key: str = Field(default="token", min_length=1, description="Key within the Secret.")


class PvcPath(ApiModel):
    model_config = cel(sub_path_rule("path"), "path must be a relative path inside the volume, "
                       "without '..'")

    claim_name: Name = Field(description="PersistentVolumeClaim in the job's namespace.")
    path: str = Field(
        default="", max_length=1024,
        description="Folder inside the volume (a subPath); empty for its root.",
    )

    @model_validator(mode="after")
    def _inside(self) -> PvcPath:
        check_sub_path(self.path)
        return self


class TolerationOperator(StrEnum):
    Exists = "Exists"
    Equal = "Equal"


class TaintEffect(StrEnum):
    NoSchedule = "NoSchedule"
    PreferNoSchedule = "PreferNoSchedule"
    NoExecute = "NoExecute"


class Toleration(ApiModel):
    model_config = cel(
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || "
        "self.value == ''", "a toleration with operator Exists matches any value: drop value")

    key: LabelKey | None = None
    operator: TolerationOperator | None = None
    value: LabelValue | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> Toleration:
        if self.operator == TolerationOperator.Exists and self.value:
            raise ValueError("a toleration with operator Exists matches any value: drop value")
        return self


class EnvVar(ApiModel):
    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = ""


class Resources(ApiModel):
    """Requests = limits for every worker (Guaranteed QoS, so CPU pinning is honoured)."""

    cpu: Quantity = Field(default="4", description="CPU cores per worker pod (one per node).")
    memory: Quantity = Field(default="16Gi", description="Memory per worker pod.")
