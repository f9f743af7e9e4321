"""annotate_layers: find weighted layers and record the recipe's decision on each."""

from __future__ import annotations

import warnings

import torch.fx

from fxquant.graph.meta import QuantRecord, set_record
from fxquant.graph.patterns import Submodules, match_layer
from fxquant.graph.recipe import LayerInfo, Recipe

__all__ = ["annotate_layers"]


def annotate_layers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """Put a ``QuantRecord(role="layer")`` with the resolved recipe slots on every weighted layer.

    Layers are ``nn.Linear``/``nn.Conv{1,2,3}d`` calls and ``F.linear``/``F.conv{1,2,3}d`` calls
    whose weight is a parameter. ``strict`` recipes raise ValueError for a rule matching no layer.
    """
    modules = Submodules(gm)
    found = [(node, match) for node in gm.graph.nodes
             if (match := match_layer(node, modules)) is not None]
    last = len(found) - 1
    infos = [LayerInfo(m.path, m.module_type, m.function, is_first=i == 0, is_last=i == last)
             for i, (_, m) in enumerate(found)]
    unmatched = recipe.unmatched_rules(infos)
    if unmatched and recipe.strict:
        paths = ", ".join(info.path for info in infos) or "none"
        raise ValueError(f"strict recipe: rule(s) {[r.describe() for r in unmatched]} match no "
                         f"layer; the model's weighted layers are: {paths}")
    any_quantized = False
    for (node, match), info in zip(found, infos, strict=True):
        specs = recipe.resolve(info)
        any_quantized |= bool(specs)
        set_record(node, QuantRecord("layer", match.path, match.op, match.module, specs))
    if not any_quantized and _recipe_quantizes_something(recipe):
        message = (f"the recipe quantizes no layer of {type(gm).__name__}: found "
                   f"{len(found)} weighted layer(s) (Linear/Conv or F.linear/F.conv with a "
                   f"parameter weight)")
        if recipe.strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return gm


def _recipe_quantizes_something(recipe: Recipe) -> bool:
    slots = (recipe.weight, recipe.input, recipe.output, recipe.error)
    return any(s is not None for s in slots) or any(
        value is not None for rule in recipe.rules for _, value in rule.slots)
