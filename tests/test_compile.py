"""torch.compile of prepared and converted models: no graph breaks, no recompilation, the eager
numbers.

The oracle is the same model run eagerly: with the ``aot_eager`` backend the compiled graph runs
the very ATen kernels eager mode runs, so outputs and gradients must be equal bit for bit;
inductor fuses and may round differently, so it is compared to float-rounding tolerance.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fxquant
from fxquant import training
from fxquant.quantizers import ProgressiveSign, sign
from fxquant.wage import WAGEError, WAGEQuantizer, WAGEWeight
from tests.models import MLP, BiRealBlock

RECIPES = {  # every preset of Recipe, and recipes for the quantizers no preset uses
    "bnn": fxquant.Recipe.bnn,
    "xnor": fxquant.Recipe.xnor,
    "bireal": fxquant.Recipe.bireal,
    "twn": fxquant.Recipe.twn,
    "dorefa": fxquant.Recipe.dorefa,
    "wage": fxquant.Recipe.wage,
    "progressive_sign": lambda: fxquant.Recipe(
        weight=ProgressiveSign(use_global_scaling=False, initial_scale=0.2),
        input=ProgressiveSign(use_global_scaling=False, initial_scale=0.1)),
    "swish_heaviside": lambda: fxquant.Recipe(weight="swish_sign", input="ste_heaviside"),
    "tern_approx": lambda: fxquant.Recipe(weight="ste_tern", input="approx_sign"),
    "magnitude_ste_sign_no_window": lambda: fxquant.Recipe(
        weight="magnitude_aware_sign", input=fxquant.quantizers.SteSign(clip_value=None)),
}


class TinyBiReal(torch.nn.Module):
    """Float stem, one downsampling Bi-Real block (binary convs reading sums of both signs, a
    1x1 shortcut conv), float head: every kind of layer, and a graph small enough to compile
    in about a second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.block = BiRealBlock(4, 8, stride=2)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        x = self.block(self.bn1(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


def _model() -> TinyBiReal:
    torch.manual_seed(0)
    return TinyBiReal()


def _prepared(name: str) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float first/last layers etc.: not this file's subject
        return fxquant.prepare(_model(), RECIPES[name]())


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def _grads(model: torch.nn.Module, run: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    x, y = _batch()
    out = run(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_every_recipe_preset_is_covered():
    def no_required_arguments(name: str) -> bool:
        parameters = inspect.signature(getattr(fxquant.Recipe, name)).parameters.values()
        return all(p.default is not p.empty for p in parameters)

    presets = {name for name, value in vars(fxquant.Recipe).items()
               if isinstance(value, classmethod) and no_required_arguments(name)}
    assert {"bnn", "xnor", "bireal", "twn", "dorefa", "wage"} <= presets
    assert presets <= set(RECIPES), presets - set(RECIPES)


class TestPreparedCompiles:
    @pytest.mark.parametrize("name", list(RECIPES))
    def test_fullgraph_without_breaks_gives_the_eager_outputs_and_gradients(self, name):
        eager = _prepared(name)
        compiled = copy.deepcopy(eager)
        out, grads = _grads(compiled, torch.compile(compiled, backend="aot_eager",
                                                    fullgraph=True))
        expected_out, expected = _grads(eager, eager)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        assert torch.equal(out, expected_out)
        assert grads.keys() == expected.keys()
        for key, grad in expected.items():
            assert grad is not None and torch.equal(grads[key], grad), key

    @pytest.mark.parametrize("name", ["bnn", "xnor", "twn", "wage"])
    def test_eval_mode_compiles_to_the_eager_output(self, name):
        eager = _prepared(name).eval()
        compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)
        x, _ = _batch()
        with torch.no_grad():
            assert torch.equal(compiled(x), eager(x))

    def test_training_steps_neither_break_nor_recompile(self):
        gm = _prepared("bnn")
        compiled = torch.compile(gm, backend="aot_eager")
        opt = torch.optim.SGD(gm.parameters(), lr=0.1)
        training.LatentWeightClip(gm, opt)
        x, y = _batch()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(compiled(x), y).backward()
                opt.step()
        assert sum(counters["graph_break"].values()) == 0
        assert counters["stats"]["unique_graphs"] == 1

    def test_a_scheduled_progressive_sign_neither_recompiles_nor_lags(self, monkeypatch):
        for attribute in ("_progressive_sign_scale", "_progressive_sign_scale_set"):
            if hasattr(sign, attribute):  # restored after the test
                monkeypatch.setattr(sign, attribute, getattr(sign, attribute))
        recipe = fxquant.Recipe(weight=ProgressiveSign(use_global_scaling=False),
                                input=ProgressiveSign())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = fxquant.prepare(_model(), recipe)
        eager = copy.deepcopy(gm)
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
        schedulers = [training.ProgressiveSignScheduler(4, gm=m) for m in (gm, eager)]
        x, _ = _batch()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(4):
                for scheduler in schedulers:
                    scheduler.step()  # both set the same global scale, and their instances'
                # the oracle: the eager model at the same scale
                assert torch.equal(compiled(x), eager(x))
        assert sign.get_progressive_sign_scale() == 1.0


class TestStochasticWage:
    def test_stochastic_rounding_compiles_without_breaks(self):
        recipe = fxquant.Recipe(weight=WAGEWeight(2, mode="stochastic"),
                                output=WAGEQuantizer(8, 8, "stochastic", "stochastic")
                                ).for_last(output=None, error=WAGEError(8, mode="stochastic"))
        gm = fxquant.prepare(MLP(), recipe)
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
        compiled(torch.randn(4, 64)).sum().backward()
        assert sum(counters["graph_break"].values()) == 0
        assert all(p.grad is not None for p in gm.parameters())


class TestClipWarningUnderCompile:
    MESSAGE = "left their quantizer's straight-through gradient window unclipped"

    def _train(self, steps: int, clip_by_hand: bool) -> list[warnings.WarningMessage]:
        gm = _prepared("bnn")
        compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
        opt = torch.optim.SGD(gm.parameters(), lr=10.0)  # throws latents out of [-1, 1]
        x, y = _batch()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(compiled(x), y).backward()
                opt.step()
                if clip_by_hand:
                    with torch.no_grad():
                        for p in gm.parameters():
                            p.clamp_(-1, 1)
        peak = max(float(p.detach().abs().max()) for p in gm.parameters())
        assert (peak <= 1.0) == clip_by_hand  # the oracle: where the latents really are
        return [w for w in caught if self.MESSAGE in str(w.message)]

    def test_warns_once_when_latents_leave_the_window(self):
        caught = self._train(steps=3, clip_by_hand=False)
        assert len(caught) == 1
        assert caught[0].filename == __file__  # the opt.step() line of the loop above

    def test_silent_when_clipping_by_hand_after_each_step(self):
        assert self._train(steps=3, clip_by_hand=True) == []


class TestConvertedCompiles:
    @pytest.mark.parametrize("name", ["bnn", "bireal", "twn", "dorefa", "wage"])
    def test_converted_model_compiles_fullgraph_to_the_eager_output(self, name):
        converted = fxquant.convert(_prepared(name))
        compiled = torch.compile(copy.deepcopy(converted), backend="aot_eager", fullgraph=True)
        x, _ = _batch()
        with torch.no_grad():
            assert torch.equal(compiled(x), converted(x))
        assert sum(counters["graph_break"].values()) == 0


def test_inductor_gradients_equal_eager_to_rounding():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = fxquant.prepare(MLP((16, 16, 16, 4)), fxquant.Recipe(weight="ste_sign",
                                                                    input="approx_sign"))
    compiled = copy.deepcopy(eager)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    out = torch.compile(compiled, backend="inductor", fullgraph=True)(x)
    out.square().sum().backward()
    expected = eager(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for (key, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=key)
