"""Tests for fxquant.quantizers.sign: the binary sign family and ProgressiveSign.

Every expectation comes from an independent oracle: a closed-form formula written here, or a
literal vector from the reference document (larq/bitorch tests, reference §1.13, §2.7, §8, §10).
"""

import operator

import pytest
import torch

from fxquant.quantizers import (
    ApproxSign,
    MagnitudeAwareSign,
    ProgressiveSign,
    SteHeaviside,
    SteSign,
    SwishSign,
    approx_sign,
    get,
    get_progressive_sign_scale,
    magnitude_aware_sign,
    set_progressive_sign_scale,
    ste_heaviside,
    ste_sign,
    swish_sign,
)
from fxquant.quantizers._common import sign_source
from fxquant.quantizers.sign import default_transform
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

BITORCH_X = [-1.5, -1.0, -0.3, 0.0, 0.3, 1.0, 1.5]


# ------------------------------------------------------------------------------------------------
# helpers (independent oracles and small utilities)


def tiny(dtype):
    """The smallest positive subnormal of ``dtype``."""
    return up(0.0, dtype)


def edge_values(dtype):
    """Zeros of both signs, ±1 and one ulp either side, subnormals, huge values, ±inf and NaN."""
    big = torch.finfo(dtype).max
    values = [-INF, -big, down(-1.0, dtype), -1.0, up(-1.0, dtype), -0.3, -tiny(dtype), -0.0, 0.0,
              tiny(dtype), 0.3, down(1.0, dtype), 1.0, up(1.0, dtype), big, INF, NAN]
    return torch.tensor(values, dtype=dtype)


def sign_oracle(x):
    """-1 for x < 0, +1 for x >= 0 (both zeros), NaN for NaN."""
    out = torch.where(x < 0, -1.0, 1.0).to(x.dtype)
    return torch.where(torch.isnan(x), x, out)


def select_oracle(window, g):
    """g where the window is open, +0 elsewhere."""
    return torch.where(window, g, torch.zeros((), dtype=g.dtype))


# ste_sign's two ways of keeping what backward needs, which must give the same gradient
SAVING_MODES = {
    "mask": lambda t: ste_sign(t * 1.0),  # an activation: a one-byte mask
    "input": ste_sign,  # a leaf: the input itself
    "forced mask": lambda t: ste_sign(t, save_input=False),
    "forced input": lambda t: ste_sign(t * 1.0, save_input=True),
}


def saved_tensors_of(fn, x):
    """The tensors autograd saves while running ``fn`` on ``x``."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = x.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved, x


def random_with_zeros(seed=0, shape=(4, 10)):
    """larq's generate_real_values_with_zeros: U(-2, 2) with a column of zeros at index 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 4 - 2
    x[:, 1] = 0.0
    return x


def assert_positive_zero(t, where):
    assert not torch.signbit(t[where]).any(), "expected +0, found -0"


@pytest.fixture
def global_scale():
    """Restore the process-wide ProgressiveSign scale after the test."""
    before = get_progressive_sign_scale()
    yield
    set_progressive_sign_scale(before)


# ------------------------------------------------------------------------------------------------
# behaviour shared by every quantizer in the module

ALL = {
    "ste_sign": (SteSign, ste_sign, 1),
    "approx_sign": (ApproxSign, approx_sign, 1),
    "swish_sign": (SwishSign, swish_sign, 1),
    "magnitude_aware_sign": (MagnitudeAwareSign, magnitude_aware_sign, 1),
    "ste_heaviside": (SteHeaviside, ste_heaviside, 1),
    "progressive_sign": (ProgressiveSign, None, 1),
}


