"""annotate_layers: find weighted layers and record the recipe's decision on each;
report_float_layers: say which weighted modules stay in float although the recipe quantizes them."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterator

import torch.fx
from torch import nn

from fxquant._text import listing
from fxquant._user_code import user_stacklevel
from fxquant.graph.meta import QuantRecord, get_record, set_record
from fxquant.graph.patterns import _LAYER_CLASSES, Submodules, match_layer, not_plain_layer
from fxquant.graph.recipe import LayerInfo, Recipe

__all__ = ["annotate_layers", "report_float_layers"]


def annotate_layers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """Put a ``QuantRecord(role="layer")`` with the resolved recipe slots on every weighted layer.

    Layers are ``nn.Linear``/``nn.Conv{1,2,3}d`` calls and ``F.linear``/``F.conv{1,2,3}d`` calls
    whose weight is a parameter. A ``for_name`` or ``for_regex`` rule matching no layer (a
    typo in a path) is a UserWarning listing the model's layers; ``strict`` recipes raise
    ValueError instead, for every kind of rule. Rules that name a layer staying float (inside a
    leaf module, say) count as matched: :func:`report_float_layers` tells about those.
    """
    modules = Submodules(gm)
    found = [(node, match) for node in gm.graph.nodes
             if (match := match_layer(node, modules)) is not None]
    last = len(found) - 1
    infos = [LayerInfo(m.path, m.module_type, m.function, is_first=i == 0, is_last=i == last)
             for i, (_, m) in enumerate(found)]
    unmatched = [r for r in recipe.unmatched_rules(infos)
                 if recipe.strict or r.kind in ("name", "regex")]  # a type rule may be generic
    if unmatched:  # a rule may name a layer that stays float (reported later)
        found_paths = {m.module or m.path for _, m in found}
        still = recipe.unmatched_rules(
            [*infos, *(info for info, _ in _weighted_modules(gm, recipe, _graph_uses(gm))
                       if info.path not in found_paths)])
        unmatched = [r for r in unmatched if r in still]
    if unmatched:
        paths = listing(info.path for info in infos)
        message = (f"rule(s) {', '.join(r.describe() for r in unmatched)} match no layer of "
                   f"{type(gm).__name__}; its weighted layers are: {paths}")
        if recipe.strict:
            raise ValueError(f"strict recipe: {message}")
        warnings.warn(f"fxquant.prepare: {message}. Check the layer path (a for_name path is "
                      "matched exactly, a for_regex pattern in full against it); "
                      "Recipe(strict=True) makes this an error.", stacklevel=user_stacklevel())
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
        warnings.warn(message, stacklevel=user_stacklevel())
    return gm


def _recipe_quantizes_something(recipe: Recipe) -> bool:
    slots = (recipe.weight, recipe.input, recipe.output, recipe.error)
    return any(s is not None for s in slots) or any(
        value is not None for rule in recipe.rules for _, value in rule.slots)


_VISIBLE_MODULES = ("torch", "_operator", "operator", "builtins", "math")

Uses = tuple[dict[str, str], dict[str, list[torch.fx.Node]]]


def _graph_uses(gm: torch.fx.GraphModule) -> Uses:
    """Called module paths (-> class name) and, per module path, the get_attr nodes reading it."""
    called: dict[str, str] = {}
    readers: dict[str, list[torch.fx.Node]] = defaultdict(list)
    modules = Submodules(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called[str(node.target)] = type(modules[str(node.target)]).__name__
        elif node.op == "get_attr":
            readers[str(node.target).rpartition(".")[0]].append(node)
    return called, readers


def _opaque(node: torch.fx.Node) -> bool:
    """A call fxquant cannot see into: a leaf module or a ``torch.fx.wrap``-ped function."""
    return node.op == "call_module" or (node.op == "call_function" and not str(
        getattr(node.target, "__module__", None) or "").startswith(_VISIBLE_MODULES))


def _weighted_modules(gm: torch.fx.GraphModule, recipe: Recipe, uses: Uses
                      ) -> Iterator[tuple[LayerInfo, nn.Module]]:
    """Modules the recipe means to quantize: Linear/Conv family (subclasses too); any module
    with a ``weight`` parameter that a type or name rule gives a quantizer (regex rules are too
    broad to say so: ``layer4\\..*`` also matches batch norms); and a module the graph only reads
    a ``weight`` matrix of, passed to a leaf module or a wrapped function (GraphModule keeps such
    a module as a bare ``nn.Module``: its class is unknown)."""
    readers = uses[1]
    for path, module in gm.named_modules():
        weight = module._parameters.get("weight")
        if isinstance(module, _LAYER_CLASSES):
            yield LayerInfo(path, type(module), None), module
        elif weight is None:
            continue
        elif type(module) is nn.Module:
            if weight.dim() >= 2 and any(_opaque(user) for node in readers.get(path, ())
                                         if node.target == f"{path}.weight" for user in node.users):
                yield LayerInfo(path, None, None), module
        else:
            info = LayerInfo(path, type(module), None)
            if any(spec.rule.startswith(("type:", "name:")) for _, spec in recipe.resolve(info)):
                yield info, module


def _why_float(path: str, module: nn.Module, uses: Uses) -> str | None:
    """Why the module at ``path`` has no layer in the graph; None when the graph never uses it."""
    called, readers = uses
    if path in called:
        return not_plain_layer(module) or ("it is called with output_size (its output padding "
                                           "then depends on the input)")
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        leaf = ".".join(parts[:i])
        if leaf in called:
            return f"it is inside {leaf!r} ({called[leaf]}), a leaf module fxquant does not trace"
    users = sorted({_describe(user) for node in readers.get(path, ()) for user in node.users})
    if users:
        return f"its parameters are passed to {', '.join(users)}, which fxquant cannot see into"
    return None


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


def report_float_layers(gm: torch.fx.GraphModule, recipe: Recipe) -> torch.fx.GraphModule:
    """One warning (a ValueError for ``strict`` recipes) listing the weighted modules that stay
    in float although the recipe gives them quantizers, each with the reason.

    Reasons: the module is inside a leaf module (``leaf_modules``, or a torch.nn container such
    as ``nn.TransformerEncoderLayer``), overrides ``forward``, has hooks or is an unmaterialised
    lazy module, or its weight is passed to a function fxquant cannot see into (a
    ``torch.fx.wrap``-ped function). Modules the recipe leaves in float (slots set to ``None``,
    first/last layers of the presets) and modules the graph never uses are not reported.
    Run after :func:`annotate_layers`, whose records say which layers were found.
    """
    found = {r.module or r.layer for node in gm.graph.nodes
             if (r := get_record(node)) is not None and r.role == "layer"}
    uses = _graph_uses(gm)
    lines = []
    for info, module in _weighted_modules(gm, recipe, uses):
        if info.path in found or not (specs := recipe.resolve(info)):
            continue
        why = _why_float(info.path, module, uses)
        if why is not None:
            kind = type(module).__name__ if info.module_type else "class unknown to the graph"
            slots = ", ".join(slot for slot, _ in specs)
            lines.append(f"  {info.path} ({kind}; recipe: {slots}): {why}")
    if not lines:
        return gm
    message = (f"{len(lines)} weighted layer(s) of {type(gm).__name__} stay in float although "
               f"the recipe quantizes them:\n" + listing(lines, 100, "\n")
               + "\nTo keep them in float on purpose, set their slots to None in the recipe (e.g. "
               ".for_name(path, weight=None, input=None)); to quantize them, let fxquant trace "
               "into the code that calls them (do not list it in leaf_modules, do not "
               "torch.fx.wrap it).")
    if recipe.strict:
        raise ValueError(message)
    warnings.warn(message, stacklevel=user_stacklevel())
    return gm
