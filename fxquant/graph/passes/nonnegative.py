"""check_nonnegative_inputs: a sign input quantizer that reads a non-negative value is a constant.

``ste_sign(relu(x))`` is ``+1`` everywhere (``sign(0) = +1``), so a binary layer whose input
quantizer reads a relu output (as in a float ResNet handed to ``Recipe.bnn()``) sees a constant:
its batch norm then divides by a zero batch variance and deep nets overflow in backward. A
ternary quantizer is not constant there but loses its ``-1`` level.

What counts as non-negative (conservative: anything not listed is assumed to take both signs,
so a warning is never about a value that can be negative, NaN aside):

* producers, whatever their input: relu, relu6, sigmoid, hardsigmoid, softmax, softmin, exp,
  abs, ``clamp``/``clip``/``clamp_min`` with ``min >= 0`` and hardtanh with ``min_val >= 0``,
  in module (``nn.ReLU``, ...), function (``torch.relu``, ``F.relu``) and method form;
* ops that keep a non-negative input non-negative, looked through: max/avg/adaptive/LP pooling,
  flatten, view, reshape, permute, transpose, squeeze, contiguous, getitem, split, dropout
  (not alpha dropout), identity, pixel shuffle, padding with a value >= 0, nearest/linear
  interpolation; and ``add``, ``mul``, ``div``, ``cat``, ``stack``, ``minimum``, ``maximum``
  when every tensor operand is non-negative and every number operand is ``>= 0``.

Which input quantizers are affected: every ±1 quantizer (``Quantizer.plus_minus_one``:
``ste_sign``, ``approx_sign``, ``swish_sign``), ``magnitude_aware_sign`` (``+alpha``
everywhere) and ``progressive_sign`` (``+1`` once sharpened, and in eval) become constant;
``ste_tern`` loses its ``-1`` level (``{0, +1}``). ``ste_heaviside`` (``{0, 1}``), the k-bit
and DoReFa activation quantizers are meant for non-negative inputs and are left alone.

``Recipe.nonnegative_inputs`` (see :meth:`fxquant.Recipe.with_nonnegative_inputs`) says what to
do with the binary layers found:

* ``"warn"`` (default): one ``UserWarning`` naming every such layer and the usual fixes;
* ``"error"``: the same message as a ``ValueError``;
* ``"ignore"``: nothing;
* ``"drop"``: the quantizer reads the value with the non-negative activation(s) removed, and
  the activation is erased from the graph; only where nothing else reads the activation (or a
  looked-through op between it and the quantizer), else that layer is left as it was and named
  in a warning;
* ``"move"``: the quantizer reads the value without the activation(s); the activation is kept
  for its other readers (a residual shortcut), and a copy of it is applied after the binary
  layer, after the layer's batch norm when the layer's only reader is one (as Bi-Real Net and
  ReActNet place it), except where that output is already followed by the same activation, or
  joins a residual sum (``add``): a relu there would make the sum, and so the next sign,
  non-negative again (Bi-Real Net has no relu in its blocks). A copy that feeds a later binary
  layer is moved again from there, so in a chain ``conv -> bn -> relu -> conv -> bn -> relu``
  the relus end up after the last binary layer's batch norm. In a torchvision BasicBlock the
  first binary conv reads ``out + identity`` itself while ``relu(out + identity)`` still feeds
  the shortcut; the second reads ``bn1``'s output, and ``bn2``'s output joins the sum as is.

Both rewrites change the function the model computes (that is their purpose), never a parameter
or buffer: the ``state_dict`` keys stay those of the float model. In-place activations the
rewrite touches are made out of place (the quantizer reads their input).
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxquant._text import listing
from fxquant._user_code import user_stacklevel
from fxquant.graph.meta import get_record
from fxquant.graph.patterns import Submodules, is_batch_norm
from fxquant.graph.recipe import Recipe
from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.sign import MagnitudeAwareSign, ProgressiveSign
from fxquant.quantizers.ternary import SteTern

__all__ = ["NonnegativeInput", "find_nonnegative_inputs", "check_nonnegative_inputs"]

Node = torch.fx.Node
Effect = Literal["constant", "loses -1"]

# -- what makes a value non-negative (rules as data) -----------------------------------------

_PRODUCER_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmin)
_PRODUCER_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, torch.sigmoid,
                       F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax, F.softmin, torch.exp,
                       torch.abs, torch.absolute, operator.abs}
_PRODUCER_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "softmax", "exp", "exp_", "abs",
                     "abs_", "absolute"}
# clamp-like: (where the lower bound is given: positional index, keyword, default)
_CLAMP_FUNCTIONS = {torch.clamp: (1, "min", None), torch.clip: (1, "min", None),
                    torch.clamp_: (1, "min", None), torch.clamp_min: (1, "min", None),
                    torch.clamp_min_: (1, "min", None), F.hardtanh: (1, "min_val", -1.0),
                    F.hardtanh_: (1, "min_val", -1.0)}
_CLAMP_METHODS = {"clamp": (1, "min", None), "clip": (1, "min", None),
                  "clamp_": (1, "min", None), "clip_": (1, "min", None),
                  "clamp_min": (1, "min", None), "clamp_min_": (1, "min", None)}
_OUT_OF_PLACE = {torch.relu_: torch.relu, F.relu_: F.relu, torch.clamp_: torch.clamp,
                 torch.clamp_min_: torch.clamp_min, F.hardtanh_: F.hardtanh}

# ops whose output is non-negative when their first argument is
_FIRST_ARG_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                      nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                      nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                      nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Flatten, nn.Unflatten,
                      nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
                      nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad1d, nn.ZeroPad2d,
                      nn.ZeroPad3d, nn.ChannelShuffle)
_FIRST_ARG_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices,
    F.max_pool2d_with_indices, F.max_pool3d_with_indices, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d,
    F.lp_pool2d, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
    torch.transpose, torch.t, torch.mean, torch.sum, torch.amax, torch.amin, torch.clone,
    torch.detach, torch.split, torch.chunk, torch.narrow, torch.flip, torch.roll,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.pixel_shuffle, F.pixel_unshuffle,
    operator.getitem, torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d,
    torch.adaptive_avg_pool1d, F.interpolate, F.pad,
}
_FIRST_ARG_METHODS = {"view", "reshape", "flatten", "unflatten", "contiguous", "permute",
                      "transpose", "t", "squeeze", "unsqueeze", "expand", "expand_as", "repeat",
                      "mean", "sum", "amax", "amin", "clone", "detach", "to", "float", "half",
                      "double", "bfloat16", "type_as", "view_as", "reshape_as", "chunk",
                      "split", "narrow", "flip", "roll", "max", "min"}
# ops whose output is non-negative when every tensor operand is and every number is >= 0
_ALL_ARGS_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, operator.truediv,
                       torch.div, torch.cat, torch.concat, torch.stack, torch.minimum,
                       torch.maximum}
_ALL_ARGS_METHODS = {"add", "mul", "div"}
_JOINS = {operator.add, operator.iadd, torch.add, "add", "add_"}  # residual sums
_INTERPOLATE_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _lower_bound_at_least_zero(node: Node, where: tuple[int, str, float | None]) -> bool:
    index, keyword, default = where
    bound = node.args[index] if len(node.args) > index else node.kwargs.get(keyword, default)
    number = _number(bound)
    return number is not None and number >= 0.0


def _is_producer(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node``'s output is >= 0 whatever its input (relu, sigmoid, clamp(min=0)...)."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh too
            return module.min_val >= 0.0
        return isinstance(module, _PRODUCER_MODULES)
    if node.op == "call_method":
        target = str(node.target)
        if target in _CLAMP_METHODS:
            return _lower_bound_at_least_zero(node, _CLAMP_METHODS[target])
        return target in _PRODUCER_METHODS
    if node.op == "call_function":
        if node.target in _CLAMP_FUNCTIONS:
            return _lower_bound_at_least_zero(node, _CLAMP_FUNCTIONS[node.target])
        return node.target in _PRODUCER_FUNCTIONS
    return False


def _data_input(node: Node) -> Any:
    """The tensor argument of a producer or a first-argument op."""
    if node.args:
        return node.args[0]
    return next(iter(node.kwargs.values()), None)


def _flat(values: Any) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


def _looked_through(node: Node, modules: Mapping[str, nn.Module]) -> list[Node] | None:
    """The operands that must be non-negative for ``node``'s output to be, or None when
    ``node`` is not an op that preserves non-negativity."""
    first = _data_input(node)
    first_only = [first] if isinstance(first, Node) else None
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, nn.Upsample):
            return first_only if module.mode in _INTERPOLATE_MODES else None
        return first_only if isinstance(module, _FIRST_ARG_MODULES) else None
    if node.op == "call_method" and node.target in _FIRST_ARG_METHODS:
        return first_only
    if node.op == "call_function" and node.target in _FIRST_ARG_FUNCTIONS:
        if node.target is F.interpolate and node.kwargs.get("mode") not in _INTERPOLATE_MODES:
            return None
        if node.target is F.pad:
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            if value is not None and not (_number(value) is not None and value >= 0):
                return None
        return first_only
    if ((node.op == "call_function" and node.target in _ALL_ARGS_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ALL_ARGS_METHODS)):
        operands = []
        for value in _flat((*node.args, *node.kwargs.values())):
            if isinstance(value, Node):
                operands.append(value)
            elif _number(value) is not None and value < 0:
                return None  # a negative number operand (x + -1, alpha=-1)
            elif not (value is None or isinstance(value, (bool, int, float, str))):
                return None  # anything else (a dtype would be fine, but be conservative)
        return operands or None
    return None


def _nonnegative(node: Any, modules: Mapping[str, nn.Module], memo: dict[Node, bool]) -> bool:
    """Whether ``node``'s value is known to be >= 0 (a producer, or looked through to them)."""
    if not isinstance(node, Node):
        return False
    if node not in memo:
        memo[node] = False  # a cycle cannot occur in a graph, but stay finite anyway
        if _is_producer(node, modules):
            memo[node] = True
        else:
            operands = _looked_through(node, modules)
            memo[node] = operands is not None and all(
                _nonnegative(x, modules, memo) for x in operands)
    return memo[node]