class TestCommon:
    @pytest.mark.parametrize(("name", "cls", "bits"),
                             [(n, c, b) for n, (c, _, b) in ALL.items()])
    def test_registry_name_gives_class_and_bits(self, name, cls, bits):
        q = get(name)
        assert type(q) is cls
        assert q.name == name
        assert q.bits == bits

    @pytest.mark.parametrize("name", list(ALL))
    def test_get_instance_returns_equal_copy(self, name):
        original = get(name)
        copy = get(original)
        assert copy is not original and type(copy) is type(original)
        x = random_with_zeros(3)
        exact(copy(x), original(x))

    @pytest.mark.parametrize("name", [n for n, (_, f, _) in ALL.items() if f is not None])
    def test_module_equals_function(self, name):
        cls, fn, _ = ALL[name]
        x = random_with_zeros(4)
        out_m, grad_m = forward_backward(cls(), x, upstream=x + 0.5)
        out_f, grad_f = forward_backward(fn, x, upstream=x + 0.5)
        exact(out_m, out_f)
        exact(grad_m, grad_f)

    @pytest.mark.parametrize("name", list(ALL))
    @pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
    def test_integer_and_bool_inputs_raise_type_error_naming_quantizer(self, name, dtype):
        q = get(name)
        label = "ProgressiveSign" if name == "progressive_sign" else name
        with pytest.raises(TypeError, match=label):
            q(torch.ones(3, dtype=dtype))

    @pytest.mark.parametrize("name", list(ALL))
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_output_and_gradient_keep_dtype(self, name, dtype):
        x = torch.tensor([[-0.5, 0.0, 0.25, 2.0]], dtype=dtype)
        out, grad = forward_backward(get(name), x)
        assert out.dtype == dtype and grad.dtype == dtype
        assert out.shape == x.shape

    @pytest.mark.parametrize("name", ["ste_sign", "approx_sign", "swish_sign", "ste_heaviside"])
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_binary_forward_matches_oracle_on_edge_values(self, name, dtype):
        x = edge_values(dtype)
        out = get(name)(x)
        if name == "ste_heaviside":
            expected = torch.where(torch.isnan(x), x, (x > 0).to(dtype))
        else:
            expected = sign_oracle(x)
        exact(out, expected)

    @pytest.mark.parametrize("cls", [SteSign, MagnitudeAwareSign, SteHeaviside])
    @pytest.mark.parametrize("clip_value", [-1.0, -1e-30, NAN, "1", True, torch.tensor(1.0)])
    def test_bad_clip_value_raises_value_error(self, cls, clip_value):
        with pytest.raises(ValueError, match="clip_value"):
            cls(clip_value=clip_value)

    @pytest.mark.parametrize("fn", [ste_sign, magnitude_aware_sign, ste_heaviside])
    def test_function_rejects_negative_clip(self, fn):
        with pytest.raises(ValueError, match=fn.__name__):
            fn(torch.ones(2), clip_value=-0.5)

    @pytest.mark.parametrize(("module", "text"), [
        (SteSign(), "bits=1, clip_value=1.0"),
        (SteSign(clip_value=None), "bits=1, clip_value=None"),
        (SwishSign(beta=10), "bits=1, beta=10.0"),
        (MagnitudeAwareSign(0.5), "bits=1, clip_value=0.5"),
        (SteHeaviside(2), "bits=1, clip_value=2.0"),
        (ApproxSign(), "bits=1"),
    ])
    def test_extra_repr_shows_arguments(self, module, text):
        assert module.extra_repr() == text

    @pytest.mark.parametrize("name", list(ALL))
    def test_no_parameters_or_buffers(self, name):
        q = get(name)
        assert list(q.parameters()) == [] and list(q.buffers()) == []
        assert q.state_dict() == {}


# ------------------------------------------------------------------------------------------------
# ste_sign


