"""The Argo CD health check (docs/argocd/health.lua) on sample objects, run in real Lua."""

from pathlib import Path

import pytest
from lupa import LuaRuntime

pytestmark = pytest.mark.unit
SCRIPT = (Path(__file__).resolve().parents[2] / "docs" / "argocd" / "health.lua").read_text()


def health(obj: dict) -> dict:
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def job(status: dict | None, generation: int = 1) -> dict:
    obj = {
        "apiVersion": "amxtune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "dicoo", "generation": generation},
        "spec": {},
    }
    if status is not None:
        obj["status"] = {"observedGeneration": 1, **status}
    return obj


def stalled(reason: str, message: str) -> list[dict]:
    return [{"type": "Stalled", "status": "True", "reason": reason, "message": message}]


@pytest.mark.parametrize(
    ("obj", "status", "message"),
    [
        (job(None), "Progressing", "Waiting for the amxtune operator"),
        (
            job(
                {
                    "phase": "Running",
                    "message": "training on 4 worker(s)",
                    "progress": {"display": "120/200"},
                }
            ),
            "Progressing",
            "training on 4 worker(s) (step 120/200)",
        ),
        (
            job({"phase": "Succeeded", "message": "trained and exported"}),
            "Healthy",
            "trained and exported",
        ),
        (
            job(
                {
                    "phase": "Failed",
                    "conditions": stalled("BackoffLimitExceeded", "worker-1 exited"),
                }
            ),
            "Degraded",
            "BackoffLimitExceeded: worker-1 exited",
        ),
        (
            job(
                {
                    "phase": "Pending",
                    "conditions": stalled("SecretNotFound", "Secret 'hf' not found"),
                }
            ),
            "Degraded",
            "SecretNotFound: Secret 'hf' not found",
        ),
        (job({"phase": "Suspended", "message": "suspended"}), "Suspended", "suspended"),
        (
            job({"phase": "Succeeded"}, generation=2),
            "Progressing",
            "Waiting for the operator to see the latest spec",
        ),
    ],
)
def test_health(obj, status, message):
    assert health(obj) == {"status": status, "message": message}
