"""summary(): per-layer bits, parameters, memory and MACs, then model totals (larq's anchor).

Numbers are read from the fxquant records on the graph and from the tensors themselves:

* a row for every weighted layer, and for every other module or op that holds parameters or
  buffers or changes the shape (batch norm, pooling, flatten, reshapes); every parameter belongs
  to exactly one row, so the rows add up to the totals;
* parameters = what the model represents: every parameter, and after :func:`fxquant.convert` a
  folded or packed weight counts as its number of weights (not its bytes); buffers (batch-norm
  statistics) are not parameters;
* memory of a prepared model: quantized weights at their bits, every other parameter at 32 bits;
  of a converted model: the bytes really stored in its state_dict (packed codes, tables, biases,
  batch-norm statistics);
* MACs per sample = weight count x output positions (H·W for conv2d, L for conv1d, D·H·W for
  conv3d, the product of the middle dims for linear), at precision max(input bits, weight bits);
  they need output shapes: pass ``example_inputs`` to :func:`fxquant.prepare` or to
  :func:`summary`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from fxquant._distributed import is_distributed, plain_copy, unwrap
from fxquant.config import CONFIG_ATTR
from fxquant.graph.blocks import flat_view
from fxquant.graph.meta import get_record
from fxquant.graph.module import mode_graph
from fxquant.graph.patterns import layer_arg

__all__ = ["LayerStats", "layer_stats", "record_shapes", "summary"]


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


# ---------------------------------------------------------------------------------------------
# model checks and shape recording

def _quantized_model(model: object, caller: str) -> torch.fx.GraphModule:
    """``model`` without DataParallel/DistributedDataParallel wrappers, checked to be a model
    returned by fxquant.prepare or fxquant.convert."""
    model = unwrap(model, caller)
    if isinstance(model, torch.fx.GraphModule) and (
            hasattr(model, CONFIG_ATTR) or any(get_record(n) is not None
                                               for n in model.graph.nodes)):
        return flat_view(model)  # blocks inlined: every layer in one graph
    raise TypeError(f"{caller} expects a model returned by fxquant.prepare or fxquant.convert, "
                    f"got {type(model).__name__}; call fxquant.prepare(model, recipe) first")


def _checked_inputs(example_inputs: object) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        raise TypeError("example_inputs must be a tuple of the forward's positional arguments, "
                        "not a tensor: pass example_inputs=(x,)")
    if not isinstance(example_inputs, (tuple, list)):
        raise TypeError("example_inputs must be a tuple of the forward's positional arguments, "
                        f"got {type(example_inputs).__name__}: pass example_inputs=(x,)")
    return tuple(example_inputs)


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """torch.fx's TensorMetadata of ``t``, as ``ShapeProp`` records it."""
    strided = t.layout == torch.strided
    formats = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)
    memory_format = next((f for f in formats if strided and _is_contiguous(t, f)), None)
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride() if strided else (),
                          memory_format, t.is_quantized, {})


