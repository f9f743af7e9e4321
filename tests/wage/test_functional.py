"""shift, C, QW, QG against QPyTorch's WAGE formulas (written out here) and the reference values."""

import math

import pytest
import torch

from fxquant.wage import QG, QW, C, shift
from tests.helpers import FLOAT_DTYPES, INF, NAN, exact, t


def qpytorch_shift(x):
    """QPyTorch examples/WAGE/wage_qtorch.py::shift, verbatim (valid for non-zero x)."""
    max_entry = x.abs().max()
    return x / 2.0 ** torch.ceil(torch.log2(max_entry))


def round_grid(v, fl):
    return torch.round(v * 2.0**fl) / 2.0**fl


class TestShift:
    @pytest.mark.parametrize(
        ("x", "expected"),
        [
            ([0.3, -0.7], [0.3, -0.7]),  # max 0.7: ceil(log2) = 0
            ([3.0, -1.0], [0.75, -0.25]),  # divide by 4
            ([0.1, 0.05], [0.8, 0.4]),  # divide by 1/8
            ([-4.0, 1.0], [-1.0, 0.25]),  # a power-of-two max maps exactly to 1
            ([0.5, 0.25], [1.0, 0.5]),
            ([2.0**-130, 2.0**-131], [1.0, 0.5]),  # subnormal maximum
        ],
    )
    def test_literal_vectors(self, x, expected):
        exact(shift(t(x)), t(expected))

    def test_random_matches_qpytorch_formula(self):
        gen = torch.Generator().manual_seed(0)
        for scale in (1e-30, 1e-3, 0.7, 1.0, 3.0, 1e20):
            x = torch.randn(1000, generator=gen) * scale
            out = shift(x)
            exact(out, qpytorch_shift(x))
            biggest = out.abs().max().item()
            assert 0.5 < biggest <= 1.0

    def test_float32_log2_rounding_is_reproduced(self):
        # log2(16 * (1 + 2**-23)) rounds to 4.0 in float32, so QPyTorch divides by 16, not 32.
        x = t([16 * (1 + 2**-23), 3.0])
        exact(shift(x), qpytorch_shift(x))
        assert shift(x)[0].item() > 1.0

    def test_all_zero_gives_zeros_not_nan(self):
        out = shift(t([0.0, -0.0, 0.0]))
        exact(out, t([0.0, -0.0, 0.0]))
        assert torch.signbit(out[1])

    def test_nan_gives_nan_everywhere(self):
        exact(shift(t([NAN, 1.0, 0.0])), t([NAN, NAN, NAN]))

    def test_inf_gives_nan_there_and_zeros_elsewhere(self):
        exact(shift(t([INF, 1.0, -3.0])), t([NAN, 0.0, -0.0]))

    def test_gradient_is_upstream_over_the_power_of_two(self):
        x = t([0.5, -3.0, 1.0]).requires_grad_()
        g = t([1.0, -2.0, 0.5])
        shift(x).backward(g)
        exact(x.grad, g / 4)

    def test_gradient_of_all_zero_input_is_finite(self):
        x = torch.zeros(4, requires_grad=True)
        shift(x).backward(torch.ones(4))
        exact(x.grad, torch.ones(4))

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept(self, dtype):
        x = t([6.0, -1.0, 0.5], dtype)
        out = shift(x)
        assert out.dtype == dtype
        exact(out, t([0.75, -0.125, 0.0625], dtype))

    def test_float16_large_maximum_does_not_overflow(self):
        x = t([60000.0, 1.0], torch.float16)  # 2**16 overflows float16
        exact(shift(x), (x.float() / 65536).half())

    def test_empty(self):
        assert shift(torch.empty(0)).shape == (0,)

    def test_integer_input_raises_type_error(self):
        with pytest.raises(TypeError, match="shift"):
            shift(torch.ones(3, dtype=torch.int64))


class TestC:
    @pytest.mark.parametrize(
        ("bits", "bound"),
        [(1, 1.0), (2, 0.5), (3, 0.75), (8, 127 / 128), (15, 1 - 2.0**-14), (16, 1.0), (32, 1.0)],
    )
    def test_bounds(self, bits, bound):
        x = t([-5.0, -1.0, -0.3, 0.0, 0.3, 1.0, 5.0, NAN])
        exact(C(x, bits), t([-bound, -bound, -0.3, 0.0, 0.3, bound, bound, NAN]))

    def test_gradient_is_clamp_gradient_on_closed_range(self):
        x = t([-0.75, -0.5, 0.2, 0.5, torch.nextafter(t(0.5), t(1.0)).item()]).requires_grad_()
        C(x, 2).backward(torch.ones(5))
        exact(x.grad, t([0.0, 1.0, 1.0, 1.0, 0.0]))

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept(self, dtype):
        assert C(torch.ones(3, dtype=dtype) * 2, 8).dtype == dtype

    @pytest.mark.parametrize("bits", [0, -1, 2.0, True])
    def test_bad_bits(self, bits):
        with pytest.raises(ValueError, match="bits"):
            C(torch.ones(3), bits)


