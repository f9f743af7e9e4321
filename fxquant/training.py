"""Training helpers for prepared models: switch quantizers, schedule them, clip latent weights.

Everything here works on the GraphModule returned by :func:`fxquant.prepare` and finds the
quantizers through the :class:`~fxquant.graph.meta.QuantRecord` on their call nodes; nothing is
stored in the ``state_dict``, so checkpoints keep the float model's keys.

* :func:`quantizers` lists the quantizer submodules (by role and layer);
  :func:`set_quantizers_enabled` switches them off (identity) and on;
  :class:`DelayedQuantization` trains in float for the first N steps, then quantized.
* :class:`ProgressiveSignScheduler` anneals bitorch's :class:`~fxquant.quantizers.ProgressiveSign`.
* :func:`clip_latent_weights` and :class:`LatentWeightClip` keep the latent weights of binary
  layers in ``[-c, c]`` (larq's ``weight_clip``); :func:`install_clip_warning` warns once per model
  when binary latent weights leave their quantizer's gradient window unclipped.
* :func:`parameter_groups` splits the parameters into latent binary weights and real-valued ones
  for an optimizer (larq's ``CaseOptimizer`` / Bop practice).

A complete loop:

>>> import torch, torch.nn as nn, torch.nn.functional as F, fxquant
>>> from fxquant import training
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> gm = fxquant.prepare(model, fxquant.Recipe.bnn())
>>> opt = torch.optim.Adam(training.parameter_groups(gm, real={"weight_decay": 1e-4}), lr=1e-3)
>>> clip = training.LatentWeightClip(gm, opt)           # clips after every opt.step()
>>> delay = training.DelayedQuantization(gm, start_step=2)
>>> for _ in range(3):
...     loss = F.cross_entropy(gm(torch.randn(5, 4)), torch.tensor([0, 1, 0, 1, 0]))
...     opt.zero_grad(); loss.backward(); opt.step(); delay.step()
>>> delay.quantizing, float(gm.get_parameter("2.weight").detach().abs().max()) <= 1.0
(True, True)
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, NamedTuple, Union

import torch
import torch.fx
import torch.optim.optimizer as optimizer_hooks
from torch import nn

from fxquant._text import listing
from fxquant._user_code import user_stacklevel
from fxquant.graph.meta import SLOTS, QuantRecord, get_record
from fxquant.graph.module import all_nodes, preserve
from fxquant.quantizers.base import Quantizer
from fxquant.quantizers.sign import (
    ApproxSign,
    MagnitudeAwareSign,
    ProgressiveSign,
    SteHeaviside,
    SteSign,
    set_progressive_sign_scale,
)

__all__ = [
    "QuantizerEntry", "quantizers", "set_quantizers_enabled", "DelayedQuantization",
    "ProgressiveSignScheduler", "latent_weights", "clip_latent_weights", "LatentWeightClip",
    "install_clip_warning", "parameter_groups",
]

Roles = Union[str, Iterable[str], None]
Layers = Union[str, "re.Pattern[str]", Iterable[str], None]

_ROLE_OF = {slot: f"{slot}_quantizer" for slot in SLOTS}  # "weight" -> "weight_quantizer"


class QuantizerEntry(NamedTuple):
    """One quantizer of a prepared model: submodule name, the module, and its call node's record."""

    name: str
    module: Quantizer
    record: QuantRecord


# ------------------------------------------------------------------------------------------------
# Selecting quantizers


