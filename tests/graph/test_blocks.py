"""prepare(..., blocks=...): blocks stay GraphModules of their own, the whole computes the same.

The oracle is the model prepared without blocks (``fxquant.prepare``'s flat graph, itself tested
against the float model and hand-written formulas elsewhere): the block-prepared model must give
the same outputs and gradients bit for bit in train and eval mode, the same state_dict keys,
warnings, summary and convert output.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fxquant
from fxquant.graph.meta import get_record
from fxquant.graph.module import QuantGraphModule, all_nodes
from fxquant.training import latent_weights, quantizers
from tests.models import (
    BasicBlock,
    BiRealBlock,
    ResNet,
    TorchvisionBasicBlock,
    TorchvisionResNet,
    bireal_resnet18,
)


def _resnet() -> ResNet:
    return ResNet((1, 1, 1, 1), width=4)


def _prepare(model: nn.Module, recipe: fxquant.Recipe, **kwargs) -> tuple[object, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxquant.prepare(model, recipe, **kwargs)
    return gm, [f"{w.category.__name__}: {w.message}" for w in caught]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model: nn.Module, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, dict]:
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = model(x)
    if train:
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), _grads(model)


def _assert_same_model(flat: nn.Module, blocked: nn.Module, x: torch.Tensor) -> None:
    """Same outputs and gradients (train), same outputs (eval), same state_dict, bit for bit."""
    for train in (True, False):
        (y1, g1), (y2, g2) = _step(flat, x, train), _step(blocked, x, train)
        assert torch.equal(y1, y2), f"train={train}"
        assert g1.keys() == g2.keys()
        for name in g1:
            assert torch.equal(g1[name], g2[name]), name
    s1, s2 = flat.state_dict(), blocked.state_dict()
    assert list(s1) == list(s2)
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


def _graphs(gm: torch.fx.GraphModule) -> None:
    gm.graph.lint()
    for block in fxquant.blocks(gm).values():
        block.graph.lint()


class Gated(nn.Module):
    """A block whose Python control flow reads ``self.training`` (one graph per mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc1(x)
        if self.training:
            h = h * 0.5 + 1.0
        return self.fc2(torch.tanh(h)) + x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.body = nn.Sequential(Gated(), Gated())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class PairBlock(nn.Module):
    """Returns two values, one read later by the parent only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return self.a(x), self.b(torch.tanh(x))


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.pair, self.head = nn.Linear(4, 6), PairBlock(), nn.Linear(6, 2)

    def forward(self, x):
        a, b = self.pair(self.stem(x))
        return self.head(torch.tanh(a) - b)


class Shared(nn.Module):
    """One block called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Gated()

    def forward(self, x):
        return self.block(self.block(x))


CASES = [
    pytest.param(lambda: _resnet(), [BasicBlock], fxquant.Recipe.bnn(),
                 (2, 3, 8, 8), id="resnet-bnn"),
    pytest.param(lambda: _resnet(), [BasicBlock],
                 fxquant.Recipe.bnn().with_nonnegative_inputs("move"), (2, 3, 8, 8),
                 id="resnet-bnn-move-relu"),
    pytest.param(lambda: bireal_resnet18(width=8), [BiRealBlock], fxquant.Recipe.bireal(),
                 (2, 3, 8, 8), id="bireal"),
    pytest.param(TorchvisionResNet, [TorchvisionBasicBlock], fxquant.Recipe.dorefa(2, 2),
                 (2, 3, 8, 8), id="torchvision-style-dorefa"),
    pytest.param(lambda: _resnet(), ["layer1.0", "layer2"], fxquant.Recipe.wage(),
                 (2, 3, 8, 8), id="resnet-wage-paths"),
    pytest.param(GatedNet, [Gated], fxquant.Recipe(weight="ste_sign", input="ste_sign"),
                 (3, 4), id="mode-graphs-in-blocks"),
    pytest.param(PairNet, [PairBlock], fxquant.Recipe.bnn(), (3, 4), id="two-outputs"),
]


class TestSameAsFlat:
    @pytest.mark.parametrize(("make", "blocks", "recipe", "shape"), CASES)
    def test_outputs_gradients_state_dict_and_warnings_equal_flat_prepare(
            self, make, blocks, recipe, shape):
        torch.manual_seed(0)
        model, x = make(), torch.randn(shape)
        flat, flat_warnings = _prepare(model, recipe)
        blocked, block_warnings = _prepare(model, recipe, blocks=blocks)
        assert block_warnings == flat_warnings
        assert fxquant.blocks(blocked) and all(
            isinstance(b, QuantGraphModule) for b in fxquant.blocks(blocked).values())
        _graphs(blocked)
        _assert_same_model(flat, blocked, x)
        blocked.load_state_dict(model.state_dict(), strict=True)  # a float checkpoint

    @pytest.mark.parametrize(("make", "blocks", "recipe", "shape"), CASES)
    def test_summary_and_convert_equal_flat_prepare(self, make, blocks, recipe, shape):
        torch.manual_seed(0)
        model, x = make(), torch.randn(shape)
        flat, _ = _prepare(model, recipe, example_inputs=(x,))
        blocked, _ = _prepare(model, recipe, blocks=blocks, example_inputs=(x,))
        assert fxquant.summary(blocked) == fxquant.summary(flat)
        converted, flat_converted = fxquant.convert(blocked), fxquant.convert(flat)
        converted.graph.lint()
        # bit for bit what flat convert gives (which equals prepared.eval() except where batch
        # norm folds into a float layer, see convert: the Bi-Real stem)
        assert torch.equal(converted(x), flat_converted(x))
        # (the same keys; flat convert orders a block's modules as its graph reads them)
        assert sorted(converted.state_dict()) == sorted(flat_converted.state_dict())
        assert fxquant.summary(converted) == fxquant.summary(flat_converted)
        assert fxquant.is_converted(converted) and not fxquant.is_converted(blocked)

    def test_torchvision_resnet18(self):
        tv = pytest.importorskip("benchmarks.tv").import_torchvision()
        if tv is None:
            pytest.skip("torchvision is not installed")
        from torchvision.models.resnet import BasicBlock as TVBlock

        torch.manual_seed(0)
        model, x = tv.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32)
        flat, flat_warnings = _prepare(model, fxquant.Recipe.bnn())
        blocked, block_warnings = _prepare(model, fxquant.Recipe.bnn(), blocks=[TVBlock])
        assert block_warnings == flat_warnings
        assert len(fxquant.blocks(blocked)) == 8
        _assert_same_model(flat, blocked, x)


