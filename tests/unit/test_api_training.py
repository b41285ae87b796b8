import pytest
from pydantic import ValidationError

from amxtune_api import TrainerConfig, TrainingOptions

pytestmark = pytest.mark.unit


def test_camel_and_snake_case_both_load_to_the_same_config():
    camel = TrainerConfig.model_validate(
        {
            "pretrainedModelNameOrPath": "tiny",
            "textualInversion": {"placeholderToken": "<cat>", "initializerToken": "cat"},
            "training": {"maxTrainSteps": 7, "learningRate": 0.002},
        }
    )
    snake = TrainerConfig.model_validate(
        {
            "pretrained_model_name_or_path": "tiny",
            "textual_inversion": {"placeholder_token": "<cat>", "initializer_token": "cat"},
            "training": {"max_train_steps": 7, "learning_rate": 0.002},
        }
    )
    assert camel == snake
    assert camel.to_wire()["training"]["maxTrainSteps"] == 7


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("resolution", 500, "multiple of 8"),
        ("maxTrainSteps", 0, "greater than or equal to 1"),
        ("learningRate", -1, "greater than 0"),
        ("lrScheduler", "warp", "constant"),
        ("maxTrainStep", 5, "Extra inputs are not permitted"),
    ],
)
def test_bad_training_options_name_the_field(field, value, message):
    with pytest.raises(ValidationError) as info:
        TrainingOptions.model_validate({field: value})
    error = info.value.errors()[0]
    assert error["loc"][0] == field
    assert message in str(info.value)


def test_placeholder_token_must_be_one_word():
    with pytest.raises(ValidationError, match="single token"):
        TrainerConfig.model_validate(
            {
                "pretrainedModelNameOrPath": "tiny",
                "textualInversion": {"placeholderToken": "<my cat>", "initializerToken": "cat"},
            }
        )
