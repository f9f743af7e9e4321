"""insert_*_quantizers: put quantizer leaf modules around the layers annotate_layers recorded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.weight_norm import WeightNorm

from fxquant import nn as fxquant_nn
from fxquant.graph.clone import clone_module
from fxquant.graph.meta import QuantRecord, Slot, get_record, set_record, update_record
from fxquant.graph.patterns import (
    Submodules,
    keeps_output_for_backward,
    layer_arg,
    layer_form,
    pattern_end,
    set_layer_arg,
)
from fxquant.graph.recipe import Recipe
from fxquant.quantizers.base import Quantizer, get

__all__ = ["insert_weight_quantizers", "insert_input_quantizers", "insert_output_quantizers",
           "insert_error_quantizers", "compact_binary_inputs"]


def _layers(gm: torch.fx.GraphModule, slot: Slot) -> Iterator[tuple[torch.fx.Node, QuantRecord]]:
    for node in list(gm.graph.nodes):
        record = get_record(node)
        if record is not None and record.role == "layer" and record.spec(slot) is not None:
            yield node, record


def _add_quantizer(gm: torch.fx.GraphModule, layer: torch.fx.Node, record: QuantRecord,
                   slot: Slot, arg: torch.fx.Node,
                   prototypes: dict[int, tuple[Any, Quantizer]]) -> torch.fx.Node:
    """Create ``<layer>_<slot>_quantizer``, register it and return its call node on ``arg``.

    The caller chooses the insertion point. The name is made unique with a numeric suffix when a
    layer module is called more than once.
    """
    spec = record.spec(slot)
    assert spec is not None
    quantizer = _new_quantizer(spec.quantizer, prototypes)
    base = f"{record.layer.replace('.', '_')}_{slot}_quantizer"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    gm.add_submodule(name, quantizer)
    node = gm.graph.call_module(name, (arg,))
    set_record(node, QuantRecord(f"{slot}_quantizer", record.layer, record.op, record.module,
                                 quantizer=quantizer.name, bits=quantizer.bits))
    update_record(layer, quantizers=(*record.quantizers, (slot, name)))
    return node


def _new_quantizer(spec: Any, prototypes: dict[int, tuple[Any, Quantizer]]) -> Quantizer:
    """``get(spec)``; names and instances are built once per pass and cloned after (module
    constructors are slow). Factories are called for every layer, as they may differ per call."""
    if not isinstance(spec, (str, Quantizer)):
        return get(spec)
    if id(spec) not in prototypes:
        prototypes[id(spec)] = (spec, get(spec))  # the spec is kept alive so its id stays unique
    return clone_module(prototypes[id(spec)][1])


def _layer_tensor(gm: torch.fx.GraphModule, path: str, module: nn.Module,
                  name: str) -> torch.fx.Node | None:
    """A node computing ``module.<name>`` (weight or bias) the way the module's own call does.

    A parametrized tensor is recomputed from its originals by ``<path>.parametrizations.<name>``
    (a ``get_attr`` would read a value, and copying the GraphModule would assign it back through
    the parametrization); the old ``torch.nn.utils.weight_norm`` hook's tensor is recomputed from
    ``<name>_v`` and ``<name>_g`` as the hook does. Either way the originals stay the trained
    parameters and keep their state_dict keys.
    """
    if parametrize.is_parametrized(module, name):
        return gm.graph.call_module(f"{path}.parametrizations.{name}")
    hook = next((h for h in module._forward_pre_hooks.values()
                 if isinstance(h, WeightNorm) and h.name == name), None)
    if hook is not None:
        v, g = gm.graph.get_attr(f"{path}.{name}_v"), gm.graph.get_attr(f"{path}.{name}_g")
        return gm.graph.call_function(torch._weight_norm, (v, g, hook.dim))
    return None if getattr(module, name) is None else gm.graph.get_attr(f"{path}.{name}")


def _functional_call(gm: torch.fx.GraphModule, node: torch.fx.Node, module: nn.Module,
                     weight: torch.fx.Node) -> torch.fx.Node:
    """The functional form of a Linear/Conv/ConvTranspose module call, fed by ``weight``: the
    same computation as the module's forward (padding modes, groups, dilation, no bias)."""
    graph, target = gm.graph, str(node.target)
    x = layer_arg(node, "input")
    bias = _layer_tensor(gm, target, module, "bias")
    form = layer_form(module)
    assert form is not None, f"{target} is not a plain Linear/Conv layer"
    op, fn = form
    if op == "linear":
        return graph.call_function(fn, (x, weight, bias))
    if op.startswith("conv_transpose"):  # forward without output_size: fixed output_padding
        return graph.call_function(fn, (x, weight, bias, module.stride, module.padding,
                                        module.output_padding, module.groups, module.dilation))
    padding = module.padding
    if module.padding_mode != "zeros":
        x = graph.call_function(F.pad, (x, module._reversed_padding_repeated_twice),
                                {"mode": module.padding_mode})
        padding = 0
    return graph.call_function(fn, (x, weight, bias, module.stride, padding, module.dilation,
                                    module.groups))


