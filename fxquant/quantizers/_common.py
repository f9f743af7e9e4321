"""Private helpers shared by the sign family (:mod:`.sign`) and :mod:`.ternary`.

Argument checks, the exact saturating sign (``clamp(bias + B*B*x)``), the exact gradient select on
integer views, and the NaN pass-through of the plain-op inference forms. Nothing here is public.
"""

from __future__ import annotations

import functools
import math
import numbers

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


@functools.cache
def _saturating_factor(dtype: torch.dtype) -> float:
    """The largest power of two ``B`` of ``dtype``; ``B*B*tiny >= 2`` for its smallest subnormal."""
    return math.ldexp(1.0, math.frexp(torch.finfo(dtype).max)[1] - 1)


def _saturate_into(src: Tensor, out: Tensor, bias: float | Tensor, low: float) -> Tensor:
    """``out <- clamp(bias + B*B*src, low, 1)`` in two passes over memory (``out`` may be ``src``).

    ``B*B`` pushes every non-zero finite value (subnormals included) to a magnitude of at least 2
    (or to ``±inf``), so after the clamp it lands on ``low`` or ``1``; ``±0`` becomes ``bias``
    (``-0 + 0`` is ``+0`` in IEEE arithmetic) and NaN stays NaN. With ``bias=1, low=-1`` this is
    sign with 0 -> +1; with ``bias=0, low=0`` the Heaviside step; with ``bias=0, low=-1`` sign with
    0 -> 0. One ``addcmul`` and one in-place clamp replace ``torch.where`` (several times slower
    on CPU) and need no comparison mask. ``bias`` may be a 0-dim tensor of ``src``'s dtype.
    """
    big = _saturating_factor(src.dtype)
    bias_t = (bias if isinstance(bias, Tensor)
              else torch.full((), bias, dtype=src.dtype, device=src.device))
    big_t = torch.full((), big, dtype=src.dtype, device=src.device)
    torch.addcmul(bias_t, src, big_t, value=big, out=out)
    return out.clamp_(low, 1.0)


def _window(magnitude: Tensor, clip_value: float | None) -> Tensor | None:
    """Bool mask ``magnitude <= clip_value`` (False at NaN), or None for no window."""
    return None if clip_value is None else magnitude.le(clip_value)


def _select(window: Tensor, grad: Tensor) -> Tensor:
    """``grad`` where ``window`` else ``+0``, exactly, as one fresh tensor.

    Works on the bit patterns: the integer view of ``grad`` times the 0/1 mask keeps every bit
    (NaN and ``±inf`` included) where the window is open and gives all-zero bits (``+0.0``) where it
    is shut, so ``inf * 0 = NaN`` cannot occur. On CPU this costs about half of
    ``torch.where(window, grad, 0)``.
    """
    as_int = _SAME_WIDTH_INT.get(grad.dtype)
    if as_int is None:  # an exotic float dtype: fall back to the plain select
        return torch.where(window, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return window.to(as_int).mul_(grad.view(as_int)).view(grad.dtype)


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