# -- which quantizers degenerate ----------------------------------------------------------------


def _effect(quantizer: nn.Module) -> Effect | None:
    """What a non-negative input does to ``quantizer``: "constant", "loses -1" or None."""
    if not isinstance(quantizer, Quantizer):
        return None
    if quantizer.plus_minus_one or isinstance(quantizer, (MagnitudeAwareSign, ProgressiveSign)):
        return "constant"
    if isinstance(quantizer, SteTern):
        return "loses -1"
    return None


# -- findings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonnegativeInput:
    """One binary layer whose input quantizer reads a value known to be >= 0.

    ``layer``: the layer path; ``quantizer``: the input quantizer's submodule name and ``kind``
    its registry name; ``effect``: "constant" (a sign: the same value everywhere) or "loses -1"
    (a ternary: only {0, +1} left); ``source``: where the value comes from, e.g.
    ``"relu 'layer1.0.relu' -> max_pool2d"``.
    """

    layer: str
    quantizer: str
    kind: str
    effect: Effect
    source: str

    def describe(self) -> str:
        return f"{self.layer} ({self.kind} of {self.source})"


def _label(node: Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}'"
    name = getattr(node.target, "__name__", str(node.target))
    return name.rstrip("_") if node.op == "call_method" else name


def _source(node: Node, modules: Mapping[str, nn.Module], memo: dict[Node, bool]) -> str:
    """``"producer -> op -> op"`` along the first non-negative path reaching ``node``."""
    chain = []
    while not _is_producer(node, modules):
        chain.append(_label(node))
        operands = _looked_through(node, modules) or []
        node = next(x for x in operands if _nonnegative(x, modules, memo))
    chain.append(_label(node))
    return " -> ".join(reversed(chain))


