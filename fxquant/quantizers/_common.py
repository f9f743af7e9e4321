"""Private helpers shared by the sign family (:mod:`.sign`) and :mod:`.ternary`.

Argument checks, the exact saturating sign (``clamp(bias + B*B*x)``), the exact gradient select on
integer views, and the NaN pass-through of the plain-op inference forms. Nothing here is public.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

__all__: list[str] = []  # private helpers only: import them by name

# Integer dtype of the same width as each float dtype, for the exact one-pass gradient select.
_SAME_WIDTH_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _check_real(value: object, who: str, arg: str, *, minimum: float | None = None,
                allow_inf: bool = False) -> float:
    """``float(value)`` if it is a real number (not bool, not NaN, >= minimum), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{who}: {arg} must be a real number, got {value!r}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ValueError(f"{who}: {arg} must be a finite real number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{who}: {arg} must be >= {minimum:g}, got {value!r}")
    return number


def _check_clip(clip_value: float | None, who: str) -> float | None:
    """Validate ``clip_value``: None (no window) or a non-negative real (``inf`` allowed)."""
    if clip_value is None:
        return None
    return _check_real(clip_value, who, "clip_value (None or a non-negative real)", minimum=0.0,
                       allow_inf=True)


def _largest_power_of_two(dtype: torch.dtype) -> float:
    return math.ldexp(1.0, math.frexp(torch.finfo(dtype).max)[1] - 1)


# The largest power of two of each float dtype, looked up (not cached) so that torch.compile
# reads a constant instead of tracing a cache wrapper.
_SATURATING_FACTOR = {dtype: _largest_power_of_two(dtype) for dtype in _SAME_WIDTH_INT}


def _saturating_factor(dtype: torch.dtype) -> float:
    """The largest power of two ``B`` of ``dtype``; ``B*B*tiny >= 2`` for its smallest subnormal."""
    factor = _SATURATING_FACTOR.get(dtype)
    return _largest_power_of_two(dtype) if factor is None else factor


def _compiling() -> bool:
    """Whether torch.compile is tracing this call: then the helpers below write plain,
    out-of-place ops that compile into fused elementwise kernels (the in-place and integer-view
    forms are eager-mode speed-ups). Both forms give the same bits."""
    return torch.compiler.is_compiling()


_ROUNDED: dict[tuple[float, torch.dtype], float] = {}


@torch.compiler.assume_constant_result
def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (nearest, as a comparison with a Python number rounds it),
    as a Python float that every dtype and backend then compares exactly. torch.compile calls it
    while tracing and keeps the result as a constant (no ``.item()`` in the graph)."""
    key = (value, dtype)
    rounded = _ROUNDED.get(key)
    if rounded is None:
        rounded = _ROUNDED[key] = torch.tensor(value, dtype=dtype).item()
    return rounded


def _saturate_into(src: Tensor, out: Tensor | None, bias: float | Tensor, low: float) -> Tensor:
    """``out <- clamp(bias + B*B*src, low, 1)`` with in-place arithmetic (``out`` may be ``src``,
    or None for a fresh tensor).

    ``B*B`` pushes every non-zero finite value (subnormals included) to a magnitude of at least 2
    (or to ``±inf``), so after the clamp it lands on ``low`` or ``1``; ``±0`` becomes ``bias``
    (``-0 + 0`` is ``+0`` in IEEE arithmetic) and NaN stays NaN. With ``bias=1, low=-1`` this is
    sign with 0 -> +1; with ``bias=0, low=0`` the Heaviside step; with ``bias=0, low=-1`` sign with
    0 -> 0. ``B`` is a power of two, so ``src*B`` is exact (a subnormal becomes normal).
    Three in-place passes (``src*B``, then ``bias + B*that``, then the clamp) replace
    ``torch.where`` (several times slower on CPU) and need no comparison mask; ``bias`` may be a
    0-dim tensor of ``src``'s dtype. Under torch.compile it is ``clamp(src*B*B + bias, low, 1)``
    out of place (any rounding of the sum is absorbed by the clamp, so the bits are the same).
    """
    big = _saturating_factor(src.dtype)
    if _compiling():
        return torch.clamp(src * big * big + bias, low, 1.0)
    bias_t = bias if isinstance(bias, Tensor) else _constant(bias, src.dtype, src.device)
    out = torch.mul(src, big) if out is None else torch.mul(src, big, out=out)
    torch.add(bias_t, out, alpha=big, out=out)
    return out.clamp_(low, 1.0)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor (read only: never modify it in place)."""
    return torch.full((), value, dtype=dtype, device=device)