def _is_contiguous(t: torch.Tensor, memory_format: torch.memory_format) -> bool:
    try:
        return t.is_contiguous(memory_format=memory_format)
    except RuntimeError:  # channels_last asked of a tensor of another rank
        return False


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs one graph of a GraphModule and stores each node's ``tensor_meta``; a failing node
    raises one error that names it (ShapeProp prints a traceback and raises a second error)."""

    def __init__(self, gm: torch.fx.GraphModule, graph: torch.fx.Graph, where: str) -> None:
        super().__init__(gm, graph=graph)
        self.extra_traceback = False
        self.where = where

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as err:
            raise RuntimeError(
                f"example_inputs failed in {self.where} at node {n.name!r} "
                f"({n.format_node()}): {type(err).__name__}: {err}. example_inputs must be a "
                "tuple of arguments the forward accepts, e.g. "
                "example_inputs=(torch.randn(2, 3, 32, 32),)") from err
        found = []
        meta = map_aggregate(result, lambda obj: found.append(obj) or _tensor_metadata(obj)
                             if isinstance(obj, torch.Tensor) else obj)
        if found:
            n.meta["tensor_meta"] = meta
        return result


def record_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ``example_inputs`` once through each mode graph of ``gm`` and store every node's
    output shape at ``node.meta["tensor_meta"]`` (torch.fx's ``TensorMetadata``).

    Runs without gradients and with every module in eval mode (a batch of 1 passes batch norm);
    each module's own train/eval flag, every buffer and the RNG states are restored after, so
    the model is left as it was. A node that fails raises a ``RuntimeError`` naming it.
    """
    inputs = _checked_inputs(example_inputs)
    eval_graph, train_graph = mode_graph(gm, False), mode_graph(gm, True)
    graphs = ([("the graph", eval_graph)] if train_graph is eval_graph else
              [("the eval-mode graph", eval_graph), ("the train-mode graph", train_graph)])
    modules = list(gm.modules())
    flags = [m.training for m in modules]
    saved = [(m, name, b, b.detach().clone()) for m in modules
             for name, b in m._buffers.items() if b is not None]
    devices = sorted({t.device.index or 0 for t in [*gm.parameters(), *gm.buffers()]
                      if t.device.type == "cuda"})
    try:
        for m in modules:
            m.training = False  # not .eval(): that would switch a QuantGraphModule's graph
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for where, graph in graphs:
                _ShapeRecorder(gm, graph, where).run(*inputs)
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.training = flag
        with torch.no_grad():
            for m, name, buffer, value in saved:
                buffer.copy_(value)
                m._buffers[name] = buffer  # a forward may have assigned a new tensor


# ---------------------------------------------------------------------------------------------
# weighted layers


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


def _output_positions(op: str, shape: tuple[int, ...], batch: int | None) -> int:
    """Output positions per sample: of a linear, all but the feature dim (whatever the batch
    dim: attention runs linears on (L, N, E) and on (L·N, E)); of a conv, the spatial dims."""
    if op != "linear":
        return math.prod(shape[2:])
    rows = math.prod(shape[:-1])
    return rows // batch if batch and rows % batch == 0 else math.prod(shape[1:-1])


def _batch_size(graph: torch.fx.Graph) -> int | None:
    """Dim 0 of the first example input, or None when shapes were not recorded."""
    first = next((n for n in graph.nodes if n.op == "placeholder"), None)
    shape = _shape_of(first) if first is not None else None
    return shape[0] if shape else None


def _shape_of(node: object) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _layer_stats(gm: torch.fx.GraphModule, state: dict[str, torch.Tensor]
                 ) -> list[tuple[torch.fx.Node, LayerStats]]:
    stats = []
    batch = _batch_size(gm.graph)
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
        if record.quantizer:  # lowered to a binary op, which applies its input quantizer
            iq, ibits = record.quantizer, record.bits
        shape = _shape_of(node)
        bcount = bias.numel() if bias is not None else 0
        macs = (wcount * _output_positions(record.op, shape, batch) if shape is not None
                else None)
        stats.append((node, LayerStats(record.layer, record.op, wq, wbits, iq, ibits, shape,
                                       wcount, bcount, wmemory + bcount * 32, macs)))
    return stats


def layer_stats(gm: torch.fx.GraphModule) -> list[LayerStats]:
    """LayerStats for every weighted layer of a prepared or converted model, in graph order."""
    gm = _quantized_model(gm, "layer_stats")
    return [s for _, s in _layer_stats(gm, gm.state_dict(keep_vars=True))]


# ---------------------------------------------------------------------------------------------
# the state of the model, in units a row claims whole


@dataclass
class _Unit:
    """Tensors counted together: one parameter or buffer, or the tensors of one folded or
    packed weight. ``count``: parameters it represents; ``bits``: its memory."""

    names: tuple[str, ...]
    count: int
    trainable: int
    bits: int


