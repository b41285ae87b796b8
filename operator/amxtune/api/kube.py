"""Small Kubernetes value types used inside our specs (typed, so the CRD schema is structural)."""

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from amxtune.api.base import ApiModel

# A resource quantity as Kubernetes writes it ("56", "500m", "128Gi"): int-or-string in the
# schema; amxtune.quantity parses it where the operator needs numbers.
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
Quantity = Annotated[
    Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN)] | int,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
]


class SecretKeyRef(ApiModel):
    name: Name = Field(description="Secret in the job's namespace.")
    key: str = Field(default="token", min_length=1, description="Key within the Secret.")


class PvcPath(ApiModel):
    claim_name: Name = Field(description="PersistentVolumeClaim in the job's namespace.")
    path: str = Field(
        default="", description="Folder inside the volume (a subPath); empty for its root."
    )


class TolerationOperator(StrEnum):
    Exists = "Exists"
    Equal = "Equal"


class TaintEffect(StrEnum):
    NoSchedule = "NoSchedule"
    PreferNoSchedule = "PreferNoSchedule"
    NoExecute = "NoExecute"


class Toleration(ApiModel):
    key: str | None = None
    operator: TolerationOperator | None = None
    value: str | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None


class EnvVar(ApiModel):
    name: str = Field(min_length=1, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str = ""


class Resources(ApiModel):
    """Requests = limits for every worker (Guaranteed QoS, so CPU pinning is honoured)."""

    cpu: Quantity = Field(default="4", description="CPU cores per worker pod (one per node).")
    memory: Quantity = Field(default="16Gi", description="Memory per worker pod.")
