"""fxquant.training: every behaviour is checked against an independent oracle (the float model, a
hand-written quantized reference, closed-form schedules, hand-computed clamps)."""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import training
from fxquant.graph.tracer import trace
from fxquant.quantizers import (
    MagnitudeAwareSign,
    ProgressiveSign,
    SteSign,
    get_progressive_sign_scale,
    set_progressive_sign_scale,
    ste_sign,
    ste_tern,
)
from tests.models import MLP, SmallCNN, Twice

EXACT = {"rtol": 0, "atol": 0}


def _mlp_all_binary() -> tuple[MLP, torch.fx.GraphModule]:
    """Every layer of the MLP gets a ste_sign weight and input quantizer."""
    torch.manual_seed(0)
    model = MLP()
    return model, fxquant.prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))


def _mlp_reference(model: MLP, x: torch.Tensor, *, weights: set[str], inputs: set[str]
                   ) -> torch.Tensor:
    """The MLP by hand, binarizing the weights / inputs of the layers named in the sets."""
    h = x.flatten(1)
    for name in ("fc1", "fc2", "fc3"):
        layer = getattr(model, name)
        h = ste_sign(h) if name in inputs else h
        w = ste_sign(layer.weight) if name in weights else layer.weight
        h = F.linear(h, w, layer.bias)
        h = torch.relu(h) if name != "fc3" else h
    return h


ALL = {"fc1", "fc2", "fc3"}


def _catch() -> warnings.catch_warnings:
    return warnings.catch_warnings(record=True)


# ------------------------------------------------------------------------------------------------
# Quantizer.enabled (base class)


class TestQuantizerEnabledFlag:
    def test_enabled_by_default(self):
        q = SteSign()
        assert q.enabled is True
        assert "enabled" not in repr(q)

    def test_disabled_returns_the_input_object_and_identity_gradient(self):
        q = SteSign()
        q.enabled = False
        x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
        assert q(x) is x
        g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
        y = q(x * 1.0)
        y.backward(g)
        torch.testing.assert_close(x.grad, g, **EXACT)  # no STE window: the float gradient

    def test_enabled_again_quantizes(self):
        q = SteSign()
        q.enabled = False
        q.enabled = True
        x = torch.tensor([-2.0, -0.0, 0.5])
        torch.testing.assert_close(q(x), torch.tensor([-1.0, 1.0, 1.0]), **EXACT)

    def test_repr_shows_disabled(self):
        q = SteSign()
        q.enabled = False
        assert "bits=1, enabled=False" in repr(q)

    def test_disabled_skips_forward_hooks(self):
        q = SteSign()
        calls = []
        q.register_forward_pre_hook(lambda m, a: calls.append(1))
        q.enabled = False
        q(torch.ones(2))
        assert calls == []

    def test_flag_survives_deepcopy_and_pickle(self):
        q = SteSign()
        q.enabled = False
        assert copy.deepcopy(q).enabled is False
        assert pickle.loads(pickle.dumps(q)).enabled is False

    def test_not_in_state_dict_or_config(self):
        q = SteSign()
        q.enabled = False
        assert q.state_dict() == {}
        assert "enabled" not in q.get_config()


# ------------------------------------------------------------------------------------------------
# quantizers / set_quantizers_enabled


