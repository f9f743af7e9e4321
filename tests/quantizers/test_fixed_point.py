"""fixed_point_quantize / fixed_point_quantize_mask against QPyTorch's CPU semantics.

Oracles are written here: ``torch.round(x * 2**fl) / 2**fl`` in float64, clamped to bounds computed
in Python, and literal vectors from QPyTorch's tests and the reference document.
"""

import math

import pytest
import torch

from fxquant.quantizers.fixed_point import fixed_point_quantize, fixed_point_quantize_mask
from tests.helpers import FLOAT_DTYPES, INF, NAN, exact, t


def bounds(wl, fl, symmetric):
    t_max = 2.0 ** (wl - fl - 1) - 2.0**-fl
    t_min = -(2.0 ** (wl - fl - 1)) + (2.0**-fl if symmetric else 0.0)
    return t_min, t_max


def oracle(x, wl, fl, clamp=True, symmetric=False):
    """QPyTorch CPU nearest kernel: half-to-even round of x * 2**fl, clamp of the rounded value."""
    q = torch.round(x.double() * 2.0**fl) / 2.0**fl
    mask = torch.zeros_like(q, dtype=torch.bool)
    if clamp:
        t_min, t_max = bounds(wl, fl, symmetric)
        mask = (q > t_max) | (q < t_min)
        q = torch.clamp(q, t_min, t_max)
    return q.to(x.dtype), mask


class TestFixedPointNearest:
    @pytest.mark.parametrize(
        ("args", "x", "expected"),
        [
            # QW 2-bit grid {-0.5, 0, 0.5}: 0.25 -> 0 (tie to even), 0.75 -> 0.5 (clamped).
            ((2, 1, True, True), [0.25, 0.75, -0.75, 0.3, -0.25, 2.0, -2.0],
             [0.0, 0.5, -0.5, 0.5, -0.0, 0.5, -0.5]),
            # FixedPoint(5, 4), not symmetric: t_min = -1, t_max = 15/16.
            ((5, 4, True, False), [-1.0, -0.6, 0.0, 1.0, -1.1],
             [-1.0, -0.625, 0.0, 0.9375, -1.0]),
            # Ties to even without clamp.
            ((8, 0, False, False), [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5],
             [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0]),
            # No clamp: values beyond t_max survive.
            ((2, 1, False, True), [3.0, -7.25, 0.75], [3.0, -7.0, 1.0]),
            # Negative fl: grid of 2, range [-16, 14].
            ((4, -1, True, False), [3.0, 5.0, 100.0, -100.0, -3.0], [4.0, 4.0, 14.0, -16.0, -4.0]),
            # fl >= wl: range [-1/8, 1/8 - 1/16] on a 1/16 grid.
            ((2, 4, True, False), [0.04, 0.5, -0.5, 0.0625], [0.0625, 0.0625, -0.125, 0.0625]),
            # wl = 1, fl = 0, symmetric: the range is [0, 0].
            ((1, 0, True, True), [0.7, -3.0, 0.2], [0.0, 0.0, 0.0]),
        ],
    )
    def test_literal_vectors(self, args, x, expected):
        wl, fl, clamp, symmetric = args
        out = fixed_point_quantize(t(x), wl, fl, clamp=clamp, symmetric=symmetric)
        exact(out, t(expected))

    @pytest.mark.parametrize(
        ("wl", "fl", "clamp", "symmetric"),
        [(8, 7, True, True), (8, 7, True, False), (4, 2, True, False), (8, 8, False, False),
         (16, 10, True, True), (3, -2, True, False), (6, 9, True, True), (24, 12, False, False)],
    )
    def test_random_matches_round_oracle(self, wl, fl, clamp, symmetric):
        gen = torch.Generator().manual_seed(wl * 100 + fl)
        x = torch.randn(4000, generator=gen) * 2.0 ** (wl - fl - 1)
        out = fixed_point_quantize(x, wl, fl, clamp=clamp, symmetric=symmetric)
        exact(out, oracle(x, wl, fl, clamp, symmetric)[0])

    def test_clamp_reaches_exact_bounds(self):
        """QPyTorch test_clamp: with clamp, max/min are t_max/t_min; without, they exceed them."""
        x = torch.linspace(-2, 2, 100)
        for symmetric in (False, True):
            t_min, t_max = bounds(4, 2, symmetric)
            out = fixed_point_quantize(x, 4, 2, clamp=True, symmetric=symmetric)
            assert out.max().item() == t_max and out.min().item() == t_min
            free = fixed_point_quantize(1.5 * x, 4, 2, clamp=False, symmetric=symmetric)
            assert free.max().item() > t_max and free.min().item() < t_min

    def test_one_ulp_around_ties_and_bounds(self):
        # wl=8, fl=7, symmetric: tie at 0.5/128 (-> 0), at 1.5/128 (-> 2/128), bound tie 127.5/128.
        points = t([0.5 / 128, 1.5 / 128, 127.5 / 128, -127.5 / 128, -0.5 / 128])
        up = torch.nextafter(points, torch.full_like(points, INF))
        down = torch.nextafter(points, torch.full_like(points, -INF))
        for x in (points, up, down):
            exact(fixed_point_quantize(x, 8, 7, symmetric=True), oracle(x, 8, 7, True, True)[0])
        exact(fixed_point_quantize(points, 8, 7, symmetric=True),
              t([0.0, 2 / 128, 127 / 128, -127 / 128, -0.0]))
        exact(fixed_point_quantize(up, 8, 7, symmetric=True)[:2], t([1 / 128, 2 / 128]))
        exact(fixed_point_quantize(down, 8, 7, symmetric=True)[:2], t([0.0, 1 / 128]))

    def test_nan_inf_and_signed_zero(self):
        x = t([NAN, INF, -INF, -0.0, 0.0])
        exact(fixed_point_quantize(x, 8, 7, symmetric=True),
              t([NAN, 127 / 128, -127 / 128, -0.0, 0.0]))
        exact(fixed_point_quantize(x, 8, 7, clamp=False), t([NAN, INF, -INF, -0.0, 0.0]))
        assert torch.signbit(fixed_point_quantize(x, 8, 7)[3])

    def test_subnormals_round_to_signed_zero(self):
        tiny = torch.tensor([1e-45, -1e-45, 1e-40])
        out = fixed_point_quantize(tiny, 8, 7)
        exact(out, t([0.0, -0.0, 0.0]))
        assert torch.signbit(out[1])

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept_and_values_match(self, dtype):
        gen = torch.Generator().manual_seed(1)
        x = (torch.randn(500, generator=gen) * 1.5).to(dtype)
        out = fixed_point_quantize(x, 6, 4, symmetric=True)
        assert out.dtype == dtype
        exact(out, oracle(x, 6, 4, True, True)[0])

    def test_float16_has_no_overflow_in_scaling(self):
        # 1000 * 2**7 overflows float16; computing in float32 keeps the exact answer.
        x = t([1000.0, -1000.0, 0.5], torch.float16)
        exact(fixed_point_quantize(x, 20, 7, clamp=False), x)

    def test_input_requiring_grad_gives_output_without_grad(self):
        x = torch.randn(10, requires_grad=True)
        out = fixed_point_quantize(x, 8, 7)
        assert not out.requires_grad and out.grad_fn is None
        exact(out, oracle(x.detach(), 8, 7)[0])

    def test_input_is_not_modified(self):
        x = t([0.3, -0.7, 5.0])
        before = x.clone()
        fixed_point_quantize(x, 4, 3, rounding="stochastic")
        fixed_point_quantize(x, 4, 3)
        exact(x, before)

    def test_empty_and_non_contiguous(self):
        assert fixed_point_quantize(torch.empty(0), 8, 7).shape == (0,)
        x = torch.randn(6, 8).t()
        exact(fixed_point_quantize(x, 8, 5), oracle(x, 8, 5)[0])


