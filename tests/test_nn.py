"""fxquant.nn: layer functions that keep a ±1 input as one byte for backward, same numbers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fxquant
from fxquant import nn as fnn
from fxquant.quantizers import ApproxSign, SteSign, SwishSign, ste_sign
from tests.helpers import down, exact, up
from tests.models import SmallCNN, resnet18

torch.manual_seed(0)

CASES = [  # (compact fn, plain fn, input shape, weight shape, extra args)
    (fnn.linear, F.linear, (5, 7), (4, 7), ()),
    (fnn.linear, F.linear, (2, 3, 7), (4, 7), ()),
    (fnn.conv1d, F.conv1d, (2, 3, 9), (4, 3, 3), (1, 1, 1, 1)),
    (fnn.conv2d, F.conv2d, (2, 4, 6, 6), (6, 2, 3, 3), ((2, 1), 1, 1, 2)),
    (fnn.conv3d, F.conv3d, (1, 2, 4, 4, 4), (3, 2, 3, 3, 3), (1, 0, 1, 1)),
]


def _saved(fn):
    """``fn()``'s result and the tensors autograd saved while running it."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _saved_dtypes(fn):
    out, saved = _saved(fn)
    return out, [t.dtype for t in saved]


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
    _, saved = _saved(lambda: compact(SteSign()(x), w, None, *extra))
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
    assert "torch.ops.fxquant.binary_conv2d" in converted.code  # sign input, sign weights


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
    # every sign here reads a relu output (kept by relu anyway): the binary layers keep that
    # output instead of their ±1 input, so nothing is saved beyond the float model's tensors
    assert sizes["bnn"] <= sizes["float"]


# ------------------------------------------------------------------------------------------------
# Sign sources: the layer keeps the quantizer's input and applies its gradient itself


def _edge_input(shape, seed=0):
    """Random values with exact zeros, -0.0, ±1 and one ulp either side of ±1 mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5
    flat = x.view(-1)
    one_up, one_down = up(1.0, torch.float32), down(1.0, torch.float32)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, one_up, -one_up, one_down, -one_down])
    flat[: min(flat.numel(), specials.numel())] = specials[: flat.numel()]
    return x


class _ReferenceSteSign(torch.autograd.Function):
    """Hand-written oracle: larq's sign forward, ``g`` where ``abs(x) <= 1`` else +0 backward."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x.isnan(), x, torch.where(x >= 0, 1.0, -1.0))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.where(x.abs() <= 1, g, torch.zeros_like(g))


def _keeping(q):
    q.save_input = True
    return q


def _untagged(make):
    """The quantizer's own autograd path: a copy of its output drops the tags."""
    def reference():
        q = make()
        return lambda h: q(h) * 1.0
    return reference


# (quantizer whose output is sign(x) and which keeps x, the unfused reference of it)
QUANTIZERS = [
    (lambda: _keeping(SteSign()), lambda: _ReferenceSteSign.apply),
    (ApproxSign, _untagged(ApproxSign)),
    (lambda: SwishSign(beta=3.0), _untagged(lambda: SwishSign(beta=3.0))),
]


def _run(layer, x_quantizer, w_quantizer, x0, w, b, extra, upstream):
    """``layer(x_quantizer(h), w_quantizer(latent), bias)`` backward: outputs and gradients."""
    src = x0.detach().clone().requires_grad_()
    latent = w.detach().clone().requires_grad_()
    bias = b.detach().clone().requires_grad_()
    h = src * 1.0  # a non-leaf activation, as in a network
    out = layer(x_quantizer(h), w_quantizer(latent), bias, *extra)
    out.backward(upstream)
    return out.detach(), src.grad, latent.grad, bias.grad