class TestSteSign:
    @pytest.mark.parametrize(("value", "expected"), [
        (0.0, 1.0), (-0.0, 1.0), (-1.4e-45, -1.0), (1.4e-45, 1.0), (NAN, NAN),
        (INF, 1.0), (-INF, -1.0), (-3e38, -1.0), (1.0, 1.0), (-1.0, -1.0),
    ])
    def test_forward_values(self, value, expected):
        exact(ste_sign(torch.tensor([value])), torch.tensor([expected]))

    def test_plus_minus_one_are_fixed_points(self):
        x = torch.tensor([-1.0, 1.0, 1.0, -1.0])
        exact(ste_sign(x), x)

    def test_random_with_zeros_has_no_zeros(self):
        x = random_with_zeros()
        y = ste_sign(x)
        assert not (y == 0).any()
        exact(y, torch.where(x < 0, -1.0, 1.0))

    def test_all_zero_input_gives_all_ones(self):
        exact(ste_sign(torch.zeros(5)), torch.ones(5))

    @pytest.mark.parametrize("mode", SAVING_MODES)
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_gradient_window_is_closed_and_shut_at_nan_inf(self, dtype, mode):
        x = edge_values(dtype)
        _, grad = forward_backward(SAVING_MODES[mode], x)
        expected = (x.abs() <= 1).to(dtype)
        exact(grad, expected)
        assert grad[x.tolist().index(1.0)] == 1 and grad[x.tolist().index(up(1.0, dtype))] == 0

    @pytest.mark.parametrize(("clip_value", "dtype"), [
        (0.5, torch.float32), (0.1, torch.float32), (0.1, torch.float16), (0.1, torch.bfloat16),
        (0.1, torch.float64), (3.0, torch.float32), (0.0, torch.float32), (INF, torch.float32),
    ])
    @pytest.mark.parametrize("save_input", [True, False])
    def test_clip_value_compared_in_input_dtype(self, clip_value, dtype, save_input):
        c = torch.tensor(clip_value, dtype=dtype).item()  # clip rounded to x's dtype
        values = [c, -c, down(c, dtype), -down(c, dtype), up(c, dtype), -up(c, dtype), 0.0, -0.0]
        x = torch.tensor(values, dtype=dtype)
        _, grad = forward_backward(lambda t: ste_sign(t, clip_value, save_input=save_input), x)
        exact(grad, (x.abs() <= c).to(dtype))

    @pytest.mark.parametrize("mode", SAVING_MODES)
    def test_random_upstream_selected_exactly(self, mode):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1000, generator=gen) * 1.5
        g = torch.randn(1000, generator=gen)
        g[::97] = INF
        g[5::89] = -INF
        g[7::83] = NAN
        g[11::50] = -0.0
        _, grad = forward_backward(SAVING_MODES[mode], x, upstream=g)
        window = x.abs() <= 1
        exact(grad, select_oracle(window, g))
        assert_positive_zero(grad, ~window)  # shut window gives +0, never -0 or inf*0 = NaN
        assert torch.signbit(grad[window & torch.signbit(g) & (g == 0)]).all()  # -0 passes through

    def test_clip_none_is_bitorch_identity_gradient(self):
        x = torch.tensor([-3.0, -1.5, -1.0, 0.0, 0.3, 1.0, 3.0, INF, -INF, NAN])
        g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, INF, -2.0, 8.0])
        _, grad = forward_backward(lambda t: ste_sign(t, clip_value=None), x, upstream=g)
        exact(grad, g)

    def test_bitorch_sign_table(self):
        """bitorch test_quantizations: Sign, upstream = x, expected grad = x * 1."""
        x = torch.tensor(BITORCH_X)
        out, grad = forward_backward(lambda t: ste_sign(t, None), x, upstream=x)
        exact(out, torch.tensor([-1.0, -1, -1, 1, 1, 1, 1]))
        exact(grad, x)

    def test_larq_ste_grad(self):
        """larq test_ste_grad: 1 where |x| <= 1 else 0, inputs include zeros."""
        x = random_with_zeros(7)
        _, grad = forward_backward(ste_sign, x)
        exact(grad, torch.where(x.abs() <= 1, 1.0, 0.0))

    def test_an_activation_is_saved_as_a_bool_mask(self):
        saved, x = saved_tensors_of(lambda t: ste_sign(t * 1.0), torch.randn(64))
        assert len(saved) == 1
        assert saved[0].dtype == torch.bool

    def test_a_parameter_is_saved_as_itself(self):
        """A leaf that requires grad stays alive for its gradient anyway: no mask is made."""
        saved, x = saved_tensors_of(ste_sign, torch.randn(64))
        assert len(saved) == 1 and saved[0] is x

    def test_save_input_overrides_the_default(self):
        saved, _ = saved_tensors_of(lambda t: ste_sign(t * 1.0, save_input=True), torch.randn(8))
        assert len(saved) == 1 and saved[0].dtype == torch.float32
        saved, _ = saved_tensors_of(lambda t: ste_sign(t, save_input=False), torch.randn(8))
        assert len(saved) == 1 and saved[0].dtype == torch.bool

    def test_module_tags_its_output_with_the_input_it_keeps(self):
        h = torch.randn(8, requires_grad=True) * 1.0
        q = SteSign()
        assert q.sign_gradient(h) is None  # an activation: a mask, no source
        assert sign_source(q(h)) is None
        q.save_input = True
        source, gradient = sign_source(q(h))
        assert source is h
        g = torch.randn(8)
        d = h.detach()  # surrogates run inside backward, on tensors without autograd
        exact(gradient(d, g, torch.empty_like(d)), select_oracle(d.abs() <= 1, g))
        with torch.no_grad():
            assert sign_source(q(h)) is None  # nothing is kept without autograd

    def test_saves_nothing_without_window(self):
        saved, _ = saved_tensors_of(lambda t: ste_sign(t, None), torch.randn(64))
        assert saved == []

    def test_no_grad_forward_equals_grad_forward(self):
        x = edge_values(torch.float32)
        with torch.no_grad():
            y = ste_sign(x.clone().requires_grad_())
        exact(y, sign_oracle(x))

    def test_non_contiguous_input_and_expanded_upstream(self):
        gen = torch.Generator().manual_seed(2)
        base = torch.randn(6, 5, generator=gen) * 2
        x = base.t().requires_grad_()  # non-contiguous view
        ste_sign(x).sum().backward()  # upstream gradient is an expanded scalar
        exact(x.grad, (base.t().abs() <= 1).float())

    def test_double_backward_is_refused(self):
        x = torch.randn(4, requires_grad=True)
        (grad,) = torch.autograd.grad(ste_sign(x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            grad.sum().backward()


# ------------------------------------------------------------------------------------------------
# approx_sign


class TestApproxSign:
    def test_bitorch_table_factors(self):
        """Reference §8.3: factors [0, 0, 1.4, 2, 1.4, 0, 0]; bitorch upstream = x."""
        x = torch.tensor(BITORCH_X)
        out, grad = forward_backward(approx_sign, x, upstream=x)
        exact(out, torch.tensor([-1.0, -1, -1, 1, 1, 1, 1]))
        factors = torch.tensor([0.0, 0.0, 1.4, 2.0, 1.4, 0.0, 0.0])
        torch.testing.assert_close(grad, x * factors, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_gradient_closed_form(self, dtype):
        x = edge_values(dtype)
        gen = torch.Generator().manual_seed(3)
        g = torch.randn(x.shape, generator=gen).to(dtype)
        _, grad = forward_backward(approx_sign, x, upstream=g)
        window = x.abs() <= 1
        expected = select_oracle(window, (2 - 2 * x.abs()) * g)
        exact(grad, expected)

    def test_random_matches_larq_formula(self):
        """larq test_approx_sign_grad: (1 - |x|) * 2 for |x| <= 1 else 0."""
        x = random_with_zeros(5)
        _, grad = forward_backward(approx_sign, x)
        exact(grad, torch.where(x.abs() <= 1, (1 - x.abs()) * 2, 0.0))

    def test_outside_window_is_positive_zero_even_for_inf_upstream(self):
        x = torch.tensor([-1.5, 1.5, 3.0, INF, -INF, NAN, 1.0, -1.0])
        g = torch.tensor([-2.0, INF, -INF, 1.0, -1.0, INF, 5.0, 5.0])
        _, grad = forward_backward(approx_sign, x, upstream=g)
        exact(grad, torch.zeros(8))
        assert_positive_zero(grad, slice(None))

    def test_saves_the_input_itself_not_a_copy(self):
        saved, x = saved_tensors_of(approx_sign, torch.randn(32))
        assert len(saved) == 1 and saved[0] is x


# ------------------------------------------------------------------------------------------------
# swish_sign


def swish_factor(x, beta):
    """Reference formula in float64: beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))."""
    y = beta * x.double()
    return beta * (2 - y * torch.tanh(y / 2)) / (1 + torch.cosh(y))


class TestSwishSign:
    def test_reference_factors_beta_5(self):
        """Reference §1.4 / §8.4 (float32, derived)."""
        x = torch.tensor(BITORCH_X)
        out, grad = forward_backward(swish_sign, x)
        exact(out, torch.tensor([-1.0, -1, -1, 1, 1, 1, 1]))
        expected = torch.tensor([-0.03034, -0.19499, 1.56198, 5.0, 1.56198, -0.19499, -0.03034])
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5)

    def test_bitorch_table(self):
        """bitorch test_quantizations: SwishSign(5.0), upstream = x, atol 1e-3."""
        x = torch.tensor(BITORCH_X)
        _, grad = forward_backward(SwishSign(5.0), x, upstream=x)
        factors = torch.tensor([-0.03, -0.195, 1.562, 5, 1.562, -0.195, -0.03])
        torch.testing.assert_close(grad, x * factors, rtol=0, atol=1e-3)

    @pytest.mark.parametrize("beta", [0.5, 1.0, 5.0, 10.0, 37.0])
    def test_gradient_matches_closed_form(self, beta):
        gen = torch.Generator().manual_seed(4)
        x = torch.cat([torch.linspace(-30 / beta, 30 / beta, 2001),
                       torch.randn(2000, generator=gen) * 2, torch.tensor([0.0, -0.0])])
        g = torch.randn(x.shape, generator=gen)
        _, grad = forward_backward(lambda t: swish_sign(t, beta), x, upstream=g)
        expected = (swish_factor(x, beta) * g.double()).float()
        # float32 rounding: a few ulp of the largest |factor * g| (beta * max|g|)
        torch.testing.assert_close(grad, expected, rtol=0, atol=3e-7 * beta * g.abs().max().item())

    def test_gradient_at_zero_is_beta(self):
        x = torch.tensor([0.0, -0.0])
        _, grad = forward_backward(lambda t: swish_sign(t, 7.0), x)
        exact(grad, torch.tensor([7.0, 7.0]))

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_undefined_points_and_far_tail_give_zero(self, dtype):
        big = torch.finfo(dtype).max
        x = torch.tensor([INF, -INF, NAN, big, -big, 1e3], dtype=dtype)
        g = torch.tensor([1.0, -2.0, 3.0, 1.0, 1.0, 1.0], dtype=dtype)
        _, grad = forward_backward(swish_sign, x, upstream=g)
        exact(grad, torch.zeros(6, dtype=dtype))

    def test_beta_zero_gives_zero_gradient(self):
        x = torch.tensor([-1.0, 0.0, 0.5, INF])
        _, grad = forward_backward(lambda t: swish_sign(t, 0.0), x)
        exact(grad, torch.zeros(4))

    @pytest.mark.parametrize("beta", [-1.0, NAN, INF, "5", None])
    def test_bad_beta_raises_value_error(self, beta):
        with pytest.raises(ValueError, match="beta"):
            SwishSign(beta=beta)
        with pytest.raises(ValueError, match="swish_sign"):
            swish_sign(torch.ones(2), beta=beta)

    def test_saves_the_input_itself_not_a_copy(self):
        saved, x = saved_tensors_of(swish_sign, torch.randn(32))
        assert len(saved) == 1 and saved[0] is x


# ------------------------------------------------------------------------------------------------
# magnitude_aware_sign


class TestMagnitudeAwareSign:
    def test_conv_weight_scale_per_output_channel(self):
        gen = torch.Generator().manual_seed(5)
        w = torch.rand(8, 4, 3, 3, generator=gen) * 4 - 2
        w[0, 0, 0, 0] = 0.0
        y = magnitude_aware_sign(w)
        alpha = w.abs().mean(dim=(1, 2, 3))
        expected = alpha.view(8, 1, 1, 1) * torch.where(w < 0, -1.0, 1.0)
        torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)
        assert y[0, 0, 0, 0] > 0  # 0 -> +alpha
        torch.testing.assert_close(y.abs().mean(dim=(1, 2, 3)), alpha, rtol=1e-6, atol=0)

    def test_linear_weight_scale_per_row(self):
        w = torch.tensor([[1.0, -3.0], [0.5, 0.0], [-0.25, -0.25]])
        exact(magnitude_aware_sign(w),
              torch.tensor([[2.0, -2.0], [0.25, 0.25], [-0.25, -0.25]]))

    def test_larq_property_sign_preserved_and_shape_kept(self):
        gen = torch.Generator().manual_seed(6)
        a = torch.rand(3, 2, 2, 3, generator=gen) * 4 - 2
        y = magnitude_aware_sign(a)
        assert y.shape == a.shape
        exact(torch.sign(y), torch.sign(a))

    def test_gradient_is_alpha_times_window(self):
        gen = torch.Generator().manual_seed(7)
        w = torch.randn(5, 3, 2, 2, generator=gen)
        w[1, 0, 0, 0] = 1.0
        w[2, 0, 0, 0] = up(1.0, torch.float32)
        g = torch.randn(w.shape, generator=gen)
        _, grad = forward_backward(magnitude_aware_sign, w, upstream=g)
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = select_oracle(w.abs() <= 1, alpha * g)
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=0)
        assert grad[2, 0, 0, 0] == 0 and grad[1, 0, 0, 0] != 0

    def test_clip_none_gradient_is_alpha_times_upstream(self):
        w = torch.tensor([[3.0, -1.0], [0.5, -0.5]])
        _, grad = forward_backward(lambda t: magnitude_aware_sign(t, None), w)
        exact(grad, torch.tensor([[2.0, 2.0], [0.5, 0.5]]))

    def test_rank_one_degenerates_to_abs_scale(self):
        x = torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.75, 3.0])
        out, grad = forward_backward(magnitude_aware_sign, x)
        exact(out, torch.tensor([-2.0, -0.5, 0.0, 0.0, 0.75, 3.0]))
        exact(grad, torch.tensor([0.0, 0.5, 0.0, 0.0, 0.75, 0.0]))

    def test_nan_makes_only_its_channel_nan(self):
        w = torch.tensor([[1.0, NAN], [1.0, -3.0]])
        exact(magnitude_aware_sign(w), torch.tensor([[NAN, NAN], [2.0, -2.0]]))

    def test_infinite_alpha_keeps_shut_window_at_positive_zero(self):
        w = torch.tensor([[INF, 0.5], [1.0, -3.0]])
        _, grad = forward_backward(magnitude_aware_sign, w)
        exact(grad, torch.tensor([[0.0, INF], [2.0, 0.0]]))

    def test_saves_bool_mask_and_per_channel_alpha_only(self):
        saved, _ = saved_tensors_of(magnitude_aware_sign, torch.randn(8, 4, 3, 3))
        assert sorted(t.numel() for t in saved) == [8, 8 * 4 * 3 * 3]
        big = [t for t in saved if t.numel() > 8]
        assert all(t.dtype == torch.bool for t in big)


