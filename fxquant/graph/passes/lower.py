"""lower_activation_quantizers, pack_weights, eliminate_dead_code: the rest of convert."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.fx
from torch import nn

from fxquant import nn as fxquant_nn
from fxquant import ops
from fxquant.graph.meta import get_record, set_record, update_record
from fxquant.quantizers.base import Quantizer

__all__ = ["restore_plain_layers", "lower_activation_quantizers", "pack_weights",
           "eliminate_dead_code"]


class _Call1(nn.Module):
    """A module whose forward is ``fn(x)``: traced to inline ``fn``'s plain ops."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):  # so tracing finds the quantizer's own tensors
            self.owner = owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _Call2(_Call1):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.fn(x, y)


def _traced(fn: Callable[..., torch.Tensor], inputs: int,
            cache: dict[object, torch.fx.GraphModule]) -> torch.fx.GraphModule:
    """``fn`` traced once per distinct quantizer configuration (tracing is the slow part)."""
    owner = getattr(fn, "__self__", None)
    key: object = None
    if isinstance(owner, Quantizer) and next(owner.parameters(), None) is None and next(
            owner.buffers(), None) is None:  # constants fully described by the config
        try:
            key = (type(owner), getattr(fn, "__name__", ""), repr(sorted(
                owner.get_config().items())))
        except NotImplementedError:
            key = None
    if key is not None and key in cache:
        return cache[key]
    sub = torch.fx.symbolic_trace((_Call1 if inputs == 1 else _Call2)(fn))
    if key is not None:
        cache[key] = sub
    return sub


def _inline(gm: torch.fx.GraphModule, before: torch.fx.Node, fn: Callable[..., torch.Tensor],
            inputs: list[torch.fx.Node], prefix: str,
            cache: dict[object, torch.fx.GraphModule] | None = None) -> torch.fx.Node:
    """Insert the traced ops of ``fn(*inputs)`` before ``before``; return the result node.

    Tensor constants ``fn`` reads (e.g. a quantizer's buffers) become buffers ``<prefix>_<name>``.
    """
    sub = _traced(fn, len(inputs), {} if cache is None else cache)
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, torch.fx.Node] = dict(zip(placeholders, inputs, strict=True))
    for n in sub.graph.nodes:
        if n.op == "get_attr":
            name = f"{prefix}_{str(n.target).replace('.', '_')}"
            value = sub
            for part in str(n.target).split("."):
                value = getattr(value, part)
            gm.register_buffer(name, value.detach().clone())
            with gm.graph.inserting_before(before):
                env[n] = gm.graph.get_attr(name)
    with gm.graph.inserting_before(before):
        return gm.graph.graph_copy(sub.graph, env)


def restore_plain_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``fxquant.nn.conv2d`` & co. (training-time memory savers) become ``F.conv2d`` & co."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in fxquant_nn.PLAIN_FORM:
            node.target = fxquant_nn.PLAIN_FORM[node.target]
    return gm


def lower_activation_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Straight-through quantizers become their plain inference ops; error quantizers go away.

    A quantizer whose class has no ``inference`` stays as a module call (its eval forward).
    """
    cache: dict[object, torch.fx.GraphModule] = {}
    for node in list(gm.graph.nodes):
        record = get_record(node)
        if record is None or record.role not in ("input_quantizer", "output_quantizer",
                                                 "error_quantizer"):
            continue
        quantizer = gm.get_submodule(str(node.target))
        if record.role == "error_quantizer" or quantizer.forward_is_identity():
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif type(quantizer).inference is not Quantizer.inference:
            out = _inline(gm, node, quantizer.eval().inference, [node.args[0]], str(node.target),
                          cache)
            if out is not node.args[0]:  # the lowered ops keep the quantizer's record
                set_record(out, record)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
    return gm


def pack_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Folded weights of 1 to 8 bits become a :class:`fxquant.ops.PackedWeight` submodule
    ``<owner>.<name>_packed`` (codes + value table) whose call in the graph yields the exact weight.
    """
    for node in list(gm.graph.nodes):
        record = get_record(node)
        if record is None or record.role != "folded_weight" or record.bits not in ops.packable_bits:
            continue
        target = str(node.target)
        owner_path, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        weight = getattr(owner, attr)
        try:
            codes, table = ops.pack(weight, record.bits)
        except ops.CannotPack as err:
            warnings.warn(f"{record.layer}: weight kept unpacked ({err})", stacklevel=2)
            continue
        delattr(owner, attr)
        name = f"{owner_path}.{attr}_packed" if owner_path else f"{attr}_packed"
        gm.add_submodule(name, ops.PackedWeight(codes, table, tuple(weight.shape), record.bits))
        with gm.graph.inserting_before(node):
            unpacked = gm.graph.call_module(name)
        unpacked.meta.update(node.meta)
        update_record(unpacked, role="packed_weight", tensors=(f"{name}.codes", f"{name}.table"))
        node.replace_all_uses_with(unpacked)
        gm.graph.erase_node(node)
    return gm


def eliminate_dead_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop unused nodes, then submodules nothing calls or reads any more (quantizers, folded
    BNs); linear in the model size (``GraphModule.delete_all_unused_submodules`` is quadratic)."""
    gm.graph.eliminate_dead_code()
    used = {""}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            path = str(node.target) if node.op == "call_module" else str(node.target).rpartition(
                ".")[0]
            parts = path.split(".") if path else []
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if node.op == "call_module":  # a called module keeps all its children
                used.update(f"{path}.{n}" for n, _ in gm.get_submodule(path).named_modules()
                            if n)
    for name in [n for n, _ in gm.named_modules() if n not in used]:
        parent = name.rpartition(".")[0]
        if parent in used:  # deleting the topmost unused module removes what is below it
            gm.delete_submodule(name)
    return gm