class TestFixedPointStochastic:
    def test_same_seed_same_result_different_seed_differs(self):
        x = torch.rand(1000) * 2 - 1
        run = [fixed_point_quantize(x, 8, 4, rounding="stochastic",
                                    generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
        exact(run[0], run[1])
        assert not torch.equal(run[0], run[2])

    def test_result_is_floor_or_ceil_on_the_grid(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5000, generator=gen)
        out = fixed_point_quantize(x, 16, 5, clamp=False, rounding="stochastic", generator=gen)
        lower = torch.floor(x.double() * 32) / 32
        upper = torch.ceil(x.double() * 32) / 32
        assert bool(((out.double() == lower) | (out.double() == upper)).all())

    def test_grid_values_are_unchanged(self):
        x = t([0.0, -1 / 16, -0.0, 0.5])
        for seed in range(20):
            out = fixed_point_quantize(x, 8, 4, rounding="stochastic",
                                       generator=torch.Generator().manual_seed(seed))
            exact(out[:2], x[:2])

    @pytest.mark.parametrize("value", [0.3, -0.3, 0.01])
    def test_unbiased_mean(self, value):
        """QPyTorch test_stochastic: the mean over many draws is the input (within 5 std errors)."""
        n, fl = 100_000, 4
        x = torch.full((n,), value)
        out = fixed_point_quantize(x, 8, fl, clamp=False, rounding="stochastic",
                                   generator=torch.Generator().manual_seed(3))
        p = value * 2**fl - math.floor(value * 2**fl)
        std_err = math.sqrt(p * (1 - p)) * 2.0**-fl / math.sqrt(n)
        assert abs(out.double().mean().item() - value) < 5 * std_err

    def test_clamps_nan_and_inf_like_nearest(self):
        x = t([NAN, INF, -INF, 9.0])
        out = fixed_point_quantize(x, 4, 3, symmetric=True, rounding="stochastic")
        exact(out, t([NAN, 7 / 8, -7 / 8, 7 / 8]))

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept(self, dtype):
        x = torch.rand(64).to(dtype)
        out = fixed_point_quantize(x, 8, 6, rounding="stochastic")
        assert out.dtype == dtype
        assert bool((out * 64 == torch.round(out * 64)).all())


class TestFixedPointMask:
    def test_qpytorch_backward_fixed_mask(self):
        """QPyTorch test_backward: FixedPoint(5, 4) on [-1, -0.6, 0, 1]: only 1.0 is clamped."""
        out, mask = fixed_point_quantize_mask(t([-1.0, -0.6, 0.0, 1.0]), 5, 4)
        exact(out, t([-1.0, -0.625, 0.0, 0.9375]))
        assert mask.dtype == torch.bool
        assert mask.tolist() == [False, False, False, True]

    def test_qpytorch_clamp_zero_oracle(self):
        """QPyTorch test_clamp_zero: FixedPoint(4, 3, symmetric) on linspace(-2, 2, 10)."""
        x = torch.linspace(-2, 2, 10)
        out, mask = fixed_point_quantize_mask(x, 4, 3, symmetric=True)
        want, want_mask = oracle(x, 4, 3, True, True)
        exact(out, want)
        assert torch.equal(mask, want_mask)

    @pytest.mark.parametrize("symmetric", [True, False])
    def test_rounding_onto_a_bound_is_not_masked(self, symmetric):
        # 8 bits, fl=7: 126.6/128 rounds to 127/128 = t_max (not masked); 127.5/128 rounds to 128.
        x = t([126.6 / 128, 127.5 / 128, -127.4 / 128, -127.5 / 128, -128.4 / 128, -128.6 / 128])
        x = torch.cat([x, torch.nextafter(t([127.5 / 128]), t([0.0]))])
        out, mask = fixed_point_quantize_mask(x, 8, 7, symmetric=symmetric)
        want, want_mask = oracle(x, 8, 7, True, symmetric)
        exact(out, want)
        assert torch.equal(mask, want_mask)
        expected_mask = [False, True, False, symmetric, symmetric, True, False]
        assert mask.tolist() == expected_mask

    def test_nan_is_not_masked_inf_is(self):
        out, mask = fixed_point_quantize_mask(t([NAN, INF, -INF, -0.0]), 8, 7, symmetric=True)
        exact(out, t([NAN, 127 / 128, -127 / 128, -0.0]))
        assert torch.signbit(out[3])
        assert mask.tolist() == [False, True, True, False]

    @pytest.mark.parametrize("symmetric", [True, False])
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_random_matches_oracle(self, symmetric, dtype):
        gen = torch.Generator().manual_seed(5)
        x = (torch.randn(3000, generator=gen) * 1.2).to(dtype)
        out, mask = fixed_point_quantize_mask(x, 6, 5, symmetric=symmetric)
        want, want_mask = oracle(x, 6, 5, True, symmetric)
        assert out.dtype == dtype
        exact(out, want)
        assert torch.equal(mask, want_mask)

    def test_stochastic_mask_marks_values_clamped_after_rounding(self):
        x = torch.full((2000,), 126.5 / 128)  # floor(126.5 + u) is 126 or 127: never clamped
        x = torch.cat([x, torch.full((2000,), 127.5 / 128)])  # 127 (kept) or 128 (clamped)
        out, mask = fixed_point_quantize_mask(x, 8, 7, symmetric=True, rounding="stochastic",
                                              generator=torch.Generator().manual_seed(0))
        assert not mask[:2000].any()
        assert 0 < int(mask[2000:].sum()) < 2000
        assert bool((out[2000:] == 127 / 128).all())


class TestFixedPointArguments:
    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
    def test_integer_and_bool_inputs_raise_type_error(self, dtype):
        with pytest.raises(TypeError, match="fixed_point_quantize"):
            fixed_point_quantize(torch.zeros(3, dtype=dtype), 8, 7)
        with pytest.raises(TypeError, match="fixed_point_quantize_mask"):
            fixed_point_quantize_mask(torch.zeros(3, dtype=dtype), 8, 7)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [({"wl": 0, "fl": 0}, "wl"), ({"wl": -1, "fl": 0}, "wl"), ({"wl": 2.0, "fl": 1}, "wl"),
         ({"wl": True, "fl": 0}, "wl"), ({"wl": 8, "fl": 0.5}, "fl"), ({"wl": 8, "fl": None}, "fl"),
         ({"wl": 8, "fl": 7, "rounding": "floor"}, "rounding"), ({"wl": 8, "fl": 5000}, "fl"),
         ({"wl": 127, "fl": 0}, "wl"), ({"wl": 8, "fl": -127}, "fl")],
    )
    def test_bad_arguments_raise_value_error(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            fixed_point_quantize(torch.zeros(3), **kwargs)

    def test_mask_variant_validates_too(self):
        with pytest.raises(ValueError, match="rounding"):
            fixed_point_quantize_mask(torch.zeros(3), 8, 7, rounding="up")