class TestQW:
    @pytest.mark.parametrize(
        ("x", "expected"),
        [
            # 2 bits: {-0.5, 0, 0.5}; 0.25 -> 0 (half to even), 0.75 -> 0.5 after clamping.
            ([0.25, 0.75, -0.75, 0.26, -0.25, 1.0, -0.0, NAN, INF],
             [0.0, 0.5, -0.5, 0.5, -0.0, 0.5, -0.0, NAN, 0.5]),
        ],
    )
    def test_two_bit_literals(self, x, expected):
        exact(QW(t(x), 2), t(expected))

    @pytest.mark.parametrize(("scale", "divisor"), [(1.0, 1.0), (1.8, 1.0), (2.0, 2.0), (16, 16.0),
                                                     (32.0, 32.0), (0.5, 1.0)])
    def test_divides_by_scale_only_above_1_8(self, scale, divisor):
        x = t([0.3, -0.9, 0.1])
        exact(QW(x, 2, scale), t([0.5, -0.5, 0.0]) / divisor)

    @pytest.mark.parametrize("bits", [2, 3, 8, 12])
    def test_random_matches_oracle(self, bits):
        gen = torch.Generator().manual_seed(bits)
        x = torch.randn(2000, generator=gen)
        sigma = 2.0 ** -(bits - 1)
        want = torch.clamp(round_grid(x, bits - 1), -1 + sigma, 1 - sigma)
        exact(QW(x, bits), want)
        exact(QW(x, bits, scale=4.0), want / 4)

    def test_one_bit_is_all_zero(self):
        exact(QW(t([0.9, -0.9, 0.2]), 1), t([0.0, 0.0, 0.0]))

    def test_no_gradient(self):
        w = torch.randn(5, requires_grad=True)
        assert not QW(w, 2).requires_grad

    def test_stochastic_reproducible_and_on_grid(self):
        x = torch.rand(500) * 2 - 1
        a = QW(x, 4, mode="stochastic", generator=torch.Generator().manual_seed(1))
        b = QW(x, 4, mode="stochastic", generator=torch.Generator().manual_seed(1))
        exact(a, b)
        assert bool((a * 8 == torch.round(a * 8)).all()) and a.abs().max() <= 7 / 8

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept(self, dtype):
        assert QW(torch.rand(4, dtype=dtype), 2, 2.0).dtype == dtype

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [({"bits": 0}, "bits"), ({"bits": 2, "scale": 0.0}, "scale"),
         ({"bits": 2, "scale": math.inf}, "scale"), ({"bits": 2, "mode": "up"}, "rounding")],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            QW(torch.ones(3), **kwargs)


class TestQG:
    def test_literal_lr8_bits8(self):
        # shift divides by 1 (max 1); R(8 * s) / 128.
        x = t([1.0, 0.5, -0.25, 0.0625, 0.0, -0.8])
        exact(QG(x, 8, 8.0), t([8.0, 4.0, -2.0, 0.0, 0.0, -6.0]) / 128)

    def test_lr1_gives_three_levels(self):
        x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
        x = torch.cat([x, t([3.5, -3.0])])  # shift divides by 4: 0.875 and -0.75 round to +-1
        values = set(QG(x, 8, 1.0).unique().tolist())
        assert values == {-1 / 128, 0.0, 1 / 128}

    @pytest.mark.parametrize("lr", [0.1, 0.125])
    def test_small_lr_gives_zeros(self, lr):
        x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
        exact(QG(x, 8, lr), torch.zeros(1000))

    @pytest.mark.parametrize(("bits_G", "lr"),
                             [(8, 8.0), (8, 0.3), (4, 1.5), (12, 3.0), (8, 1000.0)])
    def test_random_matches_qpytorch_order_of_operations(self, bits_G, lr):
        gen = torch.Generator().manual_seed(bits_G)
        x = torch.randn(3000, generator=gen) * 0.01
        lr_scaled = lr / 2.0 ** (bits_G - 1)
        want = round_grid(lr_scaled * qpytorch_shift(x), bits_G - 1)  # no clamp
        exact(QG(x, bits_G, lr), want)

    def test_no_clamp_updates_can_exceed_one(self):
        assert QG(t([1.0, -1.0]), 8, 1000.0).tolist() == [7.8125, -7.8125]  # R(1000) / 128

    def test_all_zero_gives_zeros_and_nan_gives_nan(self):
        exact(QG(torch.zeros(3), 8, 8.0), torch.zeros(3))
        exact(QG(t([NAN, 1.0]), 8, 8.0), t([NAN, NAN]))

    def test_stochastic_reproducible(self):
        x = torch.randn(200)
        a = QG(x, 8, 1.0, mode="stochastic", generator=torch.Generator().manual_seed(2))
        b = QG(x, 8, 1.0, mode="stochastic", generator=torch.Generator().manual_seed(2))
        exact(a, b)
        assert set(a.unique().tolist()) <= {-1 / 128, 0.0, 1 / 128}

    def test_no_gradient(self):
        assert not QG(torch.randn(3, requires_grad=True), 8, 8.0).requires_grad

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept(self, dtype):
        assert QG(torch.randn(5, dtype=dtype), 8, 8.0).dtype == dtype

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [({"bits_G": 0, "lr": 1.0}, "bits_G"), ({"bits_G": 8, "lr": 0.0}, "lr"),
         ({"bits_G": 8, "lr": -1.0}, "lr"), ({"bits_G": 8, "lr": math.nan}, "lr"),
         ({"bits_G": 8, "lr": 1.0, "mode": "x"}, "rounding")],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            QG(torch.ones(3), **kwargs)
