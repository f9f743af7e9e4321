"""Gradients through the packed binary ops: zero for the input (a sign is piecewise constant, as
the converted graph's plain sign ops were), exact for a trained ``scale`` and ``bias``."""

import torch
import torch.nn.functional as F

import fxquant
from fxquant.kernels import binary_conv2d, binary_linear, pack_binary_weight
from tests.models import BiRealResNet


def _signs(x):
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def test_conv_scale_and_bias_gradients_equal_the_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g).sign()
    bits, _ = pack_binary_weight(w)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
    binary_conv2d(x, bits, scale, bias, [1, 1], [1, 1], [1, 1], 1).backward(up)
    dot = F.conv2d(_signs(x.detach()), w.double(), None, 1, 1)
    torch.testing.assert_close(scale.grad, (up * dot).sum((0, 2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(bias.grad, up.sum((0, 2, 3)), rtol=0, atol=1e-12)
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_linear_gradcheck_on_scale_and_bias_with_3d_input():
    g = torch.Generator().manual_seed(1)
    bits, _ = pack_binary_weight(torch.randn(5, 7, generator=g).sign())
    x = torch.randn(3, 2, 7, generator=g, dtype=torch.float64)
    scale = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, b: binary_linear(x, bits, s, b), (scale, bias))


def test_converted_model_backward_and_compile_with_grad_enabled():
    converted = fxquant.convert(fxquant.prepare(BiRealResNet(), fxquant.Recipe.bnn()).eval())
    assert "torch.ops.fxquant.binary_conv2d" in converted.code
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = converted(x)
    y.sum().backward()
    assert x.grad.shape == x.shape and bool(torch.isfinite(x.grad).all())
    compiled = torch.compile(converted, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x.detach()), y.detach())
