"""The chart's Grafana dashboard plots only metrics the operator really exports."""

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
DASHBOARD = Path(__file__).resolve().parents[2] / "charts/amxtune/dashboards/amxtune.json"
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def exported_series() -> set[str]:
    from prometheus_client import REGISTRY

    import amxtune.controller.metrics  # noqa: F401  (registers them)

    return {family.name + suffix for family in REGISTRY.collect()
            if family.name.startswith("amxtune_") for suffix in SUFFIXES.get(family.type, [""])}


def test_every_panel_queries_series_the_operator_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bamxtune_[a-z_]+", expr)}
    exported = exported_series()
    assert used and used <= exported, used - exported
    # a panel for the training figures and for each of the operator's own health series
    for wanted in ("amxtune_jobs", "amxtune_job_samples_per_second", "amxtune_job_loss",
                   "amxtune_reconcile_seconds_bucket", "amxtune_api_requests_total",
                   "amxtune_restarts_total", "amxtune_reconcile_errors_total"):
        assert wanted in used, wanted
