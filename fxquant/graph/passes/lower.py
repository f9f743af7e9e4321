"""lower_activation_quantizers, pack_weights, eliminate_dead_code: the rest of convert."""

from __future__ import annotations

import builtins
import inspect
import operator
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant import nn as fxquant_nn
from fxquant import ops
from fxquant._text import listing
from fxquant.graph.meta import get_record, set_record, update_record
from fxquant.graph.module import preserve
from fxquant.graph.patterns import attribute_reads
from fxquant.quantizers.base import Quantizer

__all__ = ["restore_plain_layers", "lower_activation_quantizers", "pack_weights",
           "eliminate_dead_code", "is_pure_node", "guard_float_checkpoints", "InferenceOf",
           "config_key"]


class InferenceOf(nn.Module):
    """``fn(x)`` as a module (``quantizer.inference`` by default), traced to inline its plain
    ops; ``quantizer`` is a submodule, so tracing finds the quantizer's own tensors."""

    def __init__(self, quantizer: nn.Module | None,
                 fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.fn = fn if fn is not None else quantizer.inference  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def config_key(quantizer: Quantizer) -> object | None:
    """What makes two quantizers compute alike in inference: their type and settings, or None
    for a quantizer with tensors of its own or without ``get_config`` (no two are alike)."""
    if next(quantizer.parameters(), None) is not None or next(quantizer.buffers(),
                                                                 None) is not None:
        return None
    try:
        return (type(quantizer), repr(sorted(quantizer.get_config().items())))
    except NotImplementedError:
        return None


def _traced(quantizer: Quantizer, cache: dict[object, torch.fx.GraphModule]
            ) -> torch.fx.GraphModule:
    """``quantizer.inference`` traced once per distinct :func:`config_key` (tracing is the slow
    part); quantizers with tensors of their own are traced each time."""
    key = config_key(quantizer)
    if key is not None and key in cache:
        return cache[key]
    sub = torch.fx.symbolic_trace(InferenceOf(quantizer))
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

    Every read of the folded weight, the layer's and any dtype/device/shape read elsewhere in the
    forward, then reads that one call (placed at the first read), so no read is left dangling.
    """
    reads = attribute_reads(gm.graph)
    for node in list(gm.graph.nodes):
        record = get_record(node)
        if record is None or record.role != "folded_weight" or record.bits not in ops.packable_bits:
            continue
        target = str(node.target)
        if target not in reads:  # a read of a weight packed already, erased
            continue
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
        # every read of the attribute (a forward may also read its dtype) now reads the module
        with gm.graph.inserting_before(reads[target][0]):
            unpacked = gm.graph.call_module(name)
        unpacked.meta.update(node.meta)
        update_record(unpacked, role="packed_weight", tensors=(f"{name}.codes", f"{name}.table"))
        for read in reads.pop(target):
            read.replace_all_uses_with(unpacked)
            gm.graph.erase_node(read)
    return gm


# functions whose call changes something other than its result
_MUTATING_FUNCTIONS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.iand, operator.iconcat,
    operator.ifloordiv, operator.ilshift, operator.imatmul, operator.imod, operator.imul,
    operator.ior, operator.ipow, operator.irshift, operator.isub, operator.itruediv,
    operator.ixor, builtins.setattr, builtins.delattr, builtins.print})
# Python functions with no side effect besides their result
_PURE_BUILTINS = frozenset({builtins.getattr, builtins.len, builtins.isinstance,
                            builtins.hasattr, builtins.int, builtins.float, builtins.bool,
                            builtins.tuple, builtins.min, builtins.max, builtins.abs})
# Tensor method names that are also in-place methods of Python containers or have effects
_IMPURE_NAMES = frozenset({"add", "sort", "backward", "register_hook", "retain_grad",
                                  "register_post_accumulate_grad_hook", "record_stream"})
# name fragments of ops that draw random numbers (dropping a call would shift later draws) or
# check something (torch._assert)
_RANDOM_OR_CHECK = ("rand", "dropout", "bernoulli", "multinomial", "normal", "poisson",
                    "uniform", "exponential", "geometric", "cauchy", "gumbel", "rrelu",
                    "assert", "check")


def _writes_in_place(node: torch.fx.Node, fn: Callable[..., Any]) -> bool:
    """``out=`` or a true ``inplace`` argument, by keyword or position."""
    if node.kwargs.get("out") is not None or node.kwargs.get("inplace", False) is not False:
        return True
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature take no ``inplace``
        return False
    i = names.index("inplace") if "inplace" in names else len(node.args)
    return i < len(node.args) and node.args[i] is not False


def is_pure_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether dropping ``node`` when nothing uses its result changes nothing else.

    Conservative: only reads of attributes, calls of fxquant quantizers and packed weights, and
    calls of torch functions and tensor methods that are not in-place (a name ending in ``_``,
    ``out=``, ``inplace=True``, ``operator.setitem`` and the ``+=`` family), draw no random
    numbers and check nothing. Calls of other modules, of user functions, and anything unknown
    are kept.
    """
    if node.op == "get_attr":
        return True
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), (Quantizer, ops.PackedWeight))
    if node.op == "call_method":
        name = str(node.target)
        return (hasattr(torch.Tensor, name) and not name.endswith("_")
                and name not in _IMPURE_NAMES and node.kwargs.get("out") is None
                and not any(part in name for part in _RANDOM_OR_CHECK))
    if node.op != "call_function":
        return False  # placeholder, output
    fn = node.target
    if fn in _MUTATING_FUNCTIONS:
        return False
    if fn in _PURE_BUILTINS or getattr(fn, "__module__", None) == "_operator":
        return True
    name = getattr(fn, "__name__", "")
    in_torch = (str(getattr(fn, "__module__", None) or "").split(".")[0] == "torch"
                or getattr(fn, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase))
    return (in_torch and not isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            and not name.endswith("_") and name not in _IMPURE_NAMES
            and not any(part in name for part in _RANDOM_OR_CHECK)
            and not _writes_in_place(node, fn))