def _all_quantizers(gm: torch.fx.GraphModule, who: str,
                    nodes: Iterable[torch.fx.Node] | None = None) -> list[QuantizerEntry]:
    """Every quantizer called in ``gm``'s graph (``nodes``: its :func:`all_nodes`, when the
    caller has them), in graph order, each submodule once."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"{who} expects a GraphModule returned by fxquant.prepare, "
                        f"got {type(gm).__name__}")
    entries: dict[str, QuantizerEntry] = {}
    for node in all_nodes(gm) if nodes is None else nodes:
        record = get_record(node)
        if (node.op == "call_module" and record is not None
                and record.role.endswith("_quantizer") and node.target not in entries):
            module = gm.get_submodule(str(node.target))
            if isinstance(module, Quantizer):
                entries[str(node.target)] = QuantizerEntry(str(node.target), module, record)
    return list(entries.values())


def _check_roles(roles: Roles, who: str) -> set[str] | None:
    """``roles`` as record roles ("weight" or "weight_quantizer" -> "weight_quantizer")."""
    if roles is None:
        return None
    known = ", ".join(SLOTS)
    chosen = set()
    for role in [roles] if isinstance(roles, str) else list(roles):
        full = _ROLE_OF.get(role, role) if isinstance(role, str) else None
        if full not in _ROLE_OF.values():
            raise ValueError(f"{who}: unknown quantizer role {role!r}; roles are {known}")
        chosen.add(full)
    return chosen


def _check_layers(layers: Layers, known: list[str], who: str) -> set[str] | None:
    """The layer paths ``layers`` selects among ``known`` (the quantized layers of the model)."""
    if layers is None:
        return None
    if isinstance(layers, (str, re.Pattern)):
        try:
            pattern = re.compile(layers)
        except re.error as err:
            raise ValueError(f"{who}: invalid layers pattern {layers!r}: {err}") from err
        matched = {path for path in known if pattern.fullmatch(path)}
        if not matched:
            raise ValueError(f"{who}: layers pattern {pattern.pattern!r} matches no quantized "
                             f"layer; quantized layers: {listing(known)}")
        return matched
    paths = list(layers)
    bad = [p for p in paths if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{who}: layers takes a regex string, a compiled pattern or layer paths "
                         f"(str), got {bad!r}")
    unknown = [p for p in paths if p not in known]
    if unknown:
        raise ValueError(f"{who}: no quantized layer named {listing(unknown)}; quantized layers: "
                         f"{listing(known)}")
    return set(paths)


def quantizers(gm: torch.fx.GraphModule, roles: Roles = None, layers: Layers = None
               ) -> list[QuantizerEntry]:
    """The quantizers of a prepared model, in graph order, optionally filtered.

    ``roles``: a slot name or several (``"weight"``, ``"input"``, ``"output"``, ``"error"``; the
    record spelling ``"weight_quantizer"`` works too); None selects all. ``layers``: a ``str`` or
    compiled pattern is a regular expression matched in full against the layer path (as
    :meth:`fxquant.Recipe.for_regex`); any other iterable lists exact layer paths (``"fc2"``,
    ``"layer1.0.conv1"``); None selects all. An unknown role, an unknown path or a pattern that
    matches no quantized layer raises ``ValueError``; a valid selection may be empty.

    >>> import torch.nn as nn, fxquant
    >>> gm = fxquant.prepare(nn.Sequential(nn.Linear(2, 2)), fxquant.Recipe(weight="ste_sign"))
    >>> [(e.name, e.record.role, e.record.layer, e.module.bits) for e in quantizers(gm)]
    [('0_weight_quantizer', 'weight_quantizer', '0', 1)]
    >>> quantizers(gm, roles="input")
    []
    """
    return _filter(gm, roles, layers, "quantizers")


def _filter(gm: torch.fx.GraphModule, roles: Roles, layers: Layers, who: str
            ) -> list[QuantizerEntry]:
    entries = _all_quantizers(gm, who)
    chosen_roles = _check_roles(roles, who)
    known = list(dict.fromkeys(e.record.layer for e in entries))
    chosen_layers = _check_layers(layers, known, who)
    return [e for e in entries
            if (chosen_roles is None or e.record.role in chosen_roles)
            and (chosen_layers is None or e.record.layer in chosen_layers)]


def _select(gm: torch.fx.GraphModule, roles: Roles, layers: Layers, who: str
            ) -> list[QuantizerEntry]:
    """:func:`_filter`, but an empty selection is a ValueError naming what the model has."""
    chosen = _filter(gm, roles, layers, who)
    if not chosen:
        present = sorted({e.record.role.removesuffix("_quantizer")
                          for e in _all_quantizers(gm, who)})
        raise ValueError(f"{who}: roles={roles!r}, layers={layers!r} selects no quantizer; this "
                         f"model has {', '.join(present) or 'no'} quantizers"
                         + ("" if present else " (was it returned by fxquant.prepare?)"))
    return chosen


def set_quantizers_enabled(gm: torch.fx.GraphModule, enabled: bool, *, roles: Roles = None,
                           layers: Layers = None) -> list[str]:
    """Switch the selected quantizers on or off; return their submodule names.

    A disabled quantizer returns its input unchanged (see :class:`fxquant.quantizers.Quantizer`),
    so with every quantizer off the prepared model computes exactly what the float model does,
    gradients included; switching them on again restores the quantized model. ``roles`` and
    ``layers`` select as in :func:`quantizers`; a selection that matches nothing raises
    ``ValueError`` (so a typo cannot silently leave a model quantized).

    The flag is a plain attribute: it is not saved by ``state_dict`` or :func:`fxquant.save`
    (a loaded model has every quantizer on). Enable every quantizer before :func:`fxquant.convert`:
    it folds a disabled weight quantizer to the float weight but still lowers a disabled
    activation quantizer to its quantized inference form.

    >>> import torch, torch.nn as nn, fxquant
    >>> model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    >>> gm = fxquant.prepare(model, fxquant.Recipe.bnn())
    >>> set_quantizers_enabled(gm, False)
    ['1_weight_quantizer', '1_input_quantizer']
    >>> x = torch.randn(2, 3)
    >>> torch.equal(gm(x), model(x))
    True
    >>> set_quantizers_enabled(gm, True, roles="weight", layers=["1"])
    ['1_weight_quantizer']
    """
    who = "set_quantizers_enabled"
    if not isinstance(enabled, bool):
        raise ValueError(f"{who}: enabled must be a bool, got {enabled!r}")
    chosen = _select(gm, roles, layers, who)
    for entry in chosen:
        entry.module.enabled = enabled
    return [e.name for e in chosen]


class DelayedQuantization:
    """Train in float for the first ``start_step`` steps, then quantized (a delayed start).

    Call :meth:`step` once per optimizer step, like a learning-rate scheduler. The selected
    quantizers (``roles`` / ``layers`` as in :func:`quantizers`; by default all) are disabled at
    construction when ``start_step > 0`` and enabled when :meth:`step` has been called
    ``start_step`` times, so forward passes ``0 .. start_step - 1`` run in float and pass
    ``start_step`` onwards is quantized (torch.ao's ``fake_quant`` delay, counted in steps).
    ``start_step = 0`` quantizes from the start.

    The switch is applied at construction, when the count reaches ``start_step`` and by
    :meth:`load_state_dict`; in between the flags are left alone, so :func:`set_quantizers_enabled`
    can still override them. :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    count for resumed runs. Latent weights keep training in the float phase, and
    :func:`clip_latent_weights` still applies to them.

    >>> import torch, torch.nn as nn, fxquant
    >>> gm = fxquant.prepare(nn.Sequential(nn.Linear(2, 2)), fxquant.Recipe(weight="ste_sign"))
    >>> delay = DelayedQuantization(gm, start_step=2)
    >>> flags = []
    >>> for _ in range(3):
    ...     flags.append(gm.get_submodule("0_weight_quantizer").enabled)
    ...     delay.step()
    >>> flags
    [False, False, True]
    """

    def __init__(self, gm: torch.fx.GraphModule, start_step: int, *, roles: Roles = None,
                 layers: Layers = None) -> None:
        who = "DelayedQuantization"
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"{who}: start_step must be an int >= 0, got {start_step!r}")
        self.start_step = start_step
        self.modules = [e.module for e in _select(gm, roles, layers, who)]
        self.step_count = 0
        self._apply()

    @property
    def quantizing(self) -> bool:
        """True once :meth:`step` has been called ``start_step`` times."""
        return self.step_count >= self.start_step

    def step(self) -> None:
        """Count one training step; at ``start_step`` steps, enable the quantizers."""
        self.step_count += 1
        if self.step_count == self.start_step:
            self._apply()

    def _apply(self) -> None:
        for module in self.modules:
            module.enabled = self.quantizing

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count, "start_step": self.start_step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the step count (and start step) and set the quantizers accordingly."""
        self.step_count = int(state["step_count"])
        self.start_step = int(state.get("start_step", self.start_step))
        self._apply()


# ------------------------------------------------------------------------------------------------
# ProgressiveSign


class ProgressiveSignScheduler:
    """Anneal :class:`~fxquant.quantizers.ProgressiveSign`'s scale from 0 to 1 over training.

    The scale after ``k`` calls of :meth:`step` is ``fn(k)`` if ``fn`` is given, else
    ``min(k, total_steps) / total_steps`` (0 at the start, 1 from step ``total_steps`` on;
    bitorch's example callback uses ``epoch / max_epochs``). Construction applies step 0.

    Each value is written to the process-wide scale (:func:`set_progressive_sign_scale`, read by
    every ``ProgressiveSign(use_global_scaling=True)``) and, when ``gm`` (any module) is given, to
    the ``scale`` attribute of its ProgressiveSign instances with ``use_global_scaling=False``. A
    ``gm`` without any ProgressiveSign is a ValueError. ``fn`` must return finite real numbers.
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the step count.

    Distributed training (torchrun, ``mp.spawn``): create and step the scheduler on every rank.
    The global scale is a value of the process, which a started process does not inherit, and
    a global ``ProgressiveSign`` that trains where it was never set warns once
    (:func:`~fxquant.quantizers.set_progressive_sign_scale`).

    >>> import torch.nn as nn, fxquant
    >>> from fxquant.quantizers import ProgressiveSign, get_progressive_sign_scale
    >>> recipe = fxquant.Recipe(weight=ProgressiveSign(use_global_scaling=False, initial_scale=0.0))
    >>> gm = fxquant.prepare(nn.Sequential(nn.Linear(2, 2)), recipe)
    >>> scheduler = ProgressiveSignScheduler(4, gm=gm)
    >>> scheduler.step(); scheduler.step()
    >>> gm.get_submodule("0_weight_quantizer").scale, get_progressive_sign_scale()
    (0.5, 0.5)
    >>> _ = ProgressiveSignScheduler(10, fn=lambda step: 0.0)  # reset the global scale
    """

    def __init__(self, total_steps: int, fn: Callable[[int], float] | None = None,
                 gm: nn.Module | None = None) -> None:
        who = "ProgressiveSignScheduler"
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{who}: total_steps must be an int >= 1, got {total_steps!r}")
        if fn is not None and not callable(fn):
            raise ValueError(f"{who}: fn must be a callable step -> scale, got {fn!r}")
        self.instances: list[ProgressiveSign] = []
        if gm is not None:
            if not isinstance(gm, nn.Module):
                raise TypeError(f"{who}: gm must be an nn.Module, got {type(gm).__name__}")
            found = [m for m in gm.modules() if isinstance(m, ProgressiveSign)]
            if not found:
                raise ValueError(f"{who}: gm has no ProgressiveSign quantizer; leave gm=None to "
                                 "drive only the global scale")
            self.instances = [m for m in found if not m.use_global_scaling]
        self.total_steps = total_steps
        self.fn = fn
        self.step_count = 0
        self.scale = 0.0
        self._apply()

    def scale_at(self, step: int) -> float:
        """The scale after ``step`` calls of :meth:`step`."""
        if self.fn is None:
            return min(step, self.total_steps) / self.total_steps
        value = self.fn(step)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                float(value)):
            raise ValueError(f"ProgressiveSignScheduler: fn({step}) must return a finite real "
                             f"number, got {value!r}")
        return float(value)

    def step(self) -> None:
        """Count one step and apply the new scale."""
        self.step_count += 1
        self._apply()

    def _apply(self) -> None:
        self.scale = self.scale_at(self.step_count)
        set_progressive_sign_scale(self.scale)
        for module in self.instances:
            module.scale = self.scale

    def state_dict(self) -> dict[str, int]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restore the step count and apply its scale."""
        self.step_count = int(state["step_count"])
        self._apply()


# ------------------------------------------------------------------------------------------------
# Latent weights: clipping, the missing-clip warning, parameter groups

Bits = Union[Collection[int], None]


def _weight_sources(gm: torch.fx.GraphModule, bits: Bits, who: str
                    ) -> list[tuple[QuantizerEntry, str, nn.Parameter]]:
    """(weight quantizer, latent parameter name, parameter) for quantizers whose bits are in
    ``bits`` (None: every weight quantizer) and whose input is a parameter of ``gm``."""
    if bits is not None:
        bits = set(bits)
        if not bits or any(isinstance(b, bool) or not isinstance(b, int) for b in bits):
            raise ValueError(f"{who}: bits must be a non-empty collection of ints or None, "
                             f"got {bits!r}")
    nodes = list(all_nodes(gm)) if isinstance(gm, torch.fx.GraphModule) else []
    by_name = {e.name: e for e in _all_quantizers(gm, who, nodes)
               if e.record.role == "weight_quantizer"}
    found = []
    for node in nodes:  # the flat graph of a model with blocks is built once
        entry = by_name.get(str(node.target)) if node.op == "call_module" else None
        if entry is None or (bits is not None and entry.module.bits not in bits):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
            continue
        try:
            param = gm.get_parameter(str(source.target))
        except AttributeError:  # a buffer or a constant: nothing trains it
            continue
        found.append((entry, str(source.target), param))
    return found


def latent_weights(gm: torch.fx.GraphModule, *, bits: Bits = (1,)) -> dict[str, nn.Parameter]:
    """The latent weight parameters read by weight quantizers of ``bits`` bits, by name.

    ``bits=(1,)`` (default) selects binary layers, as larq's ``precision == 1`` does; ``(1, 2)``
    adds ternary ones; None selects every weight quantizer. Names are the parameters' qualified
    names (their ``state_dict`` keys), in graph order, each parameter once (tied weights too).

    >>> import torch.nn as nn, fxquant
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    >>> recipe = fxquant.Recipe(weight="ste_sign").for_name("2", weight="ste_tern")
    >>> list(latent_weights(fxquant.prepare(model, recipe)))
    ['0.weight', '1.weight', '3.weight']
    """
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for _, name, param in _weight_sources(gm, bits, "latent_weights"):
        if id(param) not in seen:
            seen.add(id(param))
            params[name] = param
    return params


def _check_clip_value(clip_value: float, who: str) -> float:
    if (isinstance(clip_value, bool) or not isinstance(clip_value, (int, float))
            or not math.isfinite(clip_value) or clip_value <= 0):
        raise ValueError(f"{who}: clip_value must be a finite number > 0, got {clip_value!r}")
    return float(clip_value)


def _clip(params: Iterable[torch.Tensor], clip: float) -> None:
    with torch.no_grad():
        for param in params:
            param.clamp_(-clip, clip)


def clip_latent_weights(gm: torch.fx.GraphModule, clip_value: float = 1.0, *,
                        bits: Bits = (1,)) -> list[str]:
    """Clamp the latent weights of binary layers to ``[-clip_value, clip_value]`` in place.

    larq's ``weight_clip`` constraint: call it after every ``optimizer.step()`` (or install
    :class:`LatentWeightClip` once). Latent weights outside the straight-through window
    ``abs(w) <= 1`` get no gradient and would never flip sign again. ``bits`` selects the layers
    as in :func:`latent_weights` (binary by default; ternary is opt-in with ``bits=(1, 2)``).
    A parameter that also feeds a float op (tied weights) is clipped all the same. NaN stays NaN.
    Returns the names of the clipped parameters; the missing-clip warning
    (:func:`install_clip_warning`) is switched off for their quantizers.

    >>> import torch, torch.nn as nn, fxquant
    >>> gm = fxquant.prepare(nn.Sequential(nn.Linear(2, 2)), fxquant.Recipe(weight="ste_sign"))
    >>> with torch.no_grad():
    ...     _ = gm.get_parameter("0.weight").copy_(torch.tensor([[-3.0, 0.5], [2.0, -0.25]]))
    >>> clip_latent_weights(gm)
    ['0.weight']
    >>> gm.get_parameter("0.weight")
    Parameter containing:
    tensor([[-1.0000,  0.5000],
            [ 1.0000, -0.2500]], requires_grad=True)
    """
    who = "clip_latent_weights"
    clip = _check_clip_value(clip_value, who)
    sources = _weight_sources(gm, bits, who)
    params = {name: param for _, name, param in sources}
    _clip(params.values(), clip)
    _stop_clip_checks(e.module for e, _, _ in sources)
    return list(params)


class LatentWeightClip:
    """Clip binary latent weights after every ``optimizer.step()`` (an optimizer post-step hook).

    The set-and-forget form of :func:`clip_latent_weights` (same ``clip_value`` and ``bits``):
    the parameters are found once, here, and clamped after each step of ``optimizer``. Nothing
    is clipped at construction (larq's constraint also acts only after updates). A model without
    such latent weights, or an optimizer that updates none of them, is a ValueError. :meth:`clip`
    clips now; :meth:`remove` uninstalls the hook.

    >>> import torch, torch.nn as nn, fxquant
    >>> gm = fxquant.prepare(nn.Sequential(nn.Linear(2, 2)), fxquant.Recipe(weight="ste_sign"))
    >>> opt = torch.optim.SGD(gm.parameters(), lr=100.0)
    >>> clip = LatentWeightClip(gm, opt)
    >>> gm(torch.randn(4, 2)).sum().backward(); opt.step()
    >>> float(gm.get_parameter("0.weight").detach().abs().max())
    1.0
    """

    def __init__(self, gm: torch.fx.GraphModule, optimizer: torch.optim.Optimizer,
                 clip_value: float = 1.0, *, bits: Bits = (1,)) -> None:
        who = "LatentWeightClip"
        self.clip_value = _check_clip_value(clip_value, who)
        sources = _weight_sources(gm, bits, who)
        self.params = {name: param for _, name, param in sources}
        if not self.params:
            raise ValueError(f"{who}: the model has no latent weights of weight quantizers with "
                             f"bits in {bits!r} to clip (bits=(1, 2) adds ternary layers)")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in in_optimizer for p in self.params.values()):
            raise ValueError(f"{who}: the optimizer updates none of the latent weights "
                             f"{listing(self.params)}; pass the optimizer that trains them")
        self._handle = optimizer.register_step_post_hook(self._after_step)
        _stop_clip_checks(e.module for e, _, _ in sources)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.clip()

    def clip(self) -> None:
        """Clamp the latent weights to ``[-clip_value, clip_value]`` now."""
        _clip(self.params.values(), self.clip_value)

    def remove(self) -> None:
        """Stop clipping after optimizer steps."""
        self._handle.remove()


def _gradient_window(module: nn.Module) -> float | None:
    """The half-width ``c`` of ``module``'s surrogate-gradient window (its gradient is exactly 0
    where ``abs(x) > c``), or None where the gradient never vanishes.

    ``ste_sign``, ``magnitude_aware_sign`` and ``ste_heaviside`` pass ``g`` where
    ``abs(x) <= clip_value`` (``clip_value=None``: everywhere); ``approx_sign`` where
    ``abs(x) <= 1``. ``swish_sign``'s gradient decays but is never cut off, ProgressiveSign's is
    the identity, and other quantizers are not known to have a window: None for all of them.
    """
    if isinstance(module, (SteSign, MagnitudeAwareSign, SteHeaviside)):
        return module.clip_value
    if isinstance(module, ApproxSign):
        return 1.0
    return None


_MAX_CHECK_INTERVAL = 1024  # optimizer steps between two value checks, once training is long
_WATCH_ATTR = "_fxquant_clip_watch"  # the prepared model's _ClipWatch (kept by copies, pickles)
_WATCHES: weakref.WeakSet[_ClipWatch] = weakref.WeakSet()  # every live model's watch
_OPTIMIZER_HOOKS: list[Any] = []  # the two global optimizer hooks, registered once


class _Watched(NamedTuple):
    """A watched binary weight quantizer and where its latent weight lives: ``owner.attr`` is
    read afresh at every check (a parameter swapped by ``.to()`` or a wrapper is seen)."""

    quantizer: nn.Module
    owner: nn.Module
    attr: str
    label: str  # the layer (or quantizer) name the warning gives

    def latent(self) -> torch.Tensor | None:
        """The latent weight, if the quantizer is on and the weight is trained."""
        latent = getattr(self.owner, self.attr, None)
        if not (isinstance(latent, torch.Tensor) and latent.requires_grad
                and getattr(self.quantizer, "enabled", True)):
            return None
        return latent


class _ClipWatch:
    """One model's clip check: the watched quantizers, whether the warning was given, the
    optimizer steps counted and the step of the next value check. Every live watch is in
    ``_WATCHES``; copies and pickles keep ``warned`` and the watched modules (theirs, through
    the copy's memo), and count steps afresh."""

    def __init__(self, entries: Iterable[_Watched] = ()) -> None:
        self.entries = list(entries)
        self.warned = False
        self.steps = 0
        self.next_check = 1
        self.due = False
        _WATCHES.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"warned": self.warned, "entries": self.entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.get("entries", ()))  # type: ignore[misc]
        self.warned = state["warned"]

    def trained_by(self, params: set[int]) -> bool:
        """Whether an optimizer holding the parameters ``params`` (ids) updates a watched
        latent weight."""
        return any(id(latent) in params for e in self.entries if (latent := e.latent()) is not None)

    def count_step(self) -> None:
        """Count an optimizer step; a value check is due after steps 1, 2, 4, 8, ... and then
        every 1024 steps (made at the next step's start, after any clipping by hand)."""
        self.steps += 1
        if self.steps >= self.next_check:
            self.next_check = self.steps + min(self.steps, _MAX_CHECK_INTERVAL)
            self.due = True

    def check(self) -> None:
        """Warn (once) if a watched latent weight has a value outside its quantizer's window."""
        windowed = []
        for entry in self.entries:
            latent, window = entry.latent(), _gradient_window(entry.quantizer)
            if latent is not None and window is not None:
                latent = latent.to_local() if hasattr(latent, "to_local") else latent  # a shard
                if latent.numel():
                    windowed.append((entry, latent, window))
        if not windowed:
            return
        with torch.no_grad():  # one reduction per latent, one synchronisation for all of them
            pairs = [torch.stack(torch.aminmax(latent.detach())).float()
                     for _, latent, _ in windowed]
            ends = torch.stack([p.to(pairs[0].device) for p in pairs]).tolist()
        outside = [(entry, window, peak) for (entry, _, window), (low, high)
                   in zip(windowed, ends, strict=True)
                   if (peak := max(-low, high)) > window]  # NaN is another problem: False
        if not outside:
            return
        self.warned = True
        _WATCHES.discard(self)
        layers = listing((f"{e.label!r} (max |w| = {peak:.3g}, window [-{w:g}, {w:g}])"
                          for e, w, peak in outside), limit=5)
        warnings.warn(f"fxquant: latent binary weights of layer(s) {layers} left their "
                      "quantizer's straight-through gradient window unclipped; values outside it "
                      "get no gradient and stop flipping sign. Clip them after every "
                      "optimizer.step(): fxquant.training.clip_latent_weights(model), or install "
                      "fxquant.training.LatentWeightClip(model, optimizer) once (larq's "
                      "weight_clip). This warning is given once per model.", UserWarning,
                      stacklevel=user_stacklevel())


