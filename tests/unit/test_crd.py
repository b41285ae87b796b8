"""The CRDs are generated from the models; crds/ must be what `amxtune crds` writes."""

from pathlib import Path

import pytest
import yaml

from amxtune import crd
from amxtune_api.kube import POSITIVE_QUANTITY_PATTERN

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", ["crds", "charts/amxtune/crds"])
@pytest.mark.parametrize("name", sorted(crd.render_all()))
def test_crd_files_are_up_to_date(folder, name):
    committed = ROOT / folder / name
    assert committed.is_file(), f"{folder}/{name} is missing: run `make crds`"
    assert committed.read_text() == crd.render_all()[name], f"{folder}/{name} is stale: `make crds`"


def walk(schema: dict, path: str = ""):
    yield path, schema
    for key, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{key}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", crd.KINDS, ids=lambda k: k.kind)
def test_schema_is_structural(kind):
    root = crd.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in walk(root):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "title", "$defs"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if "default" in node:
            assert node["default"] is not None, path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path


def test_defaults_live_in_the_schema():
    spec = crd.crd(crd.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
        "spec"
    ]["properties"]
    assert spec["training"]["default"] == {}
    assert spec["training"]["properties"]["maxTrainSteps"]["default"] == 5000
    assert "default" not in spec["workers"]["properties"]["amxNodeLabels"]  # operator setting
    assert spec["output"]["properties"]["pvc"]["default"] == {"create": {}}
    assert spec["workers"]["properties"]["resources"]["properties"]["cpu"] == {
        "default": "4",
        "description": "CPU cores per worker pod (one per node).",
        "x-kubernetes-int-or-string": True,
        "pattern": POSITIVE_QUANTITY_PATTERN,  # for the string form
        "minimum": 1,  # for the integer form
    }


def test_printer_columns_and_names():
    text = crd.render_all()["finetunejobs.amxtune.io.yaml"]
    body = yaml.safe_load(text)
    version = body["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Step",
        "Loss",
        "Workers",
        "Precision",
        "Age",
        "Ranks",
        "Batch",
    ]
    wide = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority")]
    assert wide == ["Ranks", "Batch"]  # kubectl get -o wide only
    assert body["spec"]["names"]["shortNames"] == ["ftj"]
    assert body["spec"]["names"]["categories"] == ["amxtune"]
    assert version["subresources"] == {"status": {}}


def test_reference_is_up_to_date():
    committed = ROOT / "docs" / "reference.md"
    assert committed.read_text() == crd.reference_markdown(), "docs/reference.md: make crds"