class TestStructure:
    def test_each_block_is_a_graph_module_at_its_path_holding_its_quantizers(self):
        prepared, _ = _prepare(_resnet(), fxquant.Recipe.bnn(),
                               blocks=[BasicBlock])
        block = prepared.get_submodule("layer2.0")
        assert list(fxquant.blocks(prepared)) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
        assert fxquant.blocks(prepared)["layer2.0"] is block
        assert type(block).__name__ == "BasicBlock"
        names = {n for n, m in block.named_children()}
        assert {"conv1", "bn1", "conv1_weight_quantizer", "conv1_input_quantizer",
                "shortcut"} <= names
        assert "layer2_0_conv1_weight_quantizer" not in dict(prepared.named_children())
        # the block's own graph reads its own parameters (FSDP's unshard hook then runs first)
        reads = {str(n.target) for n in block.graph.nodes if n.op == "get_attr"}
        assert reads == {"conv1.weight", "conv2.weight", "shortcut.0.weight"}
        calls = [n for n in prepared.graph.nodes if n.op == "call_module"
                 and get_record(n) is not None and get_record(n).role == "block"]
        assert [(get_record(n).role, get_record(n).layer) for n in calls] == [
            ("block", f"layer{i}.0") for i in range(1, 5)]

    def test_records_keep_full_layer_paths_and_helpers_see_every_layer(self):
        model = _resnet()
        flat, _ = _prepare(model, fxquant.Recipe.bnn())
        blocked, _ = _prepare(model, fxquant.Recipe.bnn(), blocks=[BasicBlock])
        layers = [r.layer for n in blocked.layer1[0].graph.nodes
                  if (r := get_record(n)) is not None and r.role == "layer"]
        assert layers == ["layer1.0.conv1", "layer1.0.conv2"]
        assert ([(e.record.layer, e.record.role) for e in quantizers(blocked)]
                == [(e.record.layer, e.record.role) for e in quantizers(flat)])
        assert [e.name for e in quantizers(blocked)][:2] == [
            "layer1.0.conv1_weight_quantizer", "layer1.0.conv1_input_quantizer"]
        assert list(latent_weights(blocked)) == list(latent_weights(flat))
        assert sum(1 for _ in all_nodes(blocked)) == sum(1 for _ in all_nodes(flat))

    def test_a_name_rule_matches_the_full_path_inside_a_block(self):
        recipe = fxquant.Recipe.bnn().for_name("layer1.0.conv2", weight=None, input=None)
        prepared, caught = _prepare(_resnet(), recipe, blocks=[BasicBlock])
        assert not any("match no layer" in w for w in caught)
        block = prepared.layer1[0]
        assert not hasattr(block, "conv2_weight_quantizer")
        assert hasattr(block, "conv1_weight_quantizer")

    def test_wage_helpers_see_every_layer(self):
        model = _resnet()
        flat, _ = _prepare(model, fxquant.Recipe.wage())
        blocked, _ = _prepare(model, fxquant.Recipe.wage(), blocks=[BasicBlock])
        assert ([layer for layer, _, _ in fxquant.wage.wage_weights(blocked)]
                == [layer for layer, _, _ in fxquant.wage.wage_weights(flat)])

    def test_copies_pickles_and_fxquant_files_keep_the_blocks(self, tmp_path):
        torch.manual_seed(0)
        model, x = GatedNet(), torch.randn(3, 4)
        prepared, _ = _prepare(model, fxquant.Recipe.bnn(), blocks=[Gated])
        buffer = io.BytesIO()
        torch.save(prepared, buffer)
        buffer.seek(0)
        fxquant.save(prepared, tmp_path / "m.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = fxquant.load(tmp_path / "m.pt", GatedNet())
        copies = [copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared)),
                  torch.load(buffer, weights_only=False), loaded]
        for other in copies:
            assert list(fxquant.blocks(other)) == ["body.0", "body.1"]
            assert len(quantizers(other)) == len(quantizers(prepared))
            _assert_same_model(prepared, other, x)

    def test_convert_of_a_block_model_leaves_the_prepared_model_working(self):
        torch.manual_seed(0)
        prepared, _ = _prepare(GatedNet(), fxquant.Recipe.bnn(), blocks=[Gated])
        x = torch.randn(3, 4)
        before = prepared.train()(x)
        fxquant.convert(prepared)
        assert torch.equal(prepared.train()(x), before)