def _units(gm: torch.fx.GraphModule, state: dict[str, torch.Tensor], converted: bool
           ) -> dict[str, _Unit]:
    """state_dict name -> its unit (tied tensors share one)."""
    weight_bits = {}  # prepared: latent weight -> bits of its quantizer (in either mode)
    by_name: dict[str, _Unit] = {}
    for node in [*mode_graph(gm, False).nodes, *mode_graph(gm, True).nodes]:
        record = get_record(node)
        if record is None:
            continue
        if record.role == "weight_quantizer" and isinstance(node.args[0], torch.fx.Node) \
                and node.args[0].op == "get_attr":
            weight_bits[str(node.args[0].target)] = record.bits
        if record.role in ("folded_weight", "packed_weight"):
            names = tuple(k for k in record.tensors if k in state)
            unit = _Unit(names, record.numel, 0, _stored_bits(state, names))
            by_name.update((k, unit) for k in names)
    by_id: dict[int, _Unit] = {}
    for name, t in state.items():
        if name in by_name:
            continue
        if id(t) in by_id:
            by_id[id(t)].names += (name,)
        else:
            param = isinstance(t, nn.Parameter)
            count = t.numel() if param else 0
            bits = (8 * t.numel() * t.element_size() if converted
                    else weight_bits.get(name, 32) * count)
            by_id[id(t)] = _Unit((name,), count, count if param and t.requires_grad else 0, bits)
        by_name[name] = by_id[id(t)]
    return by_name


# ---------------------------------------------------------------------------------------------
# rows


@dataclass
class _Row:
    name: str
    op: str
    order: int
    weight_q: str = "-"
    input_q: str = "-"
    shape: str = ""
    macs: int | None = 0  # None: unknown
    mac_bits: int = 32
    layer: bool = False
    units: list[_Unit] = field(default_factory=list)


# modules and ops that change the shape, known without running the model
_SHAPE_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                  nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                  nn.modules.pooling._LPPoolNd, nn.Flatten, nn.Unflatten, nn.Upsample,
                  nn.PixelShuffle, nn.PixelUnshuffle)
_SHAPE_OPS = {"flatten", "unflatten", "view", "reshape", "interpolate", "pixel_shuffle",
              "pixel_unshuffle"}
# ops holding parameters that do no multiply-accumulates (elementwise, normalization, lookup)
_MAC_FREE_MODULES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Embedding,
                     nn.EmbeddingBag, nn.PReLU)
_MAC_FREE_OPS = {"add", "sub", "mul", "truediv", "div", "batch_norm", "layer_norm",
                 "group_norm", "instance_norm", "embedding", "prelu", "cat", "where"}
_NORMALIZATIONS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_NORMALIZATION_OPS = {"batch_norm", "layer_norm", "group_norm", "instance_norm"}


def _op_name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)).lstrip("_")


def _changes_shape(gm: torch.fx.GraphModule, node: torch.fx.Node, op: str) -> bool:
    """A pooling, flatten or reshape (module or function), or a module call whose output
    shape differs from its input's."""
    if node.op != "call_module":
        return op in _SHAPE_OPS or "pool" in op
    if isinstance(gm.get_submodule(str(node.target)), _SHAPE_MODULES):
        return True
    out = _shape_of(node)
    source = next((a for a in node.all_input_nodes if _shape_of(a) is not None), None)
    return out is not None and source is not None and out != _shape_of(source)


def _mac_free(gm: torch.fx.GraphModule, node: torch.fx.Node, op: str) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _MAC_FREE_MODULES)
    return op in _MAC_FREE_OPS


def _shape_text(node: torch.fx.Node, batch: int | None, normalization: bool) -> str:
    meta = node.meta.get("tensor_meta")
    if meta is None and normalization and node.args:  # added by convert: same shape as input
        meta = getattr(node.args[0], "meta", {}).get("tensor_meta")
    if meta is None:
        return "?"
    if not isinstance(meta, TensorMetadata):
        return "multiple"
    shape = tuple(meta.shape)
    if shape and shape[0] == batch:
        shape = (-1, *shape[1:])
    return str(shape)