class TestSetQuantizersEnabled:
    def test_all_off_is_the_float_model_output_and_gradients(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False)
        x = torch.randn(6, 64)
        out = gm(x)
        torch.testing.assert_close(out, model(x), **EXACT)
        out.square().sum().backward()
        model(x).square().sum().backward()
        for name in ("fc1.weight", "fc2.weight", "fc3.weight", "fc1.bias"):
            torch.testing.assert_close(gm.get_parameter(name).grad,
                                       model.get_parameter(name).grad, **EXACT)

    def test_on_again_is_the_quantized_output(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False)
        training.set_quantizers_enabled(gm, True)
        x = torch.randn(6, 64)
        torch.testing.assert_close(gm(x), _mlp_reference(model, x, weights=ALL, inputs=ALL),
                                   **EXACT)

    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_cnn_with_batch_norm_all_off_is_the_float_model(self, mode):
        torch.manual_seed(1)
        model = SmallCNN()
        recipe = fxquant.Recipe(weight="ste_sign", input="approx_sign", output="ste_tern")
        gm = fxquant.prepare(model, recipe)
        model.train(mode == "train")
        gm.train(mode == "train")
        training.set_quantizers_enabled(gm, False)
        x = torch.randn(3, 1, 8, 8)
        torch.testing.assert_close(gm(x), model(x), **EXACT)

    def test_returns_the_names_switched(self):
        _, gm = _mlp_all_binary()
        names = training.set_quantizers_enabled(gm, False)
        assert names == ["fc1_weight_quantizer", "fc1_input_quantizer", "fc2_weight_quantizer",
                         "fc2_input_quantizer", "fc3_weight_quantizer", "fc3_input_quantizer"]
        assert all(not gm.get_submodule(n).enabled for n in names)

    @pytest.mark.parametrize("roles", ["weight", "weight_quantizer", ["weight"], ("weight",)])
    def test_role_selection_weights_off(self, roles):
        model, gm = _mlp_all_binary()
        names = training.set_quantizers_enabled(gm, False, roles=roles)
        assert names == ["fc1_weight_quantizer", "fc2_weight_quantizer", "fc3_weight_quantizer"]
        x = torch.randn(4, 64)
        torch.testing.assert_close(gm(x), _mlp_reference(model, x, weights=set(), inputs=ALL),
                                   **EXACT)

    def test_role_selection_inputs_off(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False, roles="input")
        x = torch.randn(4, 64)
        torch.testing.assert_close(gm(x), _mlp_reference(model, x, weights=ALL, inputs=set()),
                                   **EXACT)

    @pytest.mark.parametrize("layers", [["fc2"], "fc2", re.compile("fc2"), "fc[2]"])
    def test_layer_selection(self, layers):
        model, gm = _mlp_all_binary()
        names = training.set_quantizers_enabled(gm, False, layers=layers)
        assert names == ["fc2_weight_quantizer", "fc2_input_quantizer"]
        x = torch.randn(4, 64)
        expected = _mlp_reference(model, x, weights={"fc1", "fc3"}, inputs={"fc1", "fc3"})
        torch.testing.assert_close(gm(x), expected, **EXACT)

    def test_regex_is_matched_in_full(self):
        _, gm = _mlp_all_binary()
        names = training.set_quantizers_enabled(gm, False, roles="weight", layers=r"fc[13]")
        assert names == ["fc1_weight_quantizer", "fc3_weight_quantizer"]
        with pytest.raises(ValueError, match="matches no quantized layer"):
            training.set_quantizers_enabled(gm, False, layers="fc")  # a prefix is no match

    def test_roles_and_layers_combine(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False, roles=["input"], layers=["fc1", "fc3"])
        x = torch.randn(4, 64)
        torch.testing.assert_close(gm(x), _mlp_reference(model, x, weights=ALL, inputs={"fc2"}),
                                   **EXACT)

    @pytest.mark.parametrize("kwargs, message", [
        ({"roles": "bias"}, "unknown quantizer role 'bias'; roles are weight, input, output"),
        ({"roles": ["weight", 3]}, "unknown quantizer role 3"),
        ({"layers": ["fc9"]}, "no quantized layer named fc9; quantized layers: fc1, fc2, fc3"),
        ({"layers": "conv.*"}, "pattern 'conv.*' matches no quantized layer"),
        ({"layers": "fc("}, "invalid layers pattern"),
        ({"layers": [1]}, "layers takes a regex string"),
        ({"roles": "error"}, "selects no quantizer; this model has input, weight quantizers"),
    ])
    def test_bad_selection_is_a_value_error(self, kwargs, message):
        _, gm = _mlp_all_binary()
        with pytest.raises(ValueError, match=re.escape(message)):
            training.set_quantizers_enabled(gm, False, **kwargs)

    def test_layer_known_but_without_the_role_selects_nothing(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe.bnn())  # fc1 and fc3 stay float
        with pytest.raises(ValueError, match="quantized layers: fc2"):
            training.set_quantizers_enabled(gm, False, layers=["fc1"])

    def test_enabled_must_be_a_bool(self):
        _, gm = _mlp_all_binary()
        with pytest.raises(ValueError, match="enabled must be a bool"):
            training.set_quantizers_enabled(gm, 0)  # type: ignore[arg-type]

    def test_plain_module_is_a_type_error(self):
        with pytest.raises(TypeError, match="GraphModule returned by fxquant.prepare"):
            training.set_quantizers_enabled(MLP(), False)  # type: ignore[arg-type]

    def test_model_without_quantizers_is_a_value_error(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe())
        with pytest.raises(ValueError, match="was it returned by fxquant.prepare"):
            training.set_quantizers_enabled(gm, False)


