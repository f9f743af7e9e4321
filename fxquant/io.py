"""save() / load(): recipe + state_dict in a versioned file read with ``weights_only=True``.

A file holds plain data only: the recipe (quantizer names and constructor arguments, rule keys
as import paths), the tracing options, every quantizer's settings, whether the model was
converted, and the state_dict (packed codes for converted models). ``load`` rebuilds the prepared
or converted GraphModule from a fresh instance of the float model class; no pickled code runs.
"""

from __future__ import annotations

import importlib
import os
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant import _distributed
from fxquant._text import listing
from fxquant.graph.meta import SLOTS
from fxquant.graph.module import preserve
from fxquant.graph.recipe import Recipe
from fxquant.quantizers.base import Quantizer, get

__all__ = ["save", "load", "FORMAT", "VERSION", "recipe_to_plain", "recipe_from_plain",
           "guard_float_checkpoints"]

FORMAT = "fxquant"
VERSION = 1
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
        found = _resolve(f"{module}:{name}") if module and name else None
    except (ImportError, AttributeError):
        found = None
    if found is not obj:
        raise ValueError(f"cannot save {obj!r} (a rule key or leaf): it is not importable by name")
    return f"{module}:{name}"


def _resolve(path: str) -> Any:
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
        key = _resolve(rule["key"]) if rule["kind"] == "type" else rule["key"]
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


