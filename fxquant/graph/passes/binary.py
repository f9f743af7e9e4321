"""lower_binary_layers: convert's binary layers become one call of a packed-bit op.

A Conv2d or Linear layer whose input quantizer is the sign (``ste_sign``, ``approx_sign``,
``swish_sign``, ``progressive_sign``: any quantizer whose ``inference`` is the plain-op sign
``torch.where(x >= 0, 1.0, -1.0)`` with NaN kept) and whose folded weight is binary (the sign:
±1; ``magnitude_aware_sign``: ±α per output channel) computes integer dot products. Its three
nodes (sign ops, ``F.conv2d``, weight constant) become ``torch.ops.fxquant.binary_conv2d(x,
weight_bits, scale=..., ...)`` on the raw input ``x``, with the weight stored once in the op's
packed layout (:mod:`fxquant.kernels.reference`) as buffers ``<layer>.weight_bits`` and
``<layer>.weight_scale``; no float copy of it remains.

Exactness: with ±1 weights the op equals ``prepared.eval()`` bit for bit (every partial sum is
an integer). With ±α weights the prepared float conv rounds a sum of ±α terms in the kernel's
order while the op rounds ``α·dot`` once (closer to exact); they differ by at most
``(K + 1)·K·α·u`` for a fan-in ``K`` (``u = 2**-24`` in float32; each of the fewer than ``K``
additions rounds a partial sum of magnitude ``<= K·α``); measured on random layers: at most
``2.6·K·α·u`` (see docs/concepts.md).

Every floating dtype is lowered: the graph must not depend on the dtype, since ``fxquant.load``
rebuilds a converted model from a fresh float32 one before loading a float64 or bfloat16 file.
Where the native kernels do not run (other dtypes, devices, NaN inputs) the op computes
``F.conv2d`` on the ±1 sign and the unpacked ±1 weight in the input's dtype: the prepared
model's computation.

What keeps today's path (``F.conv2d`` on the unpacked weight): a layer with a bias (ATen's
convolution and ``addmm`` accumulate the bias into the partial sums, so no op computing
``dot + b`` can equal it bit for bit), a ``padding="same"`` that pads unevenly, arguments
computed in the graph, Conv1d/3d and transposed convolutions, ternary or k-bit weights or
inputs, a weight the forward reads elsewhere too (even only its dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxquant import ops
from fxquant.graph.meta import QuantRecord, get_record, set_record, update_record
from fxquant.graph.module import preserve
from fxquant.graph.passes.lower import InferenceOf, config_key
from fxquant.graph.patterns import attribute_reads
from fxquant.kernels import pack_binary_weight, reference
from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.sign import MagnitudeAwareSign

__all__ = ["lower_binary_layers", "binary_weight_kind"]

_CONV_FUNCTIONS = {F.conv2d, torch.conv2d}  # the same builtin, listed by both names
_LINEAR_FUNCTIONS = {F.linear}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _ops_of(fn: Callable[[torch.Tensor], torch.Tensor], quantizer: nn.Module | None = None
            ) -> tuple[Any, ...]:
    """The traced ops of ``fn`` as comparable data: (op, target, args by position) per node."""
    graph = torch.fx.symbolic_trace(InferenceOf(quantizer, fn)).graph
    index: dict[torch.fx.Node, int] = {}
    ops_: list[tuple[Any, ...]] = []
    for i, node in enumerate(graph.nodes):
        index[node] = i
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = None if node.op == "placeholder" else node.target
        ops_.append((node.op, target, repr(args)))
    return tuple(ops_)


_TEMPLATES: dict[str, tuple[Any, ...]] = {}  # kind -> its ops, traced on first use


def _template(kind: str) -> tuple[Any, ...]:
    if kind not in _TEMPLATES:
        fn = reference.binary_sign if kind == "sign" else MagnitudeAwareSign().inference
        _TEMPLATES[kind] = _ops_of(fn)
    return _TEMPLATES[kind]


def binary_weight_kind(quantizer: Quantizer) -> str | None:
    """``"sign"`` if ``quantizer``'s inference is the sign (±1, ``x >= 0 -> +1``, NaN kept),
    ``"magnitude"`` if it is :class:`MagnitudeAwareSign`'s (±α per channel along dim 0), else
    None. Decided from the traced ops of ``quantizer.inference``, never from values, so the
    same recipe always gives the same converted graph (``fxquant.load`` relies on that)."""
    if type(quantizer).inference is Quantizer.inference:
        return None
    try:
        traced = _ops_of(quantizer.inference, quantizer)
    except Exception:  # not traceable (data-dependent Python): not one of the plain forms
        return None
    return next((kind for kind in ("sign", "magnitude") if traced == _template(kind)), None)


class _Kinds:
    """:func:`binary_weight_kind` of each quantizer, traced once per type and configuration."""

    def __init__(self) -> None:
        self.cache: dict[object, str | None] = {}

    def __call__(self, quantizer: Quantizer) -> str | None:
        key = config_key(quantizer)
        key = id(quantizer) if key is None else key
        if key not in self.cache:
            self.cache[key] = binary_weight_kind(quantizer)
        return self.cache[key]


@dataclass(frozen=True)
class _Plan:
    """One layer call to lower: its node, its input quantizer's node (whose input, read when
    rewriting, is the op's), the weight read, the op and its keyword arguments (besides
    ``scale``)."""

    layer: torch.fx.Node
    sign: torch.fx.Node
    weight: torch.fx.Node
    op: Any
    kwargs: dict[str, Any]
    input_quantizer: str


def _ints(value: Any, n: int) -> list[int] | None:
    """``value`` (an int or a sequence of ``n`` ints, as torch accepts) as ``n`` ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n
    if (isinstance(value, (tuple, list)) and len(value) in (1, n)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return [int(v) for v in value] * (n // len(value))
    return None


def _call_args(layer: torch.fx.Node) -> dict[str, Any]:
    """The arguments of an ``F.conv2d`` / ``F.linear`` call by name, defaults filled in."""
    return {**_CONV_DEFAULTS, **dict(zip(_CONV_ARGS, layer.args, strict=False)), **layer.kwargs}


def _conv_kwargs(layer: torch.fx.Node, weight: torch.Tensor) -> dict[str, Any] | None:
    """stride, padding, dilation and groups of an ``F.conv2d`` call as the op takes them, or
    None where they are not literal or a string padding pads unevenly."""
    args = _call_args(layer)
    stride, dilation = _ints(args["stride"], 2), _ints(args["dilation"], 2)
    groups, padding = args["groups"], args["padding"]
    if stride is None or dilation is None or not isinstance(groups, int):
        return None
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":  # torch pads d·(k - 1) per dim, the odd pixel at the end
        totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
        if any(t % 2 for t in totals) or stride != [1, 1]:
            return None
        padding = [t // 2 for t in totals]
    else:
        padding = _ints(padding, 2)
        if padding is None:
            return None
    return {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}


def _plan(gm: torch.fx.GraphModule, layer: torch.fx.Node, kinds: _Kinds) -> _Plan | None:
    """How to lower ``layer``, or None if it keeps today's path (see the module docstring)."""
    record = get_record(layer)
    if record is None or record.role != "layer" or layer.op != "call_function":
        return None
    if record.op == "conv2d" and layer.target in _CONV_FUNCTIONS:
        op = torch.ops.fxquant.binary_conv2d.default
    elif record.op == "linear" and layer.target in _LINEAR_FUNCTIONS:
        op = torch.ops.fxquant.binary_linear.default
    else:
        return None
    args = _call_args(layer)
    sign, weight = args.get("input"), args.get("weight")
    if args["bias"] is not None or not all(
            isinstance(n, torch.fx.Node) for n in (sign, weight)):
        return None
    sign_record, weight_record = get_record(sign), get_record(weight)
    if (sign_record is None or sign_record.role != "input_quantizer"
            or sign_record.layer != record.layer or sign.op != "call_module"
            or weight_record is None or weight_record.role != "folded_weight"
            or weight.op != "get_attr" or not isinstance(sign.args[0], torch.fx.Node)):
        return None
    value = getattr(gm.get_submodule(str(weight.target).rpartition(".")[0]),
                    str(weight.target).rpartition(".")[2])
    weight_quantizer = record.quantizer_name("weight")
    if (not value.is_floating_point() or weight_quantizer is None
            or kinds(gm.get_submodule(str(sign.target))) != "sign"
            or kinds(gm.get_submodule(weight_quantizer)) is None):
        return None
    if record.op == "linear":
        kwargs: dict[str, Any] | None = {} if value.dim() == 2 else None
    else:
        kwargs = _conv_kwargs(layer, value) if value.dim() == 4 else None
    if kwargs is None:
        return None
    return _Plan(layer, sign, weight, op, kwargs, sign_record.quantizer)


class _PackedWeightKeys:
    """``load_state_dict`` pre-hook of a module whose binary weight ``attr`` is stored packed
    for the op (``<attr>_bits``, ``<attr>_scale``).

    A state_dict from before the op (``<attr>_packed.codes`` / ``.table``, fxquant's 1-bit
    ``PackedWeight``) is repacked into the op's layout, so old ``fxquant.save`` files load. (A
    float checkpoint is refused by :func:`fxquant.graph.passes.lower.guard_float_checkpoints`.)
    """

    def __init__(self, attr: str, shape: tuple[int, ...]) -> None:
        self.attr = attr
        self.shape = shape

    def __call__(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        codes, table = f"{prefix}{self.attr}_packed.codes", f"{prefix}{self.attr}_packed.table"
        if codes in state_dict and table in state_dict:
            weight = ops.unpack(state_dict.pop(codes), state_dict.pop(table), self.shape, 1)
            bits, scale = pack_binary_weight(weight)
            state_dict[f"{prefix}{self.attr}_bits"] = bits
            state_dict[f"{prefix}{self.attr}_scale"] = scale


def _lower(gm: torch.fx.GraphModule, target: str, plans: list[_Plan],
           reads: list[torch.fx.Node]) -> None:
    """Pack the weight at ``target`` once and call the op in each of ``plans``."""
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    names = (f"{attr}_bits", f"{attr}_scale")
    if any(hasattr(owner, n) for n in names):
        return  # taken (a user's own attribute): keep today's path
    weight = getattr(owner, attr)
    try:
        bits, scale = pack_binary_weight(weight)
    except reference.BinaryWeightError:
        return  # not {-a, +a} per channel after all (a quantizer we do not know): as today
    delattr(owner, attr)
    owner.register_buffer(names[0], bits)
    owner.register_buffer(names[1], scale)
    owner._register_load_state_dict_pre_hook(_PackedWeightKeys(attr, tuple(weight.shape)))
    if owner is gm:  # the root's hooks survive copies and pickles only when preserved
        preserve(gm, "_load_state_dict_pre_hooks", gm._load_state_dict_pre_hooks)
    prefix = f"{owner_path}." if owner_path else ""
    weight_record = get_record(plans[0].weight)
    with gm.graph.inserting_before(reads[0]):
        bits_node = gm.graph.get_attr(prefix + names[0])
        scale_node = gm.graph.get_attr(prefix + names[1])
    set_record(bits_node, QuantRecord(
        "packed_weight", weight_record.layer, weight_record.op, weight_record.module,
        quantizer=weight_record.quantizer, bits=1, numel=weight.numel(),
        tensors=(prefix + names[0], prefix + names[1])))
    for plan in plans:
        with gm.graph.inserting_before(plan.layer):
            call = gm.graph.call_function(plan.op, (plan.sign.args[0], bits_node),
                                          {"scale": scale_node, "bias": None, **plan.kwargs})
        call.meta.update(plan.layer.meta)  # the layer's record (and recorded shape)
        update_record(call, quantizer=plan.input_quantizer, bits=1)
        plan.layer.replace_all_uses_with(call)
        gm.graph.erase_node(plan.layer)
        if not plan.sign.users:
            gm.graph.erase_node(plan.sign)
    for read in reads:
        gm.graph.erase_node(read)


def lower_binary_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each Conv2d/Linear layer with a sign input quantizer and a binary folded weight becomes
    one ``torch.ops.fxquant.binary_conv2d`` / ``binary_linear`` call on the raw input, with its
    weight packed once in the op's layout (see the module docstring for what stays as it is).

    Runs after ``fold_weight_quantizers`` and ``fold_batch_norm`` (a batch norm after a binary
    layer is already the exact ``F.batch_norm`` on the op's output) and before
    ``lower_activation_quantizers``. The op node keeps the layer's ``QuantRecord``, with the
    input quantizer it absorbed as ``quantizer``/``bits``; the packed weight's ``get_attr``
    carries a ``packed_weight`` record whose ``tensors`` are ``<layer>.weight_bits`` and
    ``<layer>.weight_scale``. A weight shared by several lowered layers is packed once; one the
    forward also reads elsewhere (even only its shape) keeps today's path.
    """
    kinds = _Kinds()
    plans: dict[str, list[_Plan]] = {}
    for node in gm.graph.nodes:
        plan = _plan(gm, node, kinds)
        if plan is not None:
            plans.setdefault(str(plan.weight.target), []).append(plan)
    reads = attribute_reads(gm.graph)
    for target, group in plans.items():
        layers = {p.layer for p in group}
        if all(u in layers and u.args[0] is not r for r in reads[target] for u in r.users):
            _lower(gm, target, group, reads[target])
    return gm
