"""pytest fixtures for tests that need the control plane.

tests/conftest.py makes them available to every tier by importing the names::

    from tests.support.fixtures import control_plane, namespace, pytest_terminal_summary

`control_plane` (session scope) builds the binaries when needed, starts the control plane
with `default_nodes()` (three AMX nodes, two without AMX) and stops it at the end of the
session. When any test of the session failed, the component logs and a dump of the
cluster state are kept and their directory is printed in the terminal summary (and
stored in `config.stash`). `namespace` gives each test a fresh namespace with its
"default" ServiceAccount ready, deleted afterwards.
"""

from __future__ import annotations

import contextlib
import re
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.support.controlplane import ControlPlane, default_nodes, ensure_binaries

kept_logs_key = pytest.StashKey[str]()


def _suspended_capture(config: pytest.Config) -> contextlib.AbstractContextManager[object]:
    """Let long build/start messages reach the terminal even while pytest captures."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        return contextlib.nullcontext()
    ctx: contextlib.AbstractContextManager[object] = capman.global_and_fixture_disabled()
    return ctx


@pytest.fixture(scope="session")
def control_plane(request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    config = request.config
    with _suspended_capture(config):
        bin_dir = ensure_binaries()
        cp = ControlPlane(bin_dir)
        cp.start()
        cp.create_nodes(default_nodes())
        print(
            f"\n[control-plane] up in {cp.startup_seconds:.1f}s at {cp.server}, "
            f"kubeconfig {cp.kubeconfig}",
            file=sys.stderr,
        )
    try:
        yield cp
    finally:
        failed = request.session.testsfailed > 0
        kept = cp.stop(keep_logs=failed)
        if kept:
            config.stash[kept_logs_key] = str(kept)
            print(f"\n[control-plane] component logs kept in {kept}", file=sys.stderr)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    """Repeat where the kept logs are (import this hook into the conftest)."""
    kept = config.stash.get(kept_logs_key, None)
    if kept:
        terminalreporter.write_sep("-", "control plane")
        terminalreporter.write_line(f"component logs and cluster state kept in {kept}")


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace named after the test, deleted afterwards (without waiting)."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    control_plane.create_namespace(name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)
