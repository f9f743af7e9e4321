"""Recipe slots, refinements, precedence (global < type < first/last < regex < name), presets."""

from __future__ import annotations

import re
import warnings

import pytest
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.graph.meta import get_record
from fxquant.graph.recipe import LayerInfo, Recipe
from fxquant.quantizers import SteSign, SteTern
from tests.models import MLP


def _resolved(recipe: Recipe, path: str, module_type=nn.Conv2d, function=None, edge=False):
    specs = recipe.resolve(LayerInfo(path, module_type, function, is_first=edge, is_last=edge))
    return {slot: (spec.quantizer if isinstance(spec.quantizer, str)
                   else type(spec.quantizer).__name__, spec.rule) for slot, spec in specs}


class TestPrecedence:
    recipe = (Recipe(weight="ste_sign", input="ste_sign", keep_first_last=True)
              .for_name("layer4.conv", weight="ste_tern")
              .for_regex(r"layer4\..*", weight="dorefa", input=None)
              .for_type(nn.Conv2d, weight="approx_sign", output="ste_heaviside"))

    @pytest.mark.parametrize("path, module_type, edge, expected", [
        ("stem", nn.Linear, False,
         {"weight": ("ste_sign", "global"), "input": ("ste_sign", "global")}),
        ("layer1.conv", nn.Conv2d, False,
         {"weight": ("approx_sign", "type:Conv2d"), "input": ("ste_sign", "global"),
          "output": ("ste_heaviside", "type:Conv2d")}),
        ("layer4.other", nn.Conv2d, False,
         {"weight": ("dorefa", r"regex:layer4\..*"),
          "output": ("ste_heaviside", "type:Conv2d")}),
        ("layer4.conv", nn.Conv2d, False,
         {"weight": ("ste_tern", "name:layer4.conv"),
          "output": ("ste_heaviside", "type:Conv2d")}),
        ("first", nn.Conv2d, True, {}),  # first/last beats global and type rules
        ("layer4.conv", nn.Conv2d, True,  # ... but not regex and name rules
         {"weight": ("ste_tern", "name:layer4.conv")}),
    ])
    def test_resolution(self, path, module_type, edge, expected):
        assert _resolved(self.recipe, path, module_type, edge=edge) == expected

    def test_for_first_and_for_last(self):
        r = (Recipe(weight="ste_sign", keep_first_last=True).for_first(input="ste_tern")
             .for_last(output="dorefa"))
        first = r.resolve(LayerInfo("a", nn.Linear, None, is_first=True))
        last = r.resolve(LayerInfo("b", nn.Linear, None, is_last=True))
        middle = r.resolve(LayerInfo("c", nn.Linear, None))
        assert [(s, q.quantizer, q.rule) for s, q in first] == [("input", "ste_tern", "first")]
        assert [(s, q.quantizer, q.rule) for s, q in last] == [("output", "dorefa", "last")]
        assert [(s, q.quantizer) for s, q in middle] == [("weight", "ste_sign")]

    def test_later_rule_of_the_same_kind_wins(self):
        r = Recipe().for_name("a", weight="ste_sign").for_name("a", weight="ste_tern")
        assert _resolved(r, "a") == {"weight": ("ste_tern", "name:a")}

    def test_regex_must_match_the_whole_path(self):
        r = Recipe().for_regex("conv", weight="ste_sign")
        assert _resolved(r, "layer.conv") == {}
        assert _resolved(r, "conv") == {"weight": ("ste_sign", "regex:conv")}

    def test_type_rule_matches_subclasses_and_functions(self):
        class MyConv(nn.Conv2d):
            pass

        r = Recipe().for_type(nn.Conv2d, weight="ste_sign").for_type(F.linear, input="ste_sign")
        assert _resolved(r, "x", MyConv) == {"weight": ("ste_sign", "type:Conv2d")}
        assert _resolved(r, "y", None, F.linear) == {"input": ("ste_sign", "type:linear")}

    def test_refinements_return_new_recipes(self):
        base = Recipe(weight="ste_sign")
        refined = base.for_name("fc", weight=None)
        assert base.rules == () and len(refined.rules) == 1


