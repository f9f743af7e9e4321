"""WAGEQuantizer, WAGEError, WAGEWeight: forward/gradient against hand-written QA/QE oracles and the
observed QPyTorch values (reference §3.3, §10 "QPyTorch WAGE specifics")."""

import copy
import json

import pytest
import torch

from fxquant.quantizers import get
from fxquant.wage import (
    WAGEError,
    WAGEQuantizer,
    WAGEWeight,
    wage_quantize,
    wage_weight_quantize,
)
from tests.helpers import FLOAT_DTYPES, INF, NAN, exact, t, traced_inference


def qa_oracle(x, bits):
    """Forward QA and the 'rounded value was clamped' mask, from torch.round in float64."""
    sigma = 2.0 ** -(bits - 1)
    rounded = torch.round(x.double() / sigma) * sigma
    mask = (rounded > 1 - sigma) | (rounded < -1 + sigma)
    return rounded.clamp(-1 + sigma, 1 - sigma).to(x.dtype), mask


def qe_oracle(g, bits, mask=None):
    """Backward QE: QPyTorch shift, symmetric fixed point with clamp, then zero where masked."""
    sigma = 2.0 ** -(bits - 1)
    shifted = g / 2.0 ** torch.ceil(torch.log2(g.abs().max()))
    out = (torch.round(shifted.double() / sigma) * sigma).clamp(-1 + sigma, 1 - sigma).to(g.dtype)
    if mask is not None:
        out = out.masked_fill(mask, 0.0)
    return out


def forward_backward(module, x, g):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


class TestWAGEQuantizerReference:
    def test_forward_grid_8_bits(self):
        x = torch.linspace(-1.5, 1.5, 2001)
        y = WAGEQuantizer(8, 8)(x)
        exact(y, qa_oracle(x, 8)[0])
        assert y.max().item() == 127 / 128 and y.min().item() == -127 / 128
        assert bool((y * 128 == torch.round(y * 128)).all())

    def test_all_ones_upstream_gives_127_over_128(self):
        x = t([0.0, 0.3, -0.5, 0.99])
        _, grad = forward_backward(WAGEQuantizer(8, 8), x, torch.ones(4))
        exact(grad, torch.full((4,), 0.9921875))

    def test_values_rounding_past_the_bound_get_zero_gradient(self):
        # |x| >= 127.5/128 rounds to +-128/128 and is clamped: x = 1 and x = 0.99999994 included.
        bound = t(127.5 / 128)
        below = torch.nextafter(bound, t(0.0)).item()
        x = t([1.0, 0.99999994, 127.5 / 128, below, -127.5 / 128, -below, 5.0, -INF, INF])
        y, grad = forward_backward(WAGEQuantizer(8, 8), x, torch.ones(9))
        edge = 127 / 128
        exact(y, t([edge, edge, edge, edge, -edge, -edge, edge, -edge, edge]))
        exact(grad, t([0.0, 0.0, 0.0, edge, 0.0, edge, 0.0, 0.0, 0.0]))

    def test_nan_input_is_passed_through_and_not_masked(self):
        y, grad = forward_backward(WAGEQuantizer(8, 8), t([NAN, 2.0]), torch.ones(2))
        exact(y, t([NAN, 127 / 128]))
        exact(grad, t([127 / 128, 0.0]))

    def test_signed_zero_is_kept(self):
        y = WAGEQuantizer(8, 8)(t([-0.0, -0.001]))
        assert torch.signbit(y).tolist() == [True, True]

    @pytest.mark.parametrize(("bits_A", "bits_E"), [(8, 8), (2, 8), (4, 6), (1, 3), (12, 16)])
    def test_random_matches_oracle(self, bits_A, bits_E):
        gen = torch.Generator().manual_seed(bits_A * 10 + bits_E)
        x = torch.randn(3000, generator=gen) * 0.7
        g = torch.randn(3000, generator=gen) * 1e-3
        y, grad = forward_backward(WAGEQuantizer(bits_A, bits_E), x, g)
        want_y, mask = qa_oracle(x, bits_A)
        exact(y, want_y)
        exact(grad, qe_oracle(g, bits_E, mask))
        assert bool(mask.any()) and not bool(mask.all())

    def test_upstream_gradient_shift_uses_masked_entries_too(self):
        # The largest |g| sits at a masked position: it still sets the shift (QPyTorch hooks shift
        # before masking), so the kept entry 0.25 becomes 0.25/4 = 1/16.
        x = t([2.0, 0.1])
        _, grad = forward_backward(WAGEQuantizer(8, 8), x, t([3.0, 0.25]))
        exact(grad, t([0.0, 1 / 16]))

    def test_all_zero_upstream_gives_zero_not_nan(self):
        _, grad = forward_backward(WAGEQuantizer(8, 8), t([0.2, 3.0, -0.4]), torch.zeros(3))
        exact(grad, torch.zeros(3))

    def test_nan_upstream_gives_nan_gradient(self):
        _, grad = forward_backward(WAGEQuantizer(8, 8), t([0.2, 3.0, -0.4]), t([NAN, 1.0, 1.0]))
        assert bool(grad.isnan().all())

    def test_inf_upstream_like_qpytorch(self):
        # shift divides by inf: finite -> 0, inf -> NaN; masked entries are 0.
        _, grad = forward_backward(WAGEQuantizer(8, 8), t([0.2, 3.0, -0.4, 0.1]),
                                   t([INF, INF, 1.0, -2.0]))
        exact(grad, t([NAN, 0.0, 0.0, -0.0]))


