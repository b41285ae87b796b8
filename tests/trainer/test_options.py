"""Flags derived from the shared option models; config files; the reference script's flags."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trainer


def _config(argv):
    from amxtune_trainer import options
    from amxtune_trainer.cli import build_parser

    args = build_parser("textual-inversion").parse_args(["textual-inversion", *argv])
    return options.config_from_args(args)


def test_reference_script_spellings_and_dashes_give_the_same_config():
    underscored = _config([
        "--pretrained_model_name_or_path", "tiny", "--placeholder_token", "<t>",
        "--initializer_token", "toy", "--max_train_steps", "7", "--scale_lr",
        "--learnable_property", "style", "--only_save_embeds", "--report_to", "tensorboard",
    ])
    dashed = _config([
        "--model", "tiny", "--placeholder-token", "<t>", "--initializer-token", "toy",
        "--max-train-steps", "7", "--scale-lr", "--learnable-property", "style",
    ])
    assert underscored == dashed
    assert dashed.training.max_train_steps == 7 and dashed.training.scale_lr is True
    assert dashed.textual_inversion.learnable_property == "style"


def test_config_file_camel_case_with_flags_overriding(tmp_path):
    config = tmp_path / "trainer.json"
    config.write_text(json.dumps({
        "pretrainedModelNameOrPath": "tiny", "outputDir": "/tmp/x",
        "textualInversion": {"placeholderToken": "<t>", "initializerToken": "toy"},
        "training": {"maxTrainSteps": 9, "learningRate": 0.002, "randomFlip": True},
        "runtime": {"channelsLast": False},
    }))
    loaded = _config(["--config", str(config), "--max-train-steps", "3", "--no-random-flip"])
    assert loaded.training.max_train_steps == 3
    assert loaded.training.learning_rate == 0.002
    assert loaded.training.random_flip is False
    assert loaded.runtime.channels_last is False
    yaml_file = tmp_path / "trainer.yaml"
    yaml_file.write_text("pretrained_model_name_or_path: tiny\ntextual_inversion:\n"
                         "  placeholder_token: <t>\n  initializer_token: toy\n")
    assert _config(["--config", str(yaml_file)]).textual_inversion.placeholder_token == "<t>"


def test_invalid_option_is_a_user_error_naming_the_field():
    from amxtune_trainer.errors import UserError

    with pytest.raises(UserError, match=r"resolution \(--resolution\): must be a multiple of 8"):
        _config(["--model", "tiny", "--placeholder-token", "<t>", "--initializer-token", "t",
                 "--resolution", "100"])
    with pytest.raises(UserError, match="placeholder_token"):
        _config(["--model", "tiny", "--initializer-token", "t"])


def test_the_operator_knows_the_trainers_builtin_models():
    from amxtune_api.training import BUILTIN_MODELS
    from amxtune_trainer.builtin.models import NAMES

    assert set(NAMES) == set(BUILTIN_MODELS)