@pytest.mark.parametrize("make, reference", QUANTIZERS)
@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_sign_sources_give_exactly_the_unfused_gradients(make, reference, compact, plain, xshape,
                                                         wshape, extra):
    x0 = _edge_input(xshape)
    w = _edge_input(wshape, seed=1)
    b = torch.randn(wshape[0])
    upstream = torch.randn(plain(x0, w, b, *extra).shape,
                           generator=torch.Generator().manual_seed(2))
    got = _run(compact, make(), SteSign(), x0, w, b, extra, upstream)
    want = _run(plain, reference(), _ReferenceSteSign.apply, x0, w, b, extra, upstream)
    for g, e in zip(got, want, strict=True):
        exact(g, e)


@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_a_sign_source_is_saved_instead_of_the_output(compact, plain, xshape, wshape, extra):
    h = torch.randn(xshape, requires_grad=True) * 1.0
    latent = torch.randn(wshape, requires_grad=True)
    _, saved = _saved(lambda: compact(_keeping(SteSign())(h), SteSign()(latent), None, *extra))
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert ptrs == {h.untyped_storage().data_ptr(), latent.untyped_storage().data_ptr()}
    assert all(t.dtype == torch.float32 for t in saved)


def test_a_sign_output_used_twice_gets_both_gradients():
    """The layer applies the sign's gradient to its share; the other use goes through the sign's
    own backward: together they equal the hand-written oracle's gradient."""
    x0 = _edge_input((4, 6))
    w = torch.randn(3, 6)
    scale = torch.arange(6.0)
    grads = []
    for sign, layer in ((_keeping(SteSign()), fnn.linear),
                        (_ReferenceSteSign.apply, F.linear)):
        src = x0.clone().requires_grad_()
        latent = w.clone().requires_grad_()
        w_sign = SteSign() if layer is fnn.linear else _ReferenceSteSign.apply
        q = sign(src * 1.0)
        out = layer(q, w_sign(latent)).sum() + (q * scale).sum()
        out.backward()
        grads.append((src.grad, latent.grad))
    for g, e in zip(*grads, strict=True):
        exact(g, e)


def test_nan_and_inf_sources_give_the_reference_gradients():
    x0 = torch.tensor([[float("nan"), 0.5, -2.0], [float("inf"), -float("inf"), -0.0]])
    w = torch.tensor([[0.5, -1.5, 1.0], [-0.0, 2.0, -0.25]])
    b = torch.zeros(2)
    upstream = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    got = _run(fnn.linear, _keeping(SteSign()), SteSign(), x0, w, b, (), upstream)
    want = _run(F.linear, _ReferenceSteSign.apply, _ReferenceSteSign.apply, x0, w, b, (), upstream)
    for g, e in zip(got, want, strict=True):
        exact(g, e)
    assert torch.equal(got[1][1, :2], torch.zeros(2))  # no gradient through ±inf


def _with_plain_layers(prepared):
    """``prepared`` with every compact layer replaced by the plain torch function it stands for."""
    for node in prepared.graph.nodes:
        if node.op == "call_function" and node.target in fnn.PLAIN_FORM:
            node.target = fnn.PLAIN_FORM[node.target]
    prepared.graph.lint()
    prepared.recompile()
    return prepared


