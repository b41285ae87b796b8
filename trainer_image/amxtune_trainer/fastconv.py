"""Frozen convolutions with weights pre-packed once for oneDNN (forward and backward-data).

In eager PyTorch every `conv2d` call hands oneDNN a plain weight tensor, which oneDNN then
reorders into its blocked layout (AMX's in bf16, AVX2's or AVX-512's in fp32) — for the forward
and again for the input-gradient backward, every step. For the SD UNet's large convolutions
(1280x2560x3x3: 59 MB in bf16) on small feature maps this reorder costs more than the
convolution itself (ONEDNN_VERBOSE at 256 px: 2.1 s of reorders against 1.3 s of convolutions
per step). The UNet is frozen, so the weights are packed once here, and the backward computes
only the input gradient (a transposed convolution with a pre-packed weight too). bf16 packs by
default, fp32 only when asked (`fp32_wanted`). Results are bit-identical to eager where oneDNN
runs the same kernel (checked in tests/trainer); anything unusual (groups, dilation, string
padding) keeps the eager path.

Packed copies cost memory: a forward and a backward copy of every packed weight, per input
shape. At most `max_shapes` shapes get their own copies; further shapes (an evaluation batch)
reuse the first ones, which oneDNN then reorders per call as eager does.
"""

from __future__ import annotations

import os

MAX_SHAPES = 6  # packed copies kept per convolution in bf16 (train batch, eval batches, ...)
# fp32 copies are twice the size: one shape, whichever comes first (the evaluation batch before
# training). Measured: a 1280x1280x3x3 fp32 weight packed for batch 4 runs a batch-1 input as
# fast as one packed for batch 1 (AVX2 7.9 ms, AVX-512 4.8 ms; eager 11 ms).
MAX_SHAPES_FP32 = 1


def _ops_available() -> bool:
    import torch

    mk = getattr(torch.ops, "mkldnn", None)
    try:
        return all(hasattr(mk, name) for name in (
            "_convolution_pointwise", "_reorder_convolution_weight",
            "_convolution_transpose_pointwise", "_reorder_convolution_transpose_weight",
        )) and torch.backends.mkldnn.is_available()
    except Exception:
        return False


def _make_classes():
    import torch
    from torch import nn

    mk = torch.ops.mkldnn
    channels_last = torch.channels_last

    class _PackedConvFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, module):
            ctx.module = module
            ctx.in_shape = tuple(x.shape)
            return module._forward_packed(x)

        @staticmethod
        def backward(ctx, grad):
            module = ctx.module
            grad_input = module._input_grad(grad, ctx.in_shape)
            return grad_input, None

    class PackedConv2d(nn.Module):
        """Drop-in for a frozen nn.Conv2d (keeps the original as `.conv`)."""

        def __init__(self, conv: nn.Conv2d, max_shapes: int):
            super().__init__()
            self.conv = conv
            self.max_shapes = max_shapes
            self.padding = list(conv.padding)
            self.stride = list(conv.stride)
            self.dilation = list(conv.dilation)
            self._weight = conv.weight.detach().contiguous(memory_format=channels_last)
            self._forward_cache: dict = {}
            self._backward_cache: dict = {}

        @property
        def weight(self):
            return self.conv.weight

        @property
        def bias(self):
            return self.conv.bias

        def _out_size(self, size: int, axis: int) -> int:
            k = self._weight.shape[2 + axis]
            return (size + 2 * self.padding[axis] - k) // self.stride[axis] + 1

        def _packed(self, shape: tuple):
            packed = self._forward_cache.get(shape)
            if packed is None:
                if len(self._forward_cache) >= self.max_shapes:
                    return next(iter(self._forward_cache.values()))
                packed = mk._reorder_convolution_weight(
                    self._weight, self.padding, self.stride, self.dilation, 1, list(shape)
                )
                self._forward_cache[shape] = packed
            return packed

        def _output_padding(self, in_shape: tuple) -> list[int]:
            pads = []
            for axis in (0, 1):
                k = self._weight.shape[2 + axis]
                out = self._out_size(in_shape[2 + axis], axis)
                full = (out - 1) * self.stride[axis] - 2 * self.padding[axis] + k
                pads.append(in_shape[2 + axis] - full)
            return pads

        def _input_grad(self, grad, in_shape: tuple):
            grad = grad.to(self._weight.dtype).contiguous(memory_format=channels_last)
            key = tuple(grad.shape)
            entry = self._backward_cache.get(key)
            output_padding = self._output_padding(in_shape)
            if entry is None and len(self._backward_cache) >= self.max_shapes:
                entry = next(iter(self._backward_cache.values()))[0], output_padding
            if entry is None:
                packed = mk._reorder_convolution_transpose_weight(
                    self._weight, self.padding, output_padding, self.stride, self.dilation, 1,
                    list(key),
                )
                entry = (packed, output_padding)
                self._backward_cache[key] = entry
            packed = entry[0]
            return mk._convolution_transpose_pointwise(
                grad, packed, None, self.padding, output_padding, self.stride, self.dilation,
                1, "none", [], "",
            )

        def _forward_packed(self, x):
            return mk._convolution_pointwise(
                x, self._packed(tuple(x.shape)), self.conv.bias, self.padding, self.stride,
                self.dilation, 1, "none", [], "",
            )

        def forward(self, x):
            x = x.to(self._weight.dtype).contiguous(memory_format=channels_last)
            if x.requires_grad and torch.is_grad_enabled():
                return _PackedConvFunction.apply(x, self)
            return self._forward_packed(x)

    return PackedConv2d


_CLASS = None


def eligible(conv) -> bool:
    import torch

    return (
        isinstance(conv, torch.nn.Conv2d)
        and type(conv) is torch.nn.Conv2d
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and tuple(conv.dilation) == (1, 1)
        and conv.weight.dtype in (torch.bfloat16, torch.float32)
        and not conv.weight.requires_grad
    )


def _setting() -> str:
    """AMXTUNE_PACKED_CONV: 0 never; bf16 (the default) bf16 only; all fp32 as well."""
    return os.environ.get("AMXTUNE_PACKED_CONV", "bf16").strip().lower()


def fp32_wanted() -> bool:
    """fp32 packing is asked for: with tcmalloc it makes a step only 3-12 % faster for 2.8-4.2
    GB more per rank (docs/performance.md), so it is not the default."""
    return _setting() == "all"


def pack_frozen_convolutions(model, max_shapes: int | None = None) -> int:
    """Replace every eligible frozen Conv2d in `model`; returns how many were replaced. Each
    keeps packed copies for `max_shapes` input shapes (by default MAX_SHAPES in bf16,
    MAX_SHAPES_FP32 in fp32).

    AMXTUNE_PACKED_CONV=0 disables it (e.g. to compare with eager). bf16 convolutions stay
    eager on a CPU without oneDNN's bf16 convolution kernels (AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT): packed, they would fail at their first call.
    """
    import torch

    from amxtune_trainer.cpu import probe

    global _CLASS
    if _setting() == "0" or not _ops_available():
        return 0
    if _CLASS is None:
        _CLASS = _make_classes()
    bf16_kernels = probe().can_pack_bf16_convolutions
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if eligible(child) and (child.weight.dtype == torch.float32 or bf16_kernels):
                shapes = max_shapes
                if shapes is None:
                    fp32 = child.weight.dtype == torch.float32
                    shapes = MAX_SHAPES_FP32 if fp32 else MAX_SHAPES
                setattr(parent, name, _CLASS(child, shapes))
                replaced += 1
    return replaced
