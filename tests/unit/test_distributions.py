"""The trainer needs the shared models (amxtune-api), not the operator: a worker image must not
install kopf, the Kubernetes client or prometheus-client."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
OPERATOR_ONLY = ("kopf", "kubernetes", "prometheus_client", "prometheus-client", "amxtune")


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]\
        .strip().lower()


def test_the_trainer_and_api_distributions_do_not_depend_on_the_operator():
    for distribution in ("amxtune-trainer", "amxtune-api"):
        names = {_name(r) for r in requires(distribution) or []}
        assert not names & set(OPERATOR_ONLY), (distribution, names)
    assert "amxtune-api" in {_name(r) for r in requires("amxtune-trainer")}
    assert "amxtune-api" in {_name(r) for r in requires("amxtune")}


def test_no_trainer_module_imports_the_operator_package():
    offenders = []
    for path in (ROOT / "trainer_image" / "amxtune_trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in modules
                          if m.split(".")[0] in ("amxtune", "kopf", "kubernetes")]
    assert not offenders


def test_importing_the_trainer_loads_nothing_of_the_operator():
    code = (
        "import sys\n"
        "import amxtune_trainer.cli, amxtune_trainer.engine, amxtune_trainer.inference\n"
        "import amxtune_trainer.recipes.lora, amxtune_trainer.recipes.textual_inversion\n"
        "import amxtune_api.finetunejob, amxtune_api.inferencejob, amxtune_api.events\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {OPERATOR_ONLY!r})\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""
