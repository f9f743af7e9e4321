"""prepare(): float model -> quantization-aware GraphModule."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.graph.pipeline import PREPARE, run
from fxquant.graph.recipe import Recipe
from fxquant.graph.tracer import trace

__all__ = ["prepare"]


def _unwrap(model: nn.Module) -> nn.Module:
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def prepare(model: nn.Module, recipe: Recipe, *, example_inputs: Sequence[Any] | None = None,
            concrete_args: dict[str, Any] | None = None,
            leaf_modules: Iterable[str | type[nn.Module]] = ()) -> torch.fx.GraphModule:
    """Trace a copy of ``model`` and insert the quantizers ``recipe`` asks for.

    ``model`` is never modified (a DataParallel/DistributedDataParallel wrapper is unwrapped).
    ``concrete_args`` fixes Python-level arguments while tracing (``{"augment": False}``);
    ``leaf_modules`` lists module paths or classes to keep opaque (and in float).
    ``example_inputs``, if given, are run once (no grad, train/eval flags and buffers untouched)
    to record output shapes for :func:`fxquant.summary`.

    The result trains like the float model; its ``state_dict`` keys are the float model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare expects an nn.Module, got {type(model).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"prepare expects a fxquant.Recipe, got {type(recipe).__name__}")
    model = copy.deepcopy(_unwrap(model))
    gm = run(trace(model, concrete_args, leaf_modules), PREPARE, recipe)
    if example_inputs is not None:
        _record_shapes(gm, example_inputs)
    return gm


def _record_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Shape-propagate on a throwaway copy so BN statistics and RNG-free state stay untouched."""
    probe = copy.deepcopy(gm)
    with torch.no_grad():
        ShapeProp(probe).propagate(*example_inputs)
    for node, probed in zip(gm.graph.nodes, probe.graph.nodes):
        if "tensor_meta" in probed.meta:
            node.meta["tensor_meta"] = probed.meta["tensor_meta"]
