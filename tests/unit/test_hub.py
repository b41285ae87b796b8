"""The operator's question to the hub before it creates pods, against a stand-in hub."""

from __future__ import annotations

import socket

import pytest

from amxtune.hub import check_model
from tests.support.hub import shared_hub

pytestmark = pytest.mark.unit
KNOWN = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture
def hub():
    return shared_hub()


def test_known_models_and_revisions_pass(hub):
    assert check_model(hub.url, KNOWN, None, has_token=False) is None
    assert check_model(hub.url, KNOWN, "fp16", has_token=False) is None
    assert hub.requests[-1] == f"/api/models/{KNOWN}/revision/fp16"


def test_builtin_models_are_not_asked_about(hub):
    before = len(hub.requests)
    assert check_model(hub.url, "tiny", None, has_token=False) is None
    assert check_model(hub.url, "sd15-arch", None, has_token=False) is None
    assert len(hub.requests) == before


def test_unknown_model_without_a_token_is_named(hub):
    reason, message = check_model(hub.url, "someone/typo", None, has_token=False)
    assert reason == "ModelNotFound"
    assert message.startswith("spec.model.name:") and "'someone/typo'" in message


def test_unknown_model_with_a_token_may_be_private_and_starts(hub):
    assert check_model(hub.url, "someone/private", None, has_token=True) is None


def test_unknown_revision_is_named(hub):
    reason, message = check_model(hub.url, KNOWN, "refs/pr/1", has_token=True)
    assert reason == "ModelRevisionNotFound"
    assert message.startswith("spec.model.revision:") and "'refs/pr/1'" in message
    assert hub.requests[-1] == f"/api/models/{KNOWN}/revision/refs%2Fpr%2F1"


def test_no_verdict_without_a_definite_answer(hub):
    # a mirror without the model API: 404 without an error code
    assert check_model(hub.url + "/mirror", "someone/typo", None, has_token=False) is None
    with socket.socket() as closed:  # nothing listens: the trainer will check instead
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert check_model(f"http://127.0.0.1:{port}", "someone/typo", None, False) is None
    assert check_model("", "someone/typo", None, has_token=False) is None
