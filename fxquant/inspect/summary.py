"""summary(): per-layer bits, parameters, memory and MACs, then model totals (larq's anchor).

Numbers are read from the fxquant records on the graph and from the parameters themselves:

* a layer's memory = weight count x weight bits + bias count x 32 bits;
* MACs per sample = weight count x output positions (H·W for conv2d, L for conv1d, D·H·W for conv3d,
  the product of the middle dims for linear), at precision max(input bits, weight bits); they need
  output shapes, so ``prepare(..., example_inputs=...)``;
* totals count every parameter of the model: quantized weights at their bits, all else at 32 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from fxquant.graph.meta import get_record
from fxquant.graph.patterns import layer_arg

__all__ = ["LayerStats", "layer_stats", "summary"]


@dataclass(frozen=True)
class LayerStats:
    """The numbers of one weighted layer."""

    layer: str
    op: str
    weight_quantizer: str
    weight_bits: int
    input_quantizer: str
    input_bits: int
    output_shape: tuple[int, ...] | None
    weight_count: int
    bias_count: int
    memory_bits: int
    macs: int | None

    @property
    def params(self) -> int:
        return self.weight_count + self.bias_count

    @property
    def mac_bits(self) -> int:
        return max(self.input_bits, self.weight_bits)


def _param(gm: torch.fx.GraphModule, node: object) -> torch.Tensor | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = _fetch(gm, str(node.target))
        return value if isinstance(value, torch.Tensor) else None
    if isinstance(node, torch.fx.Node) and node.op == "call_module" and not node.args:
        with torch.no_grad():  # a parametrized weight: ``<layer>.parametrizations.weight()``
            value = gm.get_submodule(str(node.target))()
        return value if isinstance(value, torch.Tensor) else None
    if isinstance(node, torch.fx.Node) and node.target is torch._weight_norm:
        return _param(gm, node.args[0])  # old weight_norm: the weight has v's shape
    return None


def _fetch(gm: torch.fx.GraphModule, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _quantizer_of(gm: torch.fx.GraphModule, node: object) -> tuple[str, int, object]:
    """(name, bits, its input) if ``node`` is an fxquant quantizer call, else ("-", 32, node)."""
    if isinstance(node, torch.fx.Node):
        record = get_record(node)
        if record is not None and record.role.endswith("_quantizer"):
            return record.quantizer, record.bits, node.args[0]
    return "-", 32, node


def _stored_bits(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> int:
    return sum(8 * state[k].numel() * state[k].element_size() for k in keys if k in state)


_GRID_PRESERVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity)
_GRID_PRESERVING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.flatten}
_GRID_PRESERVING_METHODS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous",
                            "squeeze", "unsqueeze"}


def _through_grid_preserving_ops(gm: torch.fx.GraphModule, node: object) -> object:
    """Walk back from a layer input through ops that keep values on a quantizer's grid (max
    pooling, flatten, reshapes), so a quantizer two steps up still counts as the input's."""
    while isinstance(node, torch.fx.Node) and node.args:
        if node.op == "call_module":
            keeps = isinstance(gm.get_submodule(str(node.target)), _GRID_PRESERVING_MODULES)
        elif node.op == "call_method":
            keeps = node.target in _GRID_PRESERVING_METHODS
        else:
            keeps = node.op == "call_function" and node.target in _GRID_PRESERVING_FUNCTIONS
        if not keeps:
            break
        node = node.args[0]
    return node


def _weight(gm: torch.fx.GraphModule, node: torch.fx.Node, state: dict[str, torch.Tensor]
            ) -> tuple[str, int, int, int]:
    """(quantizer name, bits, weight count, weight memory in bits) of a layer node."""
    if node.op == "call_module":  # a layer left in float keeps its module call
        weight = gm.get_submodule(str(node.target)).weight
        return "-", 32, weight.numel(), 32 * weight.numel()
    arg = layer_arg(node, "weight")
    record = get_record(arg) if isinstance(arg, torch.fx.Node) else None
    if record is not None and record.role in ("folded_weight", "packed_weight"):  # converted
        return record.quantizer, record.bits, record.numel, _stored_bits(state, record.tensors)
    name, bits, source = _quantizer_of(gm, arg)
    weight = _param(gm, source)
    count = weight.numel() if weight is not None else 0
    return name, bits, count, bits * count


def _output_positions(op: str, shape: tuple[int, ...]) -> int:
    dims = shape[1:-1] if op == "linear" else shape[2:]
    return math.prod(dims)


