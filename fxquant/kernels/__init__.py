"""Packed binary kernels: convolution and linear layers computed on bits (xor + popcount).

A binary layer whose inputs and weights are both ±1 computes integer dot products, exactly:
``dot(a, w) = K - 2 * popcount(a XOR w)`` over ``K`` packed bits. Converted binary layers call
the custom ops ``torch.ops.fxquant.binary_conv2d`` / ``binary_linear`` (:mod:`.ops`) on
weights packed once by :func:`pack_binary_weight` (layout in :mod:`.reference`).

>>> import torch, torch.nn.functional as F
>>> w = torch.tensor([[1., -1., 1.], [-2., 2., 2.]])
>>> bits, scale = pack_binary_weight(w)
>>> x = torch.tensor([[0.5, -3., -0.0]])
>>> torch.equal(binary_linear(x, bits, scale, None), F.linear(torch.tensor([[1., -1., 1.]]), w))
True
"""

from __future__ import annotations

from fxquant.kernels import ops as _ops
from fxquant.kernels._native import NativeKernelWarning
from fxquant.kernels._native import available as native_available
from fxquant.kernels.reference import (
    BinaryWeightError,
    pack_binary_weight,
    unpack_binary_weight,
)

binary_conv2d = _ops.binary_conv2d
binary_linear = _ops.binary_linear

__all__ = ["pack_binary_weight", "unpack_binary_weight", "binary_conv2d", "binary_linear",
           "BinaryWeightError", "native_available", "NativeKernelWarning"]
