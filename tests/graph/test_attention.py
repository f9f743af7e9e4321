"""nn.MultiheadAttention is traced as fxquant.graph.attention.multi_head_attention: the float
module is the oracle (its slow path, exactly), a hand-written attention the oracle of the
quantized model; the in- and out-projections are layers a recipe quantizes."""

from __future__ import annotations

import contextlib
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.graph.attention import traces_as_function
from fxquant.graph.meta import get_record
from fxquant.graph.tracer import trace
from fxquant.quantizers import ste_sign
from fxquant.training import set_quantizers_enabled
from tests.helpers import exact

E, H, L, S, N = 8, 2, 5, 4, 3  # embed dim, heads, target length, source length, batch


class Attn(nn.Module):
    """Calls ``attn`` as self-attention (``"self"``: ``attn(q, q, q)``), encoder-decoder
    attention (``"cross"``: ``attn(q, k, k)``) or with three inputs (``"distinct"``)."""

    def __init__(self, mode: str = "self", call: dict | None = None, **mha) -> None:
        super().__init__()
        self.mode, self.call = mode, call or {}
        self.attn = nn.MultiheadAttention(E, H, **mha)

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None):
        if self.mode == "self":
            k = v = q
        elif self.mode == "cross":
            v = k
        return self.attn(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         **self.call)