def layer_stats(gm: torch.fx.GraphModule) -> list[LayerStats]:
    """LayerStats for every weighted layer, in graph order."""
    stats = []
    state = gm.state_dict(keep_vars=True)
    for node in gm.graph.nodes:
        record = get_record(node)
        if record is None or record.role != "layer":
            continue
        wq, wbits, wcount, wmemory = _weight(gm, node, state)
        if node.op == "call_module":
            bias = gm.get_submodule(str(node.target)).bias
        else:
            bias = _param(gm, layer_arg(node, "bias"))
        x = layer_arg(node, "input")
        iq, ibits, _ = _quantizer_of(gm, _through_grid_preserving_ops(gm, x))
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        bcount = bias.numel() if bias is not None else 0
        macs = wcount * _output_positions(record.op, shape) if shape is not None else None
        stats.append(LayerStats(record.layer, record.op, wq, wbits, iq, ibits, shape, wcount,
                                bcount, wmemory + bcount * 32, macs))
    return stats


def _size(bits: float) -> str:
    value, unit = bits / 8, "B"
    for next_unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{value:,.2f} {unit}"


def _count(n: int) -> str:
    return f"{n:,}"


def summary(gm: torch.fx.GraphModule) -> str:
    """A tabulate table per weighted layer, then totals. Returns the text (prints nothing).

    Columns: layer, op, weight quantizer (bits), input quantizer (bits), output shape, parameters,
    memory at quantized precision, and one MAC column per precision present.
    """
    stats = layer_stats(gm)
    precisions = sorted({s.mac_bits for s in stats if s.macs is not None})
    headers = ["Layer", "Op", "Weight q. (bits)", "Input q. (bits)", "Output shape", "Params",
               "Memory"] + [f"{p}-bit MACs" for p in precisions]
    rows = []
    for s in stats:
        row = [s.layer, s.op, f"{s.weight_quantizer} ({s.weight_bits})",
               f"{s.input_quantizer} ({s.input_bits})",
               "?" if s.output_shape is None else str(list(s.output_shape)),
               _count(s.params), _size(s.memory_bits)]
        row += ["?" if s.macs is None else (_count(s.macs) if s.mac_bits == p else "0")
                for p in precisions]
        rows.append(row)
    table = tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
    return table + "\n\n" + tabulate(_totals(gm, stats), tablefmt="plain", disable_numparse=True)


def _sizes(gm: torch.fx.GraphModule) -> tuple[int, int, int]:
    """(values, trainable values, memory in bits) of the whole model.

    Prepared (or float) models: every parameter, quantized weights at their bits, others at 32.
    Converted models: every state_dict tensor at the bytes it really takes; a packed weight counts
    as its number of weights.
    """
    constants = [r for n in gm.graph.nodes if (r := get_record(n)) is not None
                 and r.role in ("folded_weight", "packed_weight")]
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    if constants:
        state = gm.state_dict()
        packed = {k for r in constants for k in r.tensors}
        values = sum(t.numel() for k, t in state.items() if k not in packed)
        values += sum(r.numel for r in constants)
        return values, trainable, _stored_bits(state, tuple(state))
    quantized_bits = {}
    for node in gm.graph.nodes:
        record = get_record(node)
        if record is not None and record.role == "weight_quantizer":
            arg = node.args[0]
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                quantized_bits[str(arg.target)] = record.bits
    params = dict(gm.named_parameters())
    memory = sum(p.numel() * quantized_bits.get(name, 32) for name, p in params.items())
    return sum(p.numel() for p in params.values()), trainable, memory


def _totals(gm: torch.fx.GraphModule, stats: list[LayerStats]) -> list[list[str]]:
    total, trainable, memory = _sizes(gm)
    fp32 = 32 * total
    macs = sum(s.macs or 0 for s in stats)
    rows = [["Total params", _count(total)], ["Trainable params", _count(trainable)],
            ["Model size", _size(memory)], ["Float-32 equivalent", _size(fp32)],
            ["Memory vs float-32", f"{memory / max(fp32, 1):.4f} "
                                   f"({fp32 / max(memory, 1):.2f}x smaller)"],
            ["Number of MACs", _count(macs)]]
    if macs:
        for bits, label in ((1, "binarized"), (2, "ternarized")):
            share = sum(s.macs or 0 for s in stats if s.mac_bits == bits) / macs
            rows.append([f"Ratio of MACs that are {label}", f"{share:.4f}"])
    return rows
