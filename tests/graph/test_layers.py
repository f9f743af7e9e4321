"""Which modules are weighted layers: Linear/Conv/ConvTranspose subclasses, parametrized and
weight-normed layers; and the one warning naming every weighted module that stays in float.

Oracles: the float model itself (quantizers disabled must give its output bit for bit) and the
layer's functional form written out by hand with the quantizer applied to its weight.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import fxquant
from fxquant.inspect.summary import layer_stats
from fxquant.quantizers import magnitude_aware_sign, ste_sign
from fxquant.training import set_quantizers_enabled

torch.manual_seed(0)

FLOAT_REPORT = "stay in float although the recipe quantizes them"


class Wrap(nn.Module):
    """``layer`` between two float Linear/Conv-free ops, so the layer is the only weighted one."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * 0.5) + 1


def _prepare(model: nn.Module, recipe: fxquant.Recipe, **kwargs) -> torch.fx.GraphModule:
    """prepare, failing on fxquant's float-layer warning (tests that expect it catch it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{FLOAT_REPORT}")
        prepared = fxquant.prepare(model, recipe, **kwargs)
    prepared.graph.lint()
    return prepared


def _float_report(model: nn.Module, recipe: fxquant.Recipe, **kwargs) -> str:
    """The one float-layer warning prepare gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxquant.prepare(model, recipe, **kwargs).graph.lint()
    reports = [str(w.message) for w in caught if FLOAT_REPORT in str(w.message)]
    assert len(reports) == 1, [str(w.message) for w in caught]
    return reports[0]


def _assert_float_when_disabled(prepared: torch.fx.GraphModule, model: nn.Module,
                                x: torch.Tensor) -> None:
    set_quantizers_enabled(prepared, False)
    try:
        assert torch.equal(prepared(x), model(x))
    finally:
        set_quantizers_enabled(prepared, True)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


class TestLinearSubclasses:
    @pytest.mark.parametrize("make", [
        lambda: NonDynamicallyQuantizableLinear(6, 5),  # out_proj of nn.MultiheadAttention
        lambda: nn.Linear(6, 5),
    ], ids=["NonDynamicallyQuantizableLinear", "Linear"])
    def test_subclass_keeping_forward_gets_a_weight_quantizer(self, make):
        model = Wrap(make())
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        assert isinstance(prepared.get_submodule("layer_weight_quantizer"), nn.Module)
        x = torch.randn(3, 6)
        w, b = model.layer.weight, model.layer.bias
        assert torch.equal(prepared(x), F.linear(x * 0.5, ste_sign(w), b) + 1)
        _assert_float_when_disabled(prepared, model, x)

    def test_type_rule_for_the_base_class_matches_the_subclass(self):
        model = Wrap(NonDynamicallyQuantizableLinear(6, 5))
        recipe = fxquant.Recipe(weight="ste_sign", input="ste_sign", strict=True)
        prepared = _prepare(model, recipe.for_type(nn.Linear, weight=None))
        assert "layer_weight_quantizer" not in dict(prepared.named_modules())
        assert "layer_input_quantizer" in dict(prepared.named_modules())

    def test_materialised_lazy_linear_is_a_linear(self):
        lazy = nn.LazyLinear(5)
        lazy(torch.randn(1, 6))
        prepared = _prepare(Wrap(lazy), fxquant.Recipe(weight="ste_sign"))
        assert "layer_weight_quantizer" in dict(prepared.named_modules())

    def test_traced_through_subclass_is_quantized_through_its_function_call(self):
        class Mine(nn.Linear):  # defined here, so not a leaf: fx traces its forward
            pass

        model = Wrap(Mine(6, 5))
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        x = torch.randn(3, 6)
        w, b = model.layer.weight, model.layer.bias
        assert torch.equal(prepared(x), F.linear(x * 0.5, ste_sign(w), b) + 1)


