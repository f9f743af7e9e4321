"""Models under ``torch.distributed``: look through DDP, gather FSDP2 / DTensor shards.

``convert``, ``save`` and ``summary`` take a prepared model as training left it: wrapped in
``DistributedDataParallel`` (or ``DataParallel``), or sharded by FSDP2 ``fully_shard`` (at the
root or per block), whose parameters are ``DTensor`` shards and whose modules carry FSDP's
hooks, state and a swapped class. This module turns such a model into the plain single-process
GraphModule fxquant works on:

* :func:`unwrap`: the module inside DDP/DataParallel wrappers (no copy, no communication);
* :func:`plain_copy`: an independent copy without FSDP (plain classes, no distributed hooks or
  state) whose ``DTensor`` parameters and buffers become ordinary tensors of the full shape;
* :func:`full_state_dict`: the state_dict with every ``DTensor`` gathered.

Gathering (``DTensor.full_tensor()``) is a collective: every rank of the process group must
make the same call, in the same order, or the ranks that did wait until the group's timeout.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fxquant.graph.clone import _clone

__all__ = ["unwrap", "is_dtensor", "is_sharded", "is_distributed", "is_main_rank", "world_size",
           "plain_copy", "gathered", "full_state_dict"]

_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_HOOK_FLAGS = {"_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
               "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")}
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")  # set by fully_shard
_COMPOSABLE_STATE = "__composable_api_"  # fully_shard's per-module state keys start with it


def _dtensor_type() -> type | None:
    """``DTensor``, or None where it was never imported (then no tensor can be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a shard of FSDP2 or tensor parallelism)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def _is_fsdp1(model: nn.Module) -> bool:
    module = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP1 model exists
    wrapper = getattr(module, "FullyShardedDataParallel", None)
    return wrapper is not None and isinstance(model, wrapper)


def unwrap(model: nn.Module, who: str) -> nn.Module:
    """``model`` without DataParallel/DistributedDataParallel wrappers (the same object inside).

    An FSDP1 ``FullyShardedDataParallel`` wrapper (flattened parameters) is a TypeError saying
    to shard with FSDP2 ``fully_shard`` instead.
    """
    while isinstance(model, _WRAPPERS):
        model = model.module
    if _is_fsdp1(model):
        raise TypeError(f"{who}: FullyShardedDataParallel (FSDP1) wrappers flatten the "
                        "parameters, so fxquant cannot read its layers; shard the prepared "
                        "model with FSDP2 instead: torch.distributed.fsdp.fully_shard(model)")
    return model


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a ``DTensor`` (FSDP2, tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in _tensors(model))


def is_distributed(model: nn.Module) -> bool:
    """Whether ``model`` is sharded (:func:`is_sharded`) or managed by FSDP2 in any module (a
    swapped class or distributed hooks, present even while the parameters are unsharded, as
    FSDP2 leaves the root's after a forward without backward)."""
    return is_sharded(model) or any(
        _plain_class(type(m)) is not type(m) or _has_distributed_hooks(m) for m in model.modules())


def _has_distributed_hooks(module: nn.Module) -> bool:
    return any(_from_distributed(h) for name in _HOOK_DICTS
               for h in (module.__dict__.get(name) or {}).values())


def world_size() -> int:
    """The default process group's size; 1 when none is initialised."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_rank() -> bool:
    """True on rank 0 of the default process group, and in a process without one."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _require_group(model: nn.Module, who: str) -> None:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}: the model has sharded (DTensor) parameters but no process "
                           "group is initialised, so its shards cannot be gathered; call it on "
                           "every rank while the process group of the training still exists "
                           "(before torch.distributed.destroy_process_group())")


