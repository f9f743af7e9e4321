"""truncated_normal_, scale_limit, wage_init_ (QPyTorch wage_initializer.py, xbtorch API)."""

import math

import pytest
import torch
from torch import nn

from fxquant.wage import scale_limit, truncated_normal_, wage_init_
from tests.helpers import FLOAT_DTYPES


class TestTruncatedNormal:
    @pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (1.0, 0.5), (-3.0, 0.01), (0.5, 1e-3)])
    def test_values_strictly_inside_two_std(self, mean, std):
        x = torch.empty(200_000)
        out = truncated_normal_(x, mean, std, generator=torch.Generator().manual_seed(0))
        assert out is x
        lo, hi = mean - 2 * std, mean + 2 * std
        assert x.double().min().item() > lo and x.double().max().item() < hi

    def test_moments_of_the_truncated_distribution(self):
        # N(0, 1) truncated to (-2, 2): mean 0, std = sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)) = 0.8796.
        x = truncated_normal_(torch.empty(200_000), generator=torch.Generator().manual_seed(1))
        phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
        mass = math.erf(2 / math.sqrt(2))
        want_std = math.sqrt(1 - 4 * phi2 / mass)
        assert abs(x.mean().item()) < 0.01
        assert abs(x.std().item() - want_std) < 0.01

    def test_same_generator_seed_same_values(self):
        a = truncated_normal_(torch.empty(3, 4), generator=torch.Generator().manual_seed(9))
        b = truncated_normal_(torch.empty(3, 4), generator=torch.Generator().manual_seed(9))
        c = truncated_normal_(torch.empty(3, 4), generator=torch.Generator().manual_seed(10))
        assert torch.equal(a, b) and not torch.equal(a, c)

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_and_shape_kept(self, dtype):
        x = torch.empty(50, 7, dtype=dtype)
        truncated_normal_(x, 0.0, 1.0)
        assert x.dtype == dtype and x.shape == (50, 7)
        assert bool((x.abs() < 2).all())

    def test_non_contiguous_and_parameter(self):
        x = torch.zeros(20, 30).t()
        truncated_normal_(x)
        assert bool((x.abs() < 2).all()) and bool((x != 0).all())
        p = nn.Parameter(torch.empty(5, 5))
        truncated_normal_(p, 0.0, 0.1)
        assert p.requires_grad and bool((p.abs() < 0.2).all())

    def test_interval_without_any_value_of_the_dtype_raises(self):
        # float16 has no value strictly between 1 + 2**-11 -+ 2e-5 (its spacing at 1 is 2**-10).
        with pytest.raises(RuntimeError, match="truncated_normal_"):
            truncated_normal_(torch.empty(10, dtype=torch.float16), 1 + 2**-11, 1e-5)

    @pytest.mark.parametrize(("kwargs", "match"), [({"std": 0.0}, "std"), ({"std": -1.0}, "std"),
                                                   ({"mean": math.nan}, "mean"),
                                                   ({"std": math.inf}, "std")])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            truncated_normal_(torch.empty(3), **kwargs)

    def test_integer_tensor_raises_type_error(self):
        with pytest.raises(TypeError, match="truncated_normal_"):
            truncated_normal_(torch.empty(3, dtype=torch.int64))