def _inputs(batch_first=False, batched=True, kdim=E, vdim=E, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(length, dim):
        shape = ((N, length) if batch_first else (length, N)) if batched else (length,)
        return torch.randn(*shape, dim, generator=g)

    return rand(L, E), rand(S, kdim), rand(S, vdim)


def _random_params(module: nn.Module, seed: int = 1) -> None:
    """Non-zero biases everywhere (torch initialises the projection biases to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _run(model, *args, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    return model(*args, **kwargs)


def _assert_same(actual, expected, same_ops: bool = True) -> None:
    """``(output, weights)`` equal bit for bit where the traced model runs torch's operations on
    the same shapes (``same_ops``); otherwise its products have other shapes (one GEMM on the
    whole in-projection weight where torch multiplies by its thirds), whose sums the BLAS may
    block differently: then equal to float32 rounding (assert_close's float32 defaults; measured
    up to 2.4e-7 relative on x86-64 at E=8, exact at E=64 and 256)."""
    assert len(actual) == len(expected) == 2
    check = exact if same_ops else torch.testing.assert_close
    check(actual[0], expected[0])
    assert actual[0].shape == expected[0].shape and actual[0].stride() == expected[0].stride()
    if expected[1] is None:
        assert actual[1] is None
    else:
        check(actual[1], expected[1])


def _masks(kind: str, src_len: int, batched: bool = True):
    """(key_padding_mask, attn_mask) of the given kind, with some positions masked."""
    kpm = torch.zeros(N, src_len, dtype=torch.bool)
    kpm[0, -1] = kpm[2, 0] = True
    causal = torch.ones(L, src_len, dtype=torch.bool).triu(1)
    if not batched:
        kpm = kpm[0]
    return {
        "none": (None, None),
        "kpm_bool": (kpm, None),
        "kpm_float": (torch.zeros(kpm.shape).masked_fill(kpm, -math.inf), None),
        "attn_bool": (None, causal),
        "attn_float": (None, torch.randn(L, src_len,
                                         generator=torch.Generator().manual_seed(3))),
        "attn_3d": (None, torch.randn(N * H if batched else H, L, src_len,
                                      generator=torch.Generator().manual_seed(4))),
        "both": (kpm, causal),
    }[kind]


MHA_OPTIONS = [
    {}, {"batch_first": True}, {"bias": False}, {"add_bias_kv": True}, {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True},
]
CALL_OPTIONS = [{}, {"need_weights": False}, {"average_attn_weights": False}]
MASKS = ["none", "kpm_bool", "kpm_float", "attn_bool", "attn_float", "attn_3d", "both"]


class TestEqualsFloatModule:
    """Quantizers absent: the traced model computes what the module's slow path computes."""

    @pytest.mark.parametrize("mha, call, masks", [
        *[({}, call, masks) for call in CALL_OPTIONS for masks in MASKS],
        *[(mha, call, "both") for mha in MHA_OPTIONS[1:] for call in CALL_OPTIONS[:2]],
    ], ids=str)
    def test_self_attention_bit_for_bit(self, mha, call, masks):
        model = Attn("self", call, **mha)
        _random_params(model)
        gm = trace(model)
        gm.graph.lint()
        q, k, v = _inputs(mha.get("batch_first", False))
        kpm, attn_mask = _masks(masks, L)
        _assert_same(gm(q, k, v, kpm, attn_mask), model(q, k, v, kpm, attn_mask))

    @pytest.mark.parametrize("batch_first", [False, True])
    @pytest.mark.parametrize("call", CALL_OPTIONS[:2], ids=str)
    @pytest.mark.parametrize("masks", ["none", "attn_3d", "both"])
    def test_unbatched_input_equals_up_to_rounding(self, batch_first, call, masks):
        """torch unsqueezes unbatched q, k, v one by one, which ends ``query is key``: it then
        projects with the thirds of in_proj_weight, the traced model with the whole weight."""
        model = Attn("self", call, batch_first=batch_first)
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(batch_first, batched=False)
        kpm, attn_mask = _masks(masks, L, batched=False)
        _assert_same(gm(q, k, v, kpm, attn_mask), model(q, k, v, kpm, attn_mask), False)

    @pytest.mark.parametrize("batch_first", [False, True])
    @pytest.mark.parametrize("call", [{}, {"need_weights": False}], ids=str)
    @pytest.mark.parametrize("masks", ["both"])
    @pytest.mark.parametrize("mode", ["cross", "distinct"])
    @pytest.mark.parametrize("batched", [True, False])
    def test_packed_cross_and_distinct_inputs_equal_up_to_rounding(self, mode, batch_first, call,
                                                                   masks, batched):
        model = Attn(mode, call, batch_first=batch_first, add_bias_kv=True)
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(batch_first, batched)
        kpm, attn_mask = _masks(masks, S, batched)
        _assert_same(gm(q, k, v, kpm, attn_mask), model(q, k, v, kpm, attn_mask), False)

    @pytest.mark.parametrize("batch_first", [True])
    @pytest.mark.parametrize("batched", [True, False])
    @pytest.mark.parametrize("mode, kdim, vdim", [("cross", 6, 6), ("distinct", 6, 5)])
    @pytest.mark.parametrize("call", [{}, {"need_weights": False}], ids=str)
    def test_separate_kdim_vdim_weights_bit_for_bit(self, batch_first, batched, mode, kdim, vdim,
                                                    call):
        model = Attn(mode, call, batch_first=batch_first, kdim=kdim, vdim=vdim)
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(batch_first, batched, kdim, vdim)
        _assert_same(gm(q, k, v), model(q, k, v))

    @pytest.mark.parametrize("call", [{}, {"need_weights": False}], ids=str)
    @pytest.mark.parametrize("masks", ["attn_bool", "both"])
    def test_is_causal_bit_for_bit(self, call, masks):
        model = Attn("self", {**call, "is_causal": True}, batch_first=True)
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(True)
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        kpm = _masks("kpm_bool", L)[0] if masks == "both" else None
        _assert_same(gm(q, k, v, kpm, causal), model(q, k, v, kpm, causal))

    def test_is_causal_without_mask_raises_like_torch(self):
        model = Attn("self", {"is_causal": True})
        gm = trace(model)
        q, k, v = _inputs()
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            model(q, k, v)
        with pytest.raises(RuntimeError, match="Need attn_mask"):
            gm(q, k, v)

    @pytest.mark.parametrize("call", [{}, {"need_weights": False}], ids=str)
    @pytest.mark.parametrize("mode", ["self", "cross"])
    def test_dropout_follows_train_and_eval_of_the_traced_model(self, call, mode):
        model = Attn(mode, call, dropout=0.5, batch_first=True)
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(True)
        same = mode == "self"
        _assert_same(_run(gm, q, k, v, seed=7), _run(model, q, k, v, seed=7), same)
        assert not torch.equal(_run(gm, q, k, v, seed=7)[0], _run(gm, q, k, v, seed=8)[0])
        gm.eval(), model.eval()
        # grad enabled and parameters requiring grad: the module takes its slow path
        _assert_same(_run(gm, q, k, v, seed=7), _run(model, q, k, v, seed=7), same)
        _assert_same(_run(gm, q, k, v, seed=8), _run(model, q, k, v, seed=7), same)

    @pytest.mark.parametrize("mha", [{}, {"add_bias_kv": True, "add_zero_attn": True}], ids=str)
    def test_gradients_equal_the_float_modules(self, mha):
        model = Attn("self", batch_first=True, **mha)
        _random_params(model)
        gm = trace(model)  # shares the module's parameters
        q, k, v = _inputs(True)

        def grads(fn):
            model.zero_grad()
            fn(q, k, v)[0].square().sum().backward()
            return {name: p.grad.clone() for name, p in model.named_parameters()}

        expected, actual = grads(model), grads(gm)
        assert expected.keys() == actual.keys()
        for name in expected:
            exact(actual[name], expected[name])

    @pytest.mark.parametrize("call", [{}, {"need_weights": False}], ids=str)
    def test_eval_fast_path_differs_only_by_rounding(self, call):
        """In eval mode without grad the module runs torch._native_multi_head_attention; the
        traced model always runs the slow path. With need_weights=False the fused kernel sums in
        another order: measured max |difference| / max |output| of 1.5e-7 (E=8), 1.9e-7 (E=64),
        3.0e-6 (E=256, std-0.5 weights) and 8.5e-7 on torchvision's vit_b_16; with weights,
        equal. Asserted: within 1e-5 of the output's largest magnitude."""
        model = Attn("self", call, batch_first=True).eval()
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(True)
        with torch.no_grad():
            expected, actual = model(q, k, v), gm(q, k, v)
        for a, b in zip(actual, expected, strict=True):
            if b is not None:
                assert (a - b).abs().max() <= 1e-5 * b.abs().max()

    @pytest.mark.parametrize("call", [{}, {"need_weights": False}], ids=str)
    @pytest.mark.parametrize("masks", ["none", "both"])
    def test_bfloat16_autocast_bit_for_bit(self, call, masks):
        model = Attn("self", call, batch_first=True)
        _random_params(model)
        gm = trace(model)
        q, k, v = _inputs(True)
        kpm, attn_mask = _masks(masks, L)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _assert_same(gm(q, k, v, kpm, attn_mask), model(q, k, v, kpm, attn_mask))

    def test_need_weights_may_be_an_input_of_the_traced_model(self):
        class Flag(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn = nn.MultiheadAttention(E, H)

            def forward(self, x, need_weights: bool):
                return self.attn(x, x, x, need_weights=need_weights)

        model = Flag()
        gm = trace(model)
        x = _inputs()[0]
        for flag in (True, False):
            _assert_same(gm(x, flag), model(x, flag))


class TestGraph:
    def test_projections_are_layers_on_the_modules_own_parameters(self):
        gm = fxquant.prepare(Attn("self"), fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        gm.graph.lint()
        layers = {r.layer: r for n in gm.graph.nodes
                  if (r := get_record(n)) is not None and r.role == "layer"}
        assert set(layers) == {"attn.in_proj_weight", "attn.out_proj"}
        assert layers["attn.in_proj_weight"].module == "attn"
        for name in ("attn_in_proj_weight_weight_quantizer",
                     "attn_in_proj_weight_input_quantizer", "attn_out_proj_weight_quantizer",
                     "attn_out_proj_input_quantizer"):
            assert f"self.{name}(" in gm.code

    @pytest.mark.parametrize("mode, calls", [("self", 1), ("cross", 1), ("distinct", 1)])
    def test_packed_weight_is_quantized_once_whatever_the_inputs(self, mode, calls):
        gm = fxquant.prepare(Attn(mode), fxquant.Recipe(weight="ste_sign"))
        weight_quantizers = [n for n in gm.graph.nodes if n.op == "call_module"
                             and str(n.target).startswith("attn_in_proj_weight_weight_q")]
        assert len(weight_quantizers) == calls

    def test_separate_weights_are_three_layers(self):
        model = Attn("distinct", kdim=6, vdim=5)
        gm = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"))
        layers = [r.layer for n in gm.graph.nodes
                  if (r := get_record(n)) is not None and r.role == "layer"]
        assert layers == ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                          "attn.out_proj"]

    @pytest.mark.parametrize("leaf", ["attn", nn.MultiheadAttention])
    def test_listed_as_a_leaf_it_stays_one_opaque_call(self, leaf):
        gm = trace(Attn("self"), leaf_modules=[leaf])
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["attn"]

    def test_only_modules_running_torchs_forward_are_replaced(self):
        class Plain(nn.MultiheadAttention):
            pass

        class Custom(nn.MultiheadAttention):
            def forward(self, query, key, value, **kwargs):
                return super().forward(query, key, value, **kwargs)

        assert traces_as_function(nn.MultiheadAttention(E, H))
        assert traces_as_function(Plain(E, H))
        assert not traces_as_function(Custom(E, H))  # its forward is traced as written
        assert not traces_as_function(nn.Linear(E, E))

    def test_prepared_model_pickles_and_retraces(self):
        gm = fxquant.prepare(Attn("self"), fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        q, k, v = _inputs()
        again = pickle.loads(pickle.dumps(gm))
        _assert_same(again(q, k, v), gm(q, k, v))
        retraced = trace(gm)
        retraced.graph.lint()
        _assert_same(retraced(q, k, v), gm(q, k, v))


class Block(nn.Module):
    """linear -> attention -> linear, so that BNN's float first and last layers are elsewhere."""

    def __init__(self, **mha) -> None:
        super().__init__()
        self.fc_in = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, **mha)
        self.fc_out = nn.Linear(E, 4)

    def forward(self, x):
        h = self.fc_in(x)
        return self.fc_out(self.attn(h, h, h, need_weights=False)[0])


def _reference_bnn(model: Block, x: torch.Tensor) -> torch.Tensor:
    """Hand-written attention with BNN projections (sign of weights and inputs)."""
    a = model.attn
    h = model.fc_in(x)  # (N, L, E)
    q, k, v = F.linear(ste_sign(h), ste_sign(a.in_proj_weight), a.in_proj_bias).chunk(3, -1)
    heads = [t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in (q, k, v)]  # (N, H, L, d)
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(E // H)
    o = (scores.softmax(-1) @ heads[2]).transpose(1, 2).flatten(2)
    o = F.linear(ste_sign(o), ste_sign(a.out_proj.weight), a.out_proj.bias)
    return model.fc_out(o)


class TestQuantized:
    def test_bnn_quantizes_in_and_out_projection(self):
        model = Block()
        _random_params(model)
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        prepared.graph.lint()
        for name in ("attn_in_proj_weight_weight_quantizer",
                     "attn_in_proj_weight_input_quantizer", "attn_out_proj_weight_quantizer",
                     "attn_out_proj_input_quantizer"):
            assert f"self.{name}(" in prepared.code
        x = torch.randn(N, L, E)
        torch.testing.assert_close(prepared(x), _reference_bnn(model, x), rtol=1e-5, atol=1e-5)

    def test_quantizers_disabled_equals_float_model(self):
        model = Block(add_bias_kv=True, dropout=0.3)
        _random_params(model)
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        set_quantizers_enabled(prepared, False)
        x = torch.randn(N, L, E)
        exact(_run(prepared, x, seed=3), _run(model, x, seed=3))

    def test_train_step_gives_finite_nonzero_gradients(self):
        model = Block()
        _random_params(model)
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        prepared(torch.randn(N, L, E)).square().mean().backward()
        for name in ("attn.in_proj_weight", "attn.out_proj.weight", "attn.in_proj_bias"):
            grad = prepared.get_parameter(name).grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    @pytest.mark.parametrize("mha", [{}, {"kdim": 6, "vdim": 6}, {"dropout": 0.5}], ids=str)
    def test_convert_equals_prepared_eval(self, mha):
        model = Attn("cross", **mha)
        _random_params(model)
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        q, k, v = _inputs(kdim=mha.get("kdim", E), vdim=mha.get("kdim", E))
        _assert_same(converted(q, k, v), prepared.eval()(q, k, v))


class TestTransformerEncoderLayer:
    """QuantTracer traces through nn.TransformerEncoderLayer (a torch.nn leaf for plain FX) with
    torch's fast-path choice off, so its attention becomes multi_head_attention; see also
    tests/graph/test_transformer.py."""

    @pytest.mark.parametrize("norm_first", [False, True])
    @pytest.mark.parametrize("batch_first", [False, True])
    def test_is_traced_through_and_equals_the_float_layer(self, norm_first, batch_first):
        layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.2, norm_first=norm_first,
                                           batch_first=batch_first)
        model = nn.Sequential(nn.Linear(E, E), layer, nn.Linear(E, E))
        _random_params(model)
        gm = trace(model)
        gm.graph.lint()
        assert any(n.op == "get_attr" and n.target == "1.self_attn.in_proj_weight"
                   for n in gm.graph.nodes)
        x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
        exact(_run(gm, x, seed=5), _run(model, x, seed=5))
        gm.eval(), model.eval()
        exact(gm(x), model(x))

    @pytest.mark.parametrize("enabled", [False, True])
    def test_tracing_leaves_the_fast_path_setting_as_it_was(self, enabled):
        model = nn.Sequential(nn.TransformerEncoderLayer(E, H, 16))
        with _fast_path(enabled):
            trace(model)
            assert torch.backends.mha.get_fastpath_enabled() is enabled


@contextlib.contextmanager
def _fast_path(enabled: bool):
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
