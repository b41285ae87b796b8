"""Shared pytest setup: offline, one control plane for the cluster and e2e tiers, and a CPU
without AVX-512 for the tiers that train."""

import os
import sys
from pathlib import Path

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Make `tests.support` importable however pytest was started (rootdir is the repo).
_repo_root = str(Path(__file__).resolve().parents[1])
if _repo_root not in sys.path:
    sys.path.insert(0, _repo_root)

# Session-scoped, started only by the tiers that ask for it (cluster, e2e).
from tests.support.fixtures import (  # noqa: E402
    control_plane,
    namespace,
    pytest_terminal_summary,
)

__all__ = ["avx2_cpu", "control_plane", "namespace", "pytest_terminal_summary"]


@pytest.fixture(scope="session")
def avx2_cpu() -> dict[str, str]:
    """Environment variables that run a process and its children as on a CPU with AVX2 and
    nothing newer (no AVX-512, no AMX): see tests/support/cpumask.py."""
    from tests.support.cpumask import masked_environment

    return masked_environment("avx2")