def _watches_trained_by(optimizer: torch.optim.Optimizer, due_only: bool = False
                        ) -> list[_ClipWatch]:
    watches = [w for w in list(_WATCHES)
               if not w.warned and w.entries and (w.due or not due_only)]
    if not watches:
        return []
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [w for w in watches if w.trained_by(params)]


@torch.compiler.disable
def _before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer pre-hook: make the value checks that are due (none at most steps, and
    then it returns before looking at the optimizer's parameters). The latent weights are then
    those the last forward used, after any clipping by hand since the last step."""
    for watch in _watches_trained_by(optimizer, due_only=True):
        watch.due = False
        watch.check()


@torch.compiler.disable
def _after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer post-hook: count the step for every model it trained."""
    for watch in _watches_trained_by(optimizer):
        watch.count_step()


def _hook_optimizers() -> None:
    if not _OPTIMIZER_HOOKS:
        _OPTIMIZER_HOOKS.append(optimizer_hooks.register_optimizer_step_pre_hook(_before_step))
        _OPTIMIZER_HOOKS.append(optimizer_hooks.register_optimizer_step_post_hook(_after_step))


class _ClipCheck:
    """The forward pre-hook earlier versions put on quantizers; one unpickled from such a model
    does nothing (the check now runs from optimizer hooks, see :func:`install_clip_warning`)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        pass

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        return None


def _stop_clip_checks(modules: Iterable[nn.Module]) -> None:
    """Stop watching the quantizers ``modules`` (their latent weights are clipped)."""
    stopped = {id(m) for m in modules}
    for watch in list(_WATCHES):
        watch.entries = [e for e in watch.entries if id(e.quantizer) not in stopped]


def install_clip_warning(gm: torch.fx.GraphModule) -> int:
    """Warn once per model when binary latent weights leave their gradient window unclipped;
    return the number of quantizers watched.

    :func:`fxquant.prepare` calls it. It watches every binary (``bits == 1``) weight quantizer
    whose surrogate gradient has a window, i.e. is exactly 0 where ``abs(w) > c``: ``ste_sign``,
    ``magnitude_aware_sign`` and ``ste_heaviside`` (``c`` is their ``clip_value``; None means no
    window, never watched) and ``approx_sign`` (``c = 1``), when it reads a parameter.
    Quantizers whose gradient has no window, such as ProgressiveSign (identity gradient) and
    ``swish_sign`` (it decays but is never cut off), are not watched: clipping is not what they
    need.

    The check looks at values, not at how they got there, and runs from two global optimizer
    hooks (``torch.optim.optimizer.register_optimizer_step_pre_hook`` and ``..._post_hook``),
    never in the model's forward, so ``torch.compile`` sees nothing of it (no graph break, no
    recompilation) and compiled models are checked alike. Every ``step()`` of a
    ``torch.optim.Optimizer`` that updates a watched latent weight is counted; after steps 1, 2,
    4, 8, ..., 1024 and then every 1024 steps, the *next* ``step()`` starts by computing the
    smallest and largest value of every watched latent weight (one reduction each, one
    host-device synchronisation for the model) and warns if one lies outside its quantizer's
    window, naming the layers. The values checked are those the forward and backward in between
    used, so clipping by hand after ``optimizer.step()`` (``p.clamp_(-1, 1)`` under
    ``torch.no_grad()``, ``p.data.clamp_(-1, 1)``, :func:`clip_latent_weights`) never warns, nor
    does training that has made fewer than two steps, a disabled quantizer or a frozen latent.
    :func:`clip_latent_weights` and :class:`LatentWeightClip` stop the watch of the quantizers
    they clip, and once the warning is given the model is not checked again. The warning points
    at the caller's line outside torch and fxquant (the ``optimizer.step()`` of the training
    loop). Optimizers that are not ``torch.optim.Optimizer`` instances are not seen.

    The watch travels with ``copy.deepcopy`` and pickle (a copy counts steps afresh and warns
    if the original has not). Installing twice watches each quantizer once.

    >>> import warnings, torch, torch.nn as nn, fxquant
    >>> gm = fxquant.prepare(nn.Sequential(nn.Linear(2, 2)), fxquant.Recipe(weight="ste_sign"))
    >>> install_clip_warning(gm)  # prepare has installed it already: watched once
    1
    >>> opt = torch.optim.SGD(gm.parameters(), lr=10.0)  # one step throws weights out of [-1, 1]
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     for _ in range(3):
    ...         gm(torch.ones(4, 2)).sum().backward(); opt.step()
    >>> len(caught)
    1
    """
    watched: dict[str, _Watched] = {}
    for entry, name, _ in _weight_sources(gm, (1,), "install_clip_warning"):
        if (entry.record.role != "weight_quantizer" or entry.name in watched
                or _gradient_window(entry.module) is None):
            continue
        owner, _, attr = name.rpartition(".")
        watched[entry.name] = _Watched(entry.module, gm.get_submodule(owner), attr,
                                       entry.record.layer or entry.name)
    watch = gm.__dict__.get(_WATCH_ATTR)
    if isinstance(watch, _ClipWatch):
        watch.entries = list(watched.values())
    elif watched:
        preserve(gm, _WATCH_ATTR, _ClipWatch(watched.values()))
    if watched:
        _hook_optimizers()
    return len(watched)


def parameter_groups(gm: torch.fx.GraphModule, latent: Mapping[str, Any] | None = None,
                     real: Mapping[str, Any] | None = None, *, bits: Bits = (1,)
                     ) -> list[dict[str, Any]]:
    """Optimizer parameter groups: ``[latent binary weights, every other parameter]``.

    The first group holds the latent weights of :func:`latent_weights` (``bits`` as there), the
    second every other parameter of ``gm`` (biases, batch norm, float layers, ternary or k-bit
    latents unless ``bits`` includes them), each parameter exactly once, in ``gm.parameters()``
    order. ``latent`` and ``real`` are the options of each group (``lr``, ``weight_decay``, ...),
    e.g. no weight decay on binary latents, as larq's ``CaseOptimizer`` + Bop setups separate
    them. Both groups are always present (possibly empty, which torch optimizers accept).

    >>> import torch, torch.nn as nn, fxquant
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    >>> gm = fxquant.prepare(model, fxquant.Recipe.bnn())
    >>> groups = parameter_groups(gm, latent={"weight_decay": 0.0}, real={"weight_decay": 1e-4})
    >>> [len(g["params"]) for g in groups], groups[0]["weight_decay"]
    ([1, 5], 0.0)
    >>> opt = torch.optim.Adam(groups, lr=1e-3)
    """
    for label, options in (("latent", latent), ("real", real)):
        if options is not None and "params" in options:
            raise ValueError(f"parameter_groups: {label} holds group options; it cannot set "
                             "'params'")
    chosen = {id(p) for p in latent_weights(gm, bits=bits).values()}
    params = list(gm.parameters())
    return [{**(latent or {}), "params": [p for p in params if id(p) in chosen]},
            {**(real or {}), "params": [p for p in params if id(p) not in chosen]}]
