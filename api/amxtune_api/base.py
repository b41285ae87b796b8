"""Shared base for every external input model (CR specs, trainer config, CLI)."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Fields are snake_case in Python and camelCase on the wire (CRD, JSON, YAML).

    Both spellings are accepted on input so that configs written by hand for the diffusers
    script (snake_case) and Kubernetes manifests (camelCase) both load. Unknown fields are an
    error: a typo must not be silently ignored.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict:
        """The camelCase JSON form, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def cel(rule: str, message: str) -> ConfigDict:
    """Model config that adds a CEL validation rule (x-kubernetes-validations) to the CRD.

    Keep an equivalent pydantic validator when the rule matters outside the apiserver too
    (the local runner and the trainer validate without one).
    """
    return ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [{"rule": rule, "message": message}]}
    )


# Text that must hold words (a prompt). The pattern is for the apiserver: it does not strip, so
# it must see a non-space character itself.
NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000,
                                            pattern=r"\S")]