class TestQuantizersListing:
    def test_entries_carry_name_module_and_record(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        entries = training.quantizers(gm)
        assert [(e.name, e.record.role, e.record.layer, e.record.bits) for e in entries] == [
            ("fc2_weight_quantizer", "weight_quantizer", "fc2", 1),
            ("fc2_input_quantizer", "input_quantizer", "fc2", 1)]
        assert entries[0].module is gm.get_submodule("fc2_weight_quantizer")

    def test_valid_but_empty_selection_is_an_empty_list(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        assert training.quantizers(gm, roles="output") == []

    def test_module_called_twice_is_listed_per_quantizer(self):
        gm = fxquant.prepare(Twice(), fxquant.Recipe(weight="ste_sign"))
        assert [e.name for e in training.quantizers(gm, layers=["fc"])] == [
            "fc_weight_quantizer", "fc_weight_quantizer_1"]


class TestDisabledModelsSurviveGraphOperations:
    def test_deepcopy_keeps_flags_and_float_output(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False, roles="weight")
        other = copy.deepcopy(gm)
        x = torch.randn(3, 64)
        torch.testing.assert_close(other(x), _mlp_reference(model, x, weights=set(), inputs=ALL),
                                   **EXACT)

    def test_pickle_keeps_flags_and_float_output(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False)
        other = pickle.loads(pickle.dumps(gm))
        x = torch.randn(3, 64)
        torch.testing.assert_close(other(x), model(x), **EXACT)

    def test_retracing_a_disabled_model_keeps_the_quantizer_nodes(self):
        model, gm = _mlp_all_binary()
        training.set_quantizers_enabled(gm, False)
        again = trace(gm)
        again.graph.lint()
        called = [n.target for n in again.graph.nodes if n.op == "call_module"]
        assert called == [e.name for e in training.quantizers(gm)]
        x = torch.randn(3, 64)
        torch.testing.assert_close(again(x), model(x), **EXACT)
        training.set_quantizers_enabled(gm, True)  # the retraced graph calls the same modules
        torch.testing.assert_close(again(x), _mlp_reference(model, x, weights=ALL, inputs=ALL),
                                   **EXACT)


# ------------------------------------------------------------------------------------------------
# DelayedQuantization


class TestDelayedQuantization:
    @pytest.mark.parametrize("start", [0, 1, 3])
    def test_float_for_exactly_start_steps_then_quantized(self, start):
        model, gm = _mlp_all_binary()
        delay = training.DelayedQuantization(gm, start)
        x = torch.randn(4, 64)
        quantized = _mlp_reference(model, x, weights=ALL, inputs=ALL)
        float_out = model(x)
        for step in range(start + 3):
            expected = float_out if step < start else quantized
            torch.testing.assert_close(gm(x), expected, **EXACT)
            assert delay.quantizing is (step >= start)
            delay.step()
        assert delay.step_count == start + 3

    def test_roles_delay_only_the_inputs(self):
        model, gm = _mlp_all_binary()
        delay = training.DelayedQuantization(gm, 2, roles="input")
        x = torch.randn(4, 64)
        torch.testing.assert_close(gm(x), _mlp_reference(model, x, weights=ALL, inputs=set()),
                                   **EXACT)
        delay.step()
        delay.step()
        torch.testing.assert_close(gm(x), _mlp_reference(model, x, weights=ALL, inputs=ALL),
                                   **EXACT)

    def test_state_dict_resumes_a_run(self):
        _, gm = _mlp_all_binary()
        delay = training.DelayedQuantization(gm, 5)
        for _ in range(5):
            delay.step()
        state = delay.state_dict()
        assert state == {"step_count": 5, "start_step": 5}
        _, fresh = _mlp_all_binary()
        resumed = training.DelayedQuantization(fresh, 5)
        assert not fresh.get_submodule("fc1_weight_quantizer").enabled
        resumed.load_state_dict(state)
        assert all(e.module.enabled for e in training.quantizers(fresh))

    def test_does_not_touch_flags_between_switches(self):
        _, gm = _mlp_all_binary()
        delay = training.DelayedQuantization(gm, 3)
        training.set_quantizers_enabled(gm, True, layers=["fc1"])  # user override
        delay.step()
        assert gm.get_submodule("fc1_weight_quantizer").enabled
        assert not gm.get_submodule("fc2_weight_quantizer").enabled

    @pytest.mark.parametrize("start", [-1, 1.5, True, "3"])
    def test_bad_start_step(self, start):
        _, gm = _mlp_all_binary()
        with pytest.raises(ValueError, match="start_step must be an int >= 0"):
            training.DelayedQuantization(gm, start)

    def test_empty_selection_is_a_value_error(self):
        _, gm = _mlp_all_binary()
        with pytest.raises(ValueError, match="DelayedQuantization: .* selects no quantizer"):
            training.DelayedQuantization(gm, 3, roles="output")


# ------------------------------------------------------------------------------------------------
# ProgressiveSignScheduler


@pytest.fixture
def _restore_global_scale():
    before = get_progressive_sign_scale()
    yield
    set_progressive_sign_scale(before)


def _progressive_model(global_scaling: bool) -> torch.fx.GraphModule:
    quantizer = (ProgressiveSign() if global_scaling
                 else ProgressiveSign(use_global_scaling=False, initial_scale=0.0))
    return fxquant.prepare(MLP(), fxquant.Recipe(weight=quantizer))


@pytest.mark.usefixtures("_restore_global_scale")
class TestProgressiveSignScheduler:
    @pytest.mark.parametrize("total", [1, 3, 7])
    def test_default_schedule_is_step_over_total_then_one(self, total):
        gm = _progressive_model(global_scaling=False)
        scheduler = training.ProgressiveSignScheduler(total, gm=gm)
        local = [m for m in gm.modules() if isinstance(m, ProgressiveSign)]
        assert len(local) == 3
        for k in range(total + 3):
            expected = k / total if k <= total else 1.0
            assert scheduler.scale == expected
            assert get_progressive_sign_scale() == expected
            assert all(m.scale == expected and m.current_scale == expected for m in local)
            scheduler.step()

    def test_custom_fn_gets_the_step(self):
        scheduler = training.ProgressiveSignScheduler(10, fn=lambda s: 0.25 * s * s)
        values = [get_progressive_sign_scale()]
        for _ in range(4):
            scheduler.step()
            values.append(get_progressive_sign_scale())
        assert values == [0.0, 0.25, 1.0, 2.25, 4.0]

    def test_global_instances_follow_the_global_scale(self):
        gm = _progressive_model(global_scaling=True)
        scheduler = training.ProgressiveSignScheduler(4, gm=gm)
        scheduler.step()
        q = gm.get_submodule("fc1_weight_quantizer")
        assert q.current_scale == 0.25

    def test_quantizer_output_uses_the_scheduled_scale(self):
        gm = _progressive_model(global_scaling=False).train()
        scheduler = training.ProgressiveSignScheduler(2, gm=gm)
        scheduler.step()  # scale 0.5: T = 1 - 4**-5, divisor 4**-5 = 1/1024
        w = gm.get_parameter("fc2.weight").detach()
        q = gm.get_submodule("fc2_weight_quantizer")
        torch.testing.assert_close(q(w), torch.clamp(w * 1024.0, -1.0, 1.0), **EXACT)

    def test_state_dict_round_trip(self):
        scheduler = training.ProgressiveSignScheduler(8)
        for _ in range(3):
            scheduler.step()
        resumed = training.ProgressiveSignScheduler(8)
        assert get_progressive_sign_scale() == 0.0
        resumed.load_state_dict(scheduler.state_dict())
        assert resumed.step_count == 3 and get_progressive_sign_scale() == 3 / 8

    @pytest.mark.parametrize("total", [0, -2, 2.0, True])
    def test_bad_total_steps(self, total):
        with pytest.raises(ValueError, match="total_steps must be an int >= 1"):
            training.ProgressiveSignScheduler(total)

    def test_model_without_progressive_sign_is_a_value_error(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        with pytest.raises(ValueError, match="no ProgressiveSign quantizer"):
            training.ProgressiveSignScheduler(10, gm=gm)

    @pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", None])
    def test_fn_must_return_a_finite_number(self, value):
        with pytest.raises(ValueError, match=r"fn\(0\) must return a finite real number"):
            training.ProgressiveSignScheduler(10, fn=lambda s: value)

    def test_fn_must_be_callable(self):
        with pytest.raises(ValueError, match="fn must be a callable"):
            training.ProgressiveSignScheduler(10, fn=0.5)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Latent weight clipping


def _mixed_mlp() -> torch.fx.GraphModule:
    """fc1 binary (ste_sign), fc2 ternary (ste_tern), fc3 float; binary inputs on fc1."""
    recipe = (fxquant.Recipe(weight="ste_sign", input="ste_sign")
              .for_name("fc2", weight="ste_tern").for_name("fc3", weight=None, input=None))
    return fxquant.prepare(MLP(), recipe)


def _fill(gm: nn.Module, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Set every parameter to a repeated pattern (values beyond ±1) and return copies."""
    with torch.no_grad():
        for p in gm.parameters():
            p.copy_(values.repeat(p.numel() // values.numel() + 1)[:p.numel()].view_as(p))
    return {n: p.detach().clone() for n, p in gm.named_parameters()}


PATTERN = torch.tensor([-3.0, -1.0, -0.75, -0.0, 0.0, 0.5, 1.0, 1.5, 7.0])


def _clamped(t: torch.Tensor, c: float) -> torch.Tensor:
    """Hand-written clamp oracle."""
    return torch.where(t > c, torch.full_like(t, c), torch.where(t < -c, torch.full_like(t, -c), t))


class TestLatentWeights:
    @pytest.mark.parametrize("bits, expected", [
        ((1,), ["fc1.weight"]),
        ((2,), ["fc2.weight"]),
        ((1, 2), ["fc1.weight", "fc2.weight"]),
        (None, ["fc1.weight", "fc2.weight"]),
    ])
    def test_selection_by_bits(self, bits, expected):
        assert list(training.latent_weights(_mixed_mlp(), bits=bits)) == expected

    def test_values_are_the_parameters(self):
        gm = _mixed_mlp()
        assert training.latent_weights(gm)["fc1.weight"] is gm.get_parameter("fc1.weight")

    def test_tied_weight_listed_once(self):
        assert list(training.latent_weights(fxquant.prepare(Twice(), fxquant.Recipe(
            weight="ste_sign")))) == ["fc.weight"]

    def test_functional_weight_is_found(self):
        class Functional(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(2, 3))

            def forward(self, x):
                return F.linear(x, self.w)

        gm = fxquant.prepare(Functional(), fxquant.Recipe(weight="ste_sign"))
        assert list(training.latent_weights(gm)) == ["w"]

    @pytest.mark.parametrize("bits", [(), (1.0,), (True,)])
    def test_bad_bits(self, bits):
        with pytest.raises(ValueError, match="bits must be a non-empty collection of ints"):
            training.latent_weights(_mixed_mlp(), bits=bits)


class TestClipLatentWeights:
    @pytest.mark.parametrize("clip", [1.0, 0.5, 2])
    def test_binary_latents_are_clamped_and_nothing_else(self, clip):
        gm = _mixed_mlp()
        before = _fill(gm, PATTERN)
        assert training.clip_latent_weights(gm, clip) == ["fc1.weight"]
        for name, p in gm.named_parameters():
            expected = _clamped(before[name], clip) if name == "fc1.weight" else before[name]
            torch.testing.assert_close(p.detach(), expected, **EXACT)
        assert gm.get_parameter("fc1.weight").abs().max() == clip

    def test_ternary_is_opt_in(self):
        gm = _mixed_mlp()
        before = _fill(gm, PATTERN)
        assert training.clip_latent_weights(gm, bits=(1, 2)) == ["fc1.weight", "fc2.weight"]
        torch.testing.assert_close(gm.get_parameter("fc2.weight").detach(),
                                   _clamped(before["fc2.weight"], 1.0), **EXACT)
        torch.testing.assert_close(gm.get_parameter("fc3.weight").detach(), before["fc3.weight"],
                                   **EXACT)

    def test_nan_stays_nan_and_grad_flag_kept(self):
        gm = _mixed_mlp()
        _fill(gm, torch.tensor([float("nan"), 5.0]))
        training.clip_latent_weights(gm)
        w = gm.get_parameter("fc1.weight")
        assert w.requires_grad and torch.isnan(w[0, 0]) and w[0, 1] == 1.0

    @pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
    def test_bad_clip_value(self, clip):
        with pytest.raises(ValueError, match="clip_value must be a finite number > 0"):
            training.clip_latent_weights(_mixed_mlp(), clip)

    def test_model_without_binary_latents_clips_nothing(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe(weight="ste_tern"))
        assert training.clip_latent_weights(gm) == []


class TestLatentWeightClip:
    def _step(self, gm: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        gm(torch.randn(8, 64)).sum().backward()
        opt.step()

    def test_clips_after_every_step_only_binary_latents(self):
        gm = _mixed_mlp()
        opt = torch.optim.SGD(gm.parameters(), lr=50.0)
        clip = training.LatentWeightClip(gm, opt, clip_value=0.5)
        assert list(clip.params) == ["fc1.weight"]
        for _ in range(2):
            self._step(gm, opt)
            assert gm.get_parameter("fc1.weight").abs().max() <= 0.5
        others = [gm.get_parameter(n).abs().max() for n in ("fc1.bias", "fc2.weight", "fc3.weight")]
        assert max(others) > 0.5  # the huge lr pushed the unclipped parameters out

    def test_construction_does_not_clip(self):
        gm = _mixed_mlp()
        before = _fill(gm, PATTERN)
        training.LatentWeightClip(gm, torch.optim.SGD(gm.parameters(), lr=0.1))
        torch.testing.assert_close(gm.get_parameter("fc1.weight").detach(), before["fc1.weight"],
                                   **EXACT)

    def test_remove_stops_clipping(self):
        gm = _mixed_mlp()
        opt = torch.optim.SGD(gm.parameters(), lr=1.0)
        clip = training.LatentWeightClip(gm, opt)
        clip.remove()
        _fill(gm, PATTERN)
        opt.zero_grad()
        for p in gm.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert gm.get_parameter("fc1.weight").abs().max() == 7.0

    def test_model_without_latents_is_a_value_error(self):
        gm = fxquant.prepare(MLP(), fxquant.Recipe(weight="ste_tern"))
        with pytest.raises(ValueError, match=r"bits=\(1, 2\) adds ternary"):
            training.LatentWeightClip(gm, torch.optim.SGD(gm.parameters(), lr=0.1))

    def test_optimizer_without_the_latents_is_a_value_error(self):
        gm = _mixed_mlp()
        opt = torch.optim.SGD([gm.get_parameter("fc3.weight")], lr=0.1)
        with pytest.raises(ValueError, match="updates none of the latent weights fc1.weight"):
            training.LatentWeightClip(gm, opt)


class TestClipWarning:
    MESSAGE = "left their quantizer's straight-through gradient window unclipped"

    def _train(self, gm: nn.Module, opt: torch.optim.Optimizer, steps: int, after=None,
               forwards: int = 1) -> list:
        with _catch() as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                opt.zero_grad()
                for _ in range(forwards):
                    gm(torch.randn(4, 64)).square().sum().backward()
                opt.step()  # the line warned about: the check runs from optimizer hooks
                if after is not None:
                    after()
        return [w for w in caught if self.MESSAGE in str(w.message)]

    def _model(self, recipe: fxquant.Recipe | None = None) -> torch.fx.GraphModule:
        torch.manual_seed(0)
        gm = fxquant.prepare(MLP(), recipe or fxquant.Recipe(weight="ste_sign"))
        return gm

    @staticmethod
    def _watched(gm: nn.Module) -> list[str]:
        """The layers whose latents the model's clip watch still checks."""
        watch = gm.__dict__.get("_fxquant_clip_watch")
        if watch is None or watch.warned:
            return []
        return [e.label for e in watch.entries]

    @staticmethod
    def _peak(gm: nn.Module, name: str = "fc1.weight") -> float:
        return float(gm.get_parameter(name).detach().abs().max())

    def test_fires_once_naming_the_layer_and_pointing_at_the_callers_line(self):
        gm = self._model()
        assert training.install_clip_warning(gm) == 3  # prepare installed it: no second hook
        caught = self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=4)
        assert self._peak(gm) > 1.0  # the oracle: fc1's latents did leave [-1, 1]
        assert len(caught) == 1
        assert "'fc1' (max |w| = " in str(caught[0].message)
        assert caught[0].filename == __file__
        assert "the line warned about" in open(__file__).read().splitlines()[caught[0].lineno - 1]
        assert self._watched(gm) == []  # warned once: the model is not checked again

    def test_silent_while_updated_latents_stay_inside_the_window(self):
        gm = self._model()
        opt = torch.optim.SGD(gm.parameters(), lr=1e-7)
        assert self._train(gm, opt, steps=3) == []
        assert max(self._peak(gm, f"fc{i}.weight") for i in (1, 2, 3)) < 1.0

    @pytest.mark.parametrize("clip", [
        lambda p: p.clamp_(-1, 1),  # under torch.no_grad(), below
        lambda p: p.data.clamp_(-1, 1),  # does not bump p's version counter
    ], ids=["p.clamp_", "p.data.clamp_"])
    def test_silent_when_clipping_by_hand_after_each_step(self, clip):
        gm = self._model()
        opt = torch.optim.SGD(gm.parameters(), lr=10.0)
        left = []

        def clip_all() -> None:
            left.append(self._peak(gm))
            with torch.no_grad():
                for p in gm.parameters():
                    clip(p)

        assert self._train(gm, opt, steps=3, after=clip_all) == []
        assert max(left) > 1.0  # unclipped, these latents would have warned
        assert self._watched(gm) == ["fc1", "fc2", "fc3"]  # still watched

    def test_silent_when_clipping_with_clip_latent_weights(self):
        gm = self._model()
        opt = torch.optim.SGD(gm.parameters(), lr=10.0)
        assert self._train(gm, opt, steps=3, after=lambda: training.clip_latent_weights(gm)) == []

    def test_silent_with_latent_weight_clip(self):
        gm = self._model()
        opt = torch.optim.Adam(gm.parameters(), lr=0.1)
        training.LatentWeightClip(gm, opt)
        assert self._train(gm, opt, steps=3) == []
        assert self._watched(gm) == []

    @pytest.mark.parametrize("weight", [
        ProgressiveSign(use_global_scaling=False), SteSign(clip_value=None),
        MagnitudeAwareSign(clip_value=None), "swish_sign",
    ], ids=["ProgressiveSign", "ste_sign-None", "magnitude_aware_sign-None", "swish_sign"])
    def test_never_for_quantizers_whose_gradient_has_no_window(self, weight):
        gm = self._model(fxquant.Recipe(weight=weight))
        assert training.install_clip_warning(gm) == 0
        assert self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=3) == []
        assert self._peak(gm) > 1.0

    def test_the_window_is_the_quantizers_own(self):
        gm = self._model(fxquant.Recipe(weight=SteSign(clip_value=1e3)))
        assert self._train(gm, torch.optim.SGD(gm.parameters(), lr=1e-3), steps=3) == []
        assert 1.0 < self._peak(gm) < 1e3
        gm = self._model(fxquant.Recipe(weight="approx_sign"))  # window [-1, 1]
        assert len(self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=3)) == 1

    def test_checks_values_once_per_step_at_most_and_ever_more_rarely(self, monkeypatch):
        checked_at = []
        check = training._ClipWatch.check
        monkeypatch.setattr(training._ClipWatch, "check",
                            lambda self: (checked_at.append(self.steps), check(self))[1])
        gm = self._model()
        opt = torch.optim.SGD(gm.parameters(), lr=1e-7)
        assert self._train(gm, opt, steps=9, forwards=3) == []
        assert checked_at == [1, 2, 4, 8]  # at the start of the step after those steps

    def test_silent_before_the_first_step_and_with_gradient_accumulation(self):
        gm = self._model()
        with torch.no_grad():
            gm.get_parameter("fc1.weight").mul_(10.0)  # outside the window, but never stepped
        with _catch() as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                gm(torch.randn(4, 64)).sum().backward()
        assert caught == []

    @pytest.mark.parametrize("mode", ["eval", "no_grad"])
    def test_silent_outside_training(self, mode):
        gm = self._model()
        opt = torch.optim.SGD(gm.parameters(), lr=10.0)
        gm(torch.randn(4, 64)).square().sum().backward()
        opt.step()
        assert self._peak(gm) > 1.0
        gm.eval() if mode == "eval" else None
        with _catch() as caught, torch.set_grad_enabled(mode != "no_grad"):
            warnings.simplefilter("always")
            gm(torch.randn(4, 64))
        assert caught == []

    def test_clipping_only_ternary_still_warns_for_binary(self):
        recipe = fxquant.Recipe(weight="ste_sign").for_name("fc2", weight="ste_tern")
        gm = self._model(recipe)
        assert training.install_clip_warning(gm) == 2  # ternary fc2 is not watched
        opt = torch.optim.SGD(gm.parameters(), lr=10.0)
        clip = lambda: training.clip_latent_weights(gm, bits=(2,))  # noqa: E731
        assert len(self._train(gm, opt, steps=3, after=clip)) == 1

    def test_installing_twice_watches_each_quantizer_once(self):
        gm = self._model()
        assert training.install_clip_warning(gm) == 3
        assert self._watched(gm) == ["fc1", "fc2", "fc3"]
        assert len(self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=3)) == 1

    def test_a_deep_copy_watches_afresh(self):
        gm = self._model()
        other = copy.deepcopy(gm)
        assert len(self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=2)) == 1
        assert len(self._train(other, torch.optim.SGD(other.parameters(), lr=10.0), steps=2)) == 1

    def test_a_pickled_model_keeps_the_check(self):
        gm = pickle.loads(pickle.dumps(self._model()))
        assert len(self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=2)) == 1

    def test_prepare_installs_the_check(self):
        torch.manual_seed(0)
        gm = fxquant.prepare(MLP(), fxquant.Recipe.bnn().with_nonnegative_inputs("ignore"))
        caught = self._train(gm, torch.optim.SGD(gm.parameters(), lr=10.0), steps=2)
        assert len(caught) == 1 and "'fc2'" in str(caught[0].message)