class TestSlotValues:
    def test_instance_is_deep_copied_per_layer(self):
        shared = SteTern(threshold_value=0.3)
        prepared = fxquant.prepare(MLP(), Recipe(weight=shared))
        copies = [prepared.fc1_weight_quantizer, prepared.fc2_weight_quantizer]
        assert all(isinstance(q, SteTern) and q.threshold_value == 0.3 for q in copies)
        assert copies[0] is not copies[1] and shared not in copies

    def test_factory(self):
        prepared = fxquant.prepare(MLP(), Recipe(weight=lambda: SteSign(clip_value=2.0)))
        assert prepared.fc3_weight_quantizer.clip_value == 2.0

    @pytest.mark.parametrize("call", [
        lambda: Recipe(weight="no_such_quantizer"),
        lambda: Recipe().for_name("fc", weight="no_such_quantizer"),
        lambda: Recipe(weight=42),
        lambda: Recipe().for_type(42, weight="ste_sign"),
        lambda: Recipe().for_type("conv", weight="ste_sign"),
        lambda: Recipe().for_type(int, weight="ste_sign"),
        lambda: Recipe().for_regex("[unclosed", weight="ste_sign"),
        lambda: Recipe().for_regex(3, weight="ste_sign"),
        lambda: Recipe().for_name("", weight="ste_sign"),
        lambda: Recipe().for_name("fc", wieght="ste_sign"),
        lambda: fxquant.quantizers.get("dorefa", k_bit=0),
    ])
    def test_bad_input_raises_value_error(self, call):
        with pytest.raises(ValueError):
            call()

    def test_factory_returning_a_non_quantizer_is_an_error_at_prepare(self):
        with pytest.raises(ValueError, match="not a fxquant Quantizer"):
            fxquant.prepare(MLP(), Recipe(weight=lambda: nn.Identity()))


