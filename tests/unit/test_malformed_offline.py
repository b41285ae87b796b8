"""Malformed manifests are refused offline (`amxtune run`, `amxtune render`), naming the field;
the cluster tier checks that the apiserver refuses the same corpus (tests/support/malformed.py)."""

from __future__ import annotations

import pytest

from amxtune import manifest
from tests.support.malformed import CASES, OFFLINE_ONLY, malformed

pytestmark = pytest.mark.unit


def test_the_corpus_base_is_a_valid_manifest():
    assert manifest.parse(malformed({})).identity.name == "dicoo"


@pytest.mark.parametrize(("what", "change", "field"), [c[1:] for c in CASES + OFFLINE_ONLY],
                         ids=[c[0] for c in CASES + OFFLINE_ONLY])
def test_refused_offline_naming_the_field(what, change, field):
    with pytest.raises(manifest.ManifestError) as refused:
        manifest.parse(malformed(change))
    assert field in str(refused.value), (what, str(refused.value))
