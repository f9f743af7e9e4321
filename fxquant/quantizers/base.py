"""Quantizer base class, registry and the input checks every quantizer shares.

A quantizer in fxquant is two things kept side by side:

* a pure function (usually a ``torch.autograd.Function``) whose forward and surrogate gradient are
  written next to each other, and
* a thin leaf :class:`Quantizer` module that calls it, carries ``bits`` and a registry ``name``.

Graph passes insert the module (never the function): ``torch.fx`` inlines an autograd Function it
traces through and silently drops its custom backward, while a leaf module survives as one
``call_module`` node.

>>> from fxquant.quantizers import get
>>> q = get("ste_sign")
>>> q.bits, q.name
(1, 'ste_sign')
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
import torch.fx
from torch import nn

from fxquant.quantizers._common import Surrogate, mark_plus_minus_one

__all__ = ["Quantizer", "register", "get", "names", "check_floating"]

_REGISTRY: dict[str, type[Quantizer]] = {}

Q = TypeVar("Q", bound="type[Quantizer]")


class Quantizer(nn.Module):
    """Base class of every fxquant quantizer module.

    Subclasses set the class attribute ``name`` (their registry alias, given by :func:`register`)
    and an instance attribute ``bits``: the number of bits one quantized value needs (1 for binary,
    2 for ternary, k for k-bit grids; 32 for quantizers whose output is not on a fixed grid).
    A quantizer holds no persistent state unless it learns something.

    ``enabled`` (default True) switches the quantizer off: while it is False, calling the module
    returns its input unchanged (the same tensor object, so gradients flow as in the float model)
    without running ``forward`` or hooks. It is a plain attribute, checked only in
    :meth:`__call__`, not part of the ``state_dict`` or of :meth:`get_config`; deepcopy and pickle
    keep it. Use :func:`fxquant.training.set_quantizers_enabled` to flip it on a prepared model.

    ``save_input`` (default False) is a memory hint, set by ``prepare`` where the quantizer's
    input is kept alive for backward anyway (a relu output): a quantizer that can keep either
    its input or a smaller mask (:class:`~fxquant.quantizers.SteSign`) then keeps the input.
    It never changes a value or a gradient; quantizers without that choice ignore it.
    """

    name: ClassVar[str] = ""
    plus_minus_one: ClassVar[bool] = False  # outputs only -1/+1 (NaN aside) in training mode
    bits: int
    enabled: bool = True  # class default: also instances unpickled from before the flag existed
    save_input: bool = False  # memory hint (see above); a class default for the same reason

    def __init__(self, bits: int) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"{type(self).__name__}: bits must be an int >= 1, got {bits!r}")
        self.bits = bits

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module; while ``enabled`` is False, return the input unchanged instead.

        A ``torch.fx.Proxy`` input always goes through, so tracing a model keeps the quantizer's
        ``call_module`` node whatever its state.
        """
        if not self.enabled and args and not isinstance(args[0], torch.fx.Proxy):
            return args[0]
        out = super().__call__(*args, **kwargs)
        # The tag serves fxquant.nn's eager layers only; compiled code never reads it.
        if (self.plus_minus_one and isinstance(out, torch.Tensor)
                and not torch.compiler.is_compiling()):
            x = args[0] if args else None
            gradient = self.sign_gradient(x) if isinstance(x, torch.Tensor) else None
            # read by fxquant.nn's layers: see mark_plus_minus_one
            mark_plus_minus_one(out, x if gradient is not None else None, gradient)
        return out

    def sign_gradient(self, x: torch.Tensor) -> Surrogate | None:
        """The surrogate gradient ``(x, grad, scratch) -> grad_x`` of ``forward(x)``, if the
        output is exactly ``sign(x)`` and forward keeps ``x`` itself for backward; else None.

        ±1 quantizers that return it let a :mod:`fxquant.nn` layer fed by them keep ``x``
        (no extra memory) instead of the output, and apply the gradient itself. None here.
        """
        return None

    def extra_repr(self) -> str:
        return f"bits={self.bits}" if self.enabled else f"bits={self.bits}, enabled=False"

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """The eval-mode forward as plain torch ops (no custom autograd), FX-traceable.

        ``convert`` inlines it in place of the quantizer so exported graphs hold ordinary ops
        (e.g. ``torch.where(x >= 0, 1.0, -1.0)`` for a sign). It must equal ``self.eval()(x)``
        bit for bit. Quantizers that do not override it stay module calls after convert.
        """
        raise NotImplementedError(f"{type(self).__name__} has no plain-op inference form")

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments (read from same-named attributes) that rebuild this quantizer.

        ``type(q)(**q.get_config())`` is an equivalent quantizer; values are plain Python
        (numbers, strings, bools, None) so configs can be stored with ``weights_only`` files.
        Learned state lives in the state_dict, not here.
        """
        config = {}
        for name in _init_arguments(type(self)):
            if not hasattr(self, name):
                raise NotImplementedError(f"{type(self).__name__} does not store its argument "
                                          f"{name!r} as an attribute; override get_config")
            value = getattr(self, name)
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            config[name] = value
        return config

    def forward_is_identity(self) -> bool:
        """True if the forward pass returns its input unchanged (backward-only quantizers)."""
        return False


@functools.cache
def _init_arguments(cls: type) -> tuple[str, ...]:
    """Names of the constructor's named arguments (cached: ``inspect.signature`` is slow)."""
    return tuple(name for name, p in inspect.signature(cls.__init__).parameters.items()
                 if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


def register(name: str) -> Callable[[Q], Q]:
    """Class decorator: make ``cls`` available as ``get(name)``.

    A name can be registered once; registering another class under a taken name is a ValueError.
    """

    def decorate(cls: Q) -> Q:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"register({name!r}) expects a Quantizer subclass, got {cls!r}")
        known = _REGISTRY.get(name)
        reimported = known is not None and (known.__module__, known.__qualname__) == (
            cls.__module__, cls.__qualname__)  # the same class from a module imported twice
        if known is not None and known is not cls and not reimported:
            raise ValueError(f"quantizer name {name!r} is already registered to {known.__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def names() -> list[str]:
    """The registered quantizer names, sorted."""
    return sorted(_REGISTRY)


def _fold(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


def _did_you_mean(identifier: str) -> list[str]:
    """Registry names ``identifier`` probably meant: the same name or class name ignoring case
    and underscores (``"SteSign"`` -> ``ste_sign``), else close matches (``"sign"``)."""
    folded: dict[str, str] = {}
    for name, cls in sorted(_REGISTRY.items()):
        folded.setdefault(_fold(name), name)
        folded.setdefault(_fold(cls.__name__), name)
    key = _fold(identifier)
    if key in folded:
        return [folded[key]]
    close = difflib.get_close_matches(key, list(folded), n=6, cutoff=0.6)
    if not close and len(key) >= 3:  # a part of a name: "kbit" -> k_bit_quantize
        close = [f for f in folded if key in f]
    return list(dict.fromkeys(folded[c] for c in close))[:3]


def unknown_name_error(identifier: str, where: str = "") -> ValueError:
    """The ValueError for an unregistered quantizer name, with "did you mean" and the names."""
    guesses = _did_you_mean(identifier)
    hint = f"did you mean {' or '.join(map(repr, guesses))}? " if guesses else ""
    return ValueError(f"{where}{': ' if where else ''}unknown quantizer {identifier!r}; {hint}"
                      f"known names: {', '.join(names())}")


def _required_arguments(cls: type) -> list[str]:
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self" and p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def name_of_function(value: object, where: str = "") -> str | None:
    """The registry name of a quantizer *function* of :mod:`fxquant.quantizers` (``ste_sign``
    -> ``"ste_sign"``, as larq accepts ``kernel_quantizer=lq.quantizers.ste_sign``); None for
    anything else. A function that needs arguments besides the tensor (``k_bit_quantize``
    needs ``k``), or whose quantizer does, is a ValueError saying how to give them."""
    name = getattr(value, "__name__", None)
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None or not inspect.isfunction(value) or value.__module__ != cls.__module__:
        return None
    parameters = list(inspect.signature(value).parameters.values())[1:]  # after the tensor
    required = _required_arguments(cls) or [p.name for p in parameters if p.default is p.empty
                                            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        arguments = ", ".join(f"{arg}=..." for arg in required)
        raise ValueError(f"{where}{': ' if where else ''}{name} is the quantizer function "
                         f"(tensor -> tensor) and its quantizer needs arguments: give the "
                         f"quantizer {cls.__name__}({arguments}) or the name with them, "
                         f"fxquant.quantizers.get({name!r}, {arguments})")
    return name


def check_factory(value: Callable[..., Any], where: str = "") -> None:
    """Raise ValueError if ``value`` cannot be called without arguments (it is called so, once
    per layer, to make a quantizer): a function of a tensor is not a quantizer factory."""
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # builtins without a signature: let the call tell
        return
    try:
        signature.bind()
    except TypeError:
        label = getattr(value, "__qualname__", None) or repr(value)
        raise ValueError(f"{where}{': ' if where else ''}{label}{signature} is not a quantizer "
                         "factory (it is called with no arguments to make a quantizer per "
                         "layer); give a registry name, a Quantizer instance or a class, or "
                         "wrap a tensor function in a Quantizer subclass") from None


def get(identifier: str | Quantizer | Callable[[], Quantizer], **kwargs: Any) -> Quantizer:
    """Return a fresh quantizer module.

    ``identifier`` may be a registry name (``kwargs`` go to the constructor), a :class:`Quantizer`
    instance (a deep copy is returned, so one instance can serve many layers), a factory that
    returns a Quantizer (a Quantizer class is one), or a quantizer function of this package
    (``ste_sign``: its registered quantizer, as larq accepts ``lq.quantizers.ste_sign``).
    An unknown name is a ``ValueError`` suggesting close names (case and underscores ignored,
    class names too: ``"SteSign"`` -> ``ste_sign``) and listing the known ones.

    >>> from fxquant.quantizers import get, ste_sign
    >>> get(ste_sign)
    SteSign(bits=1, clip_value=1.0)
    >>> get("SteSign")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: unknown quantizer 'SteSign'; did you mean 'ste_sign'? known names: ...
    """
    if not isinstance(identifier, str) and (name := name_of_function(identifier)) is not None:
        identifier = name
    if isinstance(identifier, str):
        cls = _REGISTRY.get(identifier)
        if cls is None:
            raise unknown_name_error(identifier)
        return cls(**kwargs)
    if kwargs:
        raise ValueError("keyword arguments are only accepted together with a quantizer name")
    if isinstance(identifier, Quantizer):
        return copy.deepcopy(identifier)
    if callable(identifier) and not isinstance(identifier, nn.Module):
        check_factory(identifier, "get")
        made = identifier()
        if not isinstance(made, Quantizer):
            raise ValueError(f"quantizer factory {identifier!r} returned {type(made).__name__}, "
                             "not a fxquant Quantizer")
        return made
    raise ValueError(f"cannot make a quantizer from {identifier!r}: give a registry name, a "
                     "Quantizer instance or a factory")


def check_floating(x: torch.Tensor, who: str) -> None:
    """Raise TypeError unless ``x`` is a floating-point tensor (integer and bool are refused)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got dtype {x.dtype}")
