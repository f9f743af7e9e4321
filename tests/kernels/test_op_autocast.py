"""Under torch.autocast the binary ops cast like F.conv2d / F.linear: same dtype, same values."""

import pytest
import torch
import torch.nn.functional as F

from fxquant.kernels import binary_conv2d, binary_linear, pack_binary_weight


def _signs(x):  # the converted models' sign: NaN stays NaN
    return torch.where(torch.isnan(x), x, torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_under_autocast_equals_f_conv2d_under_autocast(dtype):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 300, 3, 3, generator=g).sign()  # sums beyond 256: bf16 rounds them
    bits, scale = pack_binary_weight(weight)
    x = torch.randn(2, 300, 6, 6, generator=g)
    x[0, 0, 0, :3] = torch.tensor([0.0, -0.0, float("nan")])
    with torch.autocast("cpu", dtype=dtype):
        want = F.conv2d(_signs(x), weight, None, 1, 1)
        got = binary_conv2d(x, bits, scale, None, [1, 1], [1, 1], [1, 1], 1)
    assert got.dtype == want.dtype == dtype
    assert bool(torch.isnan(got).any())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_under_autocast_equals_f_linear_under_autocast(dtype):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 1000, generator=g).sign()
    bits, scale = pack_binary_weight(weight)
    x = torch.randn(3, 1000, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        want = F.linear(_signs(x), weight)
        got = binary_linear(x, bits, scale, None)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)


def test_outside_autocast_the_op_keeps_float32():
    bits, scale = pack_binary_weight(torch.ones(4, 8))
    assert binary_linear(torch.randn(2, 8), bits, scale, None).dtype == torch.float32