class TestPerBlockTools:
    def test_checkpointed_blocks_give_the_same_gradients(self):
        torch.manual_seed(0)
        model, x = bireal_resnet18(width=8), torch.randn(2, 3, 8, 8)
        plain, _ = _prepare(model, fxquant.Recipe.bireal(), blocks=[BiRealBlock])
        checked = copy.deepcopy(plain)
        paths = list(fxquant.blocks(checked))
        for path, block in fxquant.blocks(checked).items():
            parent, _, name = path.rpartition(".")
            checked.get_submodule(parent)._modules[name] = _Checkpointed(block)
        y1, g1 = _step(plain, x, True)
        y2, g2 = _step(checked, x, True)
        assert torch.equal(y1, y2)
        for path in paths:
            g2 = {k.replace(f"{path}.block.", f"{path}."): v for k, v in g2.items()}
        assert g1.keys() == g2.keys()
        for name in g1:
            assert torch.equal(g1[name], g2[name]), name

    def test_activation_checkpointing_selects_the_blocks(self):
        wrapper = pytest.importorskip(
            "torch.distributed.algorithms._checkpoint.checkpoint_wrapper")
        torch.manual_seed(0)
        model, x = _resnet(), torch.randn(2, 3, 8, 8)
        plain, _ = _prepare(model, fxquant.Recipe.bnn(), blocks=[BasicBlock])
        checked = copy.deepcopy(plain)
        chosen = set(fxquant.blocks(checked).values())
        wrapper.apply_activation_checkpointing(checked, check_fn=lambda m: m in chosen)
        assert sum(isinstance(m, wrapper.CheckpointWrapper) for m in checked.modules()) == 4
        # the helpers, summary and convert look through the wrappers (before training: the
        # recomputed forward updates batch norm's running statistics a second time)
        assert [e.record.layer for e in quantizers(checked)] == [
            e.record.layer for e in quantizers(plain)]
        assert fxquant.summary(checked) == fxquant.summary(plain)
        assert torch.equal(fxquant.convert(checked)(x), fxquant.convert(plain)(x))
        y1, g1 = _step(plain, x, True)
        y2, g2 = _step(checked, x, True)
        assert torch.equal(y1, y2)
        g2 = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in g2.items()}
        assert g1.keys() == g2.keys()
        for name in g1:
            assert torch.equal(g1[name], g2[name]), name

    def test_a_block_compiled_on_its_own_computes_the_same(self):
        torch.manual_seed(0)
        model, x = GatedNet(), torch.randn(3, 4)
        plain, _ = _prepare(model, fxquant.Recipe(weight="ste_sign"), blocks=[Gated])
        compiled = copy.deepcopy(plain)
        torch._dynamo.reset()
        compiled.body[0] = torch.compile(compiled.body[0], backend="aot_eager")
        y1, g1 = _step(plain, x, True)
        y2, g2 = _step(compiled, x, True)
        assert torch.equal(y1, y2)
        g2 = {k.replace("._orig_mod", ""): v for k, v in g2.items()}
        for name in g1:
            assert torch.equal(g1[name], g2[name]), name
        assert len(quantizers(compiled)) == len(quantizers(plain))


