"""prepare(): float model -> quantization-aware GraphModule; convert(): -> inference GraphModule."""

from __future__ import annotations

import contextlib
import copy
import gc
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant import _distributed, training
from fxquant import config as plain_config
from fxquant.graph.blocks import block_paths, split_blocks
from fxquant.graph.clone import clone_module
from fxquant.graph.meta import get_record
from fxquant.graph.module import merge_modes, mode_graph, preserve
from fxquant.graph.passes.lower import guard_float_checkpoints
from fxquant.graph.pipeline import LOWER, PREPARE, DeferredGraphModule, run
from fxquant.graph.recipe import Recipe
from fxquant.graph.tracer import trace_modes
from fxquant.inspect.summary import record_shapes
from fxquant.quantizers.base import Quantizer

__all__ = ["prepare", "convert", "is_converted"]


@contextlib.contextmanager
def _paused_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building graphs.

    Tracing and rewriting allocate many small objects; on large models the collector's repeated
    full scans of the growing heap made prepare super-linear in the number of nodes. Objects are
    collected normally once it is re-enabled.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _once_per_message(active: bool) -> Iterator[None]:
    """Warnings raised inside are issued once per distinct message (when ``active``)."""
    if not active:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen: set[tuple[type[Warning], str]] = set()
    for w in caught:
        key = (w.category, str(w.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def prepare(model: nn.Module, recipe: Recipe, *, example_inputs: Sequence[Any] | None = None,
            concrete_args: dict[str, Any] | None = None,
            leaf_modules: Iterable[str | type[nn.Module]] = (),
            leaf_functions: Iterable[Callable[..., Any]] = (),
            blocks: Iterable[str | type[nn.Module]] = ()) -> torch.fx.GraphModule:
    """Trace a copy of ``model`` and insert the quantizers ``recipe`` asks for.

    ``model`` is never modified (a DataParallel/DistributedDataParallel wrapper is unwrapped).
    ``concrete_args`` fixes Python-level arguments while tracing (``{"augment": False}``);
    ``leaf_modules`` lists module paths or classes to keep opaque (and in float);
    ``leaf_functions`` lists functions to call as they are instead of tracing into them (they
    must be called by name from the module of traced code, as ``torch.fx.wrap`` requires).
    Reads of ``self.training`` follow ``train()``/``eval()``; where Python control flow branches
    on them, each mode gets its own graph (``prepared.graph`` is the current mode's).
    ``example_inputs``, if given, are run once (no grad, train/eval flags and buffers untouched)
    to record output shapes for :func:`fxquant.summary`.
    ``blocks`` lists module paths (``"layer1.0"``) and/or classes (``BasicBlock``) whose every
    instance stays a module of its own: a GraphModule at the same path, holding the quantizers
    of its layers, that the parent graph calls, so per-block tools work on it (FSDP2
    ``fully_shard``, activation checkpointing, regional ``torch.compile``; find them with
    :func:`fxquant.blocks`). The model computes exactly what it does without ``blocks``.

    The result trains like the float model; its ``state_dict`` keys are the float model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    model = _distributed.unwrap(model, "prepare")  # a DDP wrapper: the model inside
    if _from_fxquant(model):
        done, by = (("converted", "convert") if is_converted(model) else ("prepared", "prepare"))
        raise ValueError(f"prepare: this model is already {done} (it was returned by fxquant."
                         f"{by}); pass the float model. To change the recipe, prepare the float "
                         "model again and load this model's state_dict into the result (the "
                         "keys are the float model's).")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"prepare expects a fxquant.Recipe, got {type(recipe).__name__}")
    leaf_modules, leaf_functions = list(leaf_modules), list(leaf_functions)
    blocks = list(blocks)
    paths = block_paths(model, blocks, leaf_modules)
    with _paused_gc():
        model = clone_module(model)
        traced = trace_modes(model, concrete_args, leaf_modules, DeferredGraphModule,
                             leaf_functions, paths)
        with _once_per_message(len(traced) > 1):  # both modes' passes warn alike
            gm = merge_modes({mode: run(t, PREPARE, recipe) for mode, t in traced.items()},
                             model.training)
    if example_inputs is not None:  # per mode graph, modules in eval mode, state restored
        record_shapes(gm, example_inputs)
    if paths:
        split_blocks(gm, paths)
    training.install_clip_warning(gm)
    options = plain_config.options_to_plain(recipe, concrete_args, leaf_modules, leaf_functions,
                                            blocks)
    preserve(gm, plain_config.CONFIG_ATTR, options)
    return gm


def _from_fxquant(model: nn.Module) -> bool:
    """Whether ``model`` was returned by :func:`prepare` or :func:`convert` (records on nodes)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        get_record(n) is not None for n in model.graph.nodes)


def convert(prepared: nn.Module) -> torch.fx.GraphModule:
    """Lower a trained prepared model into a small inference GraphModule (``prepared`` untouched).

    Runs the LOWER pipeline on an eval-mode copy: weight quantizers are evaluated once and stored
    as constants (latent float weights disappear), eval-mode batch norm folds into the layer before
    it, straight-through quantizers become plain ops, 1- to 8-bit weights are packed.
    ``convert(prepared)(x)`` equals ``prepared.eval()(x)`` bit for bit, batch norm after quantized
    layers included, except where batch norm folds into a float layer's weights: that layer's
    output is then within a few roundings of exact batch norm (closer than eval-mode batch norm,
    which strays far where a running variance is near 0), so a sign quantizer after it may flip
    (see ``fold_batch_norm``).

    Distributed training: a ``DistributedDataParallel`` (or ``DataParallel``) wrapper is looked
    through. A model sharded with FSDP2 ``fully_shard`` (its parameters are ``DTensor`` shards,
    at the root or per block) is gathered first: ``convert`` then is a **collective**, every
    rank must call it (the shards travel with ``DTensor.full_tensor()``), and each rank gets
    the same plain single-process converted model with the full weights. An FSDP1
    ``FullyShardedDataParallel`` wrapper is a TypeError saying to use ``fully_shard``.
    """
    prepared = _distributed.unwrap(prepared, "convert")
    if not _from_fxquant(prepared):
        raise TypeError("convert expects a GraphModule returned by fxquant.prepare")
    if is_converted(prepared):
        raise ValueError("this model is already converted")
    prepared = _distributed.gathered(prepared, "convert")  # FSDP2: a plain full copy
    off = [n for n, m in prepared.named_modules() if isinstance(m, Quantizer) and not m.enabled]
    if off:
        raise ValueError(f"convert: quantizers {', '.join(off)} are disabled; enable them with "
                         "fxquant.training.set_quantizers_enabled(model, True), or leave those "
                         "slots in float in the recipe")
    config = getattr(prepared, plain_config.CONFIG_ATTR, None)
    if config is not None and "error" not in config:
        try:
            config = {**config, "quantizers": plain_config.quantizer_configs(prepared)}
        except NotImplementedError as err:
            config = {"error": str(err)}
    with _paused_gc():
        gm = run(_copy_graph_module(prepared, mode_graph(prepared, False)).eval(), LOWER)
    guard_float_checkpoints(gm)  # a float checkpoint: "load it before convert"
    preserve(gm, plain_config.CONFIG_ATTR, config)
    return gm


def _copy_graph_module(gm: torch.fx.GraphModule, graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """An independent copy of ``gm`` running ``graph`` (faster than ``copy.deepcopy``)."""
    graph = copy.deepcopy(graph)  # keeps the graph's codegen (pytree in/out specs) and meta
    return DeferredGraphModule(clone_module(gm), graph, type(gm).__name__)


def is_converted(gm: torch.fx.GraphModule) -> bool:
    """True for the output of :func:`convert` (its weights are folded constants)."""
    return any((r := get_record(n)) is not None and r.role in ("folded_weight", "packed_weight")
               for n in gm.graph.nodes)