def save(gm: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write a prepared or converted model to ``path`` (see the module docstring).

    Read it back with ``fxquant.load(path, MyNet())`` (a fresh instance of the float model
    class). The file holds plain data only, so ``torch.load(path)`` gives a dict, never a model.
    ``torch.save(gm, path)`` instead pickles the GraphModule itself (its generated code
    included); ``torch.load`` then refuses it with torch's "Weights only load failed" message,
    because since torch 2.6 it reads with ``weights_only=True``. Only for a file you trust,
    ``torch.load(path, weights_only=False)`` runs that pickle; ``fxquant.save`` needs no such
    trust.

    Distributed training: a ``DistributedDataParallel`` (or ``DataParallel``) wrapper is looked
    through, and a model sharded with FSDP2 ``fully_shard`` has its ``DTensor`` shards gathered
    (``full_tensor()``), so the file always holds the full model and loads in a single process.
    While a process group of more than one rank is initialised, **only rank 0 writes**; the
    other ranks return without touching ``path``, and nothing waits for the write (call
    ``torch.distributed.barrier()`` after ``save`` before another rank reads the file). An
    unsharded (DDP) model may be saved from rank 0 alone or from every rank; a sharded one must
    be saved from every rank, since gathering is a collective (a rank that skips the call
    leaves the others waiting until the process group's timeout). An FSDP1
    ``FullyShardedDataParallel`` wrapper is a TypeError saying to use ``fully_shard``.
    """
    from fxquant.api import is_converted

    gm = _distributed.unwrap(gm, "save")
    config = getattr(gm, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("save expects a model returned by fxquant.prepare or fxquant.convert")
    if "error" in config:
        raise ValueError(f"this model's recipe cannot be saved: {config['error']}")
    converted = is_converted(gm)
    quantizers = config["quantizers"] if converted else quantizer_configs(gm)
    state_dict = _distributed.full_state_dict(gm, "save")  # every rank, before the rank test
    if not _distributed.is_main_rank():
        return
    torch.save({"format": FORMAT, "version": VERSION, "converted": converted,
                "options": {k: config[k] for k in ("recipe", "concrete_args", "leaf_modules",
                                                   "leaf_functions", "blocks") if k in config},
                "quantizers": quantizers, "state_dict": state_dict}, path)


def quantizer_configs(gm: nn.Module) -> dict[str, dict[str, Any]]:
    """Registry name and constructor arguments of every quantizer submodule."""
    return {name: {"name": m.name, "config": m.get_config()}
            for name, m in gm.named_modules() if isinstance(m, Quantizer)}


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:  # weights_only refused a class: torch.save(model)
        raise ValueError(f"{os.fspath(path)} is not a readable fxquant file: it holds pickled "
                         "Python objects (torch.save(model, path) writes those), which "
                         "fxquant.load does not run. Write models with fxquant.save(model, path) "
                         "and read them with fxquant.load(path, MyNet()); a file you trust loads "
                         "with "
                         f"torch.load(path, weights_only=False). torch said: {err}") from err
    except Exception as err:
        raise ValueError(f"{os.fspath(path)} is not a readable fxquant file "
                         f"(corrupt or truncated?): {err}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not an fxquant file")
    if data.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)} has fxquant format version {data.get('version')!r}; "
                         f"this fxquant reads version {VERSION}")
    return data


def load(path: str | os.PathLike[str], model: nn.Module) -> torch.fx.GraphModule:
    """Rebuild the saved prepared or converted model from ``model``, a fresh float instance.

    ``model`` must be an instance of the class the file was saved from (``MyNet()``; passing
    the class ``MyNet`` is a TypeError saying so); its weights are replaced by the file's. A
    model of another class, whose ``state_dict`` keys or shapes differ, is one ValueError naming
    the keys, without the warnings the rebuild gave on the way (such as "the recipe quantizes no
    layer"). The file must come from :func:`save`: a pickled GraphModule (``torch.save(gm)``)
    is a ValueError explaining why it is not read (``torch.load`` refuses it too, with its
    ``weights_only`` message).

    Dtypes come from the file, the device from ``model``: ``load_state_dict`` alone would copy
    the saved values into the fresh model's float32 tensors, so before it, when the file's
    floating tensors all share one dtype (a model saved after ``.double()``, ``.half()`` or
    ``.to(torch.bfloat16)``) and the rebuilt model's differ, the model is converted as a whole
    with ``.to(dtype)`` (non-persistent buffers included); any parameter or buffer whose dtype
    still differs from the file's (mixed dtypes) is given the file's dtype in place. Move the
    fresh model to its device (``MyNet().cuda()``) before ``load`` or the result after it.
    """
    from fxquant.api import convert, prepare

    if isinstance(model, type) and issubclass(model, nn.Module):
        raise TypeError(f"fxquant.load expects a fresh instance of the float model, got the class "
                        f"{model.__name__}; pass an instance: {model.__name__}()")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxquant.load expects a fresh instance of the float model (an "
                        f"nn.Module), got {type(model).__name__}")
    data = _read(path)
    with warnings.catch_warnings(record=True) as caught:  # given only if the rebuild works
        warnings.simplefilter("always")
        try:
            gm = _rebuild(data, model, prepare, convert)
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"{os.fspath(path)} does not match this model "
                             f"({type(model).__name__}): {err}\nPass a fresh instance of the "
                             "model class the file was saved from.") from err
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return gm


def _rebuild(data: dict[str, Any], model: nn.Module, prepare: Callable[..., Any],
             convert: Callable[..., Any]) -> torch.fx.GraphModule:
    options = data["options"]
    gm = prepare(model, recipe_from_plain(options["recipe"]),
                 concrete_args=options["concrete_args"] or None,
                 leaf_modules=[x if ":" not in x else _resolve(x) for x in options["leaf_modules"]],
                 leaf_functions=[_resolve(x) for x in options.get("leaf_functions", [])],
                 blocks=[x if ":" not in x else _resolve(x) for x in options.get("blocks", [])])
    for name, plain in data["quantizers"].items():  # settings changed after prepare
        parent, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent), child, get(plain["name"], **plain["config"]))
    if data["converted"]:
        gm = convert(gm)
    _match_dtypes(gm, data["state_dict"])
    gm.load_state_dict(data["state_dict"], strict=True)
    return gm


def _match_dtypes(gm: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give ``gm``'s floating parameters and buffers the dtypes they have in ``state_dict``."""
    own = gm.state_dict(keep_vars=True)
    differ = [k for k, v in state_dict.items()
              if k in own and v.is_floating_point() and own[k].dtype != v.dtype]
    if not differ:
        return
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if len(dtypes) == 1:  # saved after model.to(dtype): non-persistent buffers follow as well
        gm.to(dtypes.pop())
        own = gm.state_dict(keep_vars=True)
    for key in differ:  # in place, so shared parameters stay shared
        own[key].data = own[key].data.to(state_dict[key].dtype)


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
    (``fc.weight_packed.codes``) where the float model has its latent weight (``fc.weight``);
    a state_dict holding such a latent weight is the float (or prepared) model's checkpoint, and
    loading it raises a RuntimeError saying to load it into the prepared model (or the float
    model before prepare) and convert after, instead of torch's list of missing and unexpected
    keys. The hook survives ``copy.deepcopy`` and pickling.
    """
    own = converted.state_dict(keep_vars=True)
    latent = frozenset(key.rpartition("_packed.")[0] for key in own if "_packed." in key) - set(own)
    if latent:
        converted._register_load_state_dict_pre_hook(_FloatCheckpointGuard(latent))
        preserve(converted, "_load_state_dict_pre_hooks", converted._load_state_dict_pre_hooks)