@pytest.fixture(params=[True, False], ids=["onednn", "native-kernels"])
def onednn(request, monkeypatch):
    """Run with oneDNN (CPU kernels that accept mixed float dtypes where the CPU has bfloat16
    instructions) and without it: the native kernels insist on one dtype on every CPU, as
    oneDNN does on a CPU without AVX-512 bfloat16, so the test does not depend on the CPU."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", request.param)
    return request.param


AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_gives_the_same_numbers_as_the_plain_layers(dtype, onednn):
    """Under CPU autocast a binary ResNet's compact layers match plain F.conv2d/F.linear exactly:
    both run the same kernels on the same low-precision operands (±1 casts exactly)."""
    model = resnet18(width=4)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    results = []
    for compact in (True, False):
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        if not compact:
            _with_plain_layers(prepared)
        with torch.autocast("cpu", dtype=dtype):
            out = prepared(x)
        F.cross_entropy(out.float(), y).backward()
        results.append([out.detach()] + [p.grad for p in prepared.parameters()])
    assert "fxquant_nn_conv2d" in fxquant.prepare(model, fxquant.Recipe.bnn()).code
    assert results[0][0].dtype == dtype
    for got, want in zip(*results, strict=True):
        assert got.dtype == want.dtype
        exact(got, want)


def _identity(t):
    return t


# (weight quantizer for the compact layer, its reference for the plain layer)
WEIGHTS = [
    pytest.param(SteSign, lambda: _ReferenceSteSign.apply, id="binary-latent-weight"),
    pytest.param(lambda: _identity, lambda: _identity, id="float-weight"),
]


def _run_autocast(layer, x_quantizer, w_quantizer, x0, w, b, extra, upstream, dtype):
    """:func:`_run` with the forward under CPU autocast to ``dtype`` and backward outside it."""
    src, latent, bias = (t.detach().clone().requires_grad_() for t in (x0, w, b))
    h = src * 1.0
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x_quantizer(h), w_quantizer(latent), bias, *extra)
    out.backward(upstream.to(out.dtype))
    return out.detach(), src.grad, latent.grad, bias.grad


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("make_w, reference_w", WEIGHTS)
@pytest.mark.parametrize("make, reference",
                         [*QUANTIZERS, (SteSign, lambda: _ReferenceSteSign.apply)])
@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_autocast_gradients_equal_the_plain_layers_in_dtype_and_value(
        compact, plain, xshape, wshape, extra, make, reference, make_w, reference_w, dtype, onednn):
    """The output has the autocast dtype, each gradient its float32 leaf's dtype, and all equal
    the plain layer's under the same autocast bit for bit (same kernels on the same operands; the
    quantizers' gradients are applied in float32 after the cast back, in both)."""
    x0 = _edge_input(xshape)
    w = _edge_input(wshape, seed=1)
    b = torch.randn(wshape[0])
    upstream = torch.randn(plain(x0, w, b, *extra).shape,
                           generator=torch.Generator().manual_seed(2))
    got = _run_autocast(compact, make(), make_w(), x0, w, b, extra, upstream, dtype)
    want = _run_autocast(plain, reference(), reference_w(), x0, w, b, extra, upstream, dtype)
    assert [t.dtype for t in got] == [dtype] + [torch.float32] * 3
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype
        exact(g, e)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("keep_source", [True, False], ids=["sign-source", "one-byte"])
@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_backward_gets_a_low_precision_gradient_and_returns_the_inputs_dtypes(
        compact, plain, xshape, wshape, extra, keep_source, dtype):
    """The Function's own backward, called directly: the incoming gradient has the autocast
    dtype while what it saved is float32 (or bool); what it returns has the float32 dtype of
    each autograd input (autograd would otherwise cast it silently)."""
    h = torch.randn(xshape, requires_grad=True) * 1.0
    latent = torch.randn(wshape, requires_grad=True)
    bias = torch.randn(wshape[0], requires_grad=True)
    quantizer = _keeping(SteSign()) if keep_source else SteSign()
    with torch.autocast("cpu", dtype=dtype):
        out, saved = _saved(lambda: compact(quantizer(h), SteSign()(latent), bias, *extra))
    assert out.dtype == dtype
    assert {t.dtype for t in saved} == ({torch.float32} if keep_source
                                        else {torch.bool, torch.float32})
    grads = out.grad_fn.apply(torch.ones_like(out))  # the raw return of the Function's backward
    assert [g.dtype for g in grads[:3]] == [torch.float32] * 3
    assert [g.shape for g in grads[:3]] == [h.shape, latent.shape, bias.shape]
    assert all(g is None for g in grads[3:])