class TestWAGEQuantizerDisabledSides:
    def test_bits_E_minus_one_passes_gradient_unchanged(self):
        x = t([0.3, 5.0, -INF, NAN])
        g = t([0.123, -7.0, 3.0, 2.0])
        y, grad = forward_backward(WAGEQuantizer(8, -1), x, g)
        exact(y, t([0.296875, 127 / 128, -127 / 128, NAN]))
        exact(grad, g)  # no shift, no quantization, no mask

    def test_bits_A_minus_one_is_identity_forward_quantized_backward(self):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(500, generator=gen) * 3
        g = torch.randn(500, generator=gen)
        y, grad = forward_backward(WAGEQuantizer(-1, 8), x, g)
        exact(y, x)
        exact(grad, qe_oracle(g, 8))  # no mask: |x| > 1 still gets gradient

    def test_both_disabled_is_identity(self):
        x = torch.randn(10)
        g = torch.randn(10)
        y, grad = forward_backward(WAGEQuantizer(-1, -1), x, g)
        exact(y, x)
        exact(grad, g)

    def test_identity_forward_allows_later_in_place_ops(self):
        x = torch.randn(8, requires_grad=True)
        y = WAGEQuantizer(-1, 8)(x * 1)
        torch.relu_(y)
        y.sum().backward()
        assert x.grad is not None


class TestWAGEQuantizerStochastic:
    def test_same_seed_same_result_and_seeds_differ(self):
        x = torch.rand(2000) * 2 - 1
        g = torch.randn(2000)

        def run(seed):
            q = WAGEQuantizer(4, 4, "stochastic", "stochastic",
                              generator=torch.Generator().manual_seed(seed))
            return forward_backward(q, x, g)

        (y1, g1), (y2, g2), (y3, g3) = run(1), run(1), run(2)
        exact(y1, y2)
        exact(g1, g2)
        assert not torch.equal(y1, y3) and not torch.equal(g1, g3)

    def test_stochastic_results_are_floor_or_ceil_and_masked(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4000, generator=gen)
        g = torch.randn(4000, generator=gen)
        q = WAGEQuantizer(4, 8, "stochastic", "stochastic", generator=gen)
        y, grad = forward_backward(q, x, g)
        low = torch.clamp(torch.floor(x * 8) / 8, -7 / 8, 7 / 8)
        high = torch.clamp(torch.ceil(x * 8) / 8, -7 / 8, 7 / 8)
        assert bool(((y == low) | (y == high)).all())
        assert bool((grad[x.abs() > 1] == 0).all())  # floor/ceil beyond 7/8 are clamped
        assert bool((grad[x.abs() < 0.75] != 0).any())
        shifted = g / 2.0 ** torch.ceil(torch.log2(g.abs().max()))
        kept = grad != 0
        gl, gh = torch.floor(shifted * 128) / 128, torch.ceil(shifted * 128) / 128
        assert bool(((grad == gl) | (grad == gh))[kept].all())


