"""profile_steps sorts the profiler's events into the kinds its table shows: every convolution
kernel PyTorch and oneDNN name is a convolution, spans are not ops."""

import pytest

from amxtune_trainer.profile_steps import category, is_op

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", [
    "aten::convolution", "aten::convolution_backward", "aten::mkldnn_convolution",
    "mkldnn::_convolution_pointwise", "mkldnn::_convolution_transpose_pointwise",
    "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward", "aten::thnn_conv2d",
    "aten::conv2d", "aten::conv_transpose2d", "aten::slow_conv_dilated2d",
    "aten::_conv_depthwise2d",
])
def test_convolution_kernels(name):
    assert category(name) == "convolutions"


def test_the_other_kinds():
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention forward"
    assert category("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == (
        "attention backward")
    assert category("aten::addmm") == category("aten::bmm") == "matrix multiplies"
    for name in ("aten::native_group_norm", "aten::copy_", "prims::convert_element_type",
                 "aten::_to_copy"):
        assert category(name).startswith("other ops"), name


@pytest.mark.parametrize("span", [
    "ProfilerStep#4", "Optimizer.step#AdamW.step", "ConvolutionBackward0",
    "_PackedConvFunctionBackward", "autograd::engine::evaluate_function: AddmmBackward0",
    "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__",
])
def test_spans_are_not_ops(span):
    assert not is_op(span)


def test_kernels_are_ops():
    assert is_op("aten::mm") and is_op("mkldnn::_convolution_pointwise")


def test_our_trainer_is_told_from_a_script():
    from amxtune_trainer.runtime import runs_trainer

    assert runs_trainer(["-m", "amxtune_trainer", "textual-inversion"])
    assert runs_trainer(["/venv/bin/amxtune-train", "lora"])
    assert not runs_trainer(["-m", "amxtune_trainer.profile_steps", "--", "train.py"])
    assert not runs_trainer(["/tmp/ref/textual_inversion.py"]) and not runs_trainer([])
