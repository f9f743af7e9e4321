"""clone_module(): an independent copy of a model, much faster than ``copy.deepcopy``.

``prepare`` must never modify the user's model, so it works on a copy. ``copy.deepcopy`` walks every
attribute of every module generically and costs about four symbolic traces on a 6,000-node ResNet;
this copier knows the layout of ``nn.Module``: it clones parameters and buffers (keeping their
``requires_grad``, their Python attributes and any sharing between modules), recurses into child
modules, gives each module fresh hook dictionaries, shares immutable attributes (numbers, strings,
tuples of them, dtypes, devices) and deep-copies anything else.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["clone_module"]

_ATOMS = (int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device,
          torch.layout, torch.memory_format)
_ATOM_TYPES = frozenset(_ATOMS)  # exact types, checked first (most attributes are these)
_TENSOR_DICTS = ("_parameters", "_buffers")
_EMPTY_CONTAINERS = frozenset((dict, set, OrderedDict))


def _immutable(value: Any) -> bool:
    if type(value) in _ATOM_TYPES or isinstance(value, _ATOMS):
        return True
    return isinstance(value, (tuple, frozenset)) and all(_immutable(v) for v in value)


def _clone_tensor(t: torch.Tensor | None, memo: dict[int, Any]) -> torch.Tensor | None:
    if t is None:
        return None
    if id(t) not in memo and isinstance(t, nn.parameter.UninitializedTensorMixin):
        memo[id(t)] = copy.deepcopy(t, memo)  # a lazy module's: no values to clone yet
    if id(t) not in memo:
        new = t.detach().clone()
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        elif t.requires_grad:
            new.requires_grad_(True)
        if t.__dict__:
            new.__dict__.update(copy.deepcopy(t.__dict__, memo))
        memo[id(t)] = new
    return memo[id(t)]


def _clone(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if isinstance(module, torch.fx.GraphModule):
        cls = _own_class(cls)
    new = object.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if type(value) in _EMPTY_CONTAINERS and not value:
            state[key] = type(value)()  # empty hook dicts and the like
        elif key in _TENSOR_DICTS:
            state[key] = {k: _clone_tensor(v, memo) for k, v in value.items()}
        elif key == "_modules":
            state[key] = {k: None if c is None else _clone(c, memo) for k, c in value.items()}
        elif _immutable(value):
            state[key] = value
        elif isinstance(value, torch.Tensor) and value.grad_fn is not None:
            state[key] = value.detach().clone()  # set by a hook at each call (old weight_norm)
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__dict__.update(state)
    return new


def _own_class(cls: type) -> type:
    """A copy of a GraphModule's class (the same bases and attributes): a GraphModule's generated
    ``forward`` lives on its class, and a copy that generates its code again (switching train/eval
    graphs) must not rewrite the original's. A class that ``fully_shard`` derived from it,
    ``FSDP<class>(FSDPModule, class)``, is copied over a copy of that class."""
    def copy_of(c: type, bases: tuple[type, ...]) -> type:
        body = {k: v for k, v in vars(c).items() if k not in ("__dict__", "__weakref__")}
        return type(c.__name__, bases, {**body, "__qualname__": c.__qualname__})

    impl = next((c for c in cls.__mro__ if c.__qualname__.endswith("GraphModuleImpl")), None)
    if impl is None:
        return cls
    own = copy_of(impl, impl.__bases__)
    return own if cls is impl else copy_of(cls, tuple(own if b is impl else b
                                                       for b in cls.__bases__))


def clone_module(module: nn.Module) -> nn.Module:
    """An independent copy of ``module``: same classes, same values, no shared state."""
    return _clone(module, {})