# ------------------------------------------------------------------------------------------------
# ste_heaviside


class TestSteHeaviside:
    @pytest.mark.parametrize(("value", "expected"), [
        (0.0, 0.0), (-0.0, 0.0), (1.4e-45, 1.0), (-1.4e-45, 0.0), (0.3, 1.0), (-0.3, 0.0),
        (INF, 1.0), (-INF, 0.0), (NAN, NAN),
    ])
    def test_forward_values(self, value, expected):
        exact(ste_heaviside(torch.tensor([value])), torch.tensor([expected]))

    def test_zeros_are_positive_zero(self):
        x = torch.tensor([-0.0, 0.0, -5.0, -1.4e-45])
        assert_positive_zero(ste_heaviside(x), slice(None))

    def test_larq_and_binarization(self):
        x = random_with_zeros(8)
        exact(ste_heaviside(x), (x > 0).float())
        exact(ste_heaviside(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))

    def test_gradient_window_symmetric_and_closed(self):
        x = edge_values(torch.float32)
        _, grad = forward_backward(ste_heaviside, x)
        exact(grad, (x.abs() <= 1).float())

    def test_clip_none_identity(self):
        x = torch.tensor([-5.0, 0.0, 5.0, NAN])
        g = torch.tensor([1.0, 2.0, 3.0, 4.0])
        _, grad = forward_backward(lambda t: ste_heaviside(t, None), x, upstream=g)
        exact(grad, g)

    def test_saves_only_a_bool_mask(self):
        saved, _ = saved_tensors_of(ste_heaviside, torch.randn(64))
        assert len(saved) == 1 and saved[0].dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# ProgressiveSign


