"""Tracing failures become TracingError naming the module path, the source line and the fixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.graph.tracer import QuantTracer, TracingError


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch
            return x
        return -x


class Iterates(nn.Module):
    def forward(self, x):
        return torch.stack([row * 2 for row in x])


class CallsLen(nn.Module):
    def forward(self, x):
        return x * len(x)


class Outer(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.body = nn.Sequential(nn.Identity(), inner)

    def forward(self, x):
        return self.body(self.fc(x))


@pytest.mark.parametrize("inner, line_text", [
    (DataDependent(), "if x.sum() > 0"),
    (Iterates(), "for row in x"),
    (CallsLen(), "len(x)"),
])
def test_error_names_module_path_source_line_and_fixes(inner, line_text):
    with pytest.raises(TracingError) as info:
        fxquant.prepare(Outer(inner), fxquant.Recipe(weight="ste_sign"))
    message = str(info.value)
    assert "'body.1'" in message
    assert __file__ in message and line_text in message
    cls = type(inner)
    assert f"leaf_modules=[{cls.__module__}.{cls.__qualname__}]" in message
    assert "checked" in message and "stay in float" in message
    assert info.value.__cause__ is not None


class ShapeBranch(nn.Module):
    """A branch on a tensor's shape (timm's padding/window code): fails at every instance."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        if x.shape[-1] % 2 == 1:
            x = x * 2
        return self.fc(x)


class TwoKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.a, self.b, self.c = ShapeBranch(), ShapeBranch(), CallsLen()

    def forward(self, x):
        return self.c(self.b(self.a(self.fc(x))))


def test_advice_names_every_class_needed_and_following_it_works():
    with pytest.raises(TracingError) as info:
        fxquant.prepare(TwoKinds(), fxquant.Recipe(weight="ste_sign"))
    message = str(info.value)
    names = [f"{c.__module__}.{c.__qualname__}" for c in (ShapeBranch, CallsLen)]
    assert f"leaf_modules=[{', '.join(names)}]" in message
    prepared = fxquant.prepare(TwoKinds(), fxquant.Recipe(weight="ste_sign"),
                               leaf_modules=[ShapeBranch, CallsLen])
    prepared.graph.lint()
    assert [n.target for n in prepared.graph.nodes if n.op == "call_module"
            and not str(n.target).endswith("quantizer")] == ["a", "b", "c"]


def test_marking_the_failing_module_a_leaf_fixes_tracing():
    prepared = fxquant.prepare(Outer(DataDependent()), fxquant.Recipe(weight="ste_sign"),
                               leaf_modules=["body.1"])
    prepared.graph.lint()
    assert any(n.op == "call_module" and n.target == "body.1" for n in prepared.graph.nodes)


def test_leaf_by_class():
    prepared = fxquant.prepare(Outer(CallsLen()), fxquant.Recipe(weight="ste_sign"),
                               leaf_modules=[CallsLen])
    x = torch.randn(2, 3)
    assert prepared(x).shape == (2, 3)


def test_top_level_failure_is_reported_too():
    with pytest.raises(TracingError, match="top-level forward"):
        fxquant.prepare(DataDependent(), fxquant.Recipe(weight="ste_sign"))


def test_bad_leaf_modules_argument():
    with pytest.raises(ValueError, match="leaf_modules"):
        QuantTracer([42])


def test_prepare_rejects_non_module_and_non_recipe():
    with pytest.raises(TypeError, match="nn.Module"):
        fxquant.prepare(lambda x: x, fxquant.Recipe())
    with pytest.raises(TypeError, match="Recipe"):
        fxquant.prepare(nn.Linear(2, 2), {"weight": "ste_sign"})


def rescale(x):
    """Python control flow on a shape, in a plain function (timm's scale_image)."""
    if x.shape[-1] != 3:
        return x[..., :3]
    return x


class CallsRescale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc3(self.fc2(rescale(self.fc1(x))))


def test_a_failing_plain_function_is_advised_as_a_leaf_function_and_that_works():
    with pytest.raises(TracingError) as info:
        fxquant.prepare(CallsRescale(), fxquant.Recipe(weight="ste_sign"))
    assert f"leaf_functions=[{__name__}.rescale]" in str(info.value)
    prepared = fxquant.prepare(CallsRescale(), fxquant.Recipe(weight="ste_sign"),
                               leaf_functions=[rescale])
    prepared.graph.lint()
    assert any(n.op == "call_function" and n.target is rescale for n in prepared.graph.nodes)
    # the layers around it are still quantized
    assert {"fc2_weight_quantizer", "fc3_weight_quantizer"} <= set(dict(prepared.named_modules()))
    x = torch.randn(2, 3)
    fxquant.training.set_quantizers_enabled(prepared, False)
    model = CallsRescale()
    prepared.load_state_dict(model.state_dict())
    assert torch.equal(prepared(x), model(x))


def test_leaf_functions_are_saved_with_the_model(tmp_path):
    model = CallsRescale()
    prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"), leaf_functions=[rescale])
    fxquant.save(prepared, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", CallsRescale())
    assert any(n.target is rescale for n in loaded.graph.nodes)


def test_bad_leaf_functions_argument():
    with pytest.raises(ValueError, match="leaf_functions"):
        QuantTracer([], [42])