class TestScaleLimit:
    @pytest.mark.parametrize(
        ("fan_in", "scale"),
        [(27, 2.0), (1024, 16.0), (1152, 16.0), (2304, 16.0), (3456, 32.0), (4608, 32.0),
         (8192, 32.0)],
    )
    def test_reference_table_two_bits_factor_one(self, fan_in, scale):
        p = torch.empty(1)
        limit = scale_limit(p, math.sqrt(3.0 / fan_in), 2)
        assert limit == 0.75
        assert p.weight_scale == scale and isinstance(p.weight_scale, float)

    def test_float_limit_wins_and_scale_is_at_least_one(self):
        # bits_W=8: Wm = 1.5/128; limit 0.5 > Wm; 2**round(log2(Wm / 0.5)) = 2**-5 -> 1.0.
        p = torch.empty(1)
        assert scale_limit(p, 0.5, 8) == 0.5
        assert p.weight_scale == 1.0

    @pytest.mark.parametrize(("log2_ratio", "scale"), [(1.4, 2.0), (1.6, 4.0), (3.49, 8.0),
                                                       (3.51, 16.0), (-0.6, 1.0), (0.49, 1.0)])
    def test_scale_is_the_nearest_power_of_two_of_wm_over_limit(self, log2_ratio, scale):
        p = torch.empty(1)
        scale_limit(p, 0.75 / 2**log2_ratio, 2)
        assert p.weight_scale == scale

    @pytest.mark.parametrize(("limit", "bits_W", "match"), [(0.0, 2, "limit"), (-1.0, 2, "limit"),
                                                            (0.1, 0, "bits_W")])
    def test_bad_arguments(self, limit, bits_W, match):
        with pytest.raises(ValueError, match=match):
            scale_limit(torch.empty(1), limit, bits_W)


class TestWageInit:
    @pytest.mark.parametrize(
        ("shape", "scale"),
        [((16, 3, 3, 3), 2.0), ((8, 128, 3, 3), 16.0), ((4, 512, 3, 3), 32.0), ((10, 8192), 32.0),
         ((6, 1024), 16.0)],
    )
    def test_vgg7lp_scales_and_uniform_range(self, shape, scale):
        w = torch.empty(shape)
        got = wage_init_(w, 2, factor=1.0, generator=torch.Generator().manual_seed(0))
        assert got == scale and w.weight_scale == scale
        assert w.abs().max().item() <= 0.75
        assert w.abs().max().item() > 0.7  # spread over the whole [-0.75, 0.75]

    def test_default_factor_two(self):
        # fan_in 27: limit sqrt(6/27) = 0.471 < Wm = 0.75; scale 2**round(log2(1.59)) = 2.
        w = torch.empty(64, 3, 3, 3)
        assert wage_init_(w, 2) == 2.0

    def test_float_limit_used_when_larger(self):
        # bits_W=8, fan_in 4: limit sqrt(6/4) = 1.22 > Wm = 1.5/128.
        w = torch.empty(5000, 4)
        assert wage_init_(w, 8, generator=torch.Generator().manual_seed(0)) == 1.0
        limit = math.sqrt(6 / 4)
        assert w.abs().max().item() <= limit and w.abs().max().item() > 0.95 * limit

    def test_generator_reproducible_and_parameter_kept(self):
        a = nn.Parameter(torch.empty(4, 6))
        b = nn.Parameter(torch.empty(4, 6))
        wage_init_(a, 2, generator=torch.Generator().manual_seed(3))
        wage_init_(b, 2, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.requires_grad and a.weight_scale == b.weight_scale

    def test_mode_other_than_fan_in_is_not_implemented(self):
        with pytest.raises(NotImplementedError, match="fan_in"):
            wage_init_(torch.empty(3, 3), 2, mode="fan_out")

    @pytest.mark.parametrize("shape", [(5,), ()])
    def test_fewer_than_two_dims_raise(self, shape):
        with pytest.raises(ValueError, match="2 dimensions"):
            wage_init_(torch.empty(shape), 2)

    def test_zero_fan_in_and_bad_factor_raise(self):
        with pytest.raises(ValueError, match="fan_in"):
            wage_init_(torch.empty(3, 0), 2)
        with pytest.raises(ValueError, match="factor"):
            wage_init_(torch.empty(3, 3), 2, factor=0.0)

    def test_integer_tensor_raises_type_error(self):
        with pytest.raises(TypeError, match="wage_init_"):
            wage_init_(torch.empty(3, 3, dtype=torch.int32), 2)
