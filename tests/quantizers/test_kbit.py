"""Tests for fxquant.quantizers.kbit: spikingjelly primitives, k-bit grids and larq's DoReFa.

Oracles are literal vectors from the reference document (quantizer-semantics.md §1.8, §5, §10),
Python's own rounding (``round`` is half to even, ``math.ceil``/``math.floor``), NumPy float32
arithmetic, closed-form derivatives, and the reference libraries' expressions written out here
(spikingjelly ``clamp_by_linear``, bitorch ``InputDoReFa``/``WeightDoReFa``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.fx

from fxquant.quantizers import base, kbit
from fxquant.quantizers.kbit import (
    AffineKBitQuantize,
    CeilSTE,
    ClampByLinear,
    ClampSTE,
    DoReFa,
    FloorSTE,
    KBitQuantize,
    RoundSTE,
    StepQuantize,
    affine_k_bit_quantize,
    ceil_ste,
    clamp_by_linear,
    clamp_ste,
    dorefa,
    floor_ste,
    k_bit_quantize,
    round_ste,
    step_quantize,
)
from tests.helpers import (
    FLOAT_DTYPES,
    INF,
    NAN,
    down,
    exact,
    forward_backward,
    t,
    traced_inference,
    up,
)

F32 = torch.float32


# ------------------------------------------------------------------------------------------------
# helpers


def grid(i: int, n: int) -> float:
    """i / n as float32 computes it (NumPy, independent of torch)."""
    return float(np.float32(i) / np.float32(n))


def weights_grid(i: int, n: int) -> float:
    """2 * (i / n) - 1 in float32 arithmetic (NumPy)."""
    return float(np.float32(2) * (np.float32(i) / np.float32(n)) - np.float32(1))


def seeded(*shape: int, low: float = -2.0, high: float = 2.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) * (high - low) + low


# ------------------------------------------------------------------------------------------------
# round / ceil / floor


class TestRoundingSTE:
    @pytest.mark.parametrize(
        ("fn", "x", "expected"),
        [
            # half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2 (reference §10)
            (round_ste, [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.5],
             [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 0.0, 4.0]),
            (ceil_ste, [-1.5, -0.5, 0.0, 0.5, 1.0, 1.0000001], [-1.0, -0.0, 0.0, 1.0, 1.0, 2.0]),
            (floor_ste, [-1.5, -0.5, 0.0, 0.5, 1.0, 0.99999994], [-2.0, -1.0, 0.0, 0.0, 1.0, 0.0]),
        ],
    )
    def test_literal_values(self, fn, x, expected):
        exact(fn(t(x)), t(expected))

    @pytest.mark.parametrize(("fn", "oracle"), [(round_ste, round), (ceil_ste, math.ceil),
                                                (floor_ste, math.floor)])
    def test_random_values_match_python_rounding(self, fn, oracle):
        x = torch.cat([seeded(300, low=-50, high=50), torch.arange(-20, 21) / 2])
        expected = t([float(oracle(v)) for v in x.tolist()])
        exact(fn(x), expected)

    @pytest.mark.parametrize("fn", [round_ste, ceil_ste, floor_ste])
    def test_specials_pass_through(self, fn):
        y = fn(t([NAN, INF, -INF, -0.0]))
        exact(y, t([NAN, INF, -INF, -0.0]))
        assert math.copysign(1.0, y[3].item()) == -1.0

    @pytest.mark.parametrize("fn", [round_ste, ceil_ste, floor_ste])
    def test_gradient_is_the_upstream_gradient_everywhere(self, fn):
        x = t([NAN, INF, -INF, -0.0, 0.5, 1.5, -3.7, 100.0])
        g = t([1.0, 2.0, -3.0, INF, 0.25, -INF, 7.0, NAN])
        _, grad = forward_backward(fn, x, g)
        exact(grad, g)


# ------------------------------------------------------------------------------------------------
# clamp_ste


class TestClampSTE:
    def test_forward_matches_independent_clamp(self):
        x = torch.cat([seeded(200), t([NAN, INF, -INF, -0.0, -1.0, 1.0])])
        expected = torch.where(x < -1, -1.0, torch.where(x > 1, 1.0, x))
        exact(clamp_ste(x, -1.0, 1.0), expected)

    def test_gradient_is_one_on_the_closed_window_only(self):
        x = t([down(-1.0), -1.0, -0.0, 0.0, 0.5, 1.0, up(1.0), NAN, INF, -INF])
        _, grad = forward_backward(lambda v: clamp_ste(v, -1.0, 1.0), x)
        exact(grad, t([0, 1, 1, 1, 1, 1, 0, 0, 0, 0]))

    def test_random_upstream_is_masked_and_infinite_upstream_gives_zero_outside(self):
        x = torch.cat([seeded(100), t([2.0, -3.0])])
        g = torch.cat([seeded(100, seed=1), t([INF, -INF])])
        _, grad = forward_backward(lambda v: clamp_ste(v, -1.0, 1.0), x, g)
        expected = torch.where((x >= -1) & (x <= 1), g, 0.0)
        exact(grad, expected)
        assert grad[-2:].tolist() == [0.0, 0.0]

    def test_infinite_bound_passes_infinite_input(self):
        _, grad = forward_backward(lambda v: clamp_ste(v, 0.0, INF), t([INF, -INF, 0.0, -1e-30]))
        exact(grad, t([1, 0, 1, 0]))

    def test_equal_bounds_pass_only_that_value(self):
        y, grad = forward_backward(lambda v: clamp_ste(v, 0.5, 0.5), t([0.4, 0.5, 0.6]))
        exact(y, t([0.5, 0.5, 0.5]))
        exact(grad, t([0, 1, 0]))

    def test_saves_only_a_bool_mask(self):
        y = clamp_ste(seeded(10).requires_grad_(True), -1.0, 1.0)
        assert [s.dtype for s in y.grad_fn.saved_tensors] == [torch.bool]

    @pytest.mark.parametrize(
        ("lo", "hi", "error"),
        [(1.0, -1.0, ValueError), (NAN, 1.0, ValueError), (0.0, NAN, ValueError),
         (True, 1.0, TypeError), (0.0, "1", TypeError)],
    )
    def test_bad_bounds_raise(self, lo, hi, error):
        with pytest.raises(error, match="clamp_ste"):
            clamp_ste(t([0.0]), lo, hi)
        with pytest.raises(error, match="ClampSTE"):
            ClampSTE(lo, hi)


# ------------------------------------------------------------------------------------------------
# step_quantize and k_bit_quantize


SJ_X = [-0.1, 0.26, 0.74, 1.1]  # spikingjelly test_quantizers_keep_their_straight_through_gradients


class TestStepQuantize:
    def test_spikingjelly_vector(self):
        exact(step_quantize(t(SJ_X), 0.25), t([0.0, 0.25, 0.75, 1.0]))

    @pytest.mark.parametrize(
        ("step", "x", "expected"),
        [
            (1.0, [0.5, 1.5, 2.5, -1.5, -0.5], [0.0, 2.0, 2.0, -2.0, -0.0]),  # half to even
            (0.5, [0.25, 0.75, 1.25, -0.25], [0.0, 1.0, 1.0, -0.0]),
            (0.25, [0.125, 0.375, 100.0625], [0.0, 0.5, 100.0]),
            (2.0, [3.0, 5.0, -3.0, 0.999], [4.0, 4.0, -4.0, 0.0]),
        ],
    )
    def test_ties_round_half_to_even(self, step, x, expected):
        exact(step_quantize(t(x), step), t(expected))

    @pytest.mark.parametrize("step", [0.1, 0.3, 1.0 / 3.0, 0.7, 1.5])
    def test_equals_spikingjelly_expression_on_cpu(self, step):
        x = seeded(2000, low=-10, high=10)
        exact(step_quantize(x, step), torch.round(x / step) * step)

    def test_gradient_is_identity(self):
        g = seeded(5, seed=3)
        x = t([NAN, INF, 0.15, -7.0, 2.0])
        _, grad = forward_backward(lambda v: step_quantize(v, 0.3), x, g)
        exact(grad, g)

    @pytest.mark.parametrize("step", [0.0, -0.5, NAN, INF, -INF])
    def test_bad_step_raises_value_error(self, step):
        with pytest.raises(ValueError, match="step"):
            step_quantize(t([1.0]), step)
        with pytest.raises(ValueError, match="StepQuantize"):
            StepQuantize(step)

    @pytest.mark.parametrize("step", [1e-9, 1e6])
    def test_step_that_vanishes_or_overflows_in_the_dtype_raises(self, step):
        with pytest.raises(ValueError, match="float16"):
            step_quantize(t([1.0], torch.float16), step)

    def test_module_default_step_is_one(self):
        exact(StepQuantize()(t([0.5, 1.5, 2.4])), t([0.0, 2.0, 2.0]))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_equals_cpu_bit_for_bit(self):
        x = seeded(1 << 20, low=-100, high=100)
        for step in (0.1, 0.3, 1.0 / 3.0, 0.7):
            exact(step_quantize(x.cuda(), step).cpu(), step_quantize(x, step))


class TestKBitQuantize:
    def test_spikingjelly_vector_and_gradient(self):
        x = t(SJ_X).requires_grad_(True)
        a = step_quantize(x, 0.25)
        b = k_bit_quantize(x.clamp(0, 1), 2)
        exact(a.detach(), t([0.0, 0.25, 0.75, 1.0]))
        exact(b.detach(), t([0.0, grid(1, 3), grid(2, 3), 1.0]))
        (a.sum() + b.sum()).backward()
        exact(x.grad, t([1.0, 2.0, 2.0, 1.0]))

    @pytest.mark.parametrize(
        ("k", "x", "expected"),
        [
            (2, [1.5, -1.0, 2.0, -0.5], [grid(4, 3), -1.0, 2.0, -grid(2, 3)]),  # no clipping
            (1, [0.5, 1.5, 0.49999997, 0.50000006], [0.0, 2.0, 0.0, 1.0]),  # half to even
            (2, [0.5, 0.0, 1.0, -0.0], [grid(2, 3), 0.0, 1.0, -0.0]),  # 0.5 * 3 = 1.5 -> 2
            (3, [0.5, 1 / 14], [grid(4, 7), grid(0, 7)]),  # 3.5 -> 4; 0.5 -> 0
        ],
    )
    def test_literal_values_without_clipping(self, k, x, expected):
        exact(k_bit_quantize(t(x), k), t(expected))

    @pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
    def test_interval_property(self, k):
        """Every input strictly inside ((2i-1)/(2n), (2i+1)/(2n)) maps to i/n (larq's test)."""
        n = 2**k - 1
        inputs, expected = interval_samples(n)
        exact(k_bit_quantize(inputs, k), expected)

    def test_specials_and_gradient(self):
        x = t([NAN, INF, -INF, 0.3])
        g = t([2.0, -1.0, INF, 0.5])
        y, grad = forward_backward(lambda v: k_bit_quantize(v, 2), x, g)
        exact(y, t([NAN, INF, -INF, grid(1, 3)]))
        exact(grad, g)

    @pytest.mark.parametrize(("k", "error"), [(0, ValueError), (-1, ValueError),
                                              (1.5, TypeError), (2.0, TypeError),
                                              (True, TypeError), ("2", TypeError)])
    def test_bad_k_raises(self, k, error):
        with pytest.raises(error, match="k_bit_quantize"):
            k_bit_quantize(t([0.5]), k)
        with pytest.raises(error, match="KBitQuantize"):
            KBitQuantize(k)

    def test_numpy_integer_k_is_accepted(self):
        assert KBitQuantize(np.int64(3)).bits == 3

    def test_levels_overflowing_the_dtype_raise(self):
        with pytest.raises(ValueError, match="overflows torch.float16"):
            k_bit_quantize(t([0.5], torch.float16), 16)
        exact(k_bit_quantize(t([0.5], torch.float16), 11), t([1024 / 2047], torch.float16))


def interval_samples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 inputs strictly inside each interval ((2i-1)/(2n), (2i+1)/(2n)) within [0, 1], and
    the expected grid values i/n. Samples keep 1% of the interval width away from its ends."""
    fractions = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    inputs, expected = [], []
    for i in range(n + 1):
        lo, hi = max((2 * i - 1) / (2 * n), 0.0), min((2 * i + 1) / (2 * n), 1.0)
        inputs.append(lo + fractions * (hi - lo))
        expected += [grid(i, n)] * len(fractions)
    return torch.cat(inputs).to(F32), t(expected)


class TestAffineKBitQuantize:
    X = [0.1, 0.4, 0.6, 1.5, -0.1]
    Q2 = [0.0, grid(1, 3), grid(2, 3), grid(4, 3), -0.0]  # k_bit_quantize(X, 2), no clipping

    def test_forward_and_closed_form_gradients(self):
        x = t(self.X).requires_grad_(True)
        w = torch.tensor(2.5, requires_grad=True)
        b = torch.tensor(-0.75, requires_grad=True)
        g = t([1.0, 2.0, 3.0, 4.0, -5.0])
        y = affine_k_bit_quantize(x, 2, w, b)
        q = t(self.Q2)
        exact(y.detach(), 2.5 * q - 0.75)
        y.backward(g)
        exact(x.grad, g * 2.5)
        # dL/dw = sum(g * q) = 0 + 2/3 + 2 + 16/3 + 0 = 8; dL/db = sum(g) = 5
        torch.testing.assert_close(w.grad, torch.tensor(8.0), rtol=1e-6, atol=0)
        exact(b.grad, torch.tensor(5.0))

    def test_python_number_scale_and_offset(self):
        y, grad = forward_backward(lambda v: affine_k_bit_quantize(v, 2, 3.0, 1.0), t(self.X))
        exact(y, 3.0 * t(self.Q2) + 1.0)
        exact(grad, t([3.0] * 5))

    def test_per_channel_scale_broadcasts_like_spikingjelly(self):
        x = t([[0.1, 0.5, 0.9], [0.2, 0.6, 1.0]]).requires_grad_(True)
        w = t([[2.0], [-1.0]]).requires_grad_(True)
        b = t([0.5, 0.0, -0.5]).requires_grad_(True)
        g = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        y = affine_k_bit_quantize(x, 1, w, b)
        q = t([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # k=1: 0.5 -> 0 (half to even)
        exact(y.detach(), w.detach() * q + b.detach())
        y.backward(g)
        exact(x.grad, g * w.detach())
        exact(w.grad, t([[3.0], [11.0]]))
        exact(b.grad, t([5.0, 7.0, 9.0]))

    def test_module_trains_w_and_b(self):
        m = AffineKBitQuantize(2, w=2.0, b=1.0)
        assert {name for name, _ in m.named_parameters()} == {"w", "b"}
        assert m.w.dtype == F32 and m.w.dim() == 0 and m.w.requires_grad
        g = t([1.0, 2.0, 3.0, 4.0, -5.0])
        m(t(self.X)).backward(g)
        torch.testing.assert_close(m.w.grad, torch.tensor(8.0), rtol=1e-6, atol=0)
        exact(m.b.grad, torch.tensor(5.0))

    def test_fixed_module_holds_non_persistent_buffers(self):
        m = AffineKBitQuantize(2, w=3.0, b=-1.0, learnable=False)
        assert list(m.parameters()) == []
        assert dict(m.named_buffers()).keys() == {"w", "b"}
        assert m.state_dict() == {}
        y, grad = forward_backward(m, t(self.X))
        exact(y, 3.0 * t(self.Q2) - 1.0)
        exact(grad, t([3.0] * 5))

    def test_float16_input_keeps_its_dtype_with_float32_parameters(self):
        m = AffineKBitQuantize(2, w=2.0, b=0.5)
        y = m(t([0.5, 1.0], torch.float16))
        exact(y, t([2.0 * 2 / 3 + 0.5, 2.5], torch.float16))

    def test_zero_dim_input_uses_the_composite(self):
        y, grad = forward_backward(lambda v: affine_k_bit_quantize(v, 2, 2.0, 1.0),
                                   torch.tensor(0.5))
        exact(y, torch.tensor(2.0 * grid(2, 3) + 1.0))
        exact(grad, torch.tensor(2.0))

    @pytest.mark.parametrize(("kwargs", "error"), [({"k": 0}, ValueError),
                                                   ({"k": 2, "w": INF}, ValueError),
                                                   ({"k": 2, "b": NAN}, ValueError),
                                                   ({"k": 2.0}, TypeError)])
    def test_bad_arguments_raise(self, kwargs, error):
        with pytest.raises(error, match="AffineKBitQuantize"):
            AffineKBitQuantize(**kwargs)


# ------------------------------------------------------------------------------------------------
# clamp_by_linear


def spikingjelly_clamp_by_linear(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """spikingjelly quantize.clamp_by_linear, verbatim: plain autograd through min and max."""
    x_max = torch.max(x) + eps
    x_min = torch.min(x)
    return (x - x_min) / (x_max - x_min)


class TestClampByLinear:
    @pytest.mark.parametrize(
        ("x", "eps", "expected"),
        [
            ([100.0, 300.0], 1e-5, [0.0, 1.0]),  # eps vanishes in max + eps for |max| >= 256
            ([1000.0, 1000.0], 1e-5, [NAN, NAN]),  # 0 / 0
            ([1.0, 1.0], 1e-5, [0.0, 0.0]),  # small constant: 0 / eps'
            ([1.0, 1.0], 0.0, [NAN, NAN]),
            ([0.0, 256.0, 128.0], 1e-5, [0.0, 1.0, 0.5]),
            ([-1.0, 1.0, NAN], 1e-5, [NAN, NAN, NAN]),  # min/max propagate NaN
        ],
    )
    def test_literal_values(self, x, eps, expected):
        exact(clamp_by_linear(t(x), eps), t(expected))

    def test_top_element_below_one_when_eps_survives(self):
        y = clamp_by_linear(t([0.0, 100.0]))
        assert 0.9999998 < y[1].item() < 1.0

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_forward_equals_spikingjelly_bit_for_bit(self, dtype):
        x = seeded(4, 257, low=-30, high=50).to(dtype)
        exact(clamp_by_linear(x), spikingjelly_clamp_by_linear(x))

    @pytest.mark.parametrize(
        "x",
        [
            [3.0, 1.0, 3.0, 0.0, 0.0, 2.0],  # ties at both ends
            [0.5, -2.0, 7.0, 1.25],
            [-0.0, 0.0, 1.0],  # -0 and +0 tie at the minimum
            [5.0, 5.0, 5.0],  # constant: min and max are the same elements
        ],
    )
    def test_gradient_equals_plain_autograd_through_min_and_max(self, x):
        g = seeded(len(x), seed=5)
        _, grad = forward_backward(clamp_by_linear, t(x), g)
        _, expected = forward_backward(spikingjelly_clamp_by_linear, t(x), g)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)

    def test_gradient_on_a_random_matrix(self):
        x, g = seeded(8, 16, seed=7), seeded(8, 16, seed=8)
        _, grad = forward_backward(clamp_by_linear, x, g)
        _, expected = forward_backward(spikingjelly_clamp_by_linear, x, g)
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)

    def test_gradient_of_ones_sums_to_zero(self):
        _, grad = forward_backward(clamp_by_linear, seeded(1000, seed=9))
        assert abs(grad.sum().item()) < 1e-3
        assert grad.abs().max().item() > 0.1

    def test_closed_form_gradient_of_a_two_element_tensor(self):
        # x = [a, b], a < b, den = b + eps - a: y = [0, (b - a) / den]; upstream g = [g0, g1].
        # dL/da = -g1 * eps / den**2 (y0 does not move: x0 is the min), dL/db = g1 * eps / den**2
        a, b, eps, g1 = 0.0, 2.0, 0.5, 2.0
        den = b + eps - a
        _, grad = forward_backward(lambda v: clamp_by_linear(v, eps), t([a, b]), t([3.0, g1]))
        expected = t([-g1 * eps / den**2, g1 * eps / den**2])  # [-0.16, 0.16]
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=0)

    def test_zero_dim_and_empty_inputs(self):
        y, grad = forward_backward(clamp_by_linear, torch.tensor(2.0))
        exact(y, torch.tensor(0.0))
        exact(grad, torch.tensor(0.0))
        y, grad = forward_backward(clamp_by_linear, torch.empty(0, 3))
        assert y.shape == grad.shape == (0, 3)

    @pytest.mark.parametrize(("eps", "error"), [(-1e-5, ValueError), (INF, ValueError),
                                                (NAN, ValueError), ("1e-5", TypeError)])
    def test_bad_eps_raises(self, eps, error):
        with pytest.raises(error, match="clamp_by_linear"):
            clamp_by_linear(t([0.0, 1.0]), eps)
        with pytest.raises(error, match="ClampByLinear"):
            ClampByLinear(eps)


# ------------------------------------------------------------------------------------------------
# DoReFa


LARQ_X = [-1.5, -1.0, -0.3, 0.0, 0.3, 1.0, 1.5]  # reference §1.8 derived vectors


def bitorch_weight_dorefa(x: torch.Tensor, k: int) -> torch.Tensor:
    """bitorch WeightDoReFa forward written out (larq's order of float32 operations)."""
    n = 2**k - 1
    squashed = torch.tanh(x)
    v = squashed / (2 * torch.max(torch.abs(squashed))) + 0.5
    return 2 * (torch.round(v * n) / n) - 1


def bitorch_input_dorefa(x: torch.Tensor, k: int) -> torch.Tensor:
    n = 2**k - 1
    return torch.round(torch.clamp(x, 0, 1) * n) / n


class TestDoReFa:
    @pytest.mark.parametrize(
        ("k", "mode", "expected"),
        [
            (2, "weights", [-1, -1, -0.3333333, 0.33333337, 0.33333337, 1, 1]),
            (1, "weights", [-1, -1, -1, -1, 1, 1, 1]),
            (2, "activations", [0, 0, 0, 0, 0.33333334, 1, 1]),
        ],
    )
    def test_reference_vectors(self, k, mode, expected):
        exact(dorefa(t(LARQ_X), k, mode), t(expected))
        exact(DoReFa(k, mode)(t(LARQ_X)), t(expected))

    def test_weights_gradient_reference_vector(self):
        _, grad = forward_backward(lambda v: dorefa(v, 2, "weights"), t(LARQ_X))
        expected = t([0.19964, 0.46398, 1.01104, 1.10479, 1.01104, 0.46398, 0.19964])
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5)

    @pytest.mark.parametrize("k", [1, 2, 8])
    def test_weights_gradient_closed_form(self, k):
        x, g = seeded(5, 40, seed=11), seeded(5, 40, seed=12)
        _, grad = forward_backward(lambda v: dorefa(v, k, "weights"), x, g)
        x64 = x.double()
        expected = g.double() / torch.cosh(x64) ** 2 / torch.tanh(x64).abs().max()
        torch.testing.assert_close(grad, expected.float(), rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
    def test_activations_interval_property(self, k):
        inputs, expected = interval_samples(2**k - 1)
        exact(dorefa(inputs, k, "activations"), expected)

    @pytest.mark.parametrize("k", [1, 2, 4, 6, 8])
    def test_weights_interval_property(self, k):
        """larq's test: with v = tanh(x) / max|tanh x| / 2 + 0.5 strictly inside the i-th interval,
        the output is 2 i/n - 1 (inputs within 1e-4 of an interval end are left out)."""
        n = 2**k - 1
        x = seeded(2000, seed=13)
        t64 = torch.tanh(x.double())
        v = t64 / t64.abs().max() / 2 + 0.5
        i = torch.round(v * n)
        clear = (v * n - i).abs() < 0.5 - 1e-4
        y = dorefa(x, k, "weights")
        expected = t([weights_grid(int(j), n) for j in i.tolist()])
        assert clear.sum() > 1900
        exact(y[clear], expected[clear])
        assert set(y.tolist()) <= {weights_grid(j, n) for j in range(n + 1)}

    @pytest.mark.parametrize("k", [1, 2, 3, 5])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_forward_bit_identical_to_bitorch_expressions(self, k, dtype):
        x = torch.cat([seeded(3000, seed=14), t([0.0, -0.0, 0.5, 1.0, -1.0])]).to(dtype)
        exact(dorefa(x, k, "weights"), bitorch_weight_dorefa(x, k))
        exact(dorefa(x, k, "activations"), bitorch_input_dorefa(x, k))

    @pytest.mark.parametrize(
        ("k", "expected"),
        [(1, -1.0), (2, 0.33333337), (4, weights_grid(8, 15)), (8, weights_grid(128, 255))],
    )
    def test_all_zero_weights_land_on_the_even_half_with_zero_gradient(self, k, expected):
        x = t([0.0, -0.0, 0.0])
        y, grad = forward_backward(lambda v: dorefa(v, k, "weights"), x, t([1.0, -2.0, 3.0]))
        exact(y, t([expected] * 3))
        exact(grad, t([0.0, 0.0, 0.0]))

    def test_zero_weight_in_a_normal_tensor_is_not_preserved(self):
        exact(dorefa(t([0.0, 1.0]), 2, "weights"), t([0.33333337, 1.0]))
        exact(dorefa(t([0.0, 1.0]), 1, "weights"), t([-1.0, 1.0]))

    def test_nan_weight_makes_the_whole_output_and_gradient_nan(self):
        y, grad = forward_backward(lambda v: dorefa(v, 2, "weights"), t([0.5, NAN, -0.5]))
        assert torch.isnan(y).all() and torch.isnan(grad).all()

    def test_infinite_weights_give_plus_minus_one_and_zero_gradient(self):
        y, grad = forward_backward(lambda v: dorefa(v, 2, "weights"), t([INF, -INF, 0.3]))
        exact(y, t([1.0, -1.0, 0.33333337]))
        assert grad[:2].tolist() == [0.0, 0.0]

    def test_activations_gradient_is_one_on_the_closed_unit_interval(self):
        x = t([down(0.0), -0.0, 0.0, 0.5, 1.0, up(1.0), NAN, INF, -INF, -3.0])
        g = t([5.0, 2.0, 3.0, 4.0, -1.0, 6.0, 7.0, 8.0, 9.0, INF])
        y, grad = forward_backward(lambda v: dorefa(v, 2, "activations"), x, g)
        exact(grad, t([0.0, 2.0, 3.0, 4.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
        exact(y, t([0.0, -0.0, 0.0, grid(2, 3), 1.0, 1.0, NAN, 1.0, 0.0, 0.0]))

    def test_activations_keep_negative_zero_like_torch_clamp(self):
        assert math.copysign(1.0, dorefa(t([-0.0]))[0].item()) == -1.0

    def test_activations_k1_maps_half_to_zero(self):
        exact(dorefa(t([0.5, 0.50000006, 1.5]), 1), t([0.0, 1.0, 1.0]))

    def test_activations_save_only_a_bool_mask(self):
        y = dorefa(seeded(10).requires_grad_(True))
        assert [s.dtype for s in y.grad_fn.saved_tensors] == [torch.bool]

    def test_weights_save_tanh_and_the_scalar_max(self):
        x = seeded(10).requires_grad_(True)
        saved = dorefa(x, 2, "weights").grad_fn.saved_tensors
        exact(saved[0], torch.tanh(x.detach()))
        exact(saved[1], torch.tanh(x.detach()).abs().max())

    def test_empty_and_zero_dim_weights(self):
        y, grad = forward_backward(lambda v: dorefa(v, 2, "weights"), torch.empty(0))
        assert y.shape == grad.shape == (0,)
        y, grad = forward_backward(lambda v: dorefa(v, 2, "weights"), torch.tensor(0.5))
        exact(y, torch.tensor(1.0))
        torch.testing.assert_close(grad, torch.tensor(1 / math.cosh(0.5) ** 2 / math.tanh(0.5)))

    def test_invalid_mode_raises_at_construction_and_at_call_time(self):
        with pytest.raises(ValueError, match="mode"):
            DoReFa(2, "unknown")
        q = DoReFa(2)
        q.mode = "unknown"
        with pytest.raises(ValueError, match="mode"):
            q(t([0.5]))
        with pytest.raises(ValueError, match="dorefa"):
            dorefa(t([0.5]), 2, "Weights")

    @pytest.mark.parametrize(("k", "error"), [(0, ValueError), (1.0, TypeError),
                                              (False, TypeError)])
    def test_bad_k_bit_raises(self, k, error):
        with pytest.raises(error, match="k_bit"):
            DoReFa(k)
        with pytest.raises(error, match="k_bit"):
            dorefa(t([0.5]), k)

    def test_defaults_match_larq(self):
        q = DoReFa()
        assert (q.k_bit, q.mode, q.bits) == (2, "activations", 2)
        assert "k_bit=2" in repr(q) and "'activations'" in repr(q)


# ------------------------------------------------------------------------------------------------
# properties every module in this file shares


MODULES = [
    ("round_ste", {}, RoundSTE, 32),
    ("ceil_ste", {}, CeilSTE, 32),
    ("floor_ste", {}, FloorSTE, 32),
    ("clamp_ste", {"min_value": -1.0, "max_value": 1.0}, ClampSTE, 32),
    ("step_quantize", {"step": 0.25}, StepQuantize, 32),
    ("k_bit_quantize", {"k": 3}, KBitQuantize, 3),
    ("affine_k_bit_quantize", {"k": 2, "w": 2.0, "b": -1.0}, AffineKBitQuantize, 2),
    ("clamp_by_linear", {}, ClampByLinear, 32),
    ("dorefa", {}, DoReFa, 2),
    ("dorefa", {"k_bit": 4, "mode": "weights"}, DoReFa, 4),
]
MODULE_IDS = [f"{name}-{kwargs}" for name, kwargs, _, _ in MODULES]


@pytest.mark.parametrize(("name", "kwargs", "cls", "bits"), MODULES, ids=MODULE_IDS)
class TestCommonBehaviour:
    def test_registry_round_trip(self, name, kwargs, cls, bits):
        q = base.get(name, **kwargs)
        assert type(q) is cls and q.name == name and q.bits == bits
        copy = base.get(q)
        assert type(copy) is cls and copy is not q
        x = seeded(3, 7)
        exact(copy(x), q(x))
        exact(cls(**kwargs)(x), q(x))

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept_in_forward_and_gradient(self, name, kwargs, cls, bits, dtype):
        x = seeded(2, 9, low=-1.5, high=1.5).to(dtype).requires_grad_(True)
        y = cls(**kwargs)(x)
        assert y.dtype == dtype and y.shape == x.shape
        y.backward(torch.ones_like(y))
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
    def test_integer_and_bool_inputs_raise_type_error(self, name, kwargs, cls, bits, dtype):
        with pytest.raises(TypeError, match=name.split("-")[0]):
            cls(**kwargs)(torch.zeros(3, dtype=dtype))

    def test_nan_propagates(self, name, kwargs, cls, bits):
        y = cls(**kwargs)(t([0.2, NAN, -0.7]))
        assert math.isnan(y[1].item())

    def test_output_is_finite_on_finite_input(self, name, kwargs, cls, bits):
        assert torch.isfinite(cls(**kwargs)(seeded(4, 5, seed=21))).all()

    def test_function_refuses_non_tensors(self, name, kwargs, cls, bits):
        with pytest.raises(TypeError):
            cls(**kwargs)([0.5, 1.0])


# ------------------------------------------------------------------------------------------------
# inference forms, forward_is_identity, get_config


def traced(q: base.Quantizer) -> torch.fx.GraphModule:
    return traced_inference(q.eval())


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """±0, ±1, halves and k-bit ties with their one-ulp neighbours, NaN, ±inf, subnormals, max."""
    info = torch.finfo(dtype)
    points = [0.0, 1.0, 0.5, 1.5, 2.5, 0.25, 0.125, 0.375, 0.1, 1 / 3, 2 / 3]
    points += [(i + 0.5) / n for n in (3, 7, 15) for i in range(-1, n + 1)]
    points += [(i + 0.5) / 255 for i in (0, 1, 2, 127, 128, 253, 254, 255)]
    values = torch.tensor(points + [-v for v in points], dtype=dtype)
    inf = torch.tensor(INF, dtype=dtype)
    neighbours = torch.cat([torch.nextafter(values.float(), inf.float()).to(dtype),
                            torch.nextafter(values.float(), -inf.float()).to(dtype)])
    if dtype == torch.float64:
        neighbours = torch.cat([torch.nextafter(values, inf), torch.nextafter(values, -inf)])
    specials = torch.tensor([-0.0, NAN, INF, -INF, info.tiny * info.eps, -info.tiny * info.eps,
                             info.tiny / 4, -info.tiny / 4, info.tiny, info.max, -info.max,
                             info.eps], dtype=dtype)
    return torch.cat([values, neighbours, specials, torch.arange(-24, 25, dtype=dtype) / 8])


def whole_tensor_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    """Inputs for quantizers that reduce the whole tensor: one special per tensor."""
    finite = edge_values(dtype)
    finite = finite[torch.isfinite(finite)]
    inputs = [finite, finite.reshape(1, -1), torch.zeros(4, dtype=dtype),
              torch.tensor([-0.0, 0.0, -0.0], dtype=dtype), torch.full((3,), 1000.0, dtype=dtype),
              torch.full((2, 2), 0.25, dtype=dtype)]
    for special in (NAN, INF, -INF):
        inputs.append(torch.cat([finite[:9], torch.tensor([special], dtype=dtype)]))
    return inputs


ELEMENTWISE = [
    RoundSTE(), CeilSTE(), FloorSTE(), ClampSTE(-1.0, 2.0), ClampSTE(-INF, 0.5),
    ClampSTE(0.25, 0.25), StepQuantize(0.25), StepQuantize(0.1), KBitQuantize(1),
    KBitQuantize(2), KBitQuantize(8), AffineKBitQuantize(2, w=1.5, b=-0.25),
    AffineKBitQuantize(3, w=0.1, b=0.3, learnable=False), DoReFa(1), DoReFa(2), DoReFa(4),
]
WHOLE_TENSOR = [ClampByLinear(), ClampByLinear(0.0), DoReFa(1, "weights"),
                DoReFa(2, "weights"), DoReFa(8, "weights")]
ALL_CASES = ELEMENTWISE + WHOLE_TENSOR


def case_id(q: base.Quantizer) -> str:
    return f"{type(q).__name__}({q.extra_repr()})"


def inputs_for(q: base.Quantizer, dtype: torch.dtype) -> list[torch.Tensor]:
    if any(q is case for case in WHOLE_TENSOR):
        inputs = whole_tensor_inputs(dtype)
    else:
        edge = edge_values(dtype)
        pairs = edge[: edge.numel() // 2 * 2].reshape(-1, 2)
        inputs = [edge, pairs, torch.empty(0, 3, dtype=dtype)]
        inputs += [torch.tensor(v, dtype=dtype) for v in (0.5, -0.0, NAN, -INF, 0.3)]
    inputs.append(seeded(5, 17, low=-3.0, high=3.0, seed=7).to(dtype))
    inputs.append(seeded(64, low=-0.1, high=1.1, seed=8).to(dtype))
    inputs.append(torch.tensor(0.7, dtype=dtype))  # 0-dim
    return inputs


class TestInference:
    @pytest.mark.parametrize("q", ALL_CASES, ids=case_id)
    def test_traces_to_plain_ops_only(self, q):
        gm = traced(q)
        gm.graph.lint()
        ops = {node.op for node in gm.graph.nodes}
        allowed = {"placeholder", "output", "call_function", "call_method"}
        if isinstance(q, AffineKBitQuantize):  # w and b are read as tensors: two get_attr nodes
            targets = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
            values = [functools.reduce(getattr, name.split("."), gm) for name in targets]
            assert [v.item() for v in values] == [q.w.item(), q.b.item()]
            allowed.add("get_attr")
        assert ops <= allowed and "call_function" in ops

    @pytest.mark.parametrize("q", ALL_CASES, ids=case_id)
    @pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
    def test_traced_inference_equals_eval_forward_bit_for_bit(self, q, grad_enabled):
        gm = traced(q)
        with torch.set_grad_enabled(grad_enabled):
            for dtype in FLOAT_DTYPES:
                for x in inputs_for(q, dtype):
                    expected = q.eval()(x)
                    exact(gm(x), expected.detach())
                    exact(q.inference(x), expected.detach())

    @pytest.mark.parametrize("q", ALL_CASES, ids=case_id)
    def test_traces_as_a_bound_method_of_a_foreign_module(self, q):
        # convert traces a wrapper holding only ``q.inference``: q is not a submodule of the root
        class Call(torch.nn.Module):
            def __init__(self, fn) -> None:
                super().__init__()
                self.fn = fn

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.fn(x)

        gm = torch.fx.symbolic_trace(Call(q.eval().inference))
        assert {n.op for n in gm.graph.nodes} <= {"placeholder", "output", "call_function",
                                                  "call_method", "get_attr"}
        for node in gm.graph.nodes:  # constants (Affine's w and b) are plain buffers of gm
            if node.op == "get_attr":
                assert not isinstance(gm.get_buffer(str(node.target)), torch.nn.Parameter)
        for dtype in (torch.float16, torch.float32):
            for x in inputs_for(q, dtype):
                exact(gm(x), q(x).detach())

    def test_negative_zero_and_nan_survive_like_the_forward(self):
        gm = traced(DoReFa(2))
        y = gm(t([-0.0, NAN, 0.5, 1.0]))
        exact(y, t([-0.0, NAN, grid(2, 3), 1.0]))
        assert math.copysign(1.0, y[0].item()) == -1.0

    def test_affine_keeps_float16_for_tensors_and_float32_for_zero_dim(self):
        gm = traced(AffineKBitQuantize(2, w=1.5, b=-0.25))
        assert gm(torch.ones(3, dtype=torch.float16)).dtype == torch.float16
        assert gm(torch.tensor(1.0, dtype=torch.float16)).dtype == torch.float32

    def test_affine_inference_reads_the_current_learned_values(self):
        q = AffineKBitQuantize(2)
        gm = traced(q)
        with torch.no_grad():
            q.w.fill_(2.0)
            q.b.fill_(-1.0)
        exact(gm(t([0.0, 1 / 3, 1.0])), t([-1.0, 2 * grid(1, 3) - 1, 1.0]))

    @pytest.mark.parametrize("q", [ClampByLinear(), DoReFa(2, "weights")], ids=case_id)
    def test_empty_input_raises_where_the_forward_returns_empty(self, q):
        # documented limitation: aminmax has no identity; the forward special-cases empty input
        x = torch.empty(0, 4)
        assert q(x).shape == (0, 4)
        with pytest.raises(RuntimeError, match="aminmax"):
            q.inference(x)  # eager: the traced module would print FX's slow error report

    @pytest.mark.parametrize(
        ("q", "x"),
        [(KBitQuantize(16), [0.0, 0.5, 1.0]),  # 2**16 - 1 overflows float16: n = inf
         (StepQuantize(1e-8), [0.0, 0.5, 1.0])],  # 1e-8 vanishes in float16: step = 0
    )
    def test_dtype_dependent_settings_give_nan_where_the_forward_raises(self, q, x):
        # documented limitation: the dtype is unknown when tracing, so the checks are not repeated
        x16 = t(x, torch.float16)
        with pytest.raises(ValueError):
            q(x16)
        assert torch.isnan(traced(q)(x16)).all()

    def test_bad_mode_raises_at_trace_time(self):
        q = DoReFa(2)
        q.mode = "bits"
        with pytest.raises(ValueError, match="mode"):
            traced(q)


CONFIG_CASES = [
    (RoundSTE(), {}), (CeilSTE(), {}), (FloorSTE(), {}),
    (ClampSTE(-1, 2.5), {"min_value": -1.0, "max_value": 2.5}),
    (ClampSTE(-INF, 0.0), {"min_value": -INF, "max_value": 0.0}),
    (StepQuantize(0.1), {"step": 0.1}),
    (KBitQuantize(5), {"k": 5}),
    (AffineKBitQuantize(3, w=0.5, b=-0.25), {"k": 3, "w": 0.5, "b": -0.25, "learnable": True}),
    (AffineKBitQuantize(2, w=2, b=1, learnable=False),
     {"k": 2, "w": 2.0, "b": 1.0, "learnable": False}),
    (ClampByLinear(1e-3), {"eps": 1e-3}),
    (DoReFa(3), {"k_bit": 3, "mode": "activations"}),
    (DoReFa(1, "weights"), {"k_bit": 1, "mode": "weights"}),
]


class TestConfigAndIdentity:
    @pytest.mark.parametrize("q", ALL_CASES, ids=case_id)
    def test_no_forward_is_an_identity(self, q):
        assert q.forward_is_identity() is False

    @pytest.mark.parametrize(("q", "expected"), CONFIG_CASES, ids=lambda v: "")
    def test_config_is_plain_and_rebuilds_an_equal_quantizer(self, q, expected):
        config = q.get_config()
        assert config == expected
        assert all(type(v) in (int, float, str, bool) for v in config.values())
        for rebuilt in (type(q)(**config), base.get(q.name, **config)):
            assert type(rebuilt) is type(q) and rebuilt.get_config() == config
            for dtype in FLOAT_DTYPES:
                x = edge_values(dtype)
                x = x[torch.isfinite(x)] if isinstance(q, (ClampByLinear, DoReFa)) else x
                exact(rebuilt(x).detach(), q(x).detach())

    @pytest.mark.parametrize("learnable", [True, False])
    def test_affine_config_carries_the_current_scale_and_offset(self, learnable):
        q = AffineKBitQuantize(2, learnable=learnable)
        with torch.no_grad():
            q.w.fill_(0.7)  # not a float32 number: stored as float32's 0.699999988...
            q.b.fill_(-0.3)
        config = q.get_config()
        assert config == {"k": 2, "w": float(np.float32(0.7)), "b": float(np.float32(-0.3)),
                          "learnable": learnable}
        rebuilt = AffineKBitQuantize(**config)
        x = seeded(50)
        exact(rebuilt(x).detach(), q(x).detach())
        assert rebuilt.get_config() == config


@pytest.mark.parametrize(
    ("module", "text"),
    [
        (ClampSTE(-1.0, 2.0), "min_value=-1.0, max_value=2.0"),
        (StepQuantize(0.5), "step=0.5"),
        (KBitQuantize(4), "k=4"),
        (AffineKBitQuantize(2, w=1.5, b=-0.5), "k=2, w=1.5, b=-0.5, learnable=True"),
        (ClampByLinear(), "eps=1e-05"),
        (DoReFa(3, "weights"), "k_bit=3, mode='weights'"),
    ],
)
def test_repr_shows_the_settings(module, text):
    assert text in repr(module)


def test_public_names():
    assert set(kbit.__all__) == {
        "round_ste", "ceil_ste", "floor_ste", "clamp_ste", "step_quantize", "k_bit_quantize",
        "affine_k_bit_quantize", "clamp_by_linear", "dorefa", "RoundSTE", "CeilSTE", "FloorSTE",
        "ClampSTE", "StepQuantize", "KBitQuantize", "AffineKBitQuantize", "ClampByLinear",
        "DoReFa",
    }
