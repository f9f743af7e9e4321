"""Train/eval behaviour, the module tree and fxquant's records survive prepare, copies and pickles.

The oracle is always the float model itself: with quantizers disabled a prepared model must compute
exactly what the float model computes, in train mode (same RNG seed) and in eval mode.
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

import fxquant
from fxquant.graph.module import QuantGraphModule
from fxquant.training import quantizers, set_quantizers_enabled


def _prepare(model: nn.Module, **kwargs) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"),
                               **kwargs)


def _same_as_float(prepared: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    """prepared (quantizers off) equals the float model in both modes, bit for bit."""
    set_quantizers_enabled(prepared, False)
    for mode in (True, False):
        prepared.train(mode)
        model.train(mode)
        torch.manual_seed(3)
        expected = model(x)
        torch.manual_seed(3)
        got = prepared(x)
        for e, g in zip(torch.utils._pytree.tree_leaves(expected),
                        torch.utils._pytree.tree_leaves(got), strict=True):
            assert torch.equal(e, g), f"train={mode}"
    set_quantizers_enabled(prepared, True)


class DropoutFlag(nn.Module):
    """timm/torchvision heads: the flag is an argument, not a branch."""

    def forward(self, x):
        return F.dropout(x, 0.5, self.training)


class BNAct(nn.BatchNorm1d):
    """timm's BatchNormAct: F.batch_norm with self.training, then an activation."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, self.momentum, self.eps))


class StochasticDepth(nn.Module):
    """torchvision's stochastic depth: Python control flow on the flag."""

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty(x.shape[0], 1).bernoulli_(0.5)
        return x * keep / 0.5


class Net(nn.Module):
    def __init__(self, drop: nn.Module) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), BNAct(8), nn.Linear(8, 8)
        self.drop, self.fc3 = drop, nn.Linear(8, 3)

    def forward(self, x):
        h = self.bn(self.fc1(x))
        return self.fc3(h + self.drop(self.fc2(h)))


class AuxHead(nn.Module):
    """GoogLeNet/Inception: an auxiliary head that runs and is returned in train mode only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        h = self.body(self.stem(x))
        if self.training:
            self.calls.add_(1)
            return self.head(h), self.aux(h)
        return self.head(h)


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("drop", [DropoutFlag(), StochasticDepth(), nn.Identity()],
                         ids=["dropout-argument", "branch-on-flag", "none"])
def test_prepared_follows_train_and_eval_like_the_float_model(drop):
    torch.manual_seed(0)
    model = Net(drop)
    _randomize_bn(model)
    prepared = _prepare(model)
    prepared.graph.lint()
    x = torch.randn(5, 6)
    _same_as_float(prepared, model, x)
    prepared.eval()
    assert torch.equal(prepared(x), prepared(x))  # no randomness left in eval


def test_flag_argument_becomes_a_read_of_the_module_flag():
    prepared = _prepare(Net(DropoutFlag()))
    code = prepared.code
    assert "self.drop.training" in code and "self.bn.training" in code
    assert "training = True" not in code


def test_a_module_switched_alone_keeps_its_own_flag():
    """``model.eval(); model.drop.train()`` (MC dropout): the graph reads drop's own flag."""
    torch.manual_seed(0)
    model = Net(DropoutFlag())
    prepared = _prepare(model)
    set_quantizers_enabled(prepared, False)
    model.eval(), prepared.eval()
    model.drop.train(), prepared.get_submodule("drop").train()
    x = torch.randn(5, 6)
    torch.manual_seed(1)
    expected = model(x)
    torch.manual_seed(1)
    assert torch.equal(prepared(x), expected)


def test_control_flow_on_the_flag_gives_one_graph_per_mode():
    torch.manual_seed(0)
    model = AuxHead()
    prepared = _prepare(model)
    x = torch.randn(4, 6)
    _same_as_float(prepared, model, x)
    prepared.train()
    assert isinstance(prepared(x), tuple)
    train_code = prepared.code
    assert "aux" in train_code and "calls" in train_code
    prepared.eval()
    assert isinstance(prepared(x), torch.Tensor) and "aux" not in prepared.code
    # the layers both modes run share their quantizers: each is called in both graphs
    calls = {mode: {n.target for n in prepared.train(mode).graph.nodes if n.op == "call_module"}
             for mode in (True, False)}
    assert "aux_weight_quantizer" in calls[True] - calls[False]
    assert {"body_weight_quantizer", "head_input_quantizer"} <= calls[True] & calls[False]


def test_quantizer_helpers_see_the_quantizers_of_both_modes():
    prepared = _prepare(AuxHead()).eval()
    names = [e.name for e in quantizers(prepared)]
    assert names == [e.name for e in quantizers(prepared.train())]
    assert "aux_weight_quantizer" in names
    prepared.eval()
    set_quantizers_enabled(prepared, False)
    assert not prepared.get_submodule("aux_weight_quantizer").enabled
    assert "aux.weight" in fxquant.training.latent_weights(prepared)


