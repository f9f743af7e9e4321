"""Recipes: which quantizer goes in which slot of which layer.

A :class:`Recipe` has four slots (``weight``, ``input``, ``output``, ``error``) and an ordered set
of refinement rules. Each slot value is a registry name (``"ste_sign"``), a quantizer instance
(deep-copied for every layer), a factory returning a quantizer, or ``None`` (leave that slot in
float).

Precedence, lowest to highest::

    global  <  type / function  <  first / last layer  <  regex  <  exact name

A rule only sets the slots it names; the others fall through to lower precedence. Among rules of the
same precedence, the one added last wins. ``.for_first`` / ``.for_last`` address the first and the
last weighted layer in graph order. ``keep_first_last=True`` (used by the BNN, XNOR, Bi-Real,
TWN and DoReFa presets, as in the papers) acts like ``.for_first`` and ``.for_last`` setting
every slot to ``None`` before any rule of yours, so the first and last layer stay in float unless
a first/last, regex or name rule says otherwise.

>>> import torch.nn as nn
>>> r = Recipe(weight="ste_sign").for_type(nn.Linear, weight=None)
>>> r = r.for_name("fc2", weight="ste_tern")
>>> [rule.describe() for rule in r.rules]
['type:Linear', 'name:fc2']
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fxquant.graph.meta import SLOTS, QuantizerLike, QuantSpec, Slot
from fxquant.quantizers.base import (
    Quantizer,
    check_factory,
    name_of_function,
    names,
    unknown_name_error,
)

__all__ = ["Recipe", "Rule", "LayerInfo"]

_UNSET: Any = object()
NONNEGATIVE_INPUT_MODES = ("warn", "error", "ignore", "drop", "move")
_PRECEDENCE = {"type": 1, "first": 2, "last": 2, "regex": 3, "name": 4}


@dataclass(frozen=True)
class LayerInfo:
    """What a rule can match on: the layer path, its module class (or None) and its function."""

    path: str
    module_type: type[nn.Module] | None
    function: Callable[..., Any] | None
    is_first: bool = False
    is_last: bool = False


@dataclass(frozen=True)
class Rule:
    """One refinement: ``kind`` is "type", "first", "last", "regex" or "name"; ``slots`` holds the
    slots it sets."""

    kind: str
    key: Any
    slots: tuple[tuple[Slot, QuantizerLike | None], ...]
    compiled: re.Pattern[str] | None = field(default=None, compare=False)

    def describe(self) -> str:
        if self.kind == "type":
            return f"type:{getattr(self.key, '__name__', repr(self.key))}"
        if self.kind in ("first", "last"):
            return self.kind
        return f"{self.kind}:{self.key}"

    def matches(self, layer: LayerInfo) -> bool:
        if self.kind in ("first", "last"):
            return layer.is_first if self.kind == "first" else layer.is_last
        if self.kind == "name":
            return layer.path == self.key
        if self.kind == "regex":
            assert self.compiled is not None
            return self.compiled.fullmatch(layer.path) is not None
        if isinstance(self.key, type):
            return layer.module_type is not None and issubclass(layer.module_type, self.key)
        return layer.function is self.key


_LARQ_SLOTS = {"kernel_quantizer": "weight", "input_quantizer": "input"}  # larq's layer args
_LARQ_HINT = "larq's kernel_quantizer -> weight, input_quantizer -> input"


def _slot_value(value: Any, where: str) -> Any:
    """``value`` checked as a slot value; a quantizer function of :mod:`fxquant.quantizers`
    (``ste_sign``, larq's habit) becomes its registry name."""
    if value is None or isinstance(value, Quantizer):
        return value
    if isinstance(value, str):
        if value not in names():
            raise unknown_name_error(value, where)
        return value
    if callable(value) and not isinstance(value, nn.Module):
        name = name_of_function(value, where)
        if name is not None:
            return name
        check_factory(value, where)
        return value
    raise ValueError(f"{where}: expected a quantizer name, a Quantizer instance, a factory or "
                     "None, "
                     f"got {value!r}")


def _unknown_slots_message(unknown: list[str], where: str, others: tuple[str, ...] = ()) -> str:
    """Unknown keyword(s) ``unknown``: the slots, larq's equivalents, close names."""
    known = [*SLOTS, *others]
    hints = []
    for key in unknown:
        guess = _LARQ_SLOTS.get(key) or next(iter(difflib.get_close_matches(key, known, n=1)),
                                             None)
        if guess is not None:
            hints.append(f"{guess}= for {key}=")
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    other = f"; other options: {', '.join(others)}" if others else ""
    return (f"{where}: unknown slot(s) {', '.join(map(repr, unknown))}{hint}; the slots are "
            f"{', '.join(SLOTS)} ({_LARQ_HINT}){other}")


def _slots(where: str, **slots: Any) -> tuple[tuple[Slot, Any], ...]:
    unknown = sorted(set(slots) - set(SLOTS))
    if unknown:
        raise ValueError(_unknown_slots_message(unknown, where))
    return tuple((s, _slot_value(slots[s], f"{where} slot {s!r}")) for s in SLOTS if s in slots)


@dataclass(frozen=True)
class Recipe:
    """Global slot choices plus refinement rules. Refinements return new recipes.

    ``nonnegative_inputs`` says what prepare does with a sign (or ternary) input quantizer that
    reads a value known to be >= 0, e.g. a relu output, where a sign is +1 everywhere: "warn"
    (default), "error", "ignore", or rewrite the graph: "drop" or "move" the activation (see
    :meth:`with_nonnegative_inputs`).
    """

    weight: QuantizerLike | None = None
    input: QuantizerLike | None = None
    output: QuantizerLike | None = None
    error: QuantizerLike | None = None
    strict: bool = False
    keep_first_last: bool = False
    rules: tuple[Rule, ...] = ()
    nonnegative_inputs: str = "warn"

    def __post_init__(self) -> None:
        for slot in SLOTS:
            value = _slot_value(getattr(self, slot), f"Recipe slot {slot!r}")
            object.__setattr__(self, slot, value)  # frozen: a function becomes its name
        if self.nonnegative_inputs not in NONNEGATIVE_INPUT_MODES:
            raise ValueError(f"Recipe: nonnegative_inputs must be one of "
                             f"{', '.join(map(repr, NONNEGATIVE_INPUT_MODES))}, got "
                             f"{self.nonnegative_inputs!r}")

    def with_nonnegative_inputs(self, mode: str) -> Recipe:
        """This recipe, with ``mode`` for sign/ternary input quantizers reading a value >= 0.

        A sign of a relu (relu6, sigmoid, softmax, abs, clamp(min=0), ... also seen through
        pooling, flatten, dropout, cat, add of such values) is +1 everywhere, so that binary
        layer's input is a constant; a ternary loses its -1 level. Modes:

        * ``"warn"`` (default): one UserWarning listing those layers and the fixes;
        * ``"error"``: a ValueError with the same text;
        * ``"ignore"``: nothing;
        * ``"drop"``: remove the activation(s) between the value and the quantizer where
          nothing else reads them (the others stay as they are and are listed in a warning);
        * ``"move"``: the quantizer reads the value before the activation, which stays for its
          other readers (a residual shortcut) and is applied again after the binary layer's
          batch norm (after the layer when no batch norm follows), as Bi-Real Net and ReActNet
          place it; not where that output already goes through the same activation or joins
          a residual ``add`` (a relu there would make the next sign's input non-negative).

        Both rewrites keep every parameter and buffer (the ``state_dict`` keys are unchanged)
        but change what the model computes. Details: :mod:`fxquant.graph.passes.nonnegative`.
        """
        return dataclasses.replace(self, nonnegative_inputs=mode)

    # -- refinements -------------------------------------------------------------------------
    def for_type(self, key: type[nn.Module] | Callable[..., Any], **slots: Any) -> Recipe:
        """Set slots for layers of a module class (subclasses too) or calls of a function."""
        if isinstance(key, type):
            if not issubclass(key, nn.Module):
                raise ValueError(f"for_type: {key.__name__} is not an nn.Module subclass")
        elif not callable(key) or isinstance(key, (nn.Module, str)):
            raise ValueError(f"for_type: expected an nn.Module class or a function such as "
                             f"torch.nn.functional.conv2d, got {key!r}")
        return self._add(Rule("type", key, _slots(f"for_type({key!r})", **slots)))

    def for_regex(self, pattern: str, **slots: Any) -> Recipe:
        """Set slots for layers whose qualified path fully matches ``pattern``."""
        if not isinstance(pattern, str):
            raise ValueError(f"for_regex: pattern must be a str, got {pattern!r}")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"for_regex: invalid regular expression {pattern!r}: {err}") from err
        return self._add(Rule("regex", pattern, _slots(f"for_regex({pattern!r})", **slots),
                              compiled))

    def for_first(self, **slots: Any) -> Recipe:
        """Set slots for the first weighted layer (in graph order)."""
        return self._add(Rule("first", None, _slots("for_first", **slots)))

    def for_last(self, **slots: Any) -> Recipe:
        """Set slots for the last weighted layer (in graph order)."""
        return self._add(Rule("last", None, _slots("for_last", **slots)))

    def for_name(self, qualified_name: str, **slots: Any) -> Recipe:
        """Set slots for the layer at exactly ``qualified_name`` (e.g. ``"layer1.0.conv1"``)."""
        if not isinstance(qualified_name, str) or not qualified_name:
            raise ValueError(f"for_name: expected a non-empty module path, got {qualified_name!r}")
        return self._add(Rule("name", qualified_name, _slots(f"for_name({qualified_name!r})",
                                                               **slots)))

    def _add(self, rule: Rule) -> Recipe:
        return dataclasses.replace(self, rules=(*self.rules, rule))

    # -- resolution --------------------------------------------------------------------------
    def resolve(self, layer: LayerInfo) -> tuple[tuple[Slot, QuantSpec], ...]:
        """The quantizer each slot gets for ``layer`` (slots left in float are omitted)."""
        chosen: dict[Slot, QuantSpec | None] = {}
        for slot in SLOTS:
            value = getattr(self, slot)
            chosen[slot] = None if value is None else QuantSpec(value, "global")
        for rule in self._ordered():
            if rule.matches(layer):
                for slot, value in rule.slots:
                    chosen[slot] = None if value is None else QuantSpec(value, rule.describe())
        return tuple((slot, spec) for slot, spec in chosen.items() if spec is not None)

    def _ordered(self) -> list[Rule]:
        implicit = []
        if self.keep_first_last:
            float_slots = tuple((s, None) for s in SLOTS)
            implicit = [Rule("first", None, float_slots), Rule("last", None, float_slots)]
        return sorted((*implicit, *self.rules), key=lambda r: _PRECEDENCE[r.kind])  # stable

    def unmatched_rules(self, layers: list[LayerInfo]) -> list[Rule]:
        """Rules that match none of ``layers`` (an error when ``strict``)."""
        return [r for r in self.rules if not any(r.matches(layer) for layer in layers)]

    # -- presets -----------------------------------------------------------------------------
    @classmethod
    def bnn(cls) -> Recipe:
        """BinaryNet (Hubara et al. 2016): ste_sign weights and inputs; first/last layer float."""
        return cls(weight="ste_sign", input="ste_sign", keep_first_last=True)

    @classmethod
    def xnor(cls) -> Recipe:
        """XNOR-Net (Rastegari et al. 2016): magnitude-aware (α·sign) weights, ste_sign inputs."""
        return cls(weight="magnitude_aware_sign", input="ste_sign", keep_first_last=True)

    @classmethod
    def bireal(cls) -> Recipe:
        """Bi-Real Net (Liu et al. 2018): magnitude-aware weights, approx_sign inputs."""
        return cls(weight="magnitude_aware_sign", input="approx_sign", keep_first_last=True)

    @classmethod
    def twn(cls) -> Recipe:
        """Ternary Weight Networks (Li et al. 2016): ternary weights, Δ = 0.7·mean|W|."""
        from fxquant.quantizers.ternary import SteTern

        return cls(weight=SteTern(ternary_weight_networks=True), keep_first_last=True)

    @classmethod
    def dorefa(cls, w_bits: int = 2, a_bits: int = 2) -> Recipe:
        """DoReFa-Net (Zhou et al. 2016): k-bit tanh-normalised weights, k-bit [0, 1] inputs."""
        from fxquant.quantizers.kbit import DoReFa

        return cls(weight=DoReFa(w_bits, mode="weights"), input=DoReFa(a_bits, mode="activations"),
                   keep_first_last=True)

    @classmethod
    def wage(cls, *, bits_W: int = 2, bits_A: int = 8, bits_G: int = 8,  # noqa: N803
             bits_E: int = 8, A_mode: str = "nearest", E_mode: str = "nearest") -> Recipe:  # noqa: N803
        """WAGE (Wu et al. 2018, arXiv:1802.04680) placed as QPyTorch's VGG example does.

        Every argument is keyword-only (``Recipe.wage(bits_W=2, bits_A=8, bits_G=8, bits_E=8)``):
        the paper's order W-A-G-E and other write-ups differ, and a positional call could set
        ``bits_G`` where ``bits_E`` was meant without any error.

        QW weights (``WAGEWeight(bits_W)``); ``WAGEQuantizer(bits_A, -1)`` on the network input;
        ``WAGEQuantizer(bits_A, bits_E)`` after every hidden layer's activation (QA forward; QE
        backward, zeroed where QA clamped); ``WAGEError(bits_E)`` on the logits. ``bits_G``
        belongs to the update, not the graph: it is validated here so one call names the whole
        W-A-G-E configuration; pass it to :class:`fxquant.wage.WAGEOptimizer`. QPyTorch's
        ``reproduce.sh`` uses ``E_mode="stochastic"`` (seed with ``fxquant.wage.seed_rounding``).
        """
        from fxquant.wage import WAGEError, WAGEQuantizer, WAGEWeight

        if isinstance(bits_G, bool) or not isinstance(bits_G, int) or bits_G < 1:
            raise ValueError(f"Recipe.wage: bits_G must be an int >= 1, got {bits_G!r}")
        return (cls(weight=WAGEWeight(bits_W),
                    output=WAGEQuantizer(bits_A, bits_E, A_mode=A_mode, E_mode=E_mode))
                .for_first(input=WAGEQuantizer(bits_A, -1, A_mode=A_mode))
                .for_last(output=None, error=WAGEError(bits_E, mode=E_mode)))


def _naming_unknown_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap the dataclass ``__init__``: an unknown keyword (larq's ``kernel_quantizer=``) is a
    TypeError naming the slots and larq's equivalents, not Python's bare "unexpected keyword"."""

    @functools.wraps(init)
    def __init__(self: Recipe, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(Recipe)})
        if unknown:
            raise TypeError(_unknown_slots_message(
                unknown, "Recipe()", others=("strict", "keep_first_last", "nonnegative_inputs")))
        init(self, *args, **kwargs)

    return __init__


Recipe.__init__ = _naming_unknown_arguments(Recipe.__init__)  # type: ignore[method-assign]
