"""save() / load(): recipe + state_dict in a versioned file read with ``weights_only=True``.

A file holds plain data only: the recipe (quantizer names and constructor arguments, rule keys
as import paths), the tracing options, every quantizer's settings, whether the model was
converted, and the state_dict (packed codes for converted models). ``load`` rebuilds the prepared
or converted GraphModule from a fresh instance of the float model class; no pickled code runs.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant import _distributed
from fxquant.api import convert, is_converted, prepare
from fxquant.config import CONFIG_ATTR, quantizer_configs, recipe_from_plain, resolve
from fxquant.quantizers.base import get

__all__ = ["save", "load", "FORMAT", "VERSION"]

FORMAT = "fxquant"
VERSION = 1
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
            gm = _rebuild(data, model)
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"{os.fspath(path)} does not match this model "
                             f"({type(model).__name__}): {err}\nPass a fresh instance of the "
                             "model class the file was saved from.") from err
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return gm


def _rebuild(data: dict[str, Any], model: nn.Module) -> torch.fx.GraphModule:
    options = data["options"]
    gm = prepare(model, recipe_from_plain(options["recipe"]),
                 concrete_args=options["concrete_args"] or None,
                 leaf_modules=[x if ":" not in x else resolve(x) for x in options["leaf_modules"]],
                 leaf_functions=[resolve(x) for x in options.get("leaf_functions", [])],
                 blocks=[x if ":" not in x else resolve(x) for x in options.get("blocks", [])])
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
