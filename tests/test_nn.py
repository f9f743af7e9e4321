"""fxquant.nn: layer functions that keep a ±1 input as one byte for backward, same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant import nn as fnn
from fxquant.quantizers import SteSign, ste_sign
from tests.models import SmallCNN, resnet18

torch.manual_seed(0)

CASES = [  # (compact fn, plain fn, input shape, weight shape, extra args)
    (fnn.linear, F.linear, (5, 7), (4, 7), ()),
    (fnn.linear, F.linear, (2, 3, 7), (4, 7), ()),
    (fnn.conv1d, F.conv1d, (2, 3, 9), (4, 3, 3), (1, 1, 1, 1)),
    (fnn.conv2d, F.conv2d, (2, 4, 6, 6), (6, 2, 3, 3), ((2, 1), 1, 1, 2)),
    (fnn.conv3d, F.conv3d, (1, 2, 4, 4, 4), (3, 2, 3, 3, 3), (1, 0, 1, 1)),
]


def _saved_dtypes(fn):
    dtypes = []

    def pack(t):
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, dtypes


@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_same_values_and_gradients_as_the_plain_layer(compact, plain, xshape, wshape, extra):
    x = torch.randn(xshape, requires_grad=True)
    w = torch.randn(wshape, requires_grad=True)
    b = torch.randn(wshape[0], requires_grad=True)
    upstream = None
    grads = []
    for fn in (compact, plain):
        for t in (x, w, b):
            t.grad = None
        xq = SteSign()(x)  # the module tags its ±1 output
        out = fn(xq, w, b, *extra)
        upstream = torch.randn_like(out) if upstream is None else upstream
        out.backward(upstream)
        grads.append((out.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone()))
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_only_a_bool_copy_of_the_input_is_saved(compact, plain, xshape, wshape, extra):
    x = torch.randn(xshape)
    w = torch.randn(wshape, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compact(SteSign()(x), w, None, *extra)
    (signs,) = [t for t in saved if t.dtype == torch.bool]
    assert torch.equal(signs, x > 0)
    dtypes = [t.dtype for t in saved]
    assert sorted(map(str, dtypes)) == ["torch.bool", "torch.float32"]  # x > 0, the weight
    _, plain_dtypes = _saved_dtypes(lambda: plain(SteSign()(x), w, None, *extra))
    assert torch.bool not in plain_dtypes


def test_untagged_input_takes_the_plain_path():
    x = ste_sign(torch.randn(3, 5))  # the function does not tag; a disabled quantizer neither
    w = torch.randn(2, 5, requires_grad=True)
    _, dtypes = _saved_dtypes(lambda: fnn.linear(x, w))
    assert torch.bool not in dtypes


def test_disabled_quantizer_gives_float_gradients():
    q = SteSign()
    q.enabled = False
    x = torch.randn(4, 6) * 3
    w = torch.randn(2, 6, requires_grad=True)
    fnn.linear(q(x), w).sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(4, 2).t() @ x, rtol=1e-6, atol=1e-6)


def test_prepare_uses_them_for_binary_inputs_and_convert_removes_them():
    prepared = fxquant.prepare(SmallCNN(), fxquant.Recipe.bnn())
    assert "fxquant_nn_conv2d(" in prepared.code
    converted = fxquant.convert(prepared.eval())
    assert "fxquant_nn" not in converted.code
    assert "torch.conv2d(" in converted.code


def test_binary_resnet_saves_less_for_backward():
    x = torch.randn(2, 3, 16, 16)
    model = resnet18(width=8)
    sizes = {}
    for name, recipe in (("float", fxquant.Recipe()), ("bnn", fxquant.Recipe.bnn())):
        prepared = fxquant.prepare(model, recipe)
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            prepared(x)
        sizes[name] = sum(storages.values())
    # each binary conv adds a 1-byte window mask and a 1-byte sign, never a float copy
    assert sizes["bnn"] < 1.4 * sizes["float"]
