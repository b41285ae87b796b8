"""Parse the Kubernetes resource quantities the operator computes with."""

from __future__ import annotations

import re
from decimal import Decimal

_SUFFIX = {
    "": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}
_QUANTITY = re.compile(r"^\+?([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """'500m' -> 0.5, '56' -> 56, '128Gi' -> 137438953472; ValueError for anything else."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '4', '500m', '16Gi')")
    return Decimal(match.group(1)) * _SUFFIX[match.group(2)]