@pytest.mark.parametrize("compact, plain, xshape, wshape, extra", CASES)
def test_double_precision_gives_the_plain_layers_numbers_and_dtypes(compact, plain, xshape,
                                                                    wshape, extra):
    x0 = _edge_input(xshape).double()
    w = _edge_input(wshape, seed=1).double()
    b = torch.randn(wshape[0], dtype=torch.float64)
    upstream = torch.randn(plain(x0, w, b, *extra).shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2))
    got = _run(compact, _keeping(SteSign()), SteSign(), x0, w, b, extra, upstream)
    want = _run(plain, _ReferenceSteSign.apply, _ReferenceSteSign.apply, x0, w, b, extra, upstream)
    for g, e in zip(got, want, strict=True):
        assert g.dtype == e.dtype == torch.float64
        exact(g, e)


# ------------------------------------------------------------------------------------------------
# Outputs are not views: an in-place op after the layer works as after the plain layer


def _channels_last(shape):
    return lambda g: torch.randn(shape, generator=g).to(memory_format=torch.channels_last)


def _plain_randn(shape):
    return lambda g: torch.randn(shape, generator=g)


# (compact fn, plain fn, input maker, weight shape, extra args): shapes where the kernel's own
# output is a view (linear with a bias on 3-D input, unbatched convolutions) or has odd strides
SHAPES = [
    pytest.param(fnn.linear, F.linear, _plain_randn((2, 3, 7)), (4, 7), (), id="linear-3d"),
    pytest.param(fnn.linear, F.linear, _plain_randn((2, 2, 3, 7)), (4, 7), (), id="linear-4d"),
    pytest.param(fnn.linear, F.linear, _plain_randn((7,)), (4, 7), (), id="linear-1d"),
    pytest.param(fnn.conv1d, F.conv1d, _plain_randn((3, 9)), (4, 3, 3), (1, 1),
                 id="conv1d-unbatched"),
    pytest.param(fnn.conv2d, F.conv2d, _plain_randn((2, 5, 5)), (4, 2, 3, 3), (1, 1),
                 id="conv2d-unbatched"),
    pytest.param(fnn.conv3d, F.conv3d, _plain_randn((2, 4, 4, 4)), (3, 2, 3, 3, 3), (1, 1),
                 id="conv3d-unbatched"),
    pytest.param(fnn.conv2d, F.conv2d, _channels_last((2, 3, 6, 6)), (4, 3, 3, 3), (1, 1),
                 id="conv2d-channels-last"),
]


@pytest.mark.parametrize("keep_source", [True, False], ids=["sign-source", "one-byte"])
@pytest.mark.parametrize("compact, plain, make_x, wshape, extra", SHAPES)
def test_an_in_place_op_on_the_output_gives_the_plain_layers_gradients(
        compact, plain, make_x, wshape, extra, keep_source):
    g = torch.Generator().manual_seed(0)
    x0, w, b = make_x(g), torch.randn(wshape, generator=g), torch.randn(wshape[0], generator=g)
    results = []
    for layer, sign in ((compact, _keeping(SteSign()) if keep_source else SteSign()),
                        (plain, _ReferenceSteSign.apply)):
        src, latent, bias = (t.clone().requires_grad_() for t in (x0, w, b))
        out = layer(sign(src * 1.0), SteSign()(latent), bias, *extra)
        assert layer is plain or not out._is_view()  # the plain one may be a view: autograd's own
        out += 1.0
        out.relu_()
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), src.grad, latent.grad, bias.grad))
    for got, want in zip(*results, strict=True):
        exact(got, want)


def test_a_linear_on_3d_input_then_an_in_place_relu_trains_like_the_plain_model():
    """The swin_v2_t pattern (cpb_mlp: Linear -> ReLU(inplace=True) -> Linear on a 4-D table):
    a train-mode forward and backward through the compact layers gives the plain model's
    outputs and gradients."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2))
    x = torch.randn(2, 5, 4)
    results = []
    for compact in (True, False):
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn()).train()
        if compact:
            assert "fxquant_nn_linear(" in prepared.code
        else:
            _with_plain_layers(prepared)
        out = prepared(x)
        assert out.shape == (2, 5, 2)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [p.grad for p in prepared.parameters()])
    for got, want in zip(*results, strict=True):
        exact(got, want)