def eliminate_dead_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop unused nodes that are pure (:func:`is_pure_node`: an unused ``h.mul_(0.5)`` stays),
    then submodules nothing calls or reads any more (quantizers, folded BNs); linear in the
    model size (``GraphModule.delete_all_unused_submodules`` is quadratic)."""
    for node in reversed(gm.graph.nodes):
        if not node.users and is_pure_node(gm, node):
            gm.graph.erase_node(node)
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


class _FloatCheckpointGuard:
    """``load_state_dict`` pre-hook of a converted model; see :func:`guard_float_checkpoints`."""

    def __init__(self, latent_keys: frozenset[str]) -> None:
        self.latent_keys = latent_keys

    def __call__(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        latent = sorted(k for k in self.latent_keys if prefix + k in state_dict)
        if not latent:
            return
        listed = listing(latent, limit=5)
        raise RuntimeError(f"load_state_dict: this state_dict holds float latent weights "
                           f"({listed}) that this converted model stores as packed codes: it is "
                           "a checkpoint of the float or prepared model. Load the float "
                           "checkpoint into the prepared model (or into the float model before "
                           "fxquant.prepare), then convert: fxquant.convert(prepared). A "
                           "converted model loads its own state_dict or fxquant.load files.")


def guard_float_checkpoints(converted: torch.fx.GraphModule) -> None:
    """Make ``converted.load_state_dict(float_checkpoint)`` say to load before convert.

    :func:`fxquant.convert` calls it. A converted model stores packed codes
    (``fc.weight_packed.codes``, or ``fc.weight_bits`` and ``fc.weight_scale`` for a layer on the
    packed binary op) where the float model has its latent weight (``fc.weight``);
    a state_dict holding such a latent weight is the float (or prepared) model's checkpoint, and
    loading it raises a RuntimeError saying to load it into the prepared model (or the float
    model before prepare) and convert after, instead of torch's list of missing and unexpected
    keys. The hook survives ``copy.deepcopy`` and pickling.
    """
    own = converted.state_dict(keep_vars=True)
    packed = {key.rpartition("_packed.")[0] for key in own if "_packed." in key}
    packed |= {key[:-len("_bits")] for key in own
               if key.endswith("_bits") and key[:-len("_bits")] + "_scale" in own}
    latent = frozenset(packed - set(own))
    if latent:
        converted._register_load_state_dict_pre_hook(_FloatCheckpointGuard(latent))
        preserve(converted, "_load_state_dict_pre_hooks", converted._load_state_dict_pre_hooks)