class _Claims:
    """Hands each unit of state to the first row that reads it."""

    def __init__(self, units: dict[str, _Unit]) -> None:
        self.units = units
        self.taken: set[int] = set()
        self.prefixes: dict[str, list[str]] = {}
        for name in units:
            parts = name.split(".")
            for i in range(1, len(parts)):
                self.prefixes.setdefault(".".join(parts[:i]), []).append(name)

    def under(self, path: str) -> list[str]:
        """State names of the module at ``path``, or ``[path]`` for a tensor."""
        return [path] if path in self.units else self.prefixes.get(path, [])

    def take(self, row: _Row, names: Iterable[str]) -> bool:
        took = False
        for name in names:
            unit = self.units.get(name)
            if unit is not None and id(unit) not in self.taken:
                self.taken.add(id(unit))
                row.units.append(unit)
                took = True
        return took


def _rows(gm: torch.fx.GraphModule) -> list[_Row]:
    from fxquant.api import is_converted  # fxquant.api imports this module

    state = gm.state_dict(keep_vars=True)
    claims = _Claims(_units(gm, state, is_converted(gm)))
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    activations = set()
    for n in nodes:  # nodes that depend on an input
        if n.op == "placeholder" or any(a in activations for a in n.all_input_nodes):
            activations.add(n)
    weights_of = {n: [a for a in n.all_input_nodes if a not in activations] for n in nodes}

    def state_of(n: torch.fx.Node) -> list[str]:
        targets, stack, seen = [], list(weights_of[n]), set()
        while stack:  # what the node reads from the model, through weight-side ops
            a = stack.pop()
            if a not in seen:
                seen.add(a)
                if a.op == "get_attr" or a.op == "call_module":
                    targets.append(str(a.target))
                stack.extend(weights_of[a])
        return [name for t in targets for name in claims.under(t)]

    batch = _batch_size(gm.graph)

    rows: list[_Row] = []
    layer_rows: dict[str, _Row] = {}
    for node, s in _layer_stats(gm, state):  # layers first: their weights, biases and quantizers
        row = _Row(s.layer, s.op, order[node], f"{s.weight_quantizer} ({s.weight_bits})",
                   f"{s.input_quantizer} ({s.input_bits})", _shape_text(node, batch, False),
                   s.macs, s.mac_bits, layer=True)
        if node.op == "call_module":
            claims.take(row, claims.under(str(node.target)))
        claims.take(row, state_of(node))
        absorbed = get_record(node).absorbed  # a folded batch norm's parameters, no memory
        if absorbed:
            weight = gm.get_submodule(str(node.target)).weight if node.op == "call_module" \
                else None  # trainable as the weight that now holds them
            trainable = weight is not None and weight.requires_grad
            row.units.append(_Unit((), absorbed, absorbed if trainable else 0, 0))
        layer_rows.setdefault(s.layer, row)
        rows.append(row)
    for node in nodes:  # quantizers' own state (a learned scale) belongs to their layer
        record = get_record(node)
        if record is not None and record.role.endswith("_quantizer") \
                and node.op == "call_module" and record.layer in layer_rows:
            claims.take(layer_rows[record.layer], claims.under(str(node.target)))
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr") or get_record(node) is not None:
            continue  # layers and quantizers are done
        op = _op_name(gm, node)
        is_module = node.op == "call_module"
        row = _Row(str(node.target) if is_module else node.name, op, order[node])
        took = claims.take(row, claims.under(str(node.target)) if is_module else state_of(node))
        if not (_counts(row) or node in activations and _changes_shape(gm, node, op)):
            continue  # nothing counted (buffers of a prepared model) and the same shape
        if took and not is_module:  # a functional op on a module's tensors: name the module
            owner = _common_owner([n for u in row.units for n in u.names])
            row.name = owner or node.name
            if owner:  # and count the rest of it (a batch norm's num_batches_tracked)
                claims.take(row, claims.under(owner))
        normalization = op in _NORMALIZATION_OPS or (
            is_module and isinstance(gm.get_submodule(str(node.target)), _NORMALIZATIONS))
        row.shape = _shape_text(node, batch, normalization)
        row.macs = 0 if not took or _mac_free(gm, node, op) else None
        rows.append(row)
    rows.sort(key=lambda r: r.order)
    return rows + _unread_rows(gm, claims)


def _counts(row: _Row) -> bool:
    return any(u.count or u.bits for u in row.units)