def _input_quantizers(gm: torch.fx.GraphModule) -> Iterator[tuple[Node, str]]:
    for node in gm.graph.nodes:
        record = get_record(node)
        if record is not None and record.role == "input_quantizer" and node.op == "call_module":
            yield node, record.layer


def find_nonnegative_inputs(gm: torch.fx.GraphModule) -> list[NonnegativeInput]:
    """The binary layers of a prepared ``gm`` whose input quantizer reads a value >= 0.

    Only sign and ternary quantizers are reported (see the module docstring). The analysis
    walks back from each input quantizer through the ops listed there; it changes nothing.
    """
    modules = Submodules(gm)
    found = []
    memo: dict[Node, bool] = {}
    for node, layer in _input_quantizers(gm):
        effect = _effect(modules[str(node.target)])
        if effect is not None and node.args and _nonnegative(node.args[0], modules, memo):
            quantizer = modules[str(node.target)]
            found.append(NonnegativeInput(layer, str(node.target), type(quantizer).name or
                                          type(quantizer).__name__, effect,
                                          _source(node.args[0], modules, memo)))
    return found


# -- the rewrite -------------------------------------------------------------------------------


@dataclass
class _Tree:
    """The non-negative value a quantizer reads, down to its producers."""

    root: Node
    nodes: list[Node]       # producers and looked-through ops, root first
    outermost: list[Node]   # the producers met first on each path from the root

    def why_not_drop(self, allowed: set[Node]) -> str | None:
        for node in self.nodes:
            others = [u for u in node.users if u not in allowed]
            if others:
                return (f"{_label(node)} also feeds {', '.join(u.name for u in others)}")
        return None