# ------------------------------------------------------------------------------------------------
# parameter_groups


class TestParameterGroups:
    @pytest.mark.parametrize("model_fn, recipe, latents", [
        (MLP, fxquant.Recipe.bnn(), ["fc2.weight"]),
        (MLP, fxquant.Recipe(weight="ste_sign"), ["fc1.weight", "fc2.weight", "fc3.weight"]),
        (SmallCNN, fxquant.Recipe.bnn(), ["conv2.weight"]),
        (SmallCNN, fxquant.Recipe(weight="ste_sign").for_name("fc", weight="ste_tern"),
         ["conv1.weight", "conv2.weight"]),
        (MLP, fxquant.Recipe(), []),
    ])
    def test_partition_every_parameter_exactly_once(self, model_fn, recipe, latents):
        gm = fxquant.prepare(model_fn(), recipe)
        latent, real = training.parameter_groups(gm)
        ids = [id(p) for p in latent["params"] + real["params"]]
        assert sorted(ids) == sorted(id(p) for p in gm.parameters())
        assert len(set(ids)) == len(ids)
        names = {id(p): n for n, p in gm.named_parameters()}
        assert [names[id(p)] for p in latent["params"]] == latents
        assert [names[id(p)] for p in real["params"]] == [
            n for n, _ in gm.named_parameters() if n not in latents]

    def test_options_and_optimizer(self):
        gm = fxquant.prepare(SmallCNN(), fxquant.Recipe(weight="ste_sign"))
        groups = training.parameter_groups(gm, latent={"lr": 0.5, "weight_decay": 0.0},
                                           real={"weight_decay": 1e-4})
        opt = torch.optim.SGD(groups, lr=0.01)
        assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.5, 0.0),
                                                                            (0.01, 1e-4)]

    def test_bits_none_groups_every_quantized_weight(self):
        gm = _mixed_mlp()
        latent, _ = training.parameter_groups(gm, bits=None)
        assert latent["params"] == [gm.get_parameter("fc1.weight"),
                                    gm.get_parameter("fc2.weight")]

    def test_params_in_options_is_a_value_error(self):
        gm = _mixed_mlp()
        with pytest.raises(ValueError, match="real holds group options"):
            training.parameter_groups(gm, real={"params": []})


def test_reference_oracle_matches_ste_tern_import():
    """Guard: the mixed recipe really quantizes fc2 with ste_tern (oracle of the clip tests)."""
    gm = _mixed_mlp()
    w = gm.get_parameter("fc2.weight")
    torch.testing.assert_close(gm.get_submodule("fc2_weight_quantizer")(w), ste_tern(w), **EXACT)
