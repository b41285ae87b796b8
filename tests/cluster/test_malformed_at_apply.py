"""The apiserver refuses every malformed manifest of tests/support/malformed.py at apply
(server-side dry run, CRDs installed), naming the field, as `amxtune run` does offline."""

from __future__ import annotations

import pytest
import yaml

from tests.support.controlplane import ControlPlane, KubectlError
from tests.support.jobs import ROOT
from tests.support.malformed import CASES, malformed
from tests.support.operator import install_crds

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane) -> ControlPlane:
    install_crds(control_plane)
    return control_plane


def dry_run(cp: ControlPlane, namespace: str, doc: dict) -> str:
    return cp.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                      input=yaml.safe_dump(doc)).stdout


def test_the_corpus_base_is_accepted(crds, namespace):
    assert "dicoo" in dry_run(crds, namespace, malformed({}))


def test_a_lora_job_is_accepted(crds, namespace):
    lora = {"spec": {"method": "lora", "textualInversion": None,
                     "lora": {"rank": 8, "targetModules": ["to_q", "to_v"],
                              "instancePrompt": "a photo of sks toy"}}}
    assert "dicoo" in dry_run(crds, namespace, malformed(lora))
    example = yaml.safe_load((ROOT / "examples" / "lora.yaml").read_text())
    assert "robot-lora" in dry_run(crds, namespace, example)


@pytest.mark.parametrize(("what", "change", "field"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_refused_at_apply_naming_the_field(crds, namespace, what, change, field):
    with pytest.raises(KubectlError) as refused:
        dry_run(crds, namespace, malformed(change))
    assert field in refused.value.stderr, (what, refused.value.stderr)