class TestWAGEQuantizerModule:
    @pytest.mark.parametrize(("args", "bits"), [((8, 8), 8), ((2, 8), 2), ((-1, 8), 32),
                                                 ((4, -1), 4), ((-1, -1), 32)])
    def test_bits(self, args, bits):
        assert WAGEQuantizer(*args).bits == bits

    def test_defaults_and_repr(self):
        q = WAGEQuantizer()
        assert (q.bits_A, q.bits_E, q.A_mode, q.E_mode, q.generator) == (8, 8, "nearest",
                                                                         "nearest", None)
        assert repr(q) == ("WAGEQuantizer(bits_A=8, bits_E=8, A_mode='nearest', "
                           "E_mode='nearest')")
        assert list(q.state_dict()) == [] and list(q.parameters()) == []

    @pytest.mark.parametrize("identifier", ["wage", WAGEQuantizer(4, 6)])
    def test_registry_round_trip(self, identifier):
        q = get(identifier) if not isinstance(identifier, str) else get(identifier, bits_A=4,
                                                                       bits_E=6)
        assert type(q) is WAGEQuantizer and q.name == "wage"
        x = torch.randn(100, generator=torch.Generator().manual_seed(0))
        g = torch.randn(100, generator=torch.Generator().manual_seed(1))
        y, grad = forward_backward(q, x, g)
        y2, grad2 = forward_backward(WAGEQuantizer(4, 6), x, g)
        exact(y, y2)
        exact(grad, grad2)

    def test_deep_copy_keeps_generator_state(self):
        q = WAGEQuantizer(4, 4, "stochastic", generator=torch.Generator().manual_seed(5))
        copied = copy.deepcopy(q)
        x = torch.rand(100)
        exact(q(x), copied(x))

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept_in_forward_and_gradient(self, dtype):
        x = (torch.randn(200, generator=torch.Generator().manual_seed(0))).to(dtype)
        g = torch.randn(200, generator=torch.Generator().manual_seed(1)).to(dtype)
        y, grad = forward_backward(WAGEQuantizer(6, 6), x, g)
        assert y.dtype == dtype and grad.dtype == dtype
        want_y, mask = qa_oracle(x, 6)
        exact(y, want_y)
        low_precision = dtype in (torch.float16, torch.bfloat16)  # shifted in float32
        exact(grad, qe_oracle(g.float() if low_precision else g, 6, mask).to(dtype))

    def test_only_a_bool_mask_is_saved(self):
        y = WAGEQuantizer(8, 8)(torch.randn(50, requires_grad=True))
        saved = y.grad_fn.saved_tensors
        assert len(saved) == 1 and saved[0].dtype == torch.bool

    def test_no_mask_without_grad_or_error_quantization(self):
        y = WAGEQuantizer(8, -1)(torch.randn(50, requires_grad=True))
        assert len(y.grad_fn.saved_tensors) == 0
        y = WAGEQuantizer(8, 8)(torch.randn(50))
        assert not y.requires_grad

    def test_functional_form_equals_module(self):
        x = torch.randn(64, generator=torch.Generator().manual_seed(0))
        exact(wage_quantize(x, 3, 5), WAGEQuantizer(3, 5)(x))

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [({"bits_A": 0}, "bits_A"), ({"bits_A": -2}, "bits_A"), ({"bits_A": 2.0}, "bits_A"),
         ({"bits_A": True}, "bits_A"), ({"bits_E": 0}, "bits_E"), ({"bits_E": -3}, "bits_E"),
         ({"A_mode": "floor"}, "A_mode"), ({"E_mode": "up"}, "E_mode"),
         ({"generator": 3}, "generator")],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            WAGEQuantizer(**kwargs)
        if "generator" not in kwargs:
            with pytest.raises(ValueError, match=match):
                wage_quantize(torch.ones(3), **kwargs)

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
    def test_integer_input_raises_type_error(self, dtype):
        with pytest.raises(TypeError, match="wage_quantize"):
            WAGEQuantizer()(torch.ones(3, dtype=dtype))