def _tree(root: Node, modules: Mapping[str, nn.Module]) -> _Tree:
    memo: dict[Node, bool] = {}
    nodes: list[Node] = []
    outermost: list[Node] = []
    seen: set[Node] = set()

    def visit(node: Node, above_producer: bool) -> None:
        if node in seen:
            return
        seen.add(node)
        nodes.append(node)
        if _is_producer(node, modules):
            if not above_producer:
                outermost.append(node)
            x = _data_input(node)
            if _nonnegative(x, modules, memo):
                visit(x, True)
            return
        for x in _looked_through(node, modules) or []:
            if _nonnegative(x, modules, memo):
                visit(x, above_producer)

    visit(root, False)
    return _Tree(root, nodes, outermost)


def _is_in_place(node: Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return bool(node.kwargs.get("inplace", False)) or (name.endswith("_")
                                                       and not name.startswith("__"))


def _make_out_of_place(node: Node, modules: Mapping[str, nn.Module]) -> None:
    """Turn an in-place producer into its out-of-place form (same values, no aliasing)."""
    if node.op == "call_module":
        modules[str(node.target)].inplace = False  # type: ignore[union-attr]  # shared: harmless
    elif node.op == "call_method":
        node.target = str(node.target).rstrip("_")
    else:
        node.target = _OUT_OF_PLACE.get(node.target, node.target)  # type: ignore[arg-type]
    if "inplace" in node.kwargs:
        node.update_kwarg("inplace", False)


def _why_not_rewrite(tree: _Tree, modules: Mapping[str, nn.Module]) -> str | None:
    for node in tree.nodes:
        if not _is_in_place(node, modules):
            continue
        if not _is_producer(node, modules):
            return f"{_label(node)} works in place"
        x = _data_input(node)
        if isinstance(x, Node) and len(x.users) > 1:
            return f"{_label(node)} works in place on a value others read too"
    return None


def _bypass(gm: torch.fx.GraphModule, tree: _Tree, before: Node,
            modules: Mapping[str, nn.Module]) -> Node:
    """The root's value with every producer in ``tree`` replaced by its input (new nodes for
    the looked-through ops, inserted before ``before``)."""
    members = set(tree.nodes)
    done: dict[Node, Any] = {}

    def rebuild(node: Any) -> Any:
        if not isinstance(node, Node) or node not in members:
            return node
        if node not in done:
            if _is_producer(node, modules):
                done[node] = rebuild(_data_input(node))
            else:
                with gm.graph.inserting_before(before):
                    done[node] = gm.graph.node_copy(node, rebuild)
        return done[node]

    return rebuild(tree.root)


def _activation_key(node: Node, modules: Mapping[str, nn.Module]) -> tuple[Any, ...]:
    """What an activation computes, in-placeness aside: equal keys compute equal values."""
    kwargs = tuple((k, v) for k, v in node.kwargs.items() if k != "inplace")
    if node.op == "call_module":
        module = modules[str(node.target)]
        settings = tuple((k, v) for k, v in vars(module).items()
                         if not k.startswith("_") and k not in ("training", "inplace"))
        return (type(module), settings, node.args[1:], kwargs)
    target = _OUT_OF_PLACE.get(node.target, node.target)  # type: ignore[call-overload]
    if node.op == "call_method":
        target = str(target).rstrip("_")
    return (node.op, target, node.args[1:], kwargs)


def _layer_node(quantizer: Node) -> Node | None:
    for user in quantizer.users:
        record = get_record(user)
        if record is not None and record.role == "layer":
            return user
    return None


def _apply_after(gm: torch.fx.GraphModule, layer: Node, producer: Node,
                 modules: Mapping[str, nn.Module]) -> None:
    """Apply a copy of ``producer`` to the output of ``layer`` (or of its batch norm), unless
    that output is already followed by the same activation, or joins a residual sum (a relu
    there would make the sum, and the next sign, non-negative again: Bi-Real Net has none)."""
    anchor = layer
    users = list(layer.users)
    if len(users) == 1 and users[0].args[:1] == (layer,) and is_batch_norm(users[0], modules):
        anchor = users[0]
    readers = list(anchor.users)
    if any(r.target in _JOINS for r in readers if r.op in ("call_function", "call_method")):
        return
    key = _activation_key(producer, modules)
    if (len(readers) == 1 and readers[0].args[:1] == (anchor,)
            and _activation_key(readers[0], modules) == key):
        return  # already followed by the same activation
    with gm.graph.inserting_after(anchor):
        moved = gm.graph.node_copy(producer, lambda a: anchor if a is _data_input(producer)
                                   else a)
    anchor.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)


