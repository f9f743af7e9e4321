"""Reference (plain PyTorch) implementations of the packed binary ops.

They define what the ops compute; the native kernels must agree with them exactly, and the ops
fall back to them wherever the native kernels cannot run (no compiler, another device or dtype,
NaN in the input).

Layout of a packed binary weight (``weight_bits``, ``uint8``): the input-channel axis is last
and packed LSB first, 8 channels a byte (channel ``c`` is bit ``c % 8`` of byte ``c // 8``),
each row padded with zero bits to a whole byte only, so ``weight_bits`` has shape
``(out_channels, kh, kw, ceil(in_channels_per_group / 8))`` for a convolution and
``(out_features, ceil(in_features / 8))`` for a linear layer. Bit 1 means
``-1``, bit 0 means ``+1``. ``scale`` (one value per output channel) holds the magnitude ``a`` of
a channel whose weights are ``{-a, +a}``: 1 for plain ±1 weights, α for XNOR / Bi-Real.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["pack_binary_weight", "unpack_binary_weight", "binary_sign", "binary_conv2d",
           "binary_linear", "BinaryWeightError", "row_bytes"]


class BinaryWeightError(ValueError):
    """The weight is not binary: some output channel holds values other than ``{-a, +a}``."""


def row_bytes(in_channels: int) -> int:
    """Bytes per packed row of ``in_channels`` bits: ``ceil(in_channels / 8)`` (the last byte's
    unused high bits are zero)."""
    return math.ceil(in_channels / 8)


def pack_binary_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Pack a binary weight ``(out, in[, kh, kw])`` into ``(weight_bits, scale)``.

    Every output channel must hold values in ``{-a, +a}`` for one ``a >= 0`` (``a`` is that
    channel's largest magnitude); else :class:`BinaryWeightError`. ``scale`` has ``weight``'s
    dtype. ``unpack_binary_weight(*pack_binary_weight(w), w.shape[1])`` equals ``w`` (a
    channel of zeros comes back as ``+0.0``).
    """
    if not weight.is_floating_point() or weight.dim() not in (2, 4):
        raise BinaryWeightError("pack_binary_weight: expects a floating point weight of shape "
                                f"(out, in) or (out, in, kh, kw), got {weight.dtype} "
                                f"{tuple(weight.shape)}")
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1) if flat.numel() else flat.new_zeros(weight.shape[0])
    if bool(torch.isnan(flat).any()) or not bool((flat.abs() == scale[:, None]).all()):
        raise BinaryWeightError("pack_binary_weight: every output channel must hold only -a "
                                "and +a (one magnitude a per channel, no NaN)")
    negative = weight.detach() < 0
    if weight.dim() == 4:
        negative = negative.permute(0, 2, 3, 1)  # (out, kh, kw, in): channels last
    cin = negative.shape[-1]
    nbytes = row_bytes(cin)
    bits = torch.zeros(*negative.shape[:-1], nbytes * 8, dtype=torch.uint8,
                       device=weight.device)
    bits[..., :cin] = negative.to(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=weight.device)
    packed = (bits.view(*bits.shape[:-1], nbytes, 8) << shifts).sum(-1, dtype=torch.uint8)
    return packed.contiguous(), scale.contiguous()


def unpack_binary_weight(weight_bits: Tensor, scale: Tensor | None, in_channels: int) -> Tensor:
    """The weight ``(out, in[, kh, kw])`` of packed ``weight_bits``: ``±1``, times ``scale``.

    Plain tensor ops only (bit shifts, ``where``), so it exports (ONNX, ``torch.export``).
    ``scale=None`` gives the ±1 weight as float32.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=weight_bits.device)
    bits = (weight_bits.unsqueeze(-1) >> shifts) & 1
    bits = bits.reshape(*weight_bits.shape[:-1], -1)[..., :in_channels]
    dtype = scale.dtype if scale is not None else torch.float32
    one = torch.ones((), dtype=dtype, device=weight_bits.device)
    signs = torch.where(bits.bool(), -one, one)
    if weight_bits.dim() == 4:
        signs = signs.permute(0, 3, 1, 2)
    if scale is None:
        return _standard(signs)
    return _standard(signs * scale.view(-1, *([1] * (signs.dim() - 1))))


def _standard(t: Tensor) -> Tensor:
    """``t`` with row-major strides. ``contiguous()`` is not enough: a permuted ``(out, 1, kh,
    kw)`` depthwise weight counts as contiguous yet has channels-last strides, and convolutions
    then return channels-last outputs, whose elementwise successors may round differently."""
    return t.clone(memory_format=torch.contiguous_format)


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0`` (``-0.0`` and ``+inf`` included), ``-1`` below, NaN kept: the sign
    converted models compute for ste_sign / approx_sign / swish_sign inputs."""
    signs = torch.where(x >= 0, 1.0, -1.0).type_as(x)
    return torch.where(torch.isnan(x), x, signs)


def _scale_and_bias(y: Tensor, scale: Tensor, bias: Tensor | None, channel_dim: int) -> Tensor:
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    y = y * scale.to(y.dtype).view(shape)
    return y if bias is None else y + bias.to(y.dtype).view(shape)


def binary_conv2d(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int
                  ) -> Tensor:
    """``conv2d(binary_sign(x), ±1 weight) * scale + bias`` (zero padding contributes 0).

    The ±1 convolution is a sum of integers, exact in float32 below 2**24 terms per output."""
    weight = unpack_binary_weight(weight_bits, None, x.shape[-3] // groups).to(x.dtype)
    y = F.conv2d(binary_sign(x), weight, None, stride, padding, dilation, groups)
    return _scale_and_bias(y, scale, bias, -3)


def binary_linear(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``linear(binary_sign(x), ±1 weight) * scale + bias`` over the last axis of ``x``."""
    weight = unpack_binary_weight(weight_bits, None, x.shape[-1]).to(x.dtype)
    y = F.linear(binary_sign(x), weight)
    return _scale_and_bias(y, scale, bias, -1)