class TestWAGEError:
    def test_identity_forward_and_unmasked_quantized_gradient(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(300, generator=gen) * 4
        g = torch.randn(300, generator=gen)
        y, grad = forward_backward(WAGEError(8), x, g)
        exact(y, x)
        exact(grad, qe_oracle(g, 8))

    def test_all_ones_and_all_zero_upstream(self):
        _, grad = forward_backward(WAGEError(8), t([5.0, -INF, 0.0]), torch.ones(3))
        exact(grad, torch.full((3,), 127 / 128))
        _, grad = forward_backward(WAGEError(8), t([5.0, -INF, 0.0]), torch.zeros(3))
        exact(grad, torch.zeros(3))

    def test_equals_wage_quantizer_minus_one(self):
        x, g = torch.randn(100), torch.randn(100)
        exact(forward_backward(WAGEError(6), x, g)[1], forward_backward(WAGEQuantizer(-1, 6), x,
                                                                         g)[1])

    def test_module_facts(self):
        q = WAGEError()
        assert (q.bits, q.bits_E, q.mode) == (32, 8, "nearest")
        assert repr(q) == "WAGEError(bits_E=8, mode='nearest')"
        assert type(get("wage_error")) is WAGEError
        assert type(get(WAGEError(4))) is WAGEError and get(WAGEError(4)).bits_E == 4

    @pytest.mark.parametrize(("kwargs", "match"), [({"bits_E": -1}, "bits_E"),
                                                   ({"mode": "x"}, "mode")])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            WAGEError(**kwargs)


class TestWAGEWeight:
    @pytest.mark.parametrize(("scale", "divisor"), [(1.0, 1.0), (2.0, 2.0), (16.0, 16.0)])
    def test_forward_is_qw_and_gradient_is_identity(self, scale, divisor):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(400, generator=gen)
        g = torch.randn(400, generator=gen)
        y, grad = forward_backward(WAGEWeight(2, scale), w, g)
        want = torch.clamp(torch.round(w * 2) / 2, -0.5, 0.5) / divisor
        exact(y, want)
        exact(grad, g)  # straight through: not divided by the scale, no window

    def test_literals(self):
        y, grad = forward_backward(WAGEWeight(2), t([0.25, 0.75, -0.75, 3.0, NAN]), torch.ones(5))
        exact(y, t([0.0, 0.5, -0.5, 0.5, NAN]))
        exact(grad, torch.ones(5))

    def test_scale_is_a_plain_attribute_set_later(self):
        q = WAGEWeight(2)
        q.scale = 32.0
        exact(q(t([0.7, -0.1])), t([0.5 / 32, -0.0]))
        assert list(q.state_dict()) == []

    def test_functional_form_and_registry(self):
        w = torch.randn(50)
        exact(wage_weight_quantize(w, 3, 4.0), WAGEWeight(3, 4.0)(w))
        q = get("wage_weight", bits=3, scale=4.0)
        assert type(q) is WAGEWeight and q.bits == 3 and q.name == "wage_weight"
        exact(get(q)(w), q(w))
        assert repr(WAGEWeight()) == "WAGEWeight(bits=2, scale=1.0, mode='nearest')"

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    def test_dtype_is_kept(self, dtype):
        w = torch.randn(20).to(dtype)
        y, grad = forward_backward(WAGEWeight(2, 2.0), w, torch.ones(20, dtype=dtype))
        assert y.dtype == dtype and grad.dtype == dtype

    @pytest.mark.parametrize(("kwargs", "match"), [({"bits": 0}, "bits"), ({"scale": 0.0}, "scale"),
                                                   ({"scale": -2.0}, "scale"),
                                                   ({"mode": "x"}, "mode")])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            WAGEWeight(**kwargs)


# --- plain-op inference forms, forward_is_identity, get_config ---------------------------------

def traced_plain_inference(q):
    gm = traced_inference(q)
    ops = {node.op for node in gm.graph.nodes} - {"placeholder", "output"}
    assert ops <= {"call_function", "call_method"}, ops
    return gm


def edge_inputs(dtype, bits):
    """±0, ±1, NaN, ±inf, subnormals, max, grid ties and one ulp either side, clamp bounds."""
    fi = torch.finfo(dtype)
    sigma = 2.0 ** -(bits - 1)
    fixed = torch.tensor([0.0, -0.0, 1.0, -1.0, NAN, INF, -INF, fi.tiny, -fi.tiny,
                          fi.tiny * fi.eps, -fi.tiny * fi.eps, fi.max, -fi.max, fi.eps, 0.5,
                          -0.5, 0.25, 0.75, 1 - sigma / 2, -1 + sigma / 2, 3.0, -1e4],
                         dtype=torch.float64).to(dtype)
    ties = ((torch.arange(-40, 40, dtype=torch.float64) + 0.5) * sigma).to(dtype)
    up = torch.nextafter(ties, torch.full_like(ties, INF))
    down = torch.nextafter(ties, torch.full_like(ties, -INF))
    gen = torch.Generator().manual_seed(bits)
    scales = torch.exp2(torch.randint(-20, 4, (1000,), generator=gen).double())
    rand = (torch.randn(1000, generator=gen, dtype=torch.float64) * scales).to(dtype)
    return torch.cat([fixed, ties, up, down, rand])


def same_bits(actual, expected):
    """Equal values (NaN where NaN) and the same dtype."""
    assert actual.dtype == expected.dtype
    exact(actual, expected)


INFERENCE_CASES = [
    WAGEQuantizer(8, 8), WAGEQuantizer(2, 8), WAGEQuantizer(1, 8), WAGEQuantizer(4, -1),
    WAGEQuantizer(16, 8), WAGEQuantizer(17, 8), WAGEQuantizer(24, 8),
    WAGEQuantizer(3, 8, "stochastic", "stochastic", generator=torch.Generator().manual_seed(0)),
    WAGEQuantizer(-1, 8), WAGEQuantizer(-1, -1), WAGEError(8),
    WAGEError(4, "stochastic", generator=torch.Generator().manual_seed(0)),
    WAGEWeight(2), WAGEWeight(2, 2.0), WAGEWeight(3, 3.0), WAGEWeight(8, 32.0), WAGEWeight(1),
    WAGEWeight(20, 16.0), WAGEWeight(2, 4.0, "stochastic", torch.Generator().manual_seed(0)),
]


def case_id(q):
    if not isinstance(q, torch.nn.Module):
        return None  # pytest's default id
    return f"{type(q).__name__}({q.extra_repr()})"


def bits_of(q):
    return q.bits_A if isinstance(q, WAGEQuantizer) and q.bits_A != -1 else q.bits


class TestInference:
    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    @pytest.mark.parametrize("q", INFERENCE_CASES, ids=case_id)
    def test_traced_inference_equals_eval_forward_bit_for_bit(self, q, dtype):
        x = edge_inputs(dtype, min(bits_of(q), 24))
        gm = traced_plain_inference(q)
        same_bits(gm(x), q.eval()(x))
        same_bits(q.inference(x), q.eval()(x))
        q.train()

    @pytest.mark.parametrize("dtype", FLOAT_DTYPES)
    @pytest.mark.parametrize("q", [case for case in INFERENCE_CASES
                                   if not case.forward_is_identity()], ids=case_id)
    def test_inference_equals_nearest_oracle(self, q, dtype):
        x = edge_inputs(dtype, min(bits_of(q), 24))
        want = qa_oracle(x, bits_of(q))[0]
        if isinstance(q, WAGEWeight) and q.scale > 1.8:
            want = want / q.scale
        same_bits(traced_plain_inference(q)(x), want)

    def test_zero_dim_input_keeps_its_shape(self):
        y = traced_plain_inference(WAGEQuantizer(17, 8))(torch.tensor(0.3, dtype=torch.float16))
        assert y.shape == () and y.dtype == torch.float16

    @pytest.mark.parametrize(
        ("q", "targets"),
        [(WAGEQuantizer(8, 8), ["mul", "round", "clamp", "mul"]),
         (WAGEWeight(2, 16.0), ["mul", "round", "clamp", "mul", "truediv"]),
         (WAGEWeight(2, 1.0), ["mul", "round", "clamp", "mul"]),
         (WAGEQuantizer(-1, 8), []), (WAGEError(8), [])],
    )
    def test_graph_is_the_plain_fixed_point_pattern(self, q, targets):
        nodes = [n for n in traced_plain_inference(q).graph.nodes if n.op not in ("placeholder",
                                                                              "output")]
        assert [getattr(n.target, "__name__", n.target) for n in nodes] == targets

    def test_bits_above_16_compute_in_float32_and_cast_back(self):
        nodes = [n for n in traced_plain_inference(WAGEQuantizer(17, 8)).graph.nodes]
        assert [n.target for n in nodes if n.op == "call_method"] == ["to", "to"]

    def test_stochastic_modes_round_to_nearest_in_eval_only(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(4000, generator=gen) * 2 - 1
        q = WAGEQuantizer(4, 8, "stochastic", "stochastic", generator=gen)
        w = WAGEWeight(4, 2.0, "stochastic", generator=gen)
        assert not torch.equal(q(x), qa_oracle(x, 4)[0])  # training: noise is drawn
        assert not torch.equal(w(x), qa_oracle(x, 4)[0] / 2)
        exact(q.eval()(x), qa_oracle(x, 4)[0])
        exact(w.eval()(x), qa_oracle(x, 4)[0] / 2)

    def test_eval_keeps_the_stochastic_error_rounding(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(2000, generator=gen) * 2 - 1
        g = torch.randn(2000, generator=gen)
        q = WAGEQuantizer(8, 4, "nearest", "stochastic", generator=gen).eval()
        _, grad = forward_backward(q, x, g)
        assert not torch.equal(grad, qe_oracle(g, 4, qa_oracle(x, 8)[1]))

    def test_eval_forward_with_grad_equals_inference(self):
        # The masked (training-graph) path of the eval forward gives the same values.
        x = edge_inputs(torch.float32, 8)
        q = WAGEQuantizer(8, 8).eval()
        y, _ = forward_backward(q, x, torch.ones_like(x))
        exact(y, q.inference(x))


class TestForwardIsIdentity:
    @pytest.mark.parametrize(
        ("q", "expected"),
        [(WAGEQuantizer(8, 8), False), (WAGEQuantizer(8, -1), False), (WAGEQuantizer(1, 8), False),
         (WAGEQuantizer(-1, 8), True), (WAGEQuantizer(-1, -1), True), (WAGEError(8), True),
         (WAGEError(2, "stochastic"), True), (WAGEWeight(2), False), (WAGEWeight(8, 16.0), False)],
        ids=case_id,
    )
    def test_values(self, q, expected):
        assert q.forward_is_identity() is expected

    @pytest.mark.parametrize("q", [WAGEQuantizer(-1, 8), WAGEError(8)], ids=case_id)
    def test_identity_forwards_return_their_input_values(self, q):
        x = edge_inputs(torch.float32, 8)
        exact(q(x), x)
        assert q.inference(x) is x


class TestGetConfig:
    @pytest.mark.parametrize(
        ("q", "expected"),
        [(WAGEQuantizer(), {"bits_A": 8, "bits_E": 8, "A_mode": "nearest", "E_mode": "nearest"}),
         (WAGEQuantizer(-1, 6, "stochastic", "stochastic", torch.Generator().manual_seed(1)),
          {"bits_A": -1, "bits_E": 6, "A_mode": "stochastic", "E_mode": "stochastic"}),
         (WAGEError(5, "stochastic", torch.Generator()), {"bits_E": 5, "mode": "stochastic"}),
         (WAGEWeight(2, 16.0), {"bits": 2, "scale": 16.0, "mode": "nearest"}),
         (WAGEWeight(3, 2, "stochastic", torch.Generator()),
          {"bits": 3, "scale": 2, "mode": "stochastic"})],
        ids=case_id,
    )
    def test_plain_data_without_the_generator(self, q, expected):
        config = q.get_config()
        assert config == expected
        assert json.loads(json.dumps(config)) == config

    def test_scale_set_after_construction_is_in_the_config(self):
        q = WAGEWeight(2)
        q.scale = 32.0
        assert q.get_config()["scale"] == 32.0

    @pytest.mark.parametrize("q", INFERENCE_CASES, ids=case_id)
    def test_round_trip_gives_the_same_quantizer(self, q):
        rebuilt = type(q)(**q.get_config())
        assert type(rebuilt) is type(q)
        assert rebuilt.get_config() == q.get_config()
        assert rebuilt.bits == q.bits and rebuilt.generator is None
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(300, generator=gen)
        g = torch.randn(300, generator=gen)
        exact(rebuilt.eval()(x), q.eval()(x))
        if "stochastic" not in q.extra_repr():  # nothing random: forward and gradient equal
            exact(forward_backward(rebuilt.train(), x, g)[1], forward_backward(q.train(), x, g)[1])
        q.train()