class TestMatchingNothing:
    def test_recipe_quantizing_no_layer_warns(self):
        with pytest.warns(UserWarning, match="quantizes no layer"):
            fxquant.prepare(nn.Sequential(nn.ReLU()), Recipe(weight="ste_sign"))

    def test_strict_recipe_errors_when_nothing_is_quantized(self):
        with pytest.raises(ValueError, match="quantizes no layer"):
            fxquant.prepare(nn.Sequential(nn.ReLU()), Recipe(weight="ste_sign", strict=True))

    def test_strict_rule_matching_nothing_is_an_error(self):
        recipe = Recipe(weight="ste_sign", strict=True).for_name("fc9", weight=None)
        with pytest.raises(ValueError, match=r"name:fc9.*fc1, fc2, fc3"):
            fxquant.prepare(MLP(), recipe)

    def test_float_recipe_does_not_warn(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fxquant.prepare(MLP(), Recipe())


class TestPresets:
    @pytest.mark.parametrize("recipe, weight, input_", [
        (Recipe.bnn(), "ste_sign", "ste_sign"),
        (Recipe.xnor(), "magnitude_aware_sign", "ste_sign"),
        (Recipe.bireal(), "magnitude_aware_sign", "approx_sign"),
        (Recipe.twn(), "ste_tern", None),
        (Recipe.dorefa(3, 4), "dorefa", "dorefa"),
    ])
    def test_middle_layer_quantized_first_and_last_float(self, recipe, weight, input_):
        prepared = fxquant.prepare(MLP(), recipe)
        records = {r.layer: r for n in prepared.graph.nodes
                   if (r := get_record(n)) is not None and r.role == "layer"}
        assert records["fc1"].specs == () and records["fc3"].specs == ()
        assert prepared.fc2_weight_quantizer.name == weight
        if input_ is None:
            assert not hasattr(prepared, "fc2_input_quantizer")
        else:
            assert prepared.fc2_input_quantizer.name == input_

    def test_dorefa_bits(self):
        prepared = fxquant.prepare(MLP(), Recipe.dorefa(3, 4))
        assert prepared.fc2_weight_quantizer.bits == 3
        assert prepared.fc2_input_quantizer.bits == 4

    def test_twn_uses_ternary_weight_networks_threshold(self):
        prepared = fxquant.prepare(MLP(), Recipe.twn())
        assert prepared.fc2_weight_quantizer.ternary_weight_networks is True

    def test_wage_places_quantizers_as_qpytorch_vgg(self):
        prepared = fxquant.prepare(MLP(), Recipe.wage(bits_W=2, bits_A=8, bits_G=8, bits_E=6))
        for layer in ("fc1", "fc2", "fc3"):
            assert getattr(prepared, f"{layer}_weight_quantizer").bits == 2
        first_in = prepared.fc1_input_quantizer  # QA only, on the network input only
        assert (first_in.bits_A, first_in.bits_E) == (8, -1)
        assert not hasattr(prepared, "fc2_input_quantizer")
        for layer in ("fc1", "fc2"):  # QA + QE with the clamp mask, after hidden activations
            q = getattr(prepared, f"{layer}_output_quantizer")
            assert (q.bits_A, q.bits_E) == (8, 6)
            assert not hasattr(prepared, f"{layer}_error_quantizer")
        assert not hasattr(prepared, "fc3_output_quantizer")  # logits: QE only
        assert prepared.fc3_error_quantizer.bits_E == 6

    def test_wage_bits_g_is_validated(self):
        with pytest.raises(ValueError, match="bits_G"):
            Recipe.wage(bits_G=0)


def test_instance_changed_between_prepares_is_used_as_it_is_now():
    shared = SteTern(threshold_value=0.3)
    recipe = Recipe(weight=shared)
    fxquant.prepare(MLP(), recipe)
    shared.threshold_value = 0.5
    assert fxquant.prepare(MLP(), recipe).fc1_weight_quantizer.threshold_value == 0.5


def test_factory_is_called_for_every_layer():
    calls = []

    def factory():
        calls.append(1)
        return SteSign()

    fxquant.prepare(MLP(), Recipe(weight=factory))
    assert len(calls) == 3 + 1  # one per layer, one to record the recipe for fxquant.save


class TestErrorsThatTeach:
    """Mistakes larq and bitorch users make, each answered with the fix."""

    @pytest.mark.parametrize("kwargs, hint", [
        ({"kernel_quantizer": "ste_sign"}, "weight= for kernel_quantizer="),
        ({"input_quantizer": "ste_sign"}, "input= for input_quantizer="),
        ({"weights": "ste_sign"}, "weight= for weights="),
    ])
    def test_unknown_keyword_is_a_type_error_naming_the_slots_and_larqs_names(self, kwargs, hint):
        with pytest.raises(TypeError) as caught:
            Recipe(**kwargs)
        message = str(caught.value)
        assert hint in message
        assert "the slots are weight, input, output, error" in message
        assert "kernel_quantizer -> weight, input_quantizer -> input" in message

    def test_unknown_slot_of_a_rule_names_larqs_equivalent(self):
        with pytest.raises(ValueError, match="weight= for kernel_quantizer="):
            Recipe().for_name("fc1", kernel_quantizer="ste_sign")

    def test_known_keywords_still_work(self):
        recipe = Recipe(weight="ste_sign", strict=True, keep_first_last=True,
                        nonnegative_inputs="ignore")
        assert (recipe.weight, recipe.strict, recipe.keep_first_last) == ("ste_sign", True, True)

    @pytest.mark.parametrize("function, name", [
        (fxquant.quantizers.ste_sign, "ste_sign"),
        (fxquant.quantizers.approx_sign, "approx_sign"),
        (fxquant.quantizers.magnitude_aware_sign, "magnitude_aware_sign"),
        (fxquant.quantizers.ste_tern, "ste_tern"),
        (fxquant.quantizers.dorefa, "dorefa"),
    ])
    def test_a_quantizer_function_means_its_registered_quantizer(self, function, name):
        recipe = Recipe(weight=function).for_name("fc2", input=function)
        assert recipe.weight == name and recipe.rules[0].slots == (("input", name),)
        prepared = fxquant.prepare(MLP(), recipe.with_nonnegative_inputs("ignore"))
        assert type(prepared.fc1_weight_quantizer) is type(fxquant.quantizers.get(name))
        assert fxquant.quantizers.get(function).name == name

    @pytest.mark.parametrize("function, needs", [
        (fxquant.quantizers.k_bit_quantize, r"KBitQuantize\(k=\.\.\.\)"),
        (fxquant.quantizers.clamp_ste, r"ClampSTE\(min_value=\.\.\., max_value=\.\.\.\)"),
        (fxquant.quantizers.step_quantize, r"StepQuantize\(step=\.\.\.\)"),  # class: step=1
    ])
    def test_a_quantizer_function_needing_arguments_says_how_to_give_them(self, function, needs):
        with pytest.raises(ValueError, match=needs):
            Recipe(weight=function)

    def test_a_tensor_function_is_not_taken_for_a_factory(self):
        def my_sign(x):
            return x.sign()

        with pytest.raises(ValueError, match=r"my_sign\(x\) is not a quantizer factory"):
            Recipe(weight=my_sign)

    @pytest.mark.parametrize("name, suggestion", [
        ("sign", "did you mean 'ste_sign'"),
        ("SteSign", "did you mean 'ste_sign'?"),
        ("STE_SIGN", "did you mean 'ste_sign'?"),
        ("MagnitudeAwareSign", "did you mean 'magnitude_aware_sign'?"),
        ("ste_tenr", "did you mean 'ste_tern'"),
        ("kbit", "'k_bit_quantize'"),
    ])
    def test_unknown_name_suggests_the_registered_one(self, name, suggestion):
        for call in (lambda: Recipe(weight=name), lambda: Recipe().for_name("fc1", input=name),
                     lambda: fxquant.quantizers.get(name)):
            with pytest.raises(ValueError, match=re.escape(suggestion)):
                call()

    def test_unknown_name_without_a_close_match_lists_the_names(self):
        with pytest.raises(ValueError, match=r"unknown quantizer 'xyz'; known names: .*ste_sign"):
            Recipe(weight="xyz")

    def test_wage_bit_widths_are_keyword_only(self):
        with pytest.raises(TypeError, match="positional"):
            Recipe.wage(2, 8, 6)  # once silently bits_G=6

    @pytest.mark.parametrize("recipe, rule", [
        (Recipe(weight="ste_sign").for_name("fc9", weight=None), "name:fc9"),
        (Recipe(weight="ste_sign").for_regex(r"layer\d", weight=None), r"regex:layer\d"),
    ])
    def test_name_or_regex_rule_matching_nothing_warns(self, recipe, rule):
        with pytest.warns(UserWarning, match=re.escape(rule) + ".*fc1, fc2, fc3") as caught:
            fxquant.prepare(MLP(), recipe)
        assert [w.filename for w in caught if "match no layer" in str(w.message)] == [__file__]

    def test_type_rule_matching_nothing_does_not_warn(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fxquant.prepare(MLP(), Recipe(weight="ste_sign").for_type(nn.Conv2d, weight=None))

    def test_rule_naming_a_layer_that_stays_float_does_not_warn_as_unmatched(self):
        class Leafy(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = nn.Sequential(nn.Linear(4, 4))
                self.fc = nn.Linear(4, 2)

            def forward(self, x):
                return self.fc(self.block(x))

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fxquant.prepare(Leafy(), Recipe(weight="ste_sign").for_name("block.0", weight=None),
                            leaf_modules=["block"])
        assert not [w for w in caught if "match no layer" in str(w.message)]

    @pytest.mark.parametrize("done", ["prepared", "converted", "wrapped"])
    def test_preparing_a_prepared_model_says_so(self, done):
        model = fxquant.prepare(MLP(), Recipe.bnn().with_nonnegative_inputs("ignore"))
        if done == "converted":
            model = fxquant.convert(model)
        if done == "wrapped":
            model = nn.DataParallel(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ValueError, match="already (prepared|converted).*pass the float"):
                fxquant.prepare(model, Recipe.bnn())
        assert not [w for w in caught if "quantizes no layer" in str(w.message)]