def _binary_sign(x: Tensor) -> Tensor:
    """Fresh tensor: -1 for x < 0, +1 for x >= 0 (also -0 and negative subnormals), NaN -> NaN."""
    return _saturate_into(x, None, 1.0, -1.0)


# A surrogate gradient ``(x, grad, scratch) -> gradient w.r.t. x``; ``scratch`` is a tensor like
# ``x`` that it may overwrite (and return), never aliasing ``grad``.
Surrogate = Callable[[Tensor, Tensor, Tensor], Tensor]

# Tags a ±1 quantizer sets on its output for fxquant.nn's layers (plain tensor attributes).
_PLUS_MINUS_ONE = "_fxquant_plus_minus_one"
_SIGN_SOURCE = "_fxquant_sign_source"


def mark_plus_minus_one(t: Tensor, source: Tensor | None = None,
                        gradient: Surrogate | None = None) -> Tensor:
    """Tag ``t`` as holding only -1 and +1 (and NaN); returns ``t``.

    ``source`` and ``gradient`` (given together) state that ``t`` is exactly ``sign(source)``
    (``±0`` -> ``+1``, NaN kept) made by a quantizer whose gradient is
    ``gradient(source, grad, scratch)`` and which keeps ``source`` for backward. A layer may then
    keep ``source`` instead of ``t``, rebuild ``t`` in backward and apply ``gradient`` itself.
    """
    if (source is None) != (gradient is None):
        raise ValueError("mark_plus_minus_one: give both source and gradient, or neither")
    setattr(t, _PLUS_MINUS_ONE, True)
    if source is not None:
        setattr(t, _SIGN_SOURCE, (source, gradient))
    return t


def is_plus_minus_one(t: Tensor) -> bool:
    """Whether ``t`` was tagged by :func:`mark_plus_minus_one`."""
    return bool(getattr(t, _PLUS_MINUS_ONE, False))


def sign_source(t: Tensor) -> tuple[Tensor, Surrogate] | None:
    """The ``(source, gradient)`` ``t`` was tagged with (``t == sign(source)``), or None."""
    return getattr(t, _SIGN_SOURCE, None)


def _window(magnitude: Tensor, clip_value: float | None, *,
            consume: bool = False) -> Tensor | None:
    """Bool mask ``magnitude <= clip_value`` (False at NaN), or None for no window.

    With ``consume=True`` the comparison is made in place in ``magnitude`` (as 0.0 / 1.0, which
    the caller then overwrites) and narrowed to bool: on CPU about three times faster than a
    comparison that writes bool, with no extra buffer.
    """
    if clip_value is None:
        return None
    if _compiling():
        return _open_weight(magnitude, clip_value)
    if consume:
        return magnitude.le_(clip_value).to(torch.bool)
    return magnitude.le(clip_value)