def _erase_dead(gm: torch.fx.GraphModule, nodes: list[Node]) -> None:
    """Erase the nodes of ``nodes`` nobody reads any more (readers first)."""
    alive = [node for node in dict.fromkeys(nodes) if node.graph is gm.graph]
    erased = True
    while erased:
        erased = False
        for node in alive:
            if not node.users:
                gm.graph.erase_node(node)
                alive.remove(node)
                erased = True
                break


def _drop(gm: torch.fx.GraphModule, modules: Mapping[str, nn.Module],
          quantizers: list[Node]) -> dict[str, str]:
    """Bypass and erase the producers where nothing else reads them; return why not elsewhere."""
    trees = {q: _tree(q.args[0], modules) for q in quantizers}
    refused: dict[Node, str] = {}
    for q, tree in trees.items():
        reason = _why_not_rewrite(tree, modules)
        if reason is not None:
            refused[q] = reason
    changed = True
    while changed:  # a shared producer drops only if every reader of it drops it
        changed = False
        kept = [q for q in trees if q not in refused]
        allowed = set(kept).union(*(trees[q].nodes for q in kept))
        for q in kept:
            reason = trees[q].why_not_drop(allowed)
            if reason is not None:
                refused[q], changed = reason, True
    dead: list[Node] = []
    for q, tree in trees.items():
        if q not in refused:
            q.update_arg(0, _bypass(gm, tree, q, modules))
            dead += tree.nodes
    _erase_dead(gm, dead)
    return {str(q.target): reason for q, reason in refused.items()}