def insert_weight_quantizers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """``conv(x)`` -> ``F.conv2d(x, conv_weight_quantizer(conv.weight), conv.bias, ...)``.

    The module keeps owning its parameters, so the state_dict keys stay those of the float model.
    """
    modules = Submodules(gm)
    prototypes: dict[int, tuple[Any, Quantizer]] = {}
    for node, record in _layers(gm, "weight"):
        with gm.graph.inserting_before(node):
            if node.op == "call_module":
                module = modules[str(node.target)]
                weight = _layer_tensor(gm, str(node.target), module, "weight")
                assert weight is not None, f"{node.target} has no weight"
                qweight = _add_quantizer(gm, node, record, "weight", weight, prototypes)
                new = _functional_call(gm, node, module, qweight)
                new.meta.update(node.meta)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            else:
                weight = layer_arg(node, "weight")
                qweight = _add_quantizer(gm, node, record, "weight", weight, prototypes)
                set_layer_arg(node, "weight", qweight)
    return gm


def insert_input_quantizers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """``layer(x)`` -> ``layer(<layer>_input_quantizer(x))`` (larq's placement)."""
    prototypes: dict[int, tuple[Any, Quantizer]] = {}
    for node, record in _layers(gm, "input"):
        x = layer_arg(node, "input")
        with gm.graph.inserting_before(node):
            qx = _add_quantizer(gm, node, record, "input", x, prototypes)
        set_layer_arg(node, "input", qx)
    return gm


def _insert_after(gm: torch.fx.GraphModule, layer: torch.fx.Node, record: QuantRecord,
                  slot: Slot, anchor: torch.fx.Node,
                  prototypes: dict[int, tuple[Any, Quantizer]]) -> None:
    with gm.graph.inserting_after(anchor):
        q = _add_quantizer(gm, layer, record, slot, anchor, prototypes)
    anchor.replace_all_uses_with(q, delete_user_cb=lambda user: user is not q)


def insert_output_quantizers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """Quantize the end of ``layer -> [batch norm] -> [relu/hardtanh]`` (WAGE's A placement)."""
    modules = Submodules(gm)
    prototypes: dict[int, tuple[Any, Quantizer]] = {}
    for node, record in _layers(gm, "output"):
        _insert_after(gm, node, record, "output", pattern_end(node, modules), prototypes)
    return gm


def insert_error_quantizers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """Identity forward, gradient quantizer backward (WAGE's E), after the output quantizer."""
    modules = Submodules(gm)
    prototypes: dict[int, tuple[Any, Quantizer]] = {}
    for node, record in _layers(gm, "error"):
        anchor = pattern_end(node, modules)
        output_name = record.quantizer_name("output")
        for user in anchor.users:
            if user.op == "call_module" and user.target == output_name:
                anchor = user
        _insert_after(gm, node, get_record(node) or record, "error", anchor, prototypes)
    return gm


_COMPACT_FORM = {fn: compact for compact, fn in fxquant_nn.PLAIN_FORM.items()}
_COMPACT_FORM.update({torch.conv1d: fxquant_nn.conv1d, torch.conv2d: fxquant_nn.conv2d,
                      torch.conv3d: fxquant_nn.conv3d})


def compact_binary_inputs(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """Layers fed by a ±1 input quantizer call :mod:`fxquant.nn`'s version of their function,
    which keeps that input for backward in one byte per value instead of four (same forward).

    Where the quantizer's own input is kept alive for backward anyway (the output of a relu,
    sigmoid or tanh), the quantizer is told to save that input rather than a mask
    (``save_input``); the layer then keeps it too and rebuilds the ±1 tensor in backward: no
    bytes beyond what the float model saves, and fewer passes over memory.
    """
    modules = Submodules(gm)
    for node, _ in _layers(gm, "input"):
        x = layer_arg(node, "input")
        if (node.op != "call_function" or node.target not in _COMPACT_FORM
                or not isinstance(x, torch.fx.Node) or x.op != "call_module"):
            continue
        quantizer = modules[str(x.target)]
        if not getattr(quantizer, "plus_minus_one", False):
            continue
        node.target = _COMPACT_FORM[node.target]
        source = x.args[0] if x.args else None
        if isinstance(source, torch.fx.Node) and keeps_output_for_backward(source, modules):
            quantizer.save_input = True
    return gm
