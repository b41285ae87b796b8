"""Pre-packed frozen convolutions give bit-identical outputs and input gradients.

They are oneDNN's bf16 convolutions, which need AVX-512 BW/VL/DQ or AVX-NE-CONVERT: on a CPU
without them the trainer never packs (tests/trainer/test_cpu_paths.py), and these tests skip,
naming the missing flags.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.trainer


@pytest.fixture(autouse=True)
def _bf16_convolutions():
    from amxtune_trainer.cpu import probe
    from amxtune_trainer.fastconv import _ops_available

    if not _ops_available():
        pytest.skip("this torch build has no oneDNN convolution ops")
    cpu = probe()
    if not cpu.can_pack_bf16_convolutions:
        missing = cpu.missing("avx512bw", "avx512vl", "avx512dq", "avx_ne_convert")
        pytest.skip("oneDNN bf16 convolutions need avx512bw, avx512vl and avx512dq, or "
                    f"avx_ne_convert; this CPU lacks {', '.join(missing)}")


@pytest.mark.parametrize(("kernel", "stride", "padding", "size"),
                         [(3, 1, 1, 12), (3, 2, 1, 12), (3, 2, 1, 11), (1, 1, 0, 9)])
def test_packed_conv_matches_eager(kernel, stride, padding, size):
    from amxtune_trainer.fastconv import pack_frozen_convolutions

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, kernel, stride, padding))
    model = model.to(torch.bfloat16).requires_grad_(False)
    packed = copy.deepcopy(model)
    assert pack_frozen_convolutions(packed) == 1
    x = torch.randn(2, 16, size, size, dtype=torch.bfloat16)
    grad = None
    results = []
    for net in (model, packed):
        inp = x.clone().requires_grad_(True)
        out = net(inp)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
        out.backward(grad)
        results.append((out.detach(), inp.grad))
    assert torch.equal(results[0][0], results[1][0])
    # The input gradient: identical where oneDNN runs both as the same kernel (a Xeon with
    # AMX). On AVX512-BF16 without AMX the packed one is a deconvolution (brgemm) and eager's a
    # backward-data convolution, which may round a sum differently: one bf16 step at most
    # (measured on an AMD EPYC, Zen 5: 1 element of 4608 differed, by 2^-7 at a magnitude of 2).
    eager_grad, packed_grad = (r[1].float() for r in results)
    one_step = 2.0 ** -7 * eager_grad.abs().max()
    assert (eager_grad - packed_grad).abs().max() <= one_step
    assert (eager_grad != packed_grad).float().mean() < 0.01
    with torch.no_grad():  # other batch sizes (validation) work too
        assert torch.equal(model(x[:1]), packed(x[:1]))


def test_only_frozen_bf16_convolutions_are_packed():
    from amxtune_trainer.fastconv import pack_frozen_convolutions

    fp32 = torch.nn.Conv2d(4, 4, 3).requires_grad_(False)
    trainable = torch.nn.Conv2d(4, 4, 3).to(torch.bfloat16)
    grouped = torch.nn.Conv2d(4, 4, 3, groups=2).to(torch.bfloat16).requires_grad_(False)
    assert pack_frozen_convolutions(torch.nn.Sequential(fp32, trainable, grouped)) == 0


def test_tiny_unet_is_bit_identical_with_packed_convolutions(tiny_model):
    from diffusers import UNet2DConditionModel

    from amxtune_trainer.fastconv import pack_frozen_convolutions

    unet = UNet2DConditionModel.from_pretrained(str(tiny_model), subfolder="unet",
                                                torch_dtype=torch.bfloat16)
    unet = unet.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    packed = copy.deepcopy(unet)
    assert pack_frozen_convolutions(packed) > 10
    x = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    outs = []
    for net in (unet, packed):
        hidden = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(torch.bfloat16).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, torch.tensor([500]), hidden).sample
        out.float().pow(2).mean().backward()
        outs.append((out.detach(), hidden.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
