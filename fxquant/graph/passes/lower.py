"""lower_activation_quantizers, pack_weights, eliminate_dead_code: the rest of convert."""

from __future__ import annotations

import warnings

import torch
import torch.fx
from torch import nn

from fxquant import nn as fxquant_nn
from fxquant import ops
from fxquant.graph.meta import get_record, set_record, update_record
from fxquant.quantizers.base import Quantizer

__all__ = ["restore_plain_layers", "lower_activation_quantizers", "pack_weights",
           "eliminate_dead_code"]


class _Inference(nn.Module):
    """A module whose forward is ``quantizer.inference(x)``: traced to inline its plain ops."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer  # a submodule, so tracing finds the quantizer's own tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.inference(x)


def _traced(quantizer: Quantizer, cache: dict[object, torch.fx.GraphModule]
            ) -> torch.fx.GraphModule:
    """``quantizer.inference`` traced once per distinct configuration (tracing is the slow part);
    quantizers with tensors of their own are traced each time."""
    key: object = None
    if next(quantizer.parameters(), None) is None and next(quantizer.buffers(), None) is None:
        try:
            key = (type(quantizer), repr(sorted(quantizer.get_config().items())))
        except NotImplementedError:
            key = None
    if key is not None and key in cache:
        return cache[key]
    sub = torch.fx.symbolic_trace(_Inference(quantizer))
    if key is not None:
        cache[key] = sub
    return sub


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, quantizer: Quantizer,
            cache: dict[object, torch.fx.GraphModule]) -> torch.fx.Node:
    """Insert the traced ops of ``quantizer.inference`` on ``node``'s input before ``node``.

    Tensors the quantizer reads (e.g. learned parameters) become buffers ``<node target>_<name>``.
    """
    sub = _traced(quantizer, cache)
    (placeholder,) = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, torch.fx.Node] = {placeholder: node.args[0]}
    for n in sub.graph.nodes:
        if n.op == "get_attr":
            owner, _, attr = str(n.target).rpartition(".")
            name = f"{node.target}_{str(n.target).removeprefix('quantizer.').replace('.', '_')}"
            gm.register_buffer(name, getattr(sub.get_submodule(owner), attr).detach().clone())
            with gm.graph.inserting_before(node):
                env[n] = gm.graph.get_attr(name)
    with gm.graph.inserting_before(node):
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
            out = _inline(gm, node, quantizer.eval(), cache)
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