def progressive_table(module, x, expected):
    """bitorch's check: output vs expected (atol 1e-6 here), upstream = x, gradient = x."""
    x = torch.tensor(x)
    out, grad = forward_backward(module, x, upstream=x)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=x.dtype), rtol=0, atol=1e-6)
    exact(grad, x)


class TestProgressiveSign:
    def test_bitorch_table_default_global_scale_zero(self, global_scale):
        set_progressive_sign_scale(0.0)
        progressive_table(ProgressiveSign(), BITORCH_X, [-1, -1, -0.3, 0, 0.3, 1, 1])

    def test_bitorch_table_scale_005(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.05)
        progressive_table(q, [-1.5, -1, -0.3, -0.1, 0, 0.1, 0.3, 1, 1.5],
                          [-1, -1, -0.6, -0.2, 0, 0.2, 0.6, 1, 1])

    def test_bitorch_table_scale_05(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.5)
        progressive_table(q, [-1.5, -1, -0.3, -0.1, -0.05, 0, 0.05, 0.1, 0.3, 1, 1.5],
                          [-1, -1, -1, -1, -1, 0, 1, 1, 1, 1, 1])

    def test_bitorch_table_custom_identity_transform(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.2,
                            custom_transform=lambda s: s)
        progressive_table(q, [-1.5, -1, -0.3, -0.1, 0, 0.1, 0.3, 1, 1.5],
                          [-1, -1, -0.375, -0.125, 0, 0.125, 0.375, 1, 1])

    def test_bitorch_sign_table_in_eval_mode(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.05).eval()
        progressive_table(q, BITORCH_X, [-1, -1, -1, 1, 1, 1, 1])

    def test_eval_is_sign_but_train_is_not_binary(self):
        q = ProgressiveSign(use_global_scaling=False)
        x = torch.tensor([-0.0, 0.0, 0.5, NAN])
        train = q.train()(x)
        exact(train, torch.tensor([0.0, 0.0, 0.5, NAN]))
        assert torch.signbit(train[0])  # -0 stays -0, as bitorch's hardtanh
        exact(q.eval()(x), torch.tensor([1.0, 1.0, 1.0, NAN]))

    @pytest.mark.parametrize("training", [True, False])
    def test_identity_gradient_everywhere(self, training):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.5).train(training)
        x = torch.tensor([-3.0, -1e-4, 0.0, 2.0, INF, NAN])
        g = torch.tensor([1.0, 2.0, 3.0, INF, 5.0, 6.0])
        _, grad = forward_backward(q, x, upstream=g)
        exact(grad, g)

    @pytest.mark.parametrize("training", [True, False])
    def test_saves_nothing(self, training):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.3).train(training)
        saved, _ = saved_tensors_of(q, torch.randn(16))
        assert saved == []

    @pytest.mark.parametrize(("scale", "alpha", "beta", "expected"), [
        (0.0, 4.0, 10.0, 0.0),
        (0.05, 4.0, 10.0, 0.5),
        (0.5, 4.0, 10.0, 1 - 4.0**-5),
        (1.0, 4.0, 10.0, 1 - 4.0**-10),
        (0.25, 2.0, 4.0, 0.5),
        (1.0, 4.0, 0.0, 0.0),
        (0.0, 0.0, 10.0, 0.0),
        (0.1, 0.0, 10.0, -INF),
    ])
    def test_default_transform(self, scale, alpha, beta, expected):
        assert default_transform(scale, alpha, beta) == expected

    def test_default_transform_defaults_are_alpha_4_beta_10(self):
        assert default_transform(0.05) == 0.5

    def test_divisor_floor_is_1e_minus_7(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=3.0)
        x = torch.tensor([1e-8, -2e-8, 1e-6])
        exact(q(x), torch.clamp(x / 1e-7, -1, 1))

    def test_global_scale_set_get_and_read_at_every_forward(self, global_scale):
        q = ProgressiveSign()
        x = torch.tensor([0.01, -0.3])
        set_progressive_sign_scale(0.05)
        assert get_progressive_sign_scale() == 0.05 and q.current_scale == 0.05
        exact(q(x), torch.tensor([0.02, -0.6]))
        set_progressive_sign_scale(0.5)
        exact(q(x), torch.tensor([1.0, -1.0]))

    def test_per_instance_scale_ignores_global_and_is_assignable(self, global_scale):
        set_progressive_sign_scale(0.5)
        q = ProgressiveSign(use_global_scaling=False)
        assert q.scale == 0.0 and q.current_scale == 0.0
        exact(q(torch.tensor([0.25])), torch.tensor([0.25]))
        q.scale = 0.05
        exact(q(torch.tensor([0.25])), torch.tensor([0.5]))

    @pytest.mark.parametrize("value", [NAN, INF, -INF, "0.5", True, None, torch.tensor(0.5)])
    def test_bad_global_scale_raises(self, value, global_scale):
        with pytest.raises(ValueError, match="set_progressive_sign_scale"):
            set_progressive_sign_scale(value)

    def test_negative_global_scale_is_allowed(self, global_scale):
        set_progressive_sign_scale(-0.05)  # T = 1 - 4**0.5 = -1: divisor 2
        exact(ProgressiveSign()(torch.tensor([1.0, -3.0])), torch.tensor([0.5, -1.0]))

    def test_bad_instance_scale_raises_at_forward(self):
        q = ProgressiveSign(use_global_scaling=False)
        q.scale = NAN
        with pytest.raises(ValueError, match="scale"):
            q(torch.ones(2))

    def test_initial_scale_with_global_scaling_raises(self):
        with pytest.raises(ValueError, match="initial_scale"):
            ProgressiveSign(use_global_scaling=True, initial_scale=0.1)

    def test_explicit_zero_means_zero_not_default(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.5, beta=0)
        assert q.beta == 0.0 and q.transform(0.5) == 0.0  # bitorch would use beta = 10
        exact(q(torch.tensor([0.5, -2.0])), torch.tensor([0.5, -1.0]))
        q0 = ProgressiveSign(use_global_scaling=False, initial_scale=0, alpha=0)
        assert q0.scale == 0.0 and q0.alpha == 0.0 and q0.transform(0.0) == 0.0
        q1 = ProgressiveSign(use_global_scaling=False, initial_scale=0.1, alpha=0)
        exact(q1(torch.tensor([0.5, -2.0])), torch.tensor([0.0, -0.0]))

    def test_none_selects_defaults(self):
        q = ProgressiveSign(alpha=None, beta=None)
        assert (q.alpha, q.beta, q.scale, q.initial_scale) == (4.0, 10.0, 0.0, None)

    @pytest.mark.parametrize("kwargs", [
        {"alpha": -1.0}, {"beta": -2.0}, {"alpha": NAN}, {"beta": INF}, {"alpha": "4"},
        {"use_global_scaling": 1}, {"use_global_scaling": False, "initial_scale": NAN},
        {"custom_transform": 3.0},
    ])
    def test_bad_arguments_raise_value_error(self, kwargs):
        with pytest.raises(ValueError, match="ProgressiveSign"):
            ProgressiveSign(**kwargs)

    def test_transform_returning_nan_raises(self):
        q = ProgressiveSign(use_global_scaling=False, custom_transform=lambda s: NAN)
        with pytest.raises(ValueError, match="NaN"):
            q(torch.ones(2))

    def test_bits_bit_width_and_attributes(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.25, alpha=2, beta=3)
        assert q.bits == 1 and q.bit_width == 1
        assert (q.use_global_scaling, q.initial_scale, q.alpha, q.beta) == (False, 0.25, 2.0, 3.0)
        assert q.transform(0.25) == 1 - 2.0**-0.75

    def test_extra_repr(self):
        def ramp(s):
            return s

        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.5, custom_transform=ramp)
        assert q.extra_repr() == ("bits=1, use_global_scaling=False, initial_scale=0.5, "
                                  "alpha=4.0, beta=10.0, custom_transform=ramp")

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_train_output_matches_hardtanh_of_division(self, dtype):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.07)
        x = edge_values(dtype)
        divisor = 1 - (1 - 4.0 ** (-10 * 0.07))
        exact(q(x), torch.clamp(x / divisor, -1, 1))