def _common_owner(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _unread_rows(gm: torch.fx.GraphModule, claims: _Claims) -> list[_Row]:
    """Rows for state this graph never reads, one per owning module."""
    this, that = mode_graph(gm, gm.training), mode_graph(gm, not gm.training)
    other = {str(n.target) for n in that.nodes if n.op in ("get_attr", "call_module")
             } if that is not this else set()
    mode = "eval" if gm.training else "train"
    rows: dict[str, _Row] = {}
    for name, unit in claims.units.items():
        if id(unit) in claims.taken:
            continue
        owner = name.rpartition(".")[0]
        if owner not in rows:
            used = any(owner == t or owner.startswith(t + ".") or t.startswith(owner + ".")
                       for t in other)
            rows[owner] = _Row(owner or name, f"({mode} mode only)" if used else "(unused)",
                               len(rows))
        claims.take(rows[owner], [name])
    return [r for r in rows.values() if _counts(r)]


# ---------------------------------------------------------------------------------------------
# formatting

_UNITS = (("KiB", 1024), ("MiB", 1024 ** 2), ("GiB", 1024 ** 3))


def _unit(largest_bits: float) -> tuple[str, int]:
    """KiB, MiB or GiB: the largest that shows ``largest_bits`` as at least 1."""
    return next((u for u in reversed(_UNITS) if largest_bits / 8 >= u[1]), _UNITS[0])


def _in(bits: float, unit: tuple[str, int]) -> str:
    return f"{bits / 8 / unit[1]:,.2f}"


def summary(model: nn.Module, example_inputs: Sequence[Any] | None = None) -> str:
    """larq's ``lq.models.summary`` for a prepared or converted model; returns the text (prints
    nothing).

    The table has a row for every weighted layer and every other module or op that holds
    parameters or buffers or changes the shape, then a Total row: weight and input quantizer
    (bits), output shape (batch as -1), parameters, memory (one unit for the column) and
    multiply-accumulates per sample at each precision (max of input and weight bits). The
    block after it gives total, trainable and non-trainable parameters, the model size, its
    float-32 equivalent (32 bits per parameter) and their ratio, the number of MACs and the
    share of binarized (and, when there are any, ternarized) MACs.

    Output shapes and MACs need the model run once: pass ``example_inputs`` (a tuple of forward
    arguments) here or to :func:`fxquant.prepare`; without them they show as "?". A converted
    model reports the parameter count and float-32 equivalent of the prepared model: each
    folded or packed weight counts as its number of weights (as non-trainable constants), and a
    float conv that absorbed a batch norm counts the batch norm's parameters in its row (as
    trainable as the conv's weight); its memory is the bytes its state_dict really holds.
    DataParallel/DistributedDataParallel wrappers are looked through. A model sharded with FSDP2
    ``fully_shard`` is counted at its full shapes, and ``example_inputs`` run through a
    stand-in copy with zero weights of those shapes, so no rank communicates and one rank may
    call ``summary`` alone.

    Example: ``nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
    nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(128, 10))`` prepared with ``Recipe.bnn()`` and
    ``example_inputs=(torch.randn(1, 1, 8, 8),)`` gives::

        Layer    Op           Weight q. (bits)    Input q. (bits)    Output shape      Params    Memory (KiB)    1-bit MACs    32-bit MACs
        -------  -----------  ------------------  -----------------  --------------  --------  --------------  ------------  -------------
        0        conv2d       - (32)              - (32)             (-1, 4, 8, 8)         36            0.14             0          2,304
        1        BatchNorm2d  -                   -                  (-1, 4, 8, 8)          8            0.03             0              0
        2        conv2d       ste_sign (1)        ste_sign (1)       (-1, 8, 8, 8)        288            0.04        18,432              0
        3        BatchNorm2d  -                   -                  (-1, 8, 8, 8)         16            0.06             0              0
        4        MaxPool2d    -                   -                  (-1, 8, 4, 4)          0            0.00             0              0
        5        Flatten      -                   -                  (-1, 128)              0            0.00             0              0
        6        linear       - (32)              - (32)             (-1, 10)           1,290            5.04             0          1,280
        -------  -----------  ------------------  -----------------  --------------  --------  --------------  ------------  -------------
        Total                                                                           1,638            5.31        18,432          3,584

        Total params                      1,638
        Trainable params                  1,638
        Non-trainable params              0
        Model size                        5.31 KiB
        Float-32 equivalent               6.40 KiB
        Compression ratio of memory       0.8297 (1.21x smaller)
        Number of MACs                    22,016
        Ratio of MACs that are binarized  0.8372
    """  # noqa: E501
    gm = _quantized_model(model, "summary")
    if example_inputs is not None:
        if is_distributed(gm):  # a stand-in of full shapes: no communication, no FSDP hooks
            gm = plain_copy(gm, fill=lambda t: torch.zeros(t.shape, dtype=t.dtype,
                                                             device=t.device))
        record_shapes(gm, example_inputs)
    rows = _rows(gm)
    precisions = sorted({r.mac_bits for r in rows if r.layer})
    shapes_known = all(r.macs is not None for r in rows if r.layer)
    params = sum(u.count for r in rows for u in r.units)
    memory = sum(u.bits for r in rows for u in r.units)
    unit = _unit(memory)
    headers = ["Layer", "Op", "Weight q. (bits)", "Input q. (bits)", "Output shape", "Params",
               f"Memory ({unit[0]})"] + [f"{p}-bit MACs" for p in precisions]
    table = []
    for r in rows:
        macs = ["?" if r.macs is None else f"{r.macs if r.mac_bits == p else 0:,}"
                for p in precisions]
        table.append([r.name, r.op, r.weight_q, r.input_q, r.shape,
                      f"{sum(u.count for u in r.units):,}",
                      _in(sum(u.bits for u in r.units), unit), *macs])
    macs_by_bits = {p: sum(r.macs or 0 for r in rows if r.mac_bits == p) for p in precisions}
    table.append(["Total", "", "", "", "", f"{params:,}", _in(memory, unit),
                  *(f"{macs_by_bits[p]:,}" if shapes_known else "?" for p in precisions)])
    text = tabulate(table, headers=headers, tablefmt="simple", disable_numparse=True,
                    colalign=("left",) * 5 + ("right",) * (len(headers) - 5))
    lines = text.splitlines()
    lines.insert(len(lines) - 1, lines[1])  # a rule above the Total row
    unknown_rows = any(r.macs is None for r in rows if not r.layer)
    totals = _totals(rows, params, memory, macs_by_bits if shapes_known else None, unknown_rows)
    return "\n".join(lines) + "\n\n" + tabulate(totals, tablefmt="plain", disable_numparse=True)


def _totals(rows: list[_Row], params: int, memory: int, macs_by_bits: dict[int, int] | None,
            unknown_rows: bool) -> list[list[str]]:
    trainable = sum(u.trainable for r in rows for u in r.units)
    fp32 = 32 * params
    unit = _unit(max(memory, fp32))
    ratio = (f"{memory / fp32:.4f} ({fp32 / memory:.2f}x smaller)" if memory and fp32
             else "-")
    totals = [["Total params", f"{params:,}"], ["Trainable params", f"{trainable:,}"],
              ["Non-trainable params", f"{params - trainable:,}"],
              ["Model size", f"{_in(memory, unit)} {unit[0]}"],
              ["Float-32 equivalent", f"{_in(fp32, unit)} {unit[0]}"],
              ["Compression ratio of memory", ratio]]
    if macs_by_bits is None:
        return totals + [["Number of MACs", "unknown: pass example_inputs to fxquant.prepare "
                                            "or fxquant.summary"]]
    macs = sum(macs_by_bits.values())
    note = " (rows showing ? not counted)" if unknown_rows else ""
    totals.append(["Number of MACs", f"{macs:,}{note}"])
    if macs:
        totals.append(["Ratio of MACs that are binarized",
                       f"{macs_by_bits.get(1, 0) / macs:.4f}"])
        if macs_by_bits.get(2, 0):
            totals.append(["Ratio of MACs that are ternarized", f"{macs_by_bits[2] / macs:.4f}"])
    return totals