def test_the_buffer_updated_only_in_train_mode_counts_like_the_float_model():
    model = AuxHead()
    prepared = _prepare(model)
    x = torch.randn(4, 6)
    for m in (model, prepared):
        m.train()
        m(x), m(x)
        m.eval()
        m(x)
    assert int(prepared.calls) == int(model.calls) == 2


def test_convert_uses_the_eval_graph():
    torch.manual_seed(0)
    prepared = _prepare(AuxHead())
    converted = fxquant.convert(prepared)
    x = torch.randn(4, 6)
    assert "aux" not in converted.code
    assert torch.equal(converted(x), prepared.eval()(x))
    assert prepared.eval().training is False


class Everything(nn.Module):
    """Every kind of state a traced graph can drop or change."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)  # only called when use_extra=True
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("perm", torch.arange(3, -1, -1), persistent=False)
        self.table = torch.tensor([1.0, 2.0, 3.0, 4.0])  # a plain tensor attribute

    def forward(self, x, use_extra: bool = False):
        if self.training:
            self.calls.add_(1)
        h = self.fc2(self.fc1(x[:, self.perm])) * self.table
        if use_extra:
            h = self.unused(h)
        return self.fc3(h)


def test_state_dict_keys_and_persistence_equal_the_float_models():
    model = Everything()
    prepared = _prepare(model, concrete_args={"use_extra": False})
    assert list(prepared.state_dict()) == list(model.state_dict())
    prepared.load_state_dict(model.state_dict(), strict=True)
    non_persistent = {n for n, m in prepared.named_modules() for n in m._non_persistent_buffers_set}
    assert "perm" in non_persistent
    model.eval(), prepared.eval()
    set_quantizers_enabled(prepared, False)
    x = torch.randn(3, 4)
    assert torch.equal(prepared(x), model(x))


def _round_trip(gm: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(gm, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [_round_trip, lambda m: pickle.loads(pickle.dumps(m)),
                                    copy.deepcopy], ids=["torch.save", "pickle", "deepcopy"])
def test_records_tree_modes_and_recipe_survive_copies(copier):
    torch.manual_seed(0)
    model = AuxHead()
    prepared = _prepare(model)
    copied = copier(prepared)
    assert isinstance(copied, QuantGraphModule)
    assert [e.name for e in quantizers(copied)] == [e.name for e in quantizers(prepared)]
    assert list(copied.state_dict()) == list(model.state_dict())
    x = torch.randn(4, 6)
    copied.train(), prepared.train()
    for a, b in zip(copied(x), prepared(x), strict=True):
        assert torch.equal(a, b)
    copied.eval(), prepared.eval()
    assert torch.equal(copied(x), prepared(x))
    converted = fxquant.convert(copied)
    assert torch.equal(converted(x), prepared(x))
    copied.train()
    assert [e.name for e in quantizers(copied)] == [e.name for e in quantizers(prepared.train())]
    # the saved recipe travels too: fxquant.save works on the copy
    fxquant.save(copied, io.BytesIO())


def test_a_second_round_trip_keeps_everything():
    prepared = _prepare(AuxHead())
    twice = _round_trip(_round_trip(prepared))
    assert len(quantizers(twice)) == len(quantizers(prepared)) > 0
    twice.graph.lint()


def test_clip_after_unpickling_clips_the_latents():
    prepared = _prepare(Net(nn.Identity()))
    copied = _round_trip(prepared)
    with torch.no_grad():
        copied.fc2.weight.fill_(3.0)
    fxquant.training.clip_latent_weights(copied)
    assert float(copied.fc2.weight.detach().max()) == 1.0


def test_example_inputs_record_shapes_in_both_mode_graphs():
    prepared = fxquant.prepare(AuxHead(), fxquant.Recipe(weight="ste_sign"),
                               example_inputs=(torch.randn(2, 6),))
    for mode in (True, False):
        nodes = [n for n in prepared.train(mode).graph.nodes if n.op == "call_function"]
        assert nodes and all("tensor_meta" in n.meta for n in nodes)
    assert int(prepared.calls) == 0  # the shape run left the buffers as they were


def test_prepared_keeps_the_models_own_submodules_and_their_classes():
    model = Net(DropoutFlag())
    prepared = _prepare(model)
    assert [(n, type(m)) for n, m in prepared.named_children() if not n.endswith("quantizer")] \
        == [(n, type(m)) for n, m in model.named_children()]
    assert prepared.get_submodule("drop") is not model.drop  # a copy: the model is untouched


def test_a_two_mode_model_warns_once_per_message():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AuxHead()
        model.body = nn.Sequential(nn.Linear(8, 8))  # a leaf container: its layer stays float
        fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"), leaf_modules=["body"])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "body" in messages[0]
