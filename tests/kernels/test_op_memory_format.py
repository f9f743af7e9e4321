"""The binary conv op returns the memory format F.conv2d returns for the same input.

Elementwise ops after a convolution pick their kernel by memory format, and two kernels may round
differently (GELU did, by an ulp, flipping a later sign in torchvision's maxvit_t); so the converted
model's op must hand its successors what the prepared model's ``F.conv2d`` handed them.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fxquant.kernels import binary_conv2d, pack_binary_weight

CASES = [(shape, (out, k), kind, cl) for shape, (out, k), kind, cl in itertools.product(
    [(2, 4, 5, 5), (1, 1, 5, 5), (2, 8, 6, 6), (1, 8, 1, 5), (2, 64, 8, 8)],
    [(8, 1), (8, 3), (64, 3)], ["dense", "depthwise"], [False, True])
    if min(shape[2:]) >= k and out % (shape[1] if kind == "depthwise" else 1) == 0]


@pytest.mark.parametrize("shape, out_k, kind, channels_last", CASES)
def test_output_strides_and_values_equal_f_conv2d(shape, out_k, kind, channels_last):
    n, c, h, w = shape
    out, k = out_k
    groups = c if kind == "depthwise" else 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out, c // groups, k, k, generator=g).sign()
    bits, scale = pack_binary_weight(weight)
    got = binary_conv2d(x, bits, scale, None, [1, 1], [0, 0], [1, 1], groups)
    want = F.conv2d(torch.where(x >= 0, 1.0, -1.0), weight, None, 1, 0, 1, groups)
    assert torch.equal(got, want)
    assert got.stride() == want.stride()
