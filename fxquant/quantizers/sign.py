"""Binary quantizers: the sign family (larq, Bi-Real Net, BNN+) and bitorch's ProgressiveSign.

Every quantizer here is a ``torch.autograd.Function`` with its forward and surrogate gradient side
by side, a plain function that applies it, and a thin registered :class:`Quantizer` module whose
``inference(x)`` is the eval forward in plain, FX-traceable torch ops (inlined by ``convert()``).

Conventions shared by the whole family (larq semantics unless a docstring says otherwise):

* ``sign(x)`` is ``-1`` for ``x < 0`` and ``+1`` for ``x >= 0``, so ``+0`` and ``-0`` give ``+1``.
  A negative subnormal gives ``-1`` (larq gives ``+1`` there only because TensorFlow on CPU flushes
  subnormals to zero). NaN gives NaN (bitorch gives ``+1``).
* A window ``abs(x) <= clip_value`` is closed; ``clip_value`` is compared in ``x``'s dtype (as larq
  casts it), ``None`` switches the window off, and NaN or ``±inf`` inputs fall outside every finite
  window, so their gradient is ``+0``.
* Outputs keep the input's floating dtype and device. Integer and bool inputs raise ``TypeError``.
* ``ste_sign``, ``ste_heaviside`` (and ``ste_tern`` in :mod:`fxquant.quantizers.ternary`) save only
  a one-byte mask for backward, never a float copy of the input.
* ``inference`` writes the sign as ``torch.where(x >= 0, 1.0, -1.0)`` (the pattern converters
  match), cast to x's dtype, then ``torch.where(torch.isnan(x), x, ...)`` for NaN; the Heaviside
  step as ``torch.where(x > 0, 1.0, 0.0)`` likewise. The autograd forwards keep their faster
  saturating ``clamp(bias + B*B*x)`` (no comparison, no ``where``). Both agree bit for bit on
  every input (``±0``, subnormals, ``±inf``, every dtype and memory format); NaN gives NaN in
  both, but its sign and payload bits are unspecified: ``inference`` returns the input's NaN, the
  forward one made by arithmetic (in bfloat16 always the canonical ``+NaN``).

>>> import torch
>>> ste_sign(torch.tensor([-2.0, -0.0, 0.5]))
tensor([-1.,  1.,  1.])
"""

from __future__ import annotations

import functools
import math
import os
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fxquant._user_code import user_stacklevel
from fxquant.quantizers._common import (
    Surrogate,
    _binary_sign,
    _check_clip,
    _check_real,
    _keep_nan,
    _saturate_into,
    _select,
    _select_in_window,
    _track_grad,
    _window,
)
from fxquant.quantizers.base import Quantizer, check_floating, register

__all__ = [
    "ste_sign", "approx_sign", "swish_sign", "magnitude_aware_sign", "ste_heaviside",
    "SteSign", "ApproxSign", "SwishSign", "MagnitudeAwareSign", "SteHeaviside", "ProgressiveSign",
    "default_transform", "get_progressive_sign_scale", "set_progressive_sign_scale",
]


# ------------------------------------------------------------------------------------------------
# Helpers


def _plain_sign(x: Tensor) -> Tensor:
    """The inference form of the sign: ``torch.where(x >= 0, 1.0, -1.0)`` in x's dtype, NaN kept.

    The canonical pattern converters recognise, plus a dtype cast (``where`` of two Python
    scalars is float32) and the NaN pass-through. Equal to :func:`_binary_sign` bit for bit
    (NaN payloads aside).
    """
    return _keep_nan(x, torch.where(x >= 0, 1.0, -1.0).type_as(x))


def _channel_rows(magnitude: Tensor) -> Tensor:
    """``magnitude`` as ``(dim 0, everything else)`` (rank 0 and 1: one element per row).

    The per-channel mean of :class:`MagnitudeAwareSign` is taken over dim 1 of this 2-d view in
    both the autograd forward and the inference form, so both reduce in the same order. The two
    trailing unsqueezes make ``flatten(1)`` valid for every rank without branching on it, which
    FX cannot trace.
    """
    return magnitude.unsqueeze(-1).unsqueeze(-1).flatten(1)


