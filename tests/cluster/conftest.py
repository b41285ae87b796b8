"""Cluster tier: tests against a real control plane (see tests/support/controlplane.py)."""

import sys
from pathlib import Path

# Make `tests.support` importable however pytest was started (rootdir is the repo).
_repo_root = str(Path(__file__).resolve().parents[2])
if _repo_root not in sys.path:
    sys.path.insert(0, _repo_root)

from tests.support.fixtures import (  # noqa: E402
    control_plane,
    namespace,
    pytest_terminal_summary,
)

__all__ = ["control_plane", "namespace", "pytest_terminal_summary"]
