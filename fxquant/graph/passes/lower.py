"""lower_activation_quantizers, pack_weights, eliminate_dead_code: the rest of convert."""

from __future__ import annotations

import warnings

import torch
import torch.fx
from torch import nn

from fxquant import ops
from fxquant.graph.meta import get_record, update_record
from fxquant.quantizers.base import Quantizer

__all__ = ["lower_activation_quantizers", "pack_weights", "eliminate_dead_code"]


class _Inference(nn.Module):
    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.inference(x)


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, quantizer: Quantizer) -> None:
    """Replace ``node`` (a quantizer call) by the traced ops of ``quantizer.inference``."""
    sub = torch.fx.symbolic_trace(_Inference(quantizer))
    (placeholder,) = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env: dict[torch.fx.Node, torch.fx.Node] = {placeholder: node.args[0]}
    for n in sub.graph.nodes:
        if n.op == "get_attr":  # tensor constants of the quantizer move to the model
            name = f"{node.target}_{str(n.target).replace('.', '_')}"
            gm.register_buffer(name, getattr(sub, str(n.target)).detach().clone())
            with gm.graph.inserting_before(node):
                env[n] = gm.graph.get_attr(name)
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(sub.graph, env)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def lower_activation_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Straight-through quantizers become their plain inference ops; error quantizers go away.

    A quantizer whose class has no ``inference`` stays as a module call (its eval forward).
    """
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
            _inline(gm, node, quantizer.eval())
    return gm


def pack_weights(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Folded weights of 1 to 8 bits become packed codes + value table, unpacked in the graph."""
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
        owner.register_buffer(f"{attr}_codes", codes)
        owner.register_buffer(f"{attr}_table", table)
        prefix = f"{owner_path}." if owner_path else ""
        with gm.graph.inserting_before(node):
            c = gm.graph.get_attr(f"{prefix}{attr}_codes")
            t = gm.graph.get_attr(f"{prefix}{attr}_table")
            unpacked = gm.graph.call_function(ops.unpack, (c, t, tuple(weight.shape), record.bits))
        unpacked.meta.update(node.meta)
        update_record(unpacked, role="packed_weight")
        node.replace_all_uses_with(unpacked)
        gm.graph.erase_node(node)
    return gm


def eliminate_dead_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop unused nodes, then submodules nothing calls any more (quantizers, folded BNs)."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return gm