class _Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


class TestErrors:
    @pytest.mark.parametrize(("blocks", "message"), [
        (["layer1.5"], r"no submodule 'layer1.5' \(did you mean"),
        ([""], "no submodule ''"),
        ([nn.LSTM], "no submodule of ResNet is a LSTM"),
        (["layer1", BasicBlock], "'layer1.0' is inside the block 'layer1'"),
        ([3], "module paths or nn.Module classes"),
    ])
    def test_a_bad_block_is_an_error_that_names_it(self, blocks, message):
        with pytest.raises(ValueError, match=message):
            fxquant.prepare(_resnet(), fxquant.Recipe.bnn(), blocks=blocks)

    def test_a_block_that_is_also_a_leaf_is_an_error(self):
        with pytest.raises(ValueError, match="'layer1.0' is also a leaf module"):
            fxquant.prepare(_resnet(), fxquant.Recipe.bnn(),
                            blocks=["layer1.0"], leaf_modules=[BasicBlock])

    def test_a_block_called_twice_is_an_error(self):
        with pytest.raises(ValueError, match="'block' is called more than once"):
            _prepare(Shared(), fxquant.Recipe.bnn(), blocks=["block"])

    def test_blocks_of_a_model_not_from_prepare_is_a_type_error(self):
        with pytest.raises(TypeError, match="fxquant.prepare"):
            fxquant.blocks(nn.Linear(2, 2))
        flat, _ = _prepare(_resnet(), fxquant.Recipe.bnn())
        assert fxquant.blocks(flat) == {}


def test_parent_reads_among_block_nodes_are_moved_after_the_call():
    """A value the block computes early, read by the parent: the parent's read follows the call."""

    class Early(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block, self.head = Early(), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.block(x))

    torch.manual_seed(0)
    recipe = fxquant.Recipe(weight="ste_sign", output="ste_sign")  # quantizer after the block
    model, x = Net(), torch.randn(3, 4)
    flat, _ = _prepare(model, recipe)
    blocked, _ = _prepare(model, recipe, blocks=[Early])
    _graphs(blocked)
    _assert_same_model(flat, blocked, x)


def test_a_block_the_forward_never_calls_is_named_in_a_warning():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
            self.spare = nn.Sequential(nn.Linear(4, 4))

        def forward(self, x):
            return self.used(x)

    with pytest.warns(UserWarning, match=r"blocks spare are never called") as record:
        prepared = fxquant.prepare(Model(), fxquant.Recipe.bnn(), blocks=["used", "spare"])
    assert record[0].filename == __file__
    assert isinstance(prepared.used, torch.fx.GraphModule)
    assert type(prepared.spare) is nn.Sequential