def _full(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return t.full_tensor()


def _from_distributed(hook: Any) -> bool:
    owner = getattr(hook, "__self__", None)
    for obj in (getattr(hook, "func", hook), type(owner) if owner is not None else None):
        if obj is not None and getattr(obj, "__module__", "").startswith("torch.distributed"):
            return True
    return False


def _plain_class(cls: type) -> type:
    """The class ``fully_shard`` (or ``replicate``) swapped out: ``FSDPNet(FSDPModule, Net)``."""
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__module__.startswith("torch.distributed"):
        return bases[1]
    return cls


@contextlib.contextmanager
def _distributed_parts_set_aside(model: nn.Module) -> Iterator[None]:
    """Take the hooks of ``torch.distributed`` and ``fully_shard``'s state off ``model``'s
    modules for the duration (they hold process groups, which cannot be copied), then put
    them back exactly as they were (hook order included)."""
    saved: list[tuple[dict[Any, Any], list[tuple[Any, Any]]]] = []
    states: list[tuple[nn.Module, str, Any]] = []
    try:
        for module in model.modules():
            for name in _HOOK_DICTS:
                hooks = module.__dict__.get(name)
                if hooks and any(_from_distributed(h) for h in hooks.values()):
                    saved.append((hooks, list(hooks.items())))
                    for key in [k for k, h in hooks.items() if _from_distributed(h)]:
                        del hooks[key]
            for key in [k for k in module.__dict__ if k.startswith(_COMPOSABLE_STATE)]:
                states.append((module, key, module.__dict__.pop(key)))
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)
        for module, key, value in states:
            module.__dict__[key] = value


def plain_copy(model: nn.Module, fill: Callable[[torch.Tensor], torch.Tensor] = _full
               ) -> nn.Module:
    """An independent copy of ``model`` with no trace of FSDP, each ``DTensor`` replaced.

    ``fill(dtensor)`` gives the plain tensor of the full shape (default: ``full_tensor()``, a
    collective every rank must call, in the same order: parameters, then buffers, in
    registration order). Parameters keep ``requires_grad``; shared tensors stay shared. Modules
    get back their own classes; the hooks that ``torch.distributed`` registered and
    ``fully_shard``'s state are left out, other hooks and attributes are copied
    (:func:`fxquant.graph.clone.clone_module`).
    """
    dtensor = _dtensor_type()
    memo: dict[int, Any] = {}
    for t in _tensors(model):
        if dtensor is not None and isinstance(t, dtensor) and id(t) not in memo:
            full = fill(t).detach().clone()
            memo[id(t)] = (nn.Parameter(full, t.requires_grad) if isinstance(t, nn.Parameter)
                           else full)
    with _distributed_parts_set_aside(model):
        copied = _clone(model, memo)
    for module in copied.modules():
        module.__class__ = _plain_class(type(module))
        for key in _FSDP_FLAGS:
            module.__dict__.pop(key, None)
        for name, flags in _HOOK_FLAGS.items():
            kept = module.__dict__.get(name, {})
            for flag in flags:
                table = module.__dict__.get(flag)
                if table:
                    module.__dict__[flag] = OrderedDict((k, v) for k, v in table.items()
                                                        if k in kept)
    return copied


def gathered(model: nn.Module, who: str) -> nn.Module:
    """``model`` unwrapped; if it is FSDP's (:func:`is_distributed`), a :func:`plain_copy` with
    the full tensors.

    Otherwise the very module (no copy). Gathering shards is a collective, see the module
    docstring (an FSDP2 model whose parameters are unsharded at the moment needs none).
    """
    model = unwrap(model, who)
    if not is_distributed(model):
        return model
    if is_sharded(model):
        _require_group(model, who)
    return plain_copy(model)


def full_state_dict(model: nn.Module, who: str) -> dict[str, Any]:
    """``model.state_dict()`` with every ``DTensor`` gathered to its full tensor (a collective
    when there are any, in the state_dict's order)."""
    dtensor = _dtensor_type()
    state = model.state_dict()
    if dtensor is None or not any(isinstance(v, dtensor) for v in state.values()):
        return state
    _require_group(model, who)
    return {k: _full(v) if isinstance(v, dtensor) else v for k, v in state.items()}