def _move(gm: torch.fx.GraphModule, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """Bypass the producers for every degenerate input quantizer, in graph order, and apply them
    again after the layer; return why not where that was refused."""
    refused: dict[str, str] = {}
    for q, _ in list(_input_quantizers(gm)):
        if _effect(modules[str(q.target)]) is None or not (
                q.args and _nonnegative(q.args[0], modules, {})):
            continue
        tree = _tree(q.args[0], modules)
        reason = _why_not_rewrite(tree, modules)
        keys = {_activation_key(p, modules) for p in tree.outermost}
        if reason is None and len(keys) > 1:
            reason = "different activations meet there: " + ", ".join(
                _label(p) for p in tree.outermost)
        layer = _layer_node(q)
        if reason is None and layer is None:
            reason = "its layer was not found"
        if reason is not None:
            refused[str(q.target)] = reason
            continue
        assert layer is not None
        for node in tree.nodes:
            if _is_producer(node, modules) and _is_in_place(node, modules):
                _make_out_of_place(node, modules)
        q.update_arg(0, _bypass(gm, tree, q, modules))
        _apply_after(gm, layer, tree.outermost[0], modules)
        _erase_dead(gm, tree.nodes)
    return refused


_FIXES = ("remove the activation in front of binary layers, as Bi-Real Net and ReActNet do "
          "(batch norm -> sign -> binary layer); or use input='ste_heaviside' ({0, 1}); or let "
          "prepare rewrite the graph with recipe.with_nonnegative_inputs('drop') (removes the "
          "activation where nothing else reads it) or ('move') (moves it after the binary "
          "layer's batch norm); with_nonnegative_inputs('ignore') silences this warning")


def _message(found: list[NonnegativeInput], refused: Mapping[str, str]) -> str:
    lines = [f"{len(found)} binary layer(s) read a non-negative value through their input "
             "quantizer:"]
    constant = [f for f in found if f.effect == "constant"]
    ternary = [f for f in found if f.effect == "loses -1"]
    if constant:
        lines.append("  constant input (a sign of x >= 0 is +1 everywhere): "
                     + listing((f.describe() for f in constant), 12, "; "))
    if ternary:
        lines.append("  ternary input loses its -1 level ({0, +1} only): "
                     + listing((f.describe() for f in ternary), 12, "; "))
    if refused:
        lines.append("  the requested rewrite was not possible for: " + listing((
            f"{f.layer} ({refused.get(f.quantizer, 'not rewritten')})" for f in found), 12, "; "))
    lines.append(f"Fixes: {_FIXES}.")
    return "\n".join(lines)


def check_nonnegative_inputs(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """Warn about, refuse or rewrite sign/ternary input quantizers that read a value >= 0.

    Runs right after ``insert_input_quantizers``; what it does is ``recipe.nonnegative_inputs``
    ("warn", "error", "ignore", "drop" or "move", see the module docstring).
    """
    mode = recipe.nonnegative_inputs
    if mode == "ignore":
        return gm
    found = find_nonnegative_inputs(gm)
    if not found:
        return gm
    if mode == "error":
        raise ValueError(f"fxquant.prepare: {_message(found, {})}")
    refused: dict[str, str] = {}
    if mode in ("drop", "move"):
        modules = Submodules(gm)
        if mode == "drop":
            names = {f.quantizer for f in found}
            quantizers = [q for q, _ in _input_quantizers(gm) if str(q.target) in names]
            refused = _drop(gm, modules, quantizers)
        else:
            refused = _move(gm, modules)
        found = find_nonnegative_inputs(gm)  # what is left
        if not found:
            return gm
    warnings.warn(f"fxquant.prepare: {_message(found, refused)}", UserWarning,
                  stacklevel=user_stacklevel())
    return gm
