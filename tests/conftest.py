"""Shared pytest setup: offline, and one control plane for the cluster and e2e tiers."""

import os
import sys
from pathlib import Path

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

__all__ = ["control_plane", "namespace", "pytest_terminal_summary"]
