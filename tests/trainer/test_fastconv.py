"""Pre-packed frozen convolutions give bit-identical outputs and input gradients.

fp32 ones run on every CPU oneDNN supports. bf16 ones are oneDNN's bf16 convolutions, which
need AVX-512 BW/VL/DQ or AVX-NE-CONVERT: on a CPU without them bf16 convolutions stay eager
(packed, they would fail at their first call), and the bf16 cases check exactly that: nothing
packed, the same results. Whether packed bf16 matches eager is then checked only on CPUs that
have the kernels (AMX Xeons, AVX512-BF16 EPYCs).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.trainer


def packs(dtype: torch.dtype) -> bool:
    """Whether frozen convolutions of this dtype get packed on this CPU."""
    from amxtune_trainer.cpu import probe
    from amxtune_trainer.fastconv import _ops_available

    assert _ops_available(), "this torch build has no oneDNN convolution ops"
    return dtype == torch.float32 or probe().can_pack_bf16_convolutions


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "size"),
                         [(3, 1, 1, 12), (3, 2, 1, 12), (3, 2, 1, 11), (1, 1, 0, 9)])
def test_packed_conv_matches_eager(kernel, stride, padding, size, dtype):
    from amxtune_trainer.fastconv import pack_frozen_convolutions

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, kernel, stride, padding))
    model = model.to(dtype).requires_grad_(False)
    packed = copy.deepcopy(model)
    assert pack_frozen_convolutions(packed) == int(packs(dtype))
    x = torch.randn(2, 16, size, size, dtype=dtype)
    grad = None
    results = []
    for net in (model, packed):
        inp = x.clone().requires_grad_(True)
        out = net(inp)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(grad)
        results.append((out.detach(), inp.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    # The input gradient: identical where oneDNN runs both as the same kernel (a Xeon with
    # AMX). On AVX512-BF16 without AMX the packed one is a deconvolution (brgemm) and eager's a
    # backward-data convolution, which may round a sum differently: one bf16 step at most
    # (measured on an AMD EPYC, Zen 5: 1 element of 4608 differed, by 2^-7 at a magnitude of 2).
    eager_grad, packed_grad = (r[1].float() for r in results)
    if dtype == torch.float32:  # a contiguous input: eager runs another kernel (summation order)
        torch.testing.assert_close(packed_grad, eager_grad, rtol=1e-5, atol=1e-5)
    else:
        one_step = 2.0 ** -7 * eager_grad.abs().max()
        assert (eager_grad - packed_grad).abs().max() <= one_step
        assert (eager_grad != packed_grad).float().mean() < 0.01
    with torch.no_grad():  # other batch sizes (validation) work too
        torch.testing.assert_close(packed(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-5)


def test_only_frozen_bf16_and_fp32_convolutions_are_packed_fp32_for_fewer_shapes():
    from amxtune_trainer.fastconv import MAX_SHAPES, MAX_SHAPES_FP32, pack_frozen_convolutions

    frozen = torch.nn.Conv2d(4, 8, 3).requires_grad_(False)
    frozen_bf16 = torch.nn.Conv2d(4, 8, 3).to(torch.bfloat16).requires_grad_(False)
    trainable = torch.nn.Conv2d(4, 4, 3).to(torch.bfloat16)
    grouped = torch.nn.Conv2d(4, 4, 3, groups=2).to(torch.bfloat16).requires_grad_(False)
    half = torch.nn.Conv2d(4, 4, 3).to(torch.float16).requires_grad_(False)
    model = torch.nn.Sequential(frozen, frozen_bf16, trainable, grouped, half)
    assert pack_frozen_convolutions(model) == 1 + packs(torch.bfloat16)
    assert model[0].max_shapes == MAX_SHAPES_FP32
    if packs(torch.bfloat16):
        assert model[1].max_shapes == MAX_SHAPES
    else:
        assert type(model[1]) is torch.nn.Conv2d


@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes_beyond_the_limit_reuse_the_first_packed_weights(dtype):
    """fp32 keeps one packed shape (memory): other batch sizes reuse it, still exact."""
    from amxtune_trainer.fastconv import pack_frozen_convolutions

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, 2, 1)).to(dtype).requires_grad_(False)
    packed = copy.deepcopy(model)
    assert pack_frozen_convolutions(packed, max_shapes=1) == int(packs(dtype))
    for batch in (2, 3, 1):
        x = torch.randn(batch, 16, 11, 11, dtype=dtype)
        grads = []
        for net in (model, packed):
            inp = x.clone().requires_grad_(True)
            out = net(inp)
            out.backward(torch.ones_like(out))
            grads.append((out.detach(), inp.grad))
        torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)
        one_step = 0.02 if dtype == torch.bfloat16 else 1e-5  # as in the test above
        torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=one_step)
    if packs(dtype):
        conv = packed[0]
        assert len(conv._forward_cache) == len(conv._backward_cache) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_unet_matches_eager_with_packed_convolutions(tiny_model, dtype):
    from diffusers import UNet2DConditionModel

    from amxtune_trainer.fastconv import pack_frozen_convolutions

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet",
                                                torch_dtype=dtype)
    unet = unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    packed = copy.deepcopy(unet)
    assert (pack_frozen_convolutions(packed) > 10) is packs(dtype)
    x = torch.randn(1, 4, 8, 8).to(dtype)
    outs = []
    for net in (unet, packed):
        hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = net(x, torch.tensor([500]), hidden).sample
        out.float().pow(2).mean().backward()
        outs.append((out.detach(), hidden.grad))
    if dtype == torch.float32:  # oneDNN's fp32 kernels differ from eager's in summation order
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-4, atol=1e-6)
    else:
        assert torch.equal(outs[0][0], outs[1][0])
        assert torch.equal(outs[0][1], outs[1][1])
