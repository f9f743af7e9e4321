"""Tests for fxquant.quantizers.ternary: ste_tern / SteTern (larq SteTern, reference §1.7, §10).

Oracles are written here: ``sign(x) * 1{abs(x) >= Delta}`` with Delta rounded to x's dtype, and
the TWN threshold recomputed with NumPy float32 arithmetic.
"""

import math

import numpy as np
import pytest
import torch

from fxquant.quantizers import SteTern, get, ste_tern

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NAN = math.nan
INF = math.inf


def exact(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def up(v, dtype):
    t = torch.tensor(v, dtype=dtype)
    return torch.nextafter(t, torch.tensor(INF, dtype=dtype)).item()


def down(v, dtype):
    t = torch.tensor(v, dtype=dtype)
    return torch.nextafter(t, torch.tensor(-INF, dtype=dtype)).item()


def tern_oracle(x, delta):
    """sign(x) * 1{|x| >= delta} with sign(0) = 0; NaN -> NaN. ``delta`` is a Python float."""
    out = torch.where(x >= delta, 1.0, torch.where(x <= -delta, -1.0, 0.0)).to(x.dtype)
    return torch.where(torch.isnan(x), x, out)


def in_dtype(value, dtype):
    return torch.tensor(value, dtype=dtype).item()


def forward_backward(fn, x, upstream=None):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    return y.detach(), x.grad


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