class TestParametrizedLayers:
    """The functional call recomputes the parametrized weight at every run from the originals,
    which stay the trained parameters under their own state_dict keys."""

    @pytest.mark.parametrize("make, x", [
        (lambda: weight_norm(nn.Linear(6, 5)), torch.randn(3, 6)),
        (lambda: weight_norm(nn.Conv2d(3, 4, 3, padding=1, bias=False)), torch.randn(2, 3, 5, 5)),
        (lambda: weight_norm(nn.Conv1d(3, 4, 3, padding=2, padding_mode="circular"), dim=None),
         torch.randn(2, 3, 7)),
    ], ids=["linear", "conv2d-no-bias", "conv1d-circular"])
    def test_weight_norm_layer_is_quantized_and_state_is_untouched(self, make, x):
        model = Wrap(make())
        before = _state(model)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        _assert_same_state(_state(prepared), before)
        _assert_same_state(_state(model), before)
        assert "layer_weight_quantizer" in dict(prepared.named_modules())
        _assert_float_when_disabled(prepared, model, x)
        _assert_same_state(_state(prepared), before)

    def test_output_and_gradients_use_the_parametrized_weight_of_each_step(self):
        model = Wrap(weight_norm(nn.Linear(6, 5)))
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        layer = prepared.get_submodule("layer")
        x = torch.randn(3, 6)
        with torch.no_grad():
            layer.parametrizations.weight.original1.mul_(-1)  # a training step's update
        assert torch.equal(prepared(x), F.linear(x * 0.5, ste_sign(layer.weight), layer.bias) + 1)
        prepared(x).square().sum().backward()
        originals = layer.parametrizations.weight
        for p in (originals.original0, originals.original1, layer.bias):
            assert p.grad is not None and p.grad.abs().sum() > 0

    def test_custom_parametrization_is_never_written_back(self):
        class Symmetric(nn.Module):
            armed = False

            def forward(self, w):
                return w.triu() + w.triu(1).mT

            def right_inverse(self, w):
                assert not self.armed, "prepare must not assign the parametrized weight"
                return w

        layer = nn.Linear(5, 5)
        symmetric = Symmetric()
        parametrize.register_parametrization(layer, "weight", symmetric)
        symmetric.armed = True
        model = Wrap(layer)
        before = _state(model)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        copied = copy.deepcopy(prepared)
        x = torch.randn(4, 5)
        for gm in (prepared, copied):
            _assert_same_state(_state(gm), before)
            assert torch.equal(gm(x), F.linear(x * 0.5, ste_sign(layer.weight), layer.bias) + 1)

    def test_convert_equals_the_prepared_model(self):
        model = Wrap(weight_norm(nn.Conv2d(3, 4, 3)))
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        x = torch.randn(2, 3, 6, 6)
        assert torch.equal(fxquant.convert(prepared)(x), prepared.eval()(x))

    def test_summary_counts_the_computed_weight(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            old = torch.nn.utils.weight_norm(nn.Linear(6, 4))
        model = nn.Sequential(weight_norm(nn.Linear(5, 6)), old)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        stats = layer_stats(prepared)
        assert [(s.layer, s.weight_quantizer, s.weight_count) for s in stats] == [
            ("0", "ste_sign", 30), ("1", "ste_sign", 24)]

    def test_old_weight_norm_hook_form_recomputes_the_weight(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch deprecates this form
            layer = torch.nn.utils.weight_norm(nn.Conv2d(3, 4, 3, groups=1, dilation=2))
        model = Wrap(layer)
        before = _state(model)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign"))
        x = torch.randn(2, 3, 7, 7)
        _assert_float_when_disabled(prepared, model, x)
        _assert_same_state(_state(prepared), before)
        trained = prepared.get_submodule("layer")
        with torch.no_grad():
            trained.weight_g.mul_(-2)  # a training step's update
        weight = torch._weight_norm(trained.weight_v, trained.weight_g, 0)
        expected = F.conv2d(x * 0.5, ste_sign(weight), trained.bias, dilation=2) + 1
        assert torch.equal(prepared(x), expected)
        prepared(x).sum().backward()
        assert trained.weight_g.grad is not None and trained.weight_v.grad is not None


class TestFunctionalForm:
    """With quantizers disabled the prepared layer computes exactly the module's forward."""

    @pytest.mark.parametrize("layer, shape", [
        (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (2, 4, 11)),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", bias=False), (2, 4, 6, 6)),
        (nn.Conv2d(4, 4, 3, padding="same", padding_mode="replicate", groups=4), (2, 4, 6, 6)),
        (nn.Conv3d(2, 3, 2, padding=1, padding_mode="circular"), (1, 2, 4, 4, 4)),
        (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
         (2, 4, 5)),
        (nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2, bias=False), (2, 4, 5, 5)),
        (nn.ConvTranspose3d(2, 3, 2, stride=(1, 2, 2), padding=1), (1, 2, 3, 4, 4)),
    ], ids=["conv1d", "conv2d-reflect", "conv2d-same-depthwise", "conv3d-circular", "convT1d",
            "convT2d", "convT3d"])
    def test_disabled_quantizers_give_the_float_output(self, layer, shape):
        model = Wrap(layer)
        prepared = _prepare(model, fxquant.Recipe(weight="magnitude_aware_sign"))
        assert "layer_weight_quantizer" in dict(prepared.named_modules())
        _assert_float_when_disabled(prepared, model, torch.randn(shape))

    def test_conv_transpose_weight_is_quantized_in_torch_layout(self):
        """magnitude_aware_sign scales per dim 0 of the stored weight, which for ConvTranspose is
        the input channel (larq's MagnitudeAwareSign on a Keras Conv2DTranspose kernel likewise
        reduces over all axes but the input channels)."""
        layer = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        prepared = _prepare(Wrap(layer), fxquant.Recipe(weight="magnitude_aware_sign"))
        x = torch.randn(2, 4, 5, 5)
        w = layer.weight
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)  # one per input channel
        expected = F.conv_transpose2d(x * 0.5, alpha * torch.where(w >= 0, 1.0, -1.0),
                                      layer.bias, stride=2, groups=2) + 1
        torch.testing.assert_close(prepared(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(magnitude_aware_sign(w), alpha * torch.where(w >= 0, 1.0, -1.0),
                                   rtol=0, atol=0)

    def test_conv_transpose_given_output_size_stays_float_and_is_reported(self):
        class WithSize(nn.Module):
            def __init__(self):
                super().__init__()
                self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1)

            def forward(self, x):
                return self.up(x, output_size=[10, 10])

        model = WithSize()
        message = _float_report(model, fxquant.Recipe(weight="ste_sign"))
        assert "up (ConvTranspose2d" in message and "output_size" in message


_opaque_calls = []


def opaque_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor):
    _opaque_calls.append(1)
    return F.linear(F.linear(x, qkv_weight), proj_weight)