# ------------------------------------------------------------------------------------------------
# inference (plain-op eval forward), forward_is_identity, get_config


def inference_inputs(dtype):
    """(label, tensor) pairs: edge values in several ranks and layouts, random, rank 0, empty."""
    edges = edge_values(dtype)
    finite = edges[torch.isfinite(edges)]  # 14 values: no NaN/inf to spoil per-channel scales
    gen = torch.Generator().manual_seed(21)
    rand = (torch.randn(4, 3, 5, 5, generator=gen) * 2).to(dtype)
    rand[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1.0])
    return [
        ("edges", edges),
        ("edges 2x17", torch.cat([edges, edges.flip(0)]).view(2, 17)),
        ("edges transposed", torch.cat([edges, edges.flip(0)]).view(2, 17).t()),
        ("finite 4d", torch.cat([finite, -finite]).view(2, 2, 7, 1)),
        ("finite 1 channel", finite.view(1, 14)),
        ("random 4d", rand),
        ("random channels_last", rand.to(memory_format=torch.channels_last)),
        ("random transposed 2d", rand[:, :, 0, 0].t()),
        ("random 1d", rand[1, 1, 1]),
        ("rank 0 negative", torch.tensor(-0.75, dtype=dtype)),
        ("rank 0 minus zero", torch.tensor(-0.0, dtype=dtype)),
        ("rank 0 nan", torch.tensor(NAN, dtype=dtype)),
        ("empty rows", torch.zeros(0, 3, dtype=dtype)),
        ("empty columns", torch.zeros(3, 0, dtype=dtype)),
    ]


