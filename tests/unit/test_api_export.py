import subprocess
import sys

import pytest
from pydantic import ValidationError

from amxtune_api.export import (
    ExportSpec,
    GenerationOptions,
    OpenVINOExportOptions,
    WeightFormat,
)

pytestmark = pytest.mark.unit


def test_defaults_are_the_recipes_static_512_fp32_shape():
    options = OpenVINOExportOptions()
    assert (options.batch_size, options.height, options.width) == (1, 512, 512)
    assert options.num_images_per_prompt == 1
    assert options.weight_format == WeightFormat.fp32


def test_camel_and_snake_case_both_load():
    camel = ExportSpec.model_validate(
        {
            "openvino": {"batchSize": 2, "weightFormat": "int8", "numImagesPerPrompt": 2},
            "prompts": ["a <dicoo>", "a <dicoo> at the beach"],
            "numInferenceSteps": 20,
            "guidanceScale": 6,
            "negativePrompt": "blurry",
        }
    )
    snake = ExportSpec.model_validate(
        {
            "openvino": {"batch_size": 2, "weight_format": "int8", "num_images_per_prompt": 2},
            "prompts": ["a <dicoo>", "a <dicoo> at the beach"],
            "num_inference_steps": 20,
            "guidance_scale": 6,
            "negative_prompt": "blurry",
        }
    )
    assert camel == snake
    wire = camel.to_wire()
    assert wire["openvino"]["weightFormat"] == "int8"
    assert wire["numInferenceSteps"] == 20
    assert ExportSpec.model_validate(wire) == camel


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"height": 500}, "height", "multiple of 8"),
        ({"width": 1001}, "width", "multiple of 8"),
        ({"height": 32}, "height", "greater than or equal to 64"),
        ({"batchSize": 0}, "batchSize", "greater than or equal to 1"),
        ({"weightFormat": "int4"}, "weightFormat", "'fp32', 'fp16', 'int8' or 'int8-full'"),
        ({"batchSize": 1, "dynamic": True}, "dynamic", "Extra inputs are not permitted"),
    ],
)
def test_bad_export_options_name_the_field(data, field, message):
    with pytest.raises(ValidationError) as info:
        OpenVINOExportOptions.model_validate(data)
    error = info.value.errors()[0]
    assert error["loc"][0] == field
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"prompts": []}, "at least 1 item"),
        ({"prompts": ["  "]}, "at least 1 character"),
        ({}, "Field required"),
        ({"prompts": ["x"], "guidanceScale": 1.0}, "greater than 1"),
        ({"prompts": ["x"], "numInferenceSteps": 0}, "greater than or equal to 1"),
        ({"prompts": ["x"], "seed": -1}, "greater than or equal to 0"),
    ],
)
def test_bad_generation_options(data, message):
    with pytest.raises(ValidationError, match=message):
        GenerationOptions.model_validate(data)


def test_prompts_are_stripped_and_blank_negative_prompt_is_none():
    options = GenerationOptions(prompts=["  a <cat>  "], negative_prompt="  ")
    assert options.prompts == ["a <cat>"]
    assert options.negative_prompt is None


@pytest.mark.parametrize(("prompts", "batch", "ok"), [(1, 1, True), (4, 1, True), (4, 2, True),
                                                      (5, 5, True), (3, 2, False), (1, 2, False)])
def test_prompt_count_must_fill_whole_batches(prompts, batch, ok):
    data = {"prompts": [f"p{i}" for i in range(prompts)], "openvino": {"batchSize": batch}}
    if ok:
        assert ExportSpec.model_validate(data).openvino.batch_size == batch
    else:
        with pytest.raises(ValidationError, match=r"multiple of the batch size"):
            ExportSpec.model_validate(data)


def test_json_schema_has_descriptions_and_bounds_for_the_crd():
    schema = ExportSpec.model_json_schema(by_alias=True)
    assert "prompts" in schema["required"]
    ov = schema["$defs"]["OpenVINOExportOptions"]["properties"]
    assert ov["height"]["minimum"] == 64 and ov["height"]["description"]
    assert schema["properties"]["guidanceScale"]["exclusiveMinimum"] == 1.0


def test_importable_without_torch():
    code = (
        "import sys, amxtune_api.export; "
        "assert not {'torch', 'diffusers', 'openvino', 'optimum'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