torch.fx.wrap("opaque_attention")


class SwinLike(nn.Module):
    """Passes its Linears' weights into a wrapped function, as torchvision's Swin does."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.qkv = nn.Linear(4, 4, bias=False)
        self.proj = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(opaque_attention(self.embed(x), self.qkv.weight, self.proj.weight))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).relu()


class WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.block = Block()
        self.last = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.last(self.block(self.first(x)))


class TestFloatLayerReport:
    def test_weights_passed_to_a_wrapped_function_are_named_with_the_function(self):
        message = _float_report(SwinLike(), fxquant.Recipe(weight="ste_sign"))
        assert message.startswith("2 weighted layer(s)")
        assert ("  proj (Linear; recipe: weight): its parameters are "
                "passed to opaque_attention, which fxquant cannot see into") in message
        assert "  qkv (Linear; recipe: weight)" in message
        assert "embed" not in message and "head" not in message

    def test_layers_inside_a_user_leaf_module_are_reported(self):
        message = _float_report(WithBlock(), fxquant.Recipe(weight="ste_sign"),
                                leaf_modules=["block"])
        assert "  block.fc (Linear; recipe: weight): it is inside 'block' (Block)" in message
        assert "unused" not in message  # never called: nothing is lost

    def test_leaf_class_overriding_forward_is_reported_with_the_reason(self):
        class Scaled(nn.Linear):
            def forward(self, x):
                return super().forward(x) * 2

        model = Wrap(Scaled(4, 4))
        message = _float_report(model, fxquant.Recipe(weight="ste_sign"), leaf_modules=[Scaled])
        assert "layer (Scaled; recipe: weight): Scaled overrides Linear.forward" in message

    def test_hooks_and_unmaterialised_lazy_layers_are_reported(self):
        hooked = nn.Linear(4, 4)
        hooked.register_forward_hook(lambda m, i, o: o * 3)
        model = nn.Sequential(hooked, nn.LazyLinear(4))
        message = _float_report(model, fxquant.Recipe(weight="ste_sign"))
        assert "  0 (Linear; recipe: weight): it has forward/backward hooks" in message
        assert "  1 (LazyLinear; recipe: weight): lazy module not materialised" in message

    def test_hooked_layer_keeps_its_hook(self):
        hooked = nn.Linear(4, 4)
        hooked.register_forward_hook(lambda m, i, o: o * 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = fxquant.prepare(Wrap(hooked), fxquant.Recipe(weight="ste_sign"))
        x = torch.randn(2, 4)
        assert torch.equal(prepared(x), hooked(x * 0.5) + 1)

    def test_type_rule_on_a_module_that_is_no_layer_is_reported(self):
        model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4))
        message = _float_report(model, fxquant.Recipe().for_type(nn.Embedding, weight="ste_sign"))
        assert "0 (Embedding; recipe: weight): Embedding is not a Linear" in message

    def test_regex_rules_do_not_report_batch_norms(self):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        _prepare(model, fxquant.Recipe().for_regex(r".*", weight="ste_sign"))

    def test_layers_the_recipe_leaves_float_are_not_reported(self):
        recipe = fxquant.Recipe(weight="ste_sign").for_regex(r"qkv|proj", weight=None)
        _prepare(SwinLike(), recipe)
        _prepare(WithBlock(), fxquant.Recipe.bnn().for_name("block.fc", weight=None, input=None),
                 leaf_modules=["block"])

    def test_preset_first_and_last_layers_are_not_reported(self):
        _prepare(WithBlock(), fxquant.Recipe.bnn())

    def test_strict_recipe_raises_naming_the_layers(self):
        with pytest.raises(ValueError, match=r"(?s)1 weighted layer.*block\.fc \(Linear"):
            fxquant.prepare(WithBlock(), fxquant.Recipe(weight="ste_sign", strict=True),
                            leaf_modules=["block"])

    def test_strict_recipe_may_name_a_layer_it_leaves_float(self):
        recipe = fxquant.Recipe(weight="ste_sign", strict=True).for_name("block.fc", weight=None)
        _prepare(WithBlock(), recipe, leaf_modules=["block"])

    def test_wrapped_function_still_runs_on_the_float_weights(self):
        model = SwinLike()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"))
        set_quantizers_enabled(prepared, False)
        x = torch.randn(3, 4)
        assert torch.equal(prepared(x), model(x))


def test_the_float_layer_warning_points_at_the_callers_line():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model = nn.Sequential(nn.Linear(4, 4), Block(), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="stay in float") as caught:
        fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"), leaf_modules=[Block])
    assert all(w.filename == __file__ for w in caught if "stay in float" in str(w.message))