INFERENCE_CASES = {
    "ste_sign": lambda: SteSign(),
    "ste_sign(None)": lambda: SteSign(clip_value=None),
    "approx_sign": lambda: ApproxSign(),
    "swish_sign(2)": lambda: SwishSign(beta=2.0),
    "magnitude_aware_sign": lambda: MagnitudeAwareSign(),
    "magnitude_aware_sign(None)": lambda: MagnitudeAwareSign(clip_value=None),
    "ste_heaviside": lambda: SteHeaviside(),
    "progressive_sign": lambda: ProgressiveSign(),
    "progressive_sign(0.5)": lambda: ProgressiveSign(use_global_scaling=False, initial_scale=0.5),
}


def graph_node(gm, target):
    """The single call_function node of ``gm`` with this target."""
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]
    return node


class TestInference:
    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    def test_traces_to_plain_function_and_method_calls_only(self, case):
        gm = traced_inference(INFERENCE_CASES[case]())
        ops = [n.op for n in gm.graph.nodes]
        assert set(ops) <= {"placeholder", "call_function", "call_method", "output"}
        assert ops.count("placeholder") == 1 and "call_function" in ops

    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_traced_equals_eval_forward_bit_for_bit(self, case, dtype):
        q = INFERENCE_CASES[case]()  # traced in training mode: inference must not depend on it
        gm = traced_inference(q)
        for label, x in inference_inputs(dtype):
            expected = q.eval()(x)
            assert_same_bits(gm(x), expected, f"{case} {dtype} {label}")
            assert_same_bits(q.inference(x), expected, f"{case} {dtype} {label} (eager)")

    @pytest.mark.parametrize("case", ["ste_sign", "approx_sign", "swish_sign(2)",
                                      "magnitude_aware_sign", "progressive_sign"])
    def test_sign_is_the_canonical_where_pattern(self, case):
        gm = traced_inference(INFERENCE_CASES[case]())
        where = [n for n in gm.graph.nodes if n.target is torch.where and n.args[1:] == (1.0, -1.0)]
        assert len(where) == 1
        (compare,) = where[0].args[:1]
        assert compare.target is operator.ge and compare.args[1] == 0
        assert compare.args[0].op == "placeholder"

    def test_heaviside_is_a_where_on_x_greater_than_zero(self):
        gm = traced_inference(SteHeaviside())
        where = [n for n in gm.graph.nodes if n.target is torch.where and n.args[1:] == (1.0, 0.0)]
        assert len(where) == 1
        assert where[0].args[0].target is operator.gt and where[0].args[0].args[1] == 0

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_sign_inference_matches_oracle(self, dtype):
        x = edge_values(dtype)
        assert_same_bits(SteSign().inference(x), sign_oracle(x))
        heaviside = torch.where(torch.isnan(x), x, (x > 0).to(dtype))
        assert_same_bits(SteHeaviside().inference(x), heaviside)

    def test_zeros_come_out_positive(self):
        x = torch.tensor([-0.0, 0.0, -1.4e-45])
        exact(SteSign().inference(x), torch.tensor([1.0, 1.0, -1.0]))
        out = SteHeaviside().inference(x)
        exact(out, torch.zeros(3))
        assert not torch.signbit(out).any()

    def test_magnitude_aware_inference_matches_per_channel_oracle(self):
        w = torch.tensor([[1.0, -3.0], [0.5, 0.0], [-0.25, -0.25], [NAN, 1.0]])
        exact(MagnitudeAwareSign().inference(w),
              torch.tensor([[2.0, -2.0], [0.25, 0.25], [-0.25, -0.25], [NAN, NAN]]))
        exact(MagnitudeAwareSign().inference(torch.tensor([-2.0, 0.0, 0.75])),
              torch.tensor([-2.0, 0.0, 0.75]))

    def test_magnitude_aware_scale_does_not_depend_on_memory_format(self):
        gen = torch.Generator().manual_seed(24)
        w = torch.randn(2, 16, 8, 8, generator=gen)  # mean(dim=(1, 2, 3)) differs by an ulp here
        w_cl = w.to(memory_format=torch.channels_last)
        q = MagnitudeAwareSign()
        assert_same_bits(magnitude_aware_sign(w_cl), magnitude_aware_sign(w))
        assert_same_bits(q.inference(w_cl), magnitude_aware_sign(w))
        alpha = w.double().abs().mean(dim=(1, 2, 3)).float()
        torch.testing.assert_close(magnitude_aware_sign(w).abs().amax(dim=(1, 2, 3)), alpha,
                                   rtol=2e-7, atol=0)

    def test_progressive_sign_inference_is_the_eval_sign_in_training_mode(self):
        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.05).train()
        x = torch.tensor([-0.3, -0.0, 0.1, NAN])
        exact(q.inference(x), torch.tensor([-1.0, 1.0, 1.0, NAN]))
        assert q.training  # inference does not switch the mode
        exact(q(x), torch.tensor([-0.6, 0.0, 0.2, NAN]))  # while the training forward is not sign


