"""check_nonnegative_inputs: a sign input quantizer reading a value >= 0 is a constant."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import Recipe, training
from fxquant.config import recipe_from_plain, recipe_to_plain
from fxquant.graph.passes.nonnegative import find_nonnegative_inputs
from tests.models import TorchvisionResNet, bireal_resnet18

BINARY = Recipe(weight="ste_sign", input="ste_sign")


class Probe(nn.Module):
    """stem -> ``make(stem output)`` -> binary conv ``body`` -> float head."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.body(self.make(self.stem(x)))


class ModuleProbe(Probe):
    def __init__(self, *modules: nn.Module) -> None:
        super().__init__(None)
        self.act = nn.Sequential(*modules)

    def forward(self, x):
        return self.body(self.act(self.stem(x)))


def _prepare(model: nn.Module, recipe: Recipe) -> tuple[torch.fx.GraphModule, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxquant.prepare(model, recipe.for_name("stem", weight=None, input=None))
    gm.graph.lint()
    return gm, [str(w.message) for w in caught if "non-negative" in str(w.message)]


NONNEGATIVE = {
    "relu": F.relu,
    "torch.relu": torch.relu,
    "relu_method": lambda x: x.relu(),
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "softmax": lambda x: F.softmax(x, dim=1),
    "abs": torch.abs,
    "abs_builtin": abs,
    "hardsigmoid": F.hardsigmoid,
    "clamp_min0": lambda x: x.clamp(min=0),
    "torch.clamp_0_1": lambda x: torch.clamp(x, 0.0, 1.0),
    "hardtanh_0_1": lambda x: F.hardtanh(x, 0.0, 1.0),
    # looked through
    "max_pool": lambda x: F.max_pool2d(F.relu(x), 1),
    "avg_pool": lambda x: F.avg_pool2d(torch.sigmoid(x), 1),
    "adaptive_avg_pool": lambda x: F.adaptive_avg_pool2d(F.relu(x), 4),
    "flatten_view": lambda x: F.relu(x).flatten(1).view(x.shape[0], 4, 8, 8),
    "reshape_contiguous": lambda x: F.relu(x).contiguous().reshape(-1, 4, 8, 8),
    "dropout": lambda x: F.dropout(F.relu(x), 0.1),
    "cat": lambda x: torch.cat([F.relu(x[:, :2]), torch.sigmoid(x[:, 2:])], 1),
    "add_of_two": lambda x: F.relu(x) + torch.abs(x),
    "mul_of_two": lambda x: F.relu(x) * torch.sigmoid(x),
    "add_positive_number": lambda x: F.relu(x) + 1.0,
    "chain": lambda x: F.avg_pool2d(F.max_pool2d(F.relu(x), 1), 1).flatten(1).view(-1, 4, 8, 8),
}

SIGNED = {
    "identity": lambda x: x,
    "hardtanh": F.hardtanh,
    "clamp_min_negative": lambda x: x.clamp(min=-1),
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "relu_minus_number": lambda x: F.relu(x) - 1.0,
    "add_signed": lambda x: F.relu(x) + x,
    "add_negative_number": lambda x: F.relu(x) + (-0.5),
    "cat_with_signed": lambda x: torch.cat([F.relu(x[:, :2]), x[:, 2:]], 1),
    "bicubic": lambda x: F.interpolate(F.relu(x), scale_factor=1.0, mode="bicubic"),
}


class TestWarning:
    @pytest.mark.parametrize("name", list(NONNEGATIVE))
    def test_warns_naming_the_layer_for_each_nonnegative_producer(self, name):
        gm, messages = _prepare(Probe(NONNEGATIVE[name]), BINARY)
        assert len(messages) == 1
        assert "body (ste_sign of" in messages[0] and "+1 everywhere" in messages[0]
        assert "ste_heaviside" in messages[0] and "with_nonnegative_inputs" in messages[0]

    @pytest.mark.parametrize("modules", [
        (nn.ReLU(),), (nn.ReLU6(),), (nn.Sigmoid(),), (nn.Hardsigmoid(),), (nn.Softmax(1),),
        (nn.Hardtanh(0.0, 1.0),), (nn.ReLU(inplace=True), nn.MaxPool2d(1)),
        (nn.ReLU(), nn.AvgPool2d(1), nn.Dropout(), nn.Identity()),
        (nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Unflatten(1, (4, 4, 4))),
    ], ids=lambda ms: "-".join(type(m).__name__ for m in ms))
    def test_warns_for_module_forms(self, modules):
        _, messages = _prepare(ModuleProbe(*modules), BINARY)
        assert len(messages) == 1 and "body (ste_sign of '" in messages[0]

    @pytest.mark.parametrize("name", list(SIGNED))
    def test_silent_when_the_value_can_be_negative(self, name):
        _, messages = _prepare(Probe(SIGNED[name]), BINARY)
        assert messages == []

    def test_silent_for_batch_norm_then_sign(self):
        _, messages = _prepare(ModuleProbe(nn.BatchNorm2d(4)), BINARY)
        assert messages == []

    def test_bireal_resnet_prepares_without_warning(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fxquant.prepare(bireal_resnet18(width=4), Recipe.bnn())

    @pytest.mark.parametrize("quantizer, effect", [
        ("ste_sign", "+1 everywhere"), ("approx_sign", "+1 everywhere"),
        ("swish_sign", "+1 everywhere"), ("magnitude_aware_sign", "+1 everywhere"),
        ("progressive_sign", "+1 everywhere"), ("ste_tern", "loses its -1 level"),
    ])
    def test_names_what_each_quantizer_loses(self, quantizer, effect):
        _, messages = _prepare(Probe(F.relu), Recipe(input=quantizer))
        assert len(messages) == 1 and effect in messages[0] and f"body ({quantizer} of" in (
            messages[0])

    @pytest.mark.parametrize("quantizer", ["ste_heaviside", "dorefa", "round_ste"])
    def test_silent_for_quantizers_meant_for_nonnegative_inputs(self, quantizer):
        assert _prepare(Probe(F.relu), Recipe(input=quantizer))[1] == []

    def test_one_warning_lists_every_layer(self):
        _, messages = _prepare(TorchvisionResNet(), Recipe.bnn())
        assert len(messages) == 1
        for layer in ("layer1.0.conv1", "layer1.0.conv2", "layer2.0.downsample.0"):
            assert f"{layer} (ste_sign of" in messages[0]
        assert "'relu' -> 'maxpool'" in messages[0]  # the path through the max pool

    def test_warning_points_at_the_callers_line(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fxquant.prepare(Probe(F.relu), BINARY)
        assert [w.filename for w in caught if "non-negative" in str(w.message)] == [__file__]

    def test_error_mode_raises_with_the_same_text(self):
        with pytest.raises(ValueError, match=r"body \(ste_sign of relu\)"):
            fxquant.prepare(Probe(F.relu), BINARY.with_nonnegative_inputs("error"))

    def test_ignore_mode_is_silent(self):
        assert _prepare(Probe(F.relu), BINARY.with_nonnegative_inputs("ignore"))[1] == []

    def test_find_reports_the_source(self):
        gm = fxquant.prepare(Probe(lambda x: F.max_pool2d(F.relu(x), 1)),
                             BINARY.with_nonnegative_inputs("ignore"))
        [found] = [f for f in find_nonnegative_inputs(gm) if f.layer == "body"]
        assert (found.kind, found.effect, found.source) == ("ste_sign", "constant",
                                                            "relu -> max_pool2d")


class TestRecipeOption:
    def test_default_is_warn_and_refinements_keep_the_mode(self):
        assert Recipe.bnn().nonnegative_inputs == "warn"
        recipe = Recipe.bnn().with_nonnegative_inputs("move").for_name("fc", weight=None)
        assert recipe.nonnegative_inputs == "move"

    def test_unknown_mode_is_a_value_error_listing_the_modes(self):
        with pytest.raises(ValueError, match="'warn', 'error', 'ignore', 'drop', 'move'"):
            Recipe.bnn().with_nonnegative_inputs("fix")

    @pytest.mark.parametrize("mode", ["warn", "error", "ignore", "drop", "move"])
    def test_round_trips_through_plain_data(self, mode):
        recipe = Recipe.bnn().with_nonnegative_inputs(mode)
        assert recipe_from_plain(recipe_to_plain(recipe)) == recipe

    def test_plain_data_without_the_field_means_warn(self):
        plain = recipe_to_plain(Recipe.bnn())
        del plain["nonnegative_inputs"]
        assert recipe_from_plain(plain).nonnegative_inputs == "warn"


# -- the rewrites on a small torchvision-style ResNet ------------------------------------------


def _binary_inputs(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every input quantizer reads in one forward of ``gm`` on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = [e.module.register_forward_hook(
        lambda m, i, o, n=e.name: seen.__setitem__(n, i[0].detach()))
        for e in training.quantizers(gm, roles="input")]
    loss = F.cross_entropy(gm(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    for h in handles:
        h.remove()
    return seen


def _rewritten(mode: str) -> tuple[nn.Module, torch.fx.GraphModule, list[str]]:
    torch.manual_seed(0)
    model = TorchvisionResNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxquant.prepare(model, Recipe.bnn().with_nonnegative_inputs(mode))
    gm.graph.lint()
    return model, gm, [str(w.message) for w in caught if "non-negative" in str(w.message)]


BINARY_LAYERS = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                 "layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1",
                 "layer2.1.conv2"]


class TestMove:
    def test_every_binary_layer_reads_both_signs_with_finite_nonzero_gradients(self):
        model, gm, messages = _rewritten("move")
        assert messages == []
        assert gm.state_dict().keys() == model.state_dict().keys()
        inputs = _binary_inputs(gm, torch.randn(8, 3, 16, 16))
        assert sorted(inputs) == sorted(f"{p.replace('.', '_')}_input_quantizer"
                                        for p in BINARY_LAYERS)
        for name, x in inputs.items():
            assert (x < 0).any() and (x > 0).any(), name
        for path in BINARY_LAYERS:
            grad = gm.get_parameter(f"{path}.weight").grad
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, path

    def test_the_shortcut_keeps_the_relu(self):
        """The block input relu(out + identity) still feeds the next shortcut; conv1 reads
        out + identity: both are hand-computed here from the rewritten graph's own modules."""
        model, gm, _ = _rewritten("move")
        gm.eval()
        x = torch.randn(2, 3, 16, 16)
        seen = {}
        gm.layer1_1_conv1_input_quantizer.register_forward_hook(
            lambda m, i, o: seen.__setitem__("conv1_in", i[0]))
        gm(x)
        m = model.eval()
        with torch.no_grad():
            stem = m.bn1(m.conv1(x))
            b = m.layer1[0]
            out = b.bn1(F.conv2d(_sign(m.maxpool(stem)), _sign(b.conv1.weight), None, 1, 1))
            out = b.bn2(F.conv2d(_sign(out), _sign(b.conv2.weight), None, 1, 1))
            expected = out + m.maxpool(F.relu(stem))  # the identity keeps its relu
        torch.testing.assert_close(seen["conv1_in"], expected)

    def test_chain_moves_the_relu_after_the_last_binary_batch_norm(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
                              nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).eval()
        gm = fxquant.prepare(model, Recipe.bnn().with_nonnegative_inputs("move")).eval()
        gm.graph.lint()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():  # hand-written: no relu before a sign, one after the last bn
            h = model[1](model[0](x))
            h = model[4](F.conv2d(_sign(h), _sign(model[3].weight), model[3].bias))
            h = model[7](F.conv2d(_sign(h), _sign(model[6].weight), model[6].bias))
            expected = model[9](F.relu(h).flatten(1))
        torch.testing.assert_close(gm(x), expected)


def _sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


class TestDrop:
    def test_drops_only_activations_nothing_else_reads_and_says_which_remain(self):
        model, gm, messages = _rewritten("drop")
        assert gm.state_dict().keys() == model.state_dict().keys()
        assert len(messages) == 1
        # the block inputs also feed the residual shortcut: they cannot be dropped
        for layer in ("layer1.0.conv1", "layer1.1.conv1", "layer2.1.conv1"):
            assert f"{layer} (ste_sign of" in messages[0]
        assert "also feeds add" in messages[0]
        inputs = _binary_inputs(gm, torch.randn(8, 3, 16, 16))
        for path in ("layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv1",
                     "layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"):
            x = inputs[f"{path.replace('.', '_')}_input_quantizer"]
            assert (x < 0).any() and (x > 0).any(), path
            grad = gm.get_parameter(f"{path}.weight").grad
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, path

    def test_drop_equals_the_model_without_the_relu(self):
        torch.manual_seed(0)
        model = Probe(lambda x: F.max_pool2d(F.relu(x), 2)).eval()
        gm = fxquant.prepare(model, BINARY.for_name("stem", weight=None, input=None)
                             .with_nonnegative_inputs("drop")).eval()
        gm.graph.lint()
        assert "relu" not in gm.code
        x = torch.randn(2, 2, 8, 8)
        with torch.no_grad():
            expected = F.conv2d(_sign(F.max_pool2d(model.stem(x), 2)), _sign(model.body.weight),
                                model.body.bias)
        torch.testing.assert_close(gm(x), expected)

    def test_a_relu_shared_by_two_binary_layers_is_dropped_for_both(self):
        class Two(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem, self.a, self.b = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(
                    4, 4, 1)

            def forward(self, x):
                r = torch.relu(self.stem(x))
                return self.a(r) + self.b(r)

        gm, messages = _prepare(Two(), BINARY.with_nonnegative_inputs("drop"))
        assert messages == [] and "relu" not in gm.code

    def test_in_place_relu_whose_input_is_read_elsewhere_is_not_rewritten(self):
        class Aliased(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.stem, self.body = nn.Conv2d(2, 4, 1), nn.Conv2d(4, 4, 1)

            def forward(self, x):
                h = self.stem(x)
                r = torch.relu_(h)  # h is r afterwards
                return self.body(r) + h

        gm, messages = _prepare(Aliased(), BINARY.with_nonnegative_inputs("drop"))
        assert len(messages) == 1 and "works in place" in messages[0]
        assert operator.add in {n.target for n in gm.graph.nodes}


def test_the_warning_names_a_dozen_layers_and_counts_the_rest():
    layers = []
    for _ in range(30):
        layers += [nn.Linear(4, 4), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="non-negative") as caught:
        fxquant.prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
    message = next(str(w.message) for w in caught if "non-negative" in str(w.message))
    assert "30 binary layer(s)" in message and "... (18 more)" in message
    assert len(message) < 2000


def test_the_warning_points_at_the_callers_line():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="non-negative") as caught:
        fxquant.prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
    assert all(w.filename == __file__ for w in caught if "non-negative" in str(w.message))