# ------------------------------------------------------------------------------------------------
# ste_sign


class _SteSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, clip_value: float | None, keep_input: bool) -> Tensor:
        ctx.clip_value, ctx.keep_input = clip_value, keep_input
        if clip_value is None:
            return _binary_sign(x)
        if keep_input:  # the window is computed in backward from x itself
            ctx.save_for_backward(x)
            return _binary_sign(x)
        out = torch.abs(x)  # |x|, then reused as the output buffer
        ctx.save_for_backward(_window(out, clip_value, consume=True))
        return _saturate_into(x, out, 1.0, -1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        if ctx.clip_value is None:
            return grad, None, None
        (saved,) = ctx.saved_tensors
        if ctx.keep_input:  # x itself (else its window: bool, or 0/1 in compiled code)
            return _ste_sign_grad(saved, grad, torch.empty_like(grad), ctx.clip_value), None, None
        return _select(saved, grad), None, None


def _ste_sign_grad(x: Tensor, grad: Tensor, scratch: Tensor, clip_value: float) -> Tensor:
    """The straight-through gradient ``grad * 1{abs(x) <= clip_value}``, computed in ``scratch``."""
    return _select_in_window(x, clip_value, grad, scratch)


def _keeps_input(x: Tensor, clip_value: float | None, save_input: bool | None) -> bool:
    """Whether :func:`ste_sign` saves ``x`` itself rather than a one-byte mask (see there)."""
    if clip_value is None or not _track_grad(x):
        return False
    return save_input if save_input is not None else (x.is_leaf and x.requires_grad)


def ste_sign(x: Tensor, clip_value: float | None = 1.0, *,
             save_input: bool | None = None) -> Tensor:
    """Binary sign with a straight-through gradient (larq ``ste_sign``).

    Forward: ``-1`` where ``x < 0``, ``+1`` where ``x >= 0`` (``+0`` and ``-0`` give ``+1``);
    NaN gives NaN; a negative subnormal gives ``-1``.

    Gradient: ``g * 1{abs(x) <= clip_value}`` (closed window; NaN and ``±inf`` get ``+0``).
    ``clip_value=None`` passes ``g`` unchanged everywhere, which is bitorch's ``Sign``.

    Memory: for backward it saves a one-byte mask, or ``x`` itself (a reference, not a copy)
    when ``save_input`` is True, or by default when ``x`` is a leaf that requires grad (a
    parameter: autograd keeps it alive anyway). Saving ``x`` costs nothing when something else
    keeps it until backward (``prepare`` sets this for inputs of layers that keep them) and
    four bytes per value otherwise. The gradient is the same either way.
    Courbariaux et al. 2016, arXiv:1602.02830.
    """
    check_floating(x, "ste_sign")
    clip = _check_clip(clip_value, "ste_sign")
    return _SteSign.apply(x, clip if _track_grad(x) else None,
                          _keeps_input(x, clip, save_input))


@register("ste_sign")
class SteSign(Quantizer):
    """Module form of :func:`ste_sign`: {-1, +1} forward, ``g * 1{abs(x) <= clip_value}``.

    ``save_input`` (the :class:`Quantizer` hint, default False) makes it save its input instead
    of a one-byte mask (see :func:`ste_sign`); ``prepare`` sets it where that input is kept alive
    anyway. Parameters are always saved as themselves.
    """

    plus_minus_one = True

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__(bits=1)
        self.clip_value = _check_clip(clip_value, "SteSign")

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, "ste_sign")  # clip_value was checked in __init__
        keep = _keeps_input(x, self.clip_value, self.save_input or None)
        return _SteSign.apply(x, self.clip_value if _track_grad(x) else None, keep)

    def sign_gradient(self, x: Tensor) -> Surrogate | None:
        if not _keeps_input(x, self.clip_value, self.save_input or None):
            return None
        return functools.partial(_ste_sign_grad, clip_value=self.clip_value)

    def inference(self, x: Tensor) -> Tensor:
        """Plain ops: ``torch.where(x >= 0, 1.0, -1.0)`` in x's dtype, NaN kept (see module doc)."""
        return _plain_sign(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clip_value={self.clip_value}"


# ------------------------------------------------------------------------------------------------
# approx_sign


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return _binary_sign(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return _approx_sign_grad(x, grad, torch.empty_like(grad))


def _approx_sign_grad(x: Tensor, grad: Tensor, scratch: Tensor) -> Tensor:
    """``(2 - 2 abs(x)) * grad`` where ``abs(x) <= 1``, else ``+0``; computed in ``scratch``."""
    factor = torch.abs(x, out=scratch)
    window = _window(factor, 1.0)
    two = torch.full((), 2.0, dtype=x.dtype, device=x.device)
    torch.add(two, factor, alpha=-2.0, out=factor)  # 2 - 2|x| (2|x| is exact)
    factor.mul_(grad)  # (2 - 2|x|) * g, rounded as larq and bitorch do
    return _select(window, factor)


def approx_sign(x: Tensor) -> Tensor:
    """Binary sign with Bi-Real Net's piecewise-polynomial gradient (larq ``approx_sign``).

    Forward: as :func:`ste_sign` (``±0`` -> ``+1``, NaN -> NaN).

    Gradient: ``(2 - 2*abs(x)) * g`` where ``abs(x) <= 1``, ``+0`` elsewhere (selected, never
    ``-0`` or NaN outside the window; NaN and ``±inf`` inputs get ``+0``). At ``abs(x) = 1`` the
    factor is 0, so the window edge is continuous. This is the derivative of
    ``F(x) = 2x - x*abs(x)`` on ``[-1, 1]``.

    The input is saved for backward (the gradient depends on it). Liu et al. 2018 (Bi-Real Net),
    arXiv:1808.00278; bitorch ``ApproxSign``.
    """
    check_floating(x, "approx_sign")
    return _ApproxSign.apply(x)


@register("approx_sign")
class ApproxSign(Quantizer):
    """Module form of :func:`approx_sign`: {-1, +1} forward, ``(2 - 2 abs(x)) g`` gradient."""

    plus_minus_one = True

    def __init__(self) -> None:
        super().__init__(bits=1)

    def forward(self, x: Tensor) -> Tensor:
        return approx_sign(x)

    def sign_gradient(self, x: Tensor) -> Surrogate | None:
        return _approx_sign_grad if _track_grad(x) else None

    def inference(self, x: Tensor) -> Tensor:
        """Plain ops: ``torch.where(x >= 0, 1.0, -1.0)`` in x's dtype, NaN kept (see module doc)."""
        return _plain_sign(x)


# ------------------------------------------------------------------------------------------------
# swish_sign


class _SwishSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, beta: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.beta = beta
        return _binary_sign(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return _swish_sign_grad(x, grad, torch.empty_like(grad), ctx.beta), None


def _swish_sign_grad(x: Tensor, grad: Tensor, scratch: Tensor, beta: float) -> Tensor:
    """The BNN+ swish-derivative gradient of :func:`swish_sign`, computed in ``scratch``."""
    # The factor is even in u = beta*|x|. With s = sigmoid(-u): tanh(u/2) = 1 - 2s and
    # 1 / (1 + cosh(u)) = 2 s (1 - s), so factor = 2 beta s (1 - s) (2 - u (1 - 2s)). One
    # sigmoid replaces tanh and cosh (about 8x cheaper on CPU); s <= 1/2 keeps 1 - s and
    # 1 - 2s free of cancellation, so the tail (s tiny) stays accurate.
    factor = torch.abs(x, out=scratch).mul_(-beta)  # -u
    s = torch.sigmoid(factor)
    torch.addcmul(factor, factor, s, value=-2.0, out=factor).add_(2.0)  # 2 - u (1 - 2s)
    torch.addcmul(s, s, s, value=-1.0, out=s)  # s (1 - s)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    torch.addcmul(zero, factor, s, value=2.0 * beta, out=factor)
    # NaN only where the formula is undefined (x NaN/±inf, beta*x = ±inf): use its limit, 0.
    factor.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)
    return factor.mul_(grad)


def swish_sign(x: Tensor, beta: float = 5.0) -> Tensor:
    """Binary sign with the BNN+ swish surrogate gradient (larq ``swish_sign``).

    Forward: as :func:`ste_sign` (``±0`` -> ``+1``, NaN -> NaN).

    Gradient: ``g * beta * (2 - beta*x*tanh(beta*x/2)) / (1 + cosh(beta*x))``, the derivative of
    ``2*sigmoid(beta*x)*(1 + beta*x*(1 - sigmoid(beta*x))) - 1``; it equals ``beta * g`` at 0 and
    turns negative for ``abs(beta*x) > 2.4`` (no window). Where the formula is undefined (x NaN or
    ``±inf``, or ``beta*x`` overflowing: ``inf/inf``) the factor is taken as 0, its limit, so the
    gradient is ``0 * g`` (0 for finite ``g``); larq and bitorch return NaN there. Far in the tail
    the factor underflows to ``±0``, as in both libraries where ``cosh`` overflows. ``beta = 0``
    gives a zero gradient. Computed as ``2*beta*s*(1 - s)*(2 - u*(1 - 2*s))`` with
    ``u = beta*abs(x)``, ``s = sigmoid(-u)`` (the same function, one sigmoid instead of tanh and
    cosh); it matches larq and bitorch to about 1e-6 absolute, as they match each other.

    The input is saved for backward. Darabi et al. 2018 (BNN+), arXiv:1812.11800.
    """
    check_floating(x, "swish_sign")
    b = _check_real(beta, "swish_sign", "beta", minimum=0.0)
    return _SwishSign.apply(x, b)


@register("swish_sign")
class SwishSign(Quantizer):
    """Module form of :func:`swish_sign`: {-1, +1} forward, BNN+ swish-derivative gradient."""

    plus_minus_one = True

    def __init__(self, beta: float = 5.0) -> None:
        super().__init__(bits=1)
        self.beta = _check_real(beta, "SwishSign", "beta", minimum=0.0)

    def forward(self, x: Tensor) -> Tensor:
        return swish_sign(x, self.beta)

    def sign_gradient(self, x: Tensor) -> Surrogate | None:
        return functools.partial(_swish_sign_grad, beta=self.beta) if _track_grad(x) else None

    def inference(self, x: Tensor) -> Tensor:
        """Plain ops: ``torch.where(x >= 0, 1.0, -1.0)`` in x's dtype, NaN kept (see module doc)."""
        return _plain_sign(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"


# ------------------------------------------------------------------------------------------------
# magnitude_aware_sign


class _MagnitudeAwareSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, clip_value: float | None) -> Tensor:
        magnitude = torch.abs(x)
        window = _window(magnitude, clip_value)
        if x.dim() >= 2:  # one scale per output channel (dim 0 in torch layout)
            per_row = _channel_rows(magnitude).mean(1, keepdim=True)  # shared with inference
            scale = per_row.view(x.shape[:1] + (1,) * (x.dim() - 1))
            out = _saturate_into(x, magnitude, 1.0, -1.0)
        else:  # nothing to reduce over: the scale is abs(x) itself, as in larq
            scale = magnitude
            out = _binary_sign(x)
        ctx.window = window is not None
        ctx.save_for_backward(scale, *([] if window is None else [window]))
        return out.mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        scale, *window = ctx.saved_tensors
        scaled = grad * scale
        # Select after scaling: an infinite alpha must not turn a shut window's +0 into NaN.
        return (_select(window[0], scaled) if ctx.window else scaled), None


def magnitude_aware_sign(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    """Sign times the mean magnitude per output channel (Bi-Real; larq ``MagnitudeAwareSign``).

    ``alpha = mean(abs(x))`` over every dim except dim 0, i.e. one value per output channel of a
    torch weight ``(out, in, kh, kw)`` or ``(out, in)``, equal to ``x.abs().mean(dim=(1, 2, 3))``.
    (larq reduces over every axis but the *last*, which is the same thing for Keras kernels
    ``(..., in, out)``.) For a rank-0 or rank-1 input there is nothing to reduce over and
    ``alpha = abs(x)`` elementwise, as larq degenerates. ``alpha`` is not differentiated.
    It is the mean over dim 1 of the ``(out, rest)`` flattening of ``abs(x)``, so the summation
    order is the logical one whatever the memory format (a ``channels_last`` input gives the same
    bits as a contiguous one, at the cost of one copy of ``abs(x)``), and
    :meth:`MagnitudeAwareSign.inference` repeats it exactly.

    Forward: ``alpha * sign(x)`` with ``sign(±0) = +1``, so 0 maps to ``+alpha``; a NaN anywhere
    in a channel makes that channel's ``alpha``, and so its whole output, NaN.

    Gradient: ``alpha * g * 1{abs(x) <= clip_value}`` (``clip_value=None``: ``alpha * g``).

    Saves the bool mask and ``alpha`` (one value per channel) for backward. Liu et al. 2018
    (Bi-Real Net) §3.3, arXiv:1808.00278.
    """
    check_floating(x, "magnitude_aware_sign")
    clip = _check_clip(clip_value, "magnitude_aware_sign")
    return _MagnitudeAwareSign.apply(x, clip if _track_grad(x) else None)


@register("magnitude_aware_sign")
class MagnitudeAwareSign(Quantizer):
    """Module form of :func:`magnitude_aware_sign`: ``mean(abs(x))`` per channel times sign."""

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__(bits=1)
        self.clip_value = _check_clip(clip_value, "MagnitudeAwareSign")

    def forward(self, x: Tensor) -> Tensor:
        return magnitude_aware_sign(x, self.clip_value)

    def inference(self, x: Tensor) -> Tensor:
        """Plain ops: the where-form sign times ``alpha`` broadcast back to x's shape.

        ``alpha`` is the mean of ``abs(x)`` over dim 1 of :func:`_channel_rows`, the same reduction
        as the autograd forward; for rank 0 and 1 it is a mean of one element, i.e. ``abs(x)``.
        """
        rows = _channel_rows(torch.abs(x))
        alpha = rows.mean(1, keepdim=True).expand_as(rows).reshape_as(x)
        return _plain_sign(x) * alpha

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clip_value={self.clip_value}"


# ------------------------------------------------------------------------------------------------
# ste_heaviside


class _SteHeaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, clip_value: float | None) -> Tensor:
        out = torch.abs(x)  # |x|, then reused as the output buffer
        window = _window(out, clip_value, consume=True)
        ctx.window = window is not None
        if window is not None:
            ctx.save_for_backward(window)
        return _saturate_into(x, out, 0.0, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        if not ctx.window:
            return grad, None
        (window,) = ctx.saved_tensors
        return _select(window, grad), None


def ste_heaviside(x: Tensor, clip_value: float | None = 1.0) -> Tensor:
    """Heaviside step {0, 1} with a straight-through gradient (larq ``ste_heaviside``).

    Forward: ``1`` where ``x > 0``, ``+0`` where ``x <= 0`` (``+0`` and ``-0`` give ``+0``);
    NaN gives NaN.

    Gradient: ``g * 1{abs(x) <= clip_value}``, a window symmetric around 0 although the step is
    one-sided; ``clip_value=None`` passes ``g`` unchanged. Only a bool mask is saved.

    bitorch's ``SteHeaviside`` differs: it returns {-1, +1} (a sign with 0 -> -1) in float32.
    """
    check_floating(x, "ste_heaviside")
    clip = _check_clip(clip_value, "ste_heaviside")
    return _SteHeaviside.apply(x, clip if _track_grad(x) else None)


@register("ste_heaviside")
class SteHeaviside(Quantizer):
    """Module form of :func:`ste_heaviside`: {0, 1} forward, ``g * 1{abs(x) <= clip_value}``."""

    def __init__(self, clip_value: float | None = 1.0) -> None:
        super().__init__(bits=1)
        self.clip_value = _check_clip(clip_value, "SteHeaviside")

    def forward(self, x: Tensor) -> Tensor:
        return ste_heaviside(x, self.clip_value)

    def inference(self, x: Tensor) -> Tensor:
        """Plain ops: ``torch.where(x > 0, 1.0, 0.0)`` in x's dtype (zeros ``+0``), NaN kept."""
        return _keep_nan(x, torch.where(x > 0, 1.0, 0.0).type_as(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, clip_value={self.clip_value}"


# ------------------------------------------------------------------------------------------------
# ProgressiveSign (bitorch)

_PROGRESSIVE_EPSILON = 1e-7  # bitorch's floor on the divisor 1 - T
_progressive_sign_scale = 0.0  # the process-wide scale read by ProgressiveSign(use_global_scaling)
_progressive_sign_scale_set = False  # set in this process? (a new process starts unset)
_warned_unset_scale = False
_DIVISORS: weakref.WeakSet[_Divisor] = weakref.WeakSet()  # of every live ProgressiveSign


def set_progressive_sign_scale(value: float) -> None:
    """Set the process-wide scale used by every ``ProgressiveSign(use_global_scaling=True)``.

    It replaces bitorch's ``progressive_sign_config.progressive_sign_scale`` (default 0.0) and is
    read at every forward, so a training loop can anneal all global instances at once, e.g.
    ``set_progressive_sign_scale(epoch / max_epochs)``. ``value`` must be a finite real number.

    The value belongs to this process: a process started by torchrun, ``mp.spawn`` or any other
    spawn begins at 0.0 whatever its parent set, so every training process (every rank of a
    distributed run) must set it. A ``ProgressiveSign(use_global_scaling=True)`` that trains in
    a process where it was never set warns once (``set_progressive_sign_scale(0.0)`` says that
    0.0 is meant).
    """
    global _progressive_sign_scale, _progressive_sign_scale_set
    _progressive_sign_scale = _check_real(value, "set_progressive_sign_scale", "value")
    _progressive_sign_scale_set = True
    for divisor in list(_DIVISORS):
        if divisor.owner.use_global_scaling:
            divisor.owner._update_divisor()


def _warn_if_scale_never_set() -> None:
    """Warn once per process when the global scale is read for training but was never set."""
    global _warned_unset_scale
    if _progressive_sign_scale_set or _warned_unset_scale:
        return
    _warned_unset_scale = True
    warnings.warn(f"ProgressiveSign(use_global_scaling=True) trains with the process-wide scale "
                  f"{_progressive_sign_scale}, which nothing has set in this process (pid "
                  f"{os.getpid()}): a process started by torchrun, mp.spawn or a launcher does "
                  "not inherit the scale its parent set. Run "
                  "fxquant.training.ProgressiveSignScheduler (or set_progressive_sign_scale) in "
                  "every process that trains, on every rank; call "
                  "set_progressive_sign_scale(0.0) if scale 0 is meant.",
                  stacklevel=user_stacklevel())


def get_progressive_sign_scale() -> float:
    """The process-wide ProgressiveSign scale (0.0 until :func:`set_progressive_sign_scale`)."""
    return _progressive_sign_scale


def default_transform(scale: float, alpha: float = 4.0, beta: float = 10.0) -> float:
    """bitorch's temperature ``T = 1 - alpha ** (-beta * scale)``, in Python floats.

    ``T`` is 0 at scale 0 and approaches 1 as the scale grows (``alpha > 1``, ``beta > 0``). When
    the power is infinite (``alpha = 0`` with a negative exponent, or overflow) ``T = -inf``.
    """
    exponent = -beta * scale
    if alpha == 0.0 and exponent < 0.0:
        return -math.inf
    try:
        return 1.0 - alpha**exponent
    except OverflowError:
        return -math.inf


class _Divisor:
    """The divisor a :class:`ProgressiveSign`'s compiled forward reads, a 0-dim float64 CPU
    tensor, and its owner. Every copy registers itself in ``_DIVISORS`` (deepcopy, pickle and
    prepare's module cloner all go through ``__setstate__``), so that
    :func:`set_progressive_sign_scale` reaches the quantizers of every copy of a model."""

    def __init__(self, owner: ProgressiveSign) -> None:
        self.owner = owner
        self.value = 1.0
        self.tensor = torch.ones((), dtype=torch.float64)
        _DIVISORS.add(self)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _DIVISORS.add(self)


class _ProgressiveSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, divisor: float | Tensor) -> Tensor:
        return torch.div(x, divisor).clamp_(-1.0, 1.0)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


@register("progressive_sign")
class ProgressiveSign(Quantizer):
    """bitorch's ``ProgressiveSign``: a hardtanh that sharpens into sign as the scale grows.

    Training mode: ``hardtanh(x / max(1 - T, 1e-7))`` with temperature ``T = transform(scale)``,
    by default ``1 - alpha ** (-beta * scale)``, i.e. ``clamp(x * alpha**(beta*scale), -1, 1)``:
    ``clamp(x, -1, 1)`` at scale 0, slope 1024 at scale 0.5 (defaults). The output is not binary:
    ``0 -> 0``, ``-0 -> -0``. Eval mode: :func:`ste_sign` without a window (``0 -> +1``).
    Gradient: identity in both modes (neither the slope nor the saturation is applied). Nothing
    is saved for backward. NaN gives NaN (bitorch's eval sign gives +1).

    The scale is the process-wide value (:func:`set_progressive_sign_scale`) when
    ``use_global_scaling`` is True, else the plain attribute ``scale`` (initialised from
    ``initial_scale``, default 0.0), which a scheduler may assign; it is not part of the
    ``state_dict``. Passing ``initial_scale`` with global scaling is a ValueError (bitorch raises
    ``RuntimeWarning``). ``custom_transform(scale) -> T`` replaces the default transform (``alpha``
    and ``beta`` are then unused).

    Unlike bitorch's ``x or default``, an explicit 0 for ``initial_scale``, ``alpha`` or ``beta``
    means 0; only None selects the default (scale 0.0, ``alpha`` 4, ``beta`` 10).
    ``alpha`` and ``beta`` must be finite and non-negative.

    ``x / divisor`` divides by a Python float exactly as bitorch does, so results are
    bit-identical to bitorch on the same device (on CUDA torch multiplies by the reciprocal, which
    can differ from the CPU result by one ulp).

    Under ``torch.compile`` the divisor is read from a 0-dim float64 tensor (the same quotient,
    bit for bit), which assigning ``scale`` and :func:`set_progressive_sign_scale` update, so a
    scheduled scale neither recompiles nor breaks the graph; a changed ``alpha``, ``beta`` or
    ``custom_transform`` reaches compiled code at the next such update or eager forward.
    """

    def __init__(self, use_global_scaling: bool = True, initial_scale: float | None = None,
                 custom_transform: Callable[[float], float] | None = None,
                 alpha: float | None = None, beta: float | None = None) -> None:
        super().__init__(bits=1)
        if not isinstance(use_global_scaling, bool):
            raise ValueError("ProgressiveSign: use_global_scaling must be a bool, "
                             f"got {use_global_scaling!r}")
        if use_global_scaling and initial_scale is not None:
            raise ValueError("ProgressiveSign: initial_scale cannot be combined with "
                             "use_global_scaling=True; pass use_global_scaling=False or set the "
                             "global scale with set_progressive_sign_scale()")
        if custom_transform is not None and not callable(custom_transform):
            raise ValueError("ProgressiveSign: custom_transform must be a callable scale -> T, got "
                             f"{custom_transform!r}")
        self.use_global_scaling = use_global_scaling
        self.initial_scale = (None if initial_scale is None
                              else _check_real(initial_scale, "ProgressiveSign", "initial_scale"))
        self.custom_transform = custom_transform
        self.alpha = 4.0 if alpha is None else _check_real(alpha, "ProgressiveSign", "alpha",
                                                           minimum=0.0)
        self.beta = 10.0 if beta is None else _check_real(beta, "ProgressiveSign", "beta",
                                                          minimum=0.0)
        self._divisor = _Divisor(self)  # read by compiled code: see above
        self.scale = 0.0 if self.initial_scale is None else self.initial_scale

    def __setstate__(self, state: dict[str, Any]) -> None:
        scale = state.pop("scale", None)  # pickled when scale was a plain attribute
        super().__setstate__(state)
        if "_divisor" not in self.__dict__:
            self._divisor = _Divisor(self)
            self.scale = 0.0 if scale is None else scale

    @property
    def scale(self) -> float:
        """This instance's scale (used without ``use_global_scaling``); a scheduler assigns it."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = value
        self._update_divisor()

    def _divisor_of(self, scale: float) -> float:
        return max(1.0 - self.transform(scale), _PROGRESSIVE_EPSILON)

    def _update_divisor(self) -> None:
        """Write the current divisor into the tensor compiled code reads (when it changed)."""
        try:
            divisor = self._divisor_of(self.current_scale)
        except (ValueError, TypeError, ArithmeticError):  # the eager forward raises it
            return
        if self._divisor.owner is not self:  # a shallow copy: not its original's tensor
            self._divisor = _Divisor(self)
        if divisor != self._divisor.value:
            self._divisor.value = divisor
            self._divisor.tensor.fill_(divisor)

    @property
    def bit_width(self) -> int:
        """bitorch's name for :attr:`bits` (always 1)."""
        return self.bits

    @property
    def current_scale(self) -> float:
        """The global scale under ``use_global_scaling``, else this instance's ``scale``."""
        if self.use_global_scaling:
            return get_progressive_sign_scale()
        return _check_real(self.scale, "ProgressiveSign", "scale")

    def transform(self, scale: float) -> float:
        """The temperature ``T`` for ``scale``: ``custom_transform(scale)`` or the default."""
        if self.custom_transform is not None:
            temperature = float(self.custom_transform(scale))
        else:
            temperature = default_transform(scale, self.alpha, self.beta)
        if math.isnan(temperature):
            raise ValueError(f"ProgressiveSign: the transform gave T = NaN for scale {scale!r}")
        return temperature

    def quantize(self, x: Tensor) -> Tensor:
        """Training: ``hardtanh(x / max(1 - T, 1e-7))``; eval: sign (0 -> +1); identity gradient."""
        check_floating(x, "ProgressiveSign")
        if not self.training:
            return ste_sign(x, clip_value=None)
        if torch.compiler.is_compiling():  # no Python value to specialise on: no recompiles
            return _ProgressiveSign.apply(x, self._divisor.tensor)
        if self.use_global_scaling:
            _warn_if_scale_never_set()
        divisor = self._divisor_of(self.current_scale)
        if divisor != self._divisor.value:  # e.g. alpha changed: keep compiled code in step
            self._update_divisor()
        return _ProgressiveSign.apply(x, divisor)

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x)

    def inference(self, x: Tensor) -> Tensor:
        """The eval forward in plain ops, whatever the mode: the where-form sign (``0 -> +1``)."""
        return _plain_sign(x)

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments as plain values; the callable ``custom_transform`` is dropped.

        ``initial_scale`` is the current per-instance ``scale`` (None under global scaling, whose
        process-wide value is not part of any config), so a rebuilt quantizer goes on where this
        one is. ``custom_transform`` cannot be stored: it comes back as None, i.e. the default
        transform, with a ``UserWarning``; pass it again when rebuilding. ``alpha`` and ``beta``
        are stored as resolved (4.0 and 10.0 when None was given).
        """
        if self.custom_transform is not None:
            warnings.warn("ProgressiveSign.get_config: custom_transform is a callable and is not "
                          "stored; a quantizer rebuilt from this config uses the default "
                          "transform unless custom_transform is passed again", stacklevel=2)
        return {"use_global_scaling": self.use_global_scaling,
                "initial_scale": None if self.use_global_scaling else self.current_scale,
                "custom_transform": None, "alpha": self.alpha, "beta": self.beta}

    def extra_repr(self) -> str:
        transform = self.custom_transform
        transform_name = None if transform is None else getattr(transform, "__name__", transform)
        return (f"{super().extra_repr()}, use_global_scaling={self.use_global_scaling}, "
                f"initial_scale={self.initial_scale}, alpha={self.alpha}, beta={self.beta}, "
                f"custom_transform={transform_name}")