class TestForwardIsIdentity:
    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    def test_no_sign_quantizer_has_an_identity_forward(self, case):
        assert INFERENCE_CASES[case]().forward_is_identity() is False


def plain(value):
    return value is None or isinstance(value, (bool, int, float, str))


class TestConfig:
    @pytest.mark.parametrize(("make", "expected"), [
        (lambda: SteSign(), {"clip_value": 1.0}),
        (lambda: SteSign(clip_value=None), {"clip_value": None}),
        (lambda: SteSign(clip_value=2), {"clip_value": 2.0}),
        (lambda: ApproxSign(), {}),
        (lambda: SwishSign(beta=10), {"beta": 10.0}),
        (lambda: MagnitudeAwareSign(0.5), {"clip_value": 0.5}),
        (lambda: SteHeaviside(INF), {"clip_value": INF}),
        (lambda: ProgressiveSign(), {"use_global_scaling": True, "initial_scale": None,
                                     "custom_transform": None, "alpha": 4.0, "beta": 10.0}),
        (lambda: ProgressiveSign(use_global_scaling=False, initial_scale=0.25, alpha=2, beta=3),
         {"use_global_scaling": False, "initial_scale": 0.25, "custom_transform": None,
          "alpha": 2.0, "beta": 3.0}),
    ])
    def test_get_config_values_are_plain(self, make, expected):
        config = make().get_config()
        assert config == expected
        assert all(plain(v) for v in config.values())

    @pytest.mark.parametrize("case", list(INFERENCE_CASES))
    @pytest.mark.parametrize("training", [True, False])
    def test_round_trip_rebuilds_an_equal_quantizer(self, case, training):
        q = INFERENCE_CASES[case]()
        rebuilt = type(q)(**q.get_config())
        assert type(rebuilt) is type(q) and rebuilt.get_config() == q.get_config()
        assert rebuilt.extra_repr() == q.extra_repr()
        x = random_with_zeros(22) * 0.1  # small: ProgressiveSign's train forward is not binary
        upstream = random_with_zeros(23)
        out, grad = forward_backward(q.train(training), x, upstream)
        out_r, grad_r = forward_backward(rebuilt.train(training), x, upstream)
        exact(out_r, out)
        exact(grad_r, grad)

    def test_progressive_sign_config_carries_the_current_instance_scale(self):
        q = ProgressiveSign(use_global_scaling=False)
        q.scale = 0.05  # a scheduler moved it
        config = q.get_config()
        assert config["initial_scale"] == 0.05
        rebuilt = ProgressiveSign(**config)
        x = torch.tensor([0.01, -0.3, 2.0])
        exact(rebuilt(x), q(x))
        exact(rebuilt(x), torch.tensor([0.02, -0.6, 1.0]))

    def test_progressive_sign_config_drops_custom_transform_with_a_warning(self):
        def ramp(s):
            return s

        q = ProgressiveSign(use_global_scaling=False, initial_scale=0.2, custom_transform=ramp)
        with pytest.warns(UserWarning, match="custom_transform"):
            config = q.get_config()
        assert config["custom_transform"] is None and all(plain(v) for v in config.values())
        rebuilt = ProgressiveSign(**config)
        x = torch.tensor([0.1, -0.3])
        exact(rebuilt.eval()(x), q.eval()(x))  # the eval forward is sign either way
        exact(ProgressiveSign(**{**config, "custom_transform": ramp})(x), q.train()(x))
