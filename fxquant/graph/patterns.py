"""What counts as a weighted layer, a batch norm and an activation, in module and functional form.

Rules are data: adding a layer kind means adding a row to a table, not touching traversal code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["LayerMatch", "match_layer", "is_batch_norm", "is_activation", "pattern_end",
           "is_plain_batch_norm", "attribute_reads",
           "layer_arg", "set_layer_arg", "keeps_output_for_backward", "Submodules",
           "FUNCTIONAL_FORM", "layer_form", "not_plain_layer"]

# module class -> (op name, functional form used once its weight is quantized). Subclasses that
# keep the class's forward match too (see layer_form).
FUNCTIONAL_FORM: dict[type[nn.Module], tuple[str, Callable[..., Any]]] = {
    nn.Linear: ("linear", F.linear),
    nn.Conv1d: ("conv1d", F.conv1d),
    nn.Conv2d: ("conv2d", F.conv2d),
    nn.Conv3d: ("conv3d", F.conv3d),
    nn.ConvTranspose1d: ("conv_transpose1d", F.conv_transpose1d),
    nn.ConvTranspose2d: ("conv_transpose2d", F.conv_transpose2d),
    nn.ConvTranspose3d: ("conv_transpose3d", F.conv_transpose3d),
}
_LAYER_CLASSES = tuple(FUNCTIONAL_FORM)

# functional call -> op name (weight is args[1] or kwargs["weight"])
_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.linear: "linear", torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d",
    F.conv_transpose1d: "conv_transpose1d", F.conv_transpose2d: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d", torch.conv_transpose1d: "conv_transpose1d",
    torch.conv_transpose2d: "conv_transpose2d", torch.conv_transpose3d: "conv_transpose3d",
}

# methods a Linear/Conv subclass must inherit unchanged to compute its base class's forward
_FORWARD_METHODS = ("forward", "_conv_forward", "_output_padding")

# forwards that compute exactly F.batch_norm (SyncBatchNorm syncs statistics only when training
# under torch.distributed with more than one process; otherwise it calls F.batch_norm too)
_BATCH_NORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)
_BATCH_NORM_FUNCTIONS = {F.batch_norm, torch.batch_norm}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.nn.functional.hardtanh_,
                         torch.relu_, F.relu_}
_ACTIVATION_METHODS = {"relu", "relu_", "hardtanh", "clamp"}

# Ops whose autograd backward keeps their *output* alive (ReluBackward0, SigmoidBackward0 and
# TanhBackward0 save ``result``): another saved reference to that output costs no memory.
_OUTPUT_SAVING_MODULES = (nn.ReLU, nn.Sigmoid, nn.Tanh)
_OUTPUT_SAVING_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.sigmoid, F.sigmoid,
                            torch.tanh, F.tanh}
_OUTPUT_SAVING_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


class Submodules(Mapping[str, nn.Module]):
    """``root``'s submodules by qualified name, looked up on demand.

    Passes look up the modules of a few nodes; ``dict(root.named_modules())`` would walk the
    whole module tree (about 15 ms per pass on a 6,000-node model) to build the full table.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __getitem__(self, target: str) -> nn.Module:
        module: Any = self.root
        for atom in target.split(".") if target else ():
            module = getattr(module, atom, None)  # cheaper than get_submodule's checks
        if not isinstance(module, nn.Module):
            raise KeyError(target)
        return module

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.root.named_modules())

    def __len__(self) -> int:
        return sum(1 for _ in self.root.named_modules())


@dataclass(frozen=True)
class LayerMatch:
    """A weighted layer found in the graph."""

    op: str
    path: str                     # module path, or the weight's path without ".weight"
    module: str                   # owner of the parameters ("" if none)
    module_type: type[nn.Module] | None
    function: Callable[..., Any] | None
    weight: torch.fx.Node | None  # the get_attr node feeding a functional call


_ARG_INDEX = {"input": 0, "weight": 1, "bias": 2}


def layer_arg(node: torch.fx.Node, name: str) -> Any:
    """The ``input``, ``weight`` or ``bias`` argument of a layer call, positional or keyword."""
    i = _ARG_INDEX[name]
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def set_layer_arg(node: torch.fx.Node, name: str, value: Any) -> None:
    """Replace the ``input``/``weight``/``bias`` argument of a layer call where it is given."""
    i = _ARG_INDEX[name]
    if len(node.args) > i:
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


def _base_layer_class(cls: type[nn.Module]) -> type[nn.Module] | None:
    return next((base for base in cls.__mro__ if base in FUNCTIONAL_FORM), None)


