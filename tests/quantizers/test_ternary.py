"""Tests for fxquant.quantizers.ternary: ste_tern / SteTern (larq SteTern, reference §1.7, §10).

Oracles are written here: ``sign(x) * 1{abs(x) >= Delta}`` with Delta rounded to x's dtype, and
the TWN threshold recomputed with NumPy float32 arithmetic.
"""

import operator

import numpy as np
import pytest
import torch

from fxquant.quantizers import SteTern, get, ste_tern
from tests.helpers import (
    FLOAT_DTYPES,
    INF,
    NAN,
    assert_same_bits,
    down,
    exact,
    forward_backward,
    traced_inference,
    up,
)


def tern_oracle(x, delta):
    """sign(x) * 1{|x| >= delta} with sign(0) = 0; NaN -> NaN. ``delta`` is a Python float."""
    out = torch.where(x >= delta, 1.0, torch.where(x <= -delta, -1.0, 0.0)).to(x.dtype)
    return torch.where(torch.isnan(x), x, out)


def in_dtype(value, dtype):
    return torch.tensor(value, dtype=dtype).item()


def random_with_zeros(seed=0, shape=(4, 10)):
    """larq's generate_real_values_with_zeros: U(-2, 2) with a column of zeros at index 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 4 - 2
    x[:, 1] = 0.0
    return x


def twn_delta_float32(values):
    """TWN threshold as ste_tern defines it: fl(fl(0.7 * sum|x|) / n), all in float32.

    Only used on two-element inputs, whose sum has one rounding whatever the summation order.
    """
    a = [abs(np.float32(v)) for v in values]
    assert len(a) == 2
    total = np.float32(a[0] + a[1])
    return float(np.float32(total * np.float32(0.7)) / np.float32(len(a)))


class TestSteTernForward:
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_ties_at_default_threshold_map_to_plus_minus_one(self, dtype):
        d = in_dtype(0.1, dtype)  # float32: 0.100000001
        x = torch.tensor([d, -d, down(d, dtype), -down(d, dtype), up(d, dtype), -up(d, dtype)],
                         dtype=dtype)
        exact(ste_tern(x), torch.tensor([1.0, -1.0, 0.0, 0.0, 1.0, -1.0], dtype=dtype))

    def test_float32_literal_tie(self):
        x = torch.tensor([0.1, -0.1, 0.099999994, -0.099999994], dtype=torch.float32)
        exact(ste_tern(x), torch.tensor([1.0, -1.0, 0.0, 0.0]))

    def test_default_threshold_is_0_1_not_larq_0_05(self):
        assert SteTern().threshold_value == 0.1
        x = torch.tensor([0.07, -0.07, 0.05])
        exact(ste_tern(x), torch.zeros(3))
        exact(ste_tern(x, threshold_value=0.05), torch.tensor([1.0, -1.0, 1.0]))

    @pytest.mark.parametrize("threshold", [0.05, 0.3, 0.8, 0.123456789, 1.0, 1.5])
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_random_matches_oracle(self, threshold, dtype):
        gen = torch.Generator().manual_seed(9)
        x = (torch.rand(500, generator=gen) * 4 - 2).to(dtype)
        d = in_dtype(threshold, dtype)
        x[:4] = torch.tensor([d, -d, down(d, dtype), -down(d, dtype)], dtype=dtype)
        exact(ste_tern(x, threshold_value=threshold), tern_oracle(x, d))

    @pytest.mark.parametrize(("value", "expected"), [
        (NAN, NAN), (INF, 1.0), (-INF, -1.0), (0.0, 0.0), (-0.0, 0.0), (-1.4e-45, 0.0),
        (3e38, 1.0), (-3e38, -1.0), (0.5, 1.0), (-0.05, 0.0),
    ])
    def test_edge_values(self, value, expected):
        exact(ste_tern(torch.tensor([value])), torch.tensor([expected]))

    def test_zero_outputs_are_positive_zero(self):
        out = ste_tern(torch.tensor([-0.0, 0.0, -0.05, -1.4e-45, 0.05]))
        exact(out, torch.zeros(5))
        assert not torch.signbit(out).any()

    def test_zero_threshold_is_sign_with_zero_at_zero(self):
        x = torch.tensor([-2.0, -1.4e-45, -0.0, 0.0, 1.4e-45, 0.3, NAN])
        exact(ste_tern(x, threshold_value=0.0), torch.tensor([-1.0, -1, 0, 0, 1, 1, NAN]))

    def test_infinite_threshold_keeps_only_infinities(self):
        x = torch.tensor([-INF, -3e38, 0.0, 3e38, INF])
        exact(ste_tern(x, threshold_value=INF), torch.tensor([-1.0, 0, 0, 0, 1]))

    @pytest.mark.parametrize("kwargs", [{}, {"ternary_weight_networks": True},
                                        {"threshold_value": 0.42}])
    def test_larq_ternarization_basic(self, kwargs):
        fixed = torch.tensor([-1.0, 0.0, 1.0, 1.0, -1.0, 0.0])
        exact(ste_tern(fixed, **kwargs), fixed)
        out = ste_tern(random_with_zeros(10), **kwargs)
        assert set(out.unique().tolist()) == {-1.0, 0.0, 1.0}

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_and_shape_kept(self, dtype):
        x = torch.randn(3, 4, 5).to(dtype)
        out = ste_tern(x)
        assert out.dtype == dtype and out.shape == x.shape

    def test_non_contiguous_input(self):
        gen = torch.Generator().manual_seed(11)
        base = torch.randn(7, 6, generator=gen)
        exact(ste_tern(base.t()), tern_oracle(base.t(), in_dtype(0.1, torch.float32)))


class TestTernaryWeightNetworks:
    def test_threshold_is_0_7_mean_abs_over_whole_tensor(self):
        gen = torch.Generator().manual_seed(12)
        x = torch.randn(16, 32, generator=gen)
        x[0] *= 100  # one large channel moves the threshold of every channel
        delta = 0.7 * x.double().abs().mean().item()
        clear = ((x.double().abs() - delta).abs() > 1e-5 * delta).float()
        out = ste_tern(x, ternary_weight_networks=True)
        exact(out * clear, tern_oracle(x, delta) * clear)
        assert (out[1:] == 0).float().mean() > 0.9  # small channels mostly zero: not per channel
        assert (out != 0).any() and (out == 0).any()

    def test_threshold_value_is_ignored(self):
        x = torch.tensor([0.5, -0.3, 0.2, 1.0])  # Delta = 0.7 * 0.5 = 0.35
        expected = torch.tensor([1.0, 0.0, 0.0, 1.0])
        exact(ste_tern(x, threshold_value=0.01, ternary_weight_networks=True), expected)
        exact(ste_tern(x, threshold_value=5.0, ternary_weight_networks=True), expected)

    @pytest.mark.parametrize(("values", "expected"), [
        ([0.5384615063667297, 1.0], [1.0, 1.0]),  # element exactly at Delta
        ([-0.5384615063667297, 1.0], [-1.0, 1.0]),  # exactly at -Delta
        ([0.538461446762085, 1.0], [0.0, 1.0]),  # one ulp below Delta
        ([0.4038461446762085, -0.75], [1.0, -1.0]),
    ])
    def test_ties_at_twn_threshold(self, values, expected):
        delta = twn_delta_float32(values)
        element = abs(np.float32(values[0]))
        assert delta == element or delta == float(np.nextafter(element, np.float32(INF)))
        exact(ste_tern(torch.tensor(values), ternary_weight_networks=True),
              torch.tensor(expected))

    def test_float16_threshold_does_not_overflow(self):
        x = torch.ones(100_000, dtype=torch.float16)  # sum 1e5 > float16 max 65504
        x[::2] = -1.0
        x[1] = 0.5  # below Delta = 0.7 * ~1
        out = ste_tern(x, ternary_weight_networks=True)
        exact(out[:4], torch.tensor([-1.0, 0.0, -1.0, 1.0], dtype=torch.float16))

    def test_nan_anywhere_makes_every_output_nan(self):
        x = torch.tensor([[1.0, NAN], [0.0, -3.0]])
        exact(ste_tern(x, ternary_weight_networks=True), torch.full((2, 2), NAN))

    def test_infinite_element_makes_threshold_infinite(self):
        x = torch.tensor([INF, -5.0, 0.0, -INF])
        exact(ste_tern(x, ternary_weight_networks=True), torch.tensor([1.0, 0.0, 0.0, -1.0]))

    def test_all_zero_tensor_gives_zeros(self):
        exact(ste_tern(torch.zeros(3, 3), ternary_weight_networks=True), torch.zeros(3, 3))

    def test_threshold_is_not_differentiated(self):
        x = torch.tensor([0.5, -0.3, 0.2, 1.0, -2.0])
        _, grad = forward_backward(lambda t: ste_tern(t, ternary_weight_networks=True), x)
        exact(grad, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))


class TestSteTernGradient:
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_window_closed_and_independent_of_threshold(self, dtype):
        x = torch.tensor([0.05, -0.05, 0.5, 1.0, -1.0, up(1.0, dtype), down(-1.0, dtype), 0.0,
                          NAN, INF, -INF], dtype=dtype)
        _, grad = forward_backward(ste_tern, x)
        exact(grad, torch.tensor([1.0, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0], dtype=dtype))

    @pytest.mark.parametrize("clip_value", [0.5, 2.0, 0.0])
    def test_custom_clip(self, clip_value):
        gen = torch.Generator().manual_seed(13)
        x = torch.rand(200, generator=gen) * 6 - 3
        x[:3] = torch.tensor([clip_value, -clip_value, up(clip_value, torch.float32)])
        g = torch.randn(200, generator=gen)
        _, grad = forward_backward(lambda t: ste_tern(t, clip_value=clip_value), x, upstream=g)
        exact(grad, torch.where(x.abs() <= clip_value, g, torch.zeros(())))

    def test_clip_none_is_identity(self):
        x = torch.tensor([-5.0, 0.0, 0.05, 5.0, INF, NAN])
        g = torch.tensor([1.0, 2.0, 3.0, INF, 5.0, 6.0])
        _, grad = forward_backward(lambda t: ste_tern(t, clip_value=None), x, upstream=g)
        exact(grad, g)

    def test_shut_window_is_positive_zero_even_for_inf_upstream(self):
        x = torch.tensor([2.0, -2.0, NAN, INF])
        g = torch.tensor([INF, -3.0, -INF, -1.0])
        _, grad = forward_backward(ste_tern, x, upstream=g)
        exact(grad, torch.zeros(4))
        assert not torch.signbit(grad).any()

    def test_saves_only_a_bool_mask(self):
        saved = []
        x = torch.randn(64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ste_tern(x)
            ste_tern(x, ternary_weight_networks=True)
        assert len(saved) == 2
        assert all(t.dtype in (torch.bool, torch.uint8) for t in saved)


class TestSteTernModule:
    def test_registry_round_trip(self):
        q = get("ste_tern", threshold_value=0.3, clip_value=2.0)
        assert type(q) is SteTern and q.name == "ste_tern" and q.bits == 2
        copy = get(q)
        assert type(copy) is SteTern and copy is not q
        x = random_with_zeros(14)
        exact(copy(x), q(x))
        exact(q(x), ste_tern(x, 0.3, False, 2.0))

    def test_module_stores_arguments(self):
        q = SteTern(threshold_value=0.2, ternary_weight_networks=True, clip_value=None)
        assert (q.threshold_value, q.ternary_weight_networks, q.clip_value) == (0.2, True, None)
        assert q.extra_repr() == ("bits=2, threshold_value=0.2, ternary_weight_networks=True, "
                                  "clip_value=None")
        assert list(q.parameters()) == [] and q.state_dict() == {}

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
    def test_integer_and_bool_inputs_raise_type_error(self, dtype):
        with pytest.raises(TypeError, match="ste_tern"):
            SteTern()(torch.ones(3, dtype=dtype))

    @pytest.mark.parametrize(("kwargs", "argument"), [
        ({"threshold_value": -0.1}, "threshold_value"),
        ({"threshold_value": NAN}, "threshold_value"),
        ({"threshold_value": "0.1"}, "threshold_value"),
        ({"ternary_weight_networks": 1}, "ternary_weight_networks"),
        ({"ternary_weight_networks": None}, "ternary_weight_networks"),
        ({"clip_value": -1.0}, "clip_value"),
        ({"clip_value": NAN}, "clip_value"),
    ])
    def test_bad_arguments_raise_value_error(self, kwargs, argument):
        with pytest.raises(ValueError, match=argument):
            SteTern(**kwargs)
        with pytest.raises(ValueError, match="ste_tern"):
            ste_tern(torch.ones(2), **kwargs)


# ------------------------------------------------------------------------------------------------
# inference (plain-op eval forward), forward_is_identity, get_config


INFERENCE_CASES = {
    "default": {},
    "larq 0.05": {"threshold_value": 0.05},
    "zero": {"threshold_value": 0.0},
    "tiny 1e-46": {"threshold_value": 1e-46},  # 0 in float32 and below, not in float64
    "1e5": {"threshold_value": 1e5},  # inf in float16
    "inf": {"threshold_value": INF},
    "clip None": {"clip_value": None},
    "twn": {"ternary_weight_networks": True},
}


def inference_inputs(dtype, threshold):
    """Edge values and ±Delta with one ulp either side (Delta in ``dtype``), in several shapes."""
    d = in_dtype(threshold, dtype)
    near = [d, -d, up(d, dtype), -up(d, dtype), down(d, dtype), -down(d, dtype)] if d > 0 else []
    big = torch.finfo(dtype).max
    tiny = up(0.0, dtype)
    values = near + [0.0, -0.0, tiny, -tiny, 1.0, -1.0, 0.3, -0.3, big, -big, INF, -INF, NAN]
    edges = torch.tensor(values, dtype=dtype)
    finite = edges[torch.isfinite(edges)]
    gen = torch.Generator().manual_seed(31)
    rand = (torch.randn(4, 3, 5, 5, generator=gen) * 0.2).to(dtype)
    return [
        ("edges", edges),
        ("edges 2d", torch.cat([edges, edges]).view(2, -1)),
        ("edges transposed", torch.cat([edges, edges]).view(2, -1).t()),
        ("finite", finite),
        ("random 4d", rand),
        ("random channels_last", rand.to(memory_format=torch.channels_last)),
        ("random transposed", rand[:, :, 0, 0].t()),
        ("rank 0", torch.tensor(-0.5, dtype=dtype)),
        ("empty", torch.zeros(0, 3, dtype=dtype)),
    ]


class TestSteTernInference:
    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    def test_traces_to_plain_function_and_method_calls_only(self, case):
        gm = traced_inference(SteTern(**INFERENCE_CASES[case]))
        ops = [n.op for n in gm.graph.nodes]
        assert set(ops) <= {"placeholder", "call_function", "call_method", "output"}
        assert ops.count("placeholder") == 1 and "call_function" in ops

    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_traced_equals_eval_forward_bit_for_bit(self, case, dtype):
        q = SteTern(**INFERENCE_CASES[case])
        gm = traced_inference(q)
        for label, x in inference_inputs(dtype, q.threshold_value):
            expected = q.eval()(x)
            assert_same_bits(gm(x), expected, f"{case} {dtype} {label}")
            assert_same_bits(q.inference(x), expected, f"{case} {dtype} {label} (eager)")

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_threshold_inference_matches_oracle(self, dtype):
        d = in_dtype(0.1, dtype)
        x = torch.tensor([d, -d, down(d, dtype), -down(d, dtype), up(d, dtype), 0.0, -0.0, NAN,
                          INF, -INF], dtype=dtype)
        assert_same_bits(SteTern().inference(x), tern_oracle(x, d))

    def test_threshold_graph_is_two_comparisons(self):
        gm = traced_inference(SteTern(threshold_value=0.25))
        ge = [n for n in gm.graph.nodes if n.target is operator.ge]
        le = [n for n in gm.graph.nodes if n.target is operator.le]
        assert len(ge) == 1 and ge[0].args[1] == 0.25
        assert len(le) == 1 and le[0].args[1] == -0.25

    def test_zero_threshold_maps_zeros_to_positive_zero(self):
        out = SteTern(threshold_value=0.0).inference(torch.tensor([-0.0, 0.0, -1.4e-45, 2.0]))
        exact(out, torch.tensor([0.0, 0.0, -1.0, 1.0]))
        assert not torch.signbit(out[:2]).any()

    @pytest.mark.parametrize(("values", "expected"), [
        ([0.5384615063667297, 1.0], [1.0, 1.0]),  # element exactly at Delta
        ([-0.5384615063667297, 1.0], [-1.0, 1.0]),  # exactly at -Delta
        ([0.538461446762085, 1.0], [0.0, 1.0]),  # one ulp below Delta
    ])
    def test_twn_ties_computed_in_the_graph(self, values, expected):
        gm = traced_inference(SteTern(ternary_weight_networks=True))
        exact(gm(torch.tensor(values)), torch.tensor(expected))

    def test_twn_threshold_is_recomputed_per_input(self):
        gm = traced_inference(SteTern(ternary_weight_networks=True))
        x = torch.tensor([0.5, -0.3, 0.2, 1.0])  # Delta = 0.35
        exact(gm(x), torch.tensor([1.0, 0.0, 0.0, 1.0]))
        exact(gm(x * 10), torch.tensor([1.0, 0.0, 0.0, 1.0]))
        x = torch.tensor([0.5, -0.3, 0.2, 0.1])  # Delta = 0.7 * 1.1 / 4 = 0.1925
        exact(gm(x), torch.tensor([1.0, -1.0, 1.0, 0.0]))

    def test_twn_nan_anywhere_and_float16_sum(self):
        q = SteTern(ternary_weight_networks=True)
        exact(q.inference(torch.tensor([[1.0, NAN], [0.0, -3.0]])), torch.full((2, 2), NAN))
        x = torch.ones(100_000, dtype=torch.float16)  # sum 1e5 > float16 max: float32 sum
        x[::2] = -1.0
        x[1] = 0.5
        exact(q.inference(x)[:4], torch.tensor([-1.0, 0.0, -1.0, 1.0], dtype=torch.float16))

    def test_forward_is_not_identity(self):
        assert SteTern().forward_is_identity() is False
        assert SteTern(ternary_weight_networks=True).forward_is_identity() is False


class TestSteTernConfig:
    @pytest.mark.parametrize(("kwargs", "expected"), [
        ({}, {"threshold_value": 0.1, "ternary_weight_networks": False, "clip_value": 1.0}),
        ({"threshold_value": 1, "ternary_weight_networks": True, "clip_value": None},
         {"threshold_value": 1.0, "ternary_weight_networks": True, "clip_value": None}),
        ({"threshold_value": INF, "clip_value": 0},
         {"threshold_value": INF, "ternary_weight_networks": False, "clip_value": 0.0}),
    ])
    def test_get_config_values_are_plain(self, kwargs, expected):
        config = SteTern(**kwargs).get_config()
        assert config == expected
        assert all(type(v) in (bool, float, type(None)) for v in config.values())

    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    def test_round_trip_rebuilds_an_equal_quantizer(self, case):
        q = SteTern(**INFERENCE_CASES[case])
        rebuilt = SteTern(**q.get_config())
        assert rebuilt.get_config() == q.get_config() and rebuilt.extra_repr() == q.extra_repr()
        x = random_with_zeros(32)
        upstream = random_with_zeros(33)
        out, grad = forward_backward(q, x, upstream)
        out_r, grad_r = forward_backward(rebuilt, x, upstream)
        exact(out_r, out)
        exact(grad_r, grad)
