"""pipeline: run() applies passes in order and generates code once; DeferredGraphModule."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx
from torch import nn

from fxquant.graph import pipeline
from fxquant.graph.pipeline import DeferredGraphModule, run
from fxquant.graph.tracer import trace
from tests.models import MLP


def _relu_to_tanh(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.relu:
            node.target = torch.tanh
    return gm


_RECOMPILE = torch.fx.GraphModule.recompile


def _spy(calls: list[str]):
    def spy(self):  # records each code generation
        calls.append(type(self).__name__)
        return _RECOMPILE(self)
    return spy


def test_deferred_module_generates_code_only_when_finished(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", _spy(calls))
    gm = trace(MLP(), graph_module_class=DeferredGraphModule)
    assert calls == []  # building it generated nothing
    gm.recompile()
    assert calls == []
    with pytest.raises(RuntimeError, match="finish"):  # no code yet: it cannot run
        gm(torch.randn(2, 64))
    gm.finish()
    assert calls == ["MLP"]
    model = MLP()
    gm = trace(model, graph_module_class=DeferredGraphModule)
    gm.finish()
    x = torch.randn(3, 64)
    assert torch.equal(gm(x), model(x))


def test_run_applies_passes_in_order_lints_and_generates_code_once(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(torch.fx.GraphModule, "recompile", _spy(calls))
    model = MLP()
    gm = run(trace(model, graph_module_class=DeferredGraphModule), (_relu_to_tanh,))
    assert calls == ["MLP"]
    assert "torch.tanh" in gm.code and "torch.relu" not in gm.code
    x = torch.randn(3, 64)
    expected = model.fc3(torch.tanh(model.fc2(torch.tanh(model.fc1(x)))))
    torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_run_names_the_pass_that_breaks_the_graph(monkeypatch):
    monkeypatch.setattr(pipeline, "CHECK_EVERY_PASS", False)

    def break_graph(gm):
        foreign = torch.fx.Graph().placeholder("y")  # a node of another graph
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(x):
            gm.graph.call_function(torch.add, (x, foreign))
        return gm

    with pytest.raises(RuntimeError, match="break_graph"):
        run(trace(MLP(), graph_module_class=DeferredGraphModule), (break_graph,))


def test_finished_module_copies_and_pickles_as_a_graph_module():
    model = MLP()
    gm = run(trace(model, graph_module_class=DeferredGraphModule), ())
    x = torch.randn(2, 64)
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert isinstance(other, torch.fx.GraphModule)
        assert torch.equal(other(x), model(x))
        other.graph.lint()


def test_plain_graph_modules_still_run_through_the_pipeline():
    gm = run(torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 2), nn.ReLU())), ())
    assert gm(torch.ones(1, 3)).shape == (1, 2)