def not_plain_layer(module: nn.Module) -> str | None:
    """Why calling ``module`` is not exactly its Linear/Conv base class's functional form, or
    None when it is (the class or a subclass keeping its forward, no hooks but weight_norm's).

    Such a module cannot have its call replaced by ``F.linear``/``F.conv*``: the reason is what
    fxquant reports when it leaves the layer in float.
    """
    cls = type(module)
    base = _base_layer_class(cls)
    if base is None:
        return f"{cls.__name__} is not a Linear/Conv/ConvTranspose layer"
    for method in _FORWARD_METHODS:
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (f"{cls.__name__} overrides {base.__name__}.{method}, so its call is not "
                    f"{FUNCTIONAL_FORM[base][0]}")
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy module not materialised: run one forward pass before prepare"
    pre_hooks = [h for h in module._forward_pre_hooks.values() if not isinstance(h, WeightNorm)]
    if pre_hooks or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks:
        return "it has forward/backward hooks, which its functional form would not run"
    return None


def layer_form(module: nn.Module | None) -> tuple[str, Callable[..., Any]] | None:
    """``(op name, functional form)`` when calling ``module`` is a plain Linear/Conv layer call,
    subclasses (``NonDynamicallyQuantizableLinear``, parametrized layers) included."""
    if not isinstance(module, _LAYER_CLASSES) or not_plain_layer(module) is not None:
        return None
    base = _base_layer_class(type(module))
    assert base is not None
    return FUNCTIONAL_FORM[base]


def match_layer(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> LayerMatch | None:
    """Return a LayerMatch if ``node`` is a weighted layer whose weight is a parameter: a call
    of a plain Linear/Conv/ConvTranspose module (:func:`layer_form`) or of their functions."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        form = layer_form(module)
        if form is None or _given_output_size(node):
            return None
        return LayerMatch(form[0], str(node.target), str(node.target), type(module), None, None)
    if node.op == "call_function" and node.target in _FUNCTIONS:
        weight = layer_arg(node, "weight")
        if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
            return None
        target = str(weight.target)
        owner, _, attr = target.rpartition(".")
        path = owner if attr == "weight" and owner else target
        return LayerMatch(_FUNCTIONS[node.target], path, owner, None, node.target, weight)
    return None


def _given_output_size(node: torch.fx.Node) -> bool:
    """A ConvTranspose call given ``output_size`` (its output padding depends on the input)."""
    return (len(node.args) > 1 and node.args[1] is not None) or node.kwargs.get(
        "output_size") is not None


def _single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_plain_batch_norm(module: nn.Module | None) -> bool:
    """Whether calling ``module`` is exactly batch norm: a ``_BatchNorm`` (``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm``, a subclass that only changes ``_check_input_dim`` or ``__init__``) whose
    class keeps that forward, with no hooks. A subclass whose forward adds an activation (timm's
    ``BatchNormAct2d``) is not: folding it would drop what its forward adds."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm)
            and type(module).forward in _BATCH_NORM_FORWARDS
            and type(module).__call__ is nn.Module.__call__
            and not (module._forward_pre_hooks or module._forward_hooks
                     or module._backward_hooks or module._backward_pre_hooks))


def is_batch_norm(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """A call of a plain batch-norm module (:func:`is_plain_batch_norm`) or of ``F.batch_norm``."""
    if node.op == "call_module":
        return is_plain_batch_norm(modules.get(str(node.target)))
    return node.op == "call_function" and node.target in _BATCH_NORM_FUNCTIONS


def is_activation(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _ACTIVATION_MODULES)
    if node.op == "call_method":
        return node.target in _ACTIVATION_METHODS
    return node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS


def pattern_end(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> torch.fx.Node:
    """The last node of ``layer -> [batch norm] -> [relu/hardtanh]`` starting at ``node``.

    A step is only taken when the current node has exactly one user and it is the first argument
    of that user, so a value that also feeds elsewhere (a residual branch) is never skipped.
    """
    end = node
    for test in (is_batch_norm, is_activation):
        nxt = _single_user(end)
        if nxt is not None and nxt.args and nxt.args[0] is end and test(nxt, modules):
            end = nxt
    return end



def keeps_output_for_backward(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node``'s autograd backward saves its output (relu, sigmoid, tanh), so that
    output stays alive until backward whatever else saves it."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _OUTPUT_SAVING_MODULES)
    if node.op == "call_method":
        return node.target in _OUTPUT_SAVING_METHODS
    return node.op == "call_function" and node.target in _OUTPUT_SAVING_FUNCTIONS


def attribute_reads(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    """The ``get_attr`` nodes of ``graph`` by target, in graph order."""
    reads: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            reads.setdefault(str(node.target), []).append(node)
    return reads