def _open_weight(magnitude: Tensor, clip_value: float) -> Tensor:
    """``1.0`` where ``magnitude <= clip_value``, ``0.0`` elsewhere and at NaN, in magnitude's
    dtype: the window of compiled code, written without a bool tensor.

    Inductor stores bool (and uint8) tensors on CPU some thirty times slower than float ones,
    and autograd's partitioner keeps whatever the forward computed cheapest to store, so a
    comparison anywhere near a saved window becomes a slow saved bool mask. This is the
    saturating trick of :func:`_saturate_into` on ``clip - magnitude`` (zero exactly where they
    are equal, gradual underflow); the infinite window is ``clamp(magnitude, 0, 0) + 1``.
    """
    if math.isinf(clip_value):
        weight = torch.clamp(magnitude, 0.0, 0.0) + 1.0  # 1, NaN at NaN
    else:
        big = _saturating_factor(magnitude.dtype)
        weight = (_rounded(clip_value, magnitude.dtype) - magnitude) * big * big + 1.0
    # fmax takes 0 over NaN (a vectorised kernel, where nan_to_num compiles to a scalar loop)
    return torch.clamp(torch.fmax(weight, magnitude.new_zeros(())), max=1.0)


def _select(window: Tensor, grad: Tensor) -> Tensor:
    """``grad`` where ``window`` (bool, or 0/1 of any dtype) else ``+0``, exactly, fresh.

    Works on the bit patterns: the integer view of ``grad`` times the 0/1 mask keeps every bit
    (NaN and ``±inf`` included) where the window is open and gives all-zero bits (``+0.0``) where it
    is shut, so ``inf * 0 = NaN`` cannot occur. On CPU this costs about half of
    ``torch.where(window, grad, 0)``.
    """
    as_int = _SAME_WIDTH_INT.get(grad.dtype)
    if as_int is None:  # an exotic float dtype: the plain select
        return torch.where(window.to(torch.bool), grad, 0.0)
    if _compiling():  # all-ones or all-zero bits, and-ed: fuses, and no bool in the graph
        return (grad.view(as_int) & -window.to(as_int)).view(grad.dtype)
    return window.to(as_int).mul_(grad.view(as_int)).view(grad.dtype)


def _select_in_window(x: Tensor, clip_value: float, grad: Tensor,
                      out: Tensor | None = None) -> Tensor:
    """``grad`` where ``abs(x) <= clip_value`` (False at NaN) else ``+0``, exactly.

    Like ``_select(_window(abs(x), clip_value), grad)`` in one buffer (``out``, like ``x`` and not
    aliasing ``grad``, or a fresh one) and three passes: ``abs(x)`` there, then its integer view
    compared in place with the bits of ``clip_value`` (for non-negative floats, NaN and ``inf``
    included, the order of the bit patterns is the order of the values), which leaves 0 / 1,
    then multiplied in place by the bits of ``grad``.
    """
    if _compiling():
        return _select(_open_weight(torch.abs(x), clip_value), grad)
    magnitude = torch.abs(x, out=out) if out is not None else torch.abs(x)
    as_int = _SAME_WIDTH_INT.get(grad.dtype)
    if as_int is None or magnitude.dtype != grad.dtype:
        return _select(magnitude.le_(clip_value), grad)
    bits = magnitude.view(as_int).le_(_bits_of(clip_value, grad.dtype))
    return bits.mul_(grad.view(as_int)).view(grad.dtype)


@functools.cache
def _bits_of(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` rounded to ``dtype``, as a signed integer of its width
    (eager mode only: compiled code compares the values, see :func:`_select_in_window`)."""
    return int(torch.tensor(value, dtype=dtype).view(_SAME_WIDTH_INT[dtype]).item())


def _track_grad(x: Tensor) -> bool:
    """Whether autograd will ask for a gradient of ``x`` (else no backward mask is needed)."""
    return torch.is_grad_enabled() and x.requires_grad


def _keep_nan(x: Tensor, out: Tensor) -> Tensor:
    """Plain-op inference: ``out``, except ``x`` itself where ``x`` is NaN (FX-traceable).

    Comparisons are False at NaN, so the ``torch.where`` forms map NaN to a grid value; the
    autograd forwards propagate it. The NaN returned is the input's own; the forwards return one
    made by arithmetic (the same bits for a quiet float16/32/64 NaN, the canonical ``+NaN`` in
    bfloat16), so NaN sign and payload bits are unspecified.
    """
    return torch.where(torch.isnan(x), x, out)
