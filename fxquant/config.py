"""The plain-data form of what :func:`fxquant.prepare` was called with.

A recipe (quantizer names and constructor arguments, rule keys as import paths), the tracing
options and every quantizer's settings as plain dicts, lists and strings: what
:func:`fxquant.save` writes and :func:`fxquant.load` reads back, and what prepare keeps on the
model (``CONFIG_ATTR``) so that convert and save know how it was built. Kept apart from the file
format (:mod:`fxquant.io`) so that prepare and convert need nothing from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from fxquant.graph.meta import SLOTS
from fxquant.graph.recipe import Recipe
from fxquant.quantizers.base import Quantizer, get

__all__ = ["CONFIG_ATTR", "recipe_to_plain", "recipe_from_plain", "options_to_plain",
           "quantizer_configs", "resolve"]

CONFIG_ATTR = "_fxquant_config"  # set by prepare(): plain dict of recipe and tracing options


def _quantizer_to_plain(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value, "config": None}
    quantizer = get(value)  # instances are copied, factories called
    return {"name": quantizer.name, "config": quantizer.get_config()}


def _quantizer_from_plain(plain: dict[str, Any] | None) -> Any:
    if plain is None:
        return None
    if plain["config"] is None:
        return plain["name"]
    return get(plain["name"], **plain["config"])


def _import_path(obj: Any) -> str:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    try:
        found = resolve(f"{module}:{name}") if module and name else None
    except (ImportError, AttributeError):
        found = None
    if found is not obj:
        raise ValueError(f"cannot save {obj!r} (a rule key or leaf): it is not importable by name")
    return f"{module}:{name}"


def resolve(path: str) -> Any:
    """The object an import path ``"module:qualname"`` names."""
    module, _, name = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def recipe_to_plain(recipe: Recipe) -> dict[str, Any]:
    """A Recipe as plain data (raises ValueError naming what cannot be stored)."""
    rules = []
    for rule in recipe.rules:
        key = _import_path(rule.key) if rule.kind == "type" else rule.key
        rules.append({"kind": rule.kind, "key": key,
                      "slots": {s: _quantizer_to_plain(v) for s, v in rule.slots}})
    return {"slots": {s: _quantizer_to_plain(getattr(recipe, s)) for s in SLOTS},
            "strict": recipe.strict, "keep_first_last": recipe.keep_first_last, "rules": rules,
            "nonnegative_inputs": recipe.nonnegative_inputs}


def recipe_from_plain(plain: dict[str, Any]) -> Recipe:
    recipe = Recipe(**{s: _quantizer_from_plain(plain["slots"][s]) for s in SLOTS},
                    strict=plain["strict"], keep_first_last=plain["keep_first_last"],
                    nonnegative_inputs=plain.get("nonnegative_inputs", "warn"))  # older files
    keyed: dict[str, Callable[..., Recipe]] = {"type": Recipe.for_type, "regex": Recipe.for_regex,
                                               "name": Recipe.for_name}
    for rule in plain["rules"]:
        slots = {s: _quantizer_from_plain(v) for s, v in rule["slots"].items()}
        if rule["kind"] in ("first", "last"):
            method = Recipe.for_first if rule["kind"] == "first" else Recipe.for_last
            recipe = method(recipe, **slots)
            continue
        key = resolve(rule["key"]) if rule["kind"] == "type" else rule["key"]
        recipe = keyed[rule["kind"]](recipe, key, **slots)
    return recipe


def options_to_plain(recipe: Recipe, concrete_args: dict[str, Any] | None,
                     leaf_modules: list[Any], leaf_functions: Sequence[Any] = (),
                     blocks: Sequence[Any] = ()) -> dict[str, Any]:
    """What prepare() was called with, as plain data; {"error": why} if it cannot be stored."""
    try:
        blocks_plain = {"blocks": [x if isinstance(x, str) else _import_path(x)
                                   for x in blocks]} if blocks else {}
        return {"recipe": recipe_to_plain(recipe), "concrete_args": dict(concrete_args or {}),
                "leaf_modules": [x if isinstance(x, str) else _import_path(x)
                                 for x in leaf_modules],
                "leaf_functions": [_import_path(f) for f in leaf_functions], **blocks_plain}
    except (ValueError, NotImplementedError) as err:
        return {"error": str(err)}


def quantizer_configs(gm: nn.Module) -> dict[str, dict[str, Any]]:
    """Registry name and constructor arguments of every quantizer submodule."""
    return {name: {"name": m.name, "config": m.get_config()}
            for name, m in gm.named_modules() if isinstance(m, Quantizer)}
