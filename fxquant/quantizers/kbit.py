"""k-bit family: spikingjelly's rounding primitives and k-bit quantizers, and larq's DoReFa.

Every quantizer here is a pure function (an autograd Function with its forward and backward side by
side) plus a thin leaf :class:`~fxquant.quantizers.base.Quantizer` module that calls it.

Conventions shared by the whole file:

* Rounding is ``torch.round``: **half to even** (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2), as in
  spikingjelly, larq (``tf.round``) and bitorch.
* Arithmetic runs in the input's dtype and the output keeps it (float16, bfloat16, float32,
  float64); integer and bool tensors raise ``TypeError``. NaN in the input gives NaN in the output.
* Constants that divide (the step of :func:`step_quantize`, the ``2**k - 1`` levels of the k-bit
  grids) are 0-dim tensors of the input's dtype **on the input's device**. On CUDA, dividing by
  a Python number or by a 0-dim CPU tensor is computed as a multiplication by the reciprocal, which
  can differ from a true division by one ulp and flip a rounding tie; dividing by a device tensor
  is a true division on every device, so CPU and CUDA give the same numbers. On CPU the result
  equals spikingjelly's ``x / step`` (float32 and float64: the Python number is rounded to the
  tensor's dtype first in both). For float16/bfloat16 the constant is rounded to that dtype, so e.g.
  ``2**k - 1`` is exact only for k <= 11 (float16) or k <= 8 (bfloat16).
* Windowed gradients use closed windows and are 0 at NaN inputs; they are built with
  ``torch.where`` from a saved bool mask, so an infinite upstream gradient outside the window
  gives 0, not NaN.

Inference forms (``Quantizer.inference``, inlined by ``convert``): every module here writes its
eval forward again with plain, out-of-place torch ops, **op for op the same kernels** as the
autograd forward (which runs some of them in place to save temporaries; in-place and
out-of-place calls of one elementwise kernel give the same bits), so the two agree bit for bit on
every input, NaN, ±inf, -0.0 and subnormals included. The formula is not shared through one helper
because the forward's in-place chain would become out-of-place (slower) or the traced graph would
hold in-place methods; the tests compare the two on edge and random inputs in every float dtype.
Constants are built with ``x.new_full((), value)`` as in the forward (a 0-dim tensor of x's dtype
on x's device, so CUDA divides truly). Two limits, both documented per class:

* The argument checks that depend on x's dtype are not repeated (x is an FX Proxy when traced):
  where the forward raises ValueError because ``2**k - 1`` overflows the dtype (k >= 16 for
  float16) or a step vanishes in it (``step=1e-8`` in float16), the inference form returns NaN.
* :class:`ClampByLinear` and ``DoReFa(mode="weights")`` reduce the whole tensor with
  ``torch.aminmax``, which has no identity: on an **empty** tensor the inference form raises
  RuntimeError where the forward returns an empty tensor. Padding the reduction to avoid this
  would copy the whole input on every call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.autograd.function import FunctionCtx

from fxquant.quantizers.base import Quantizer, check_floating, register

__all__ = [
    "round_ste", "ceil_ste", "floor_ste", "clamp_ste", "step_quantize", "k_bit_quantize",
    "affine_k_bit_quantize", "clamp_by_linear", "dorefa",
    "RoundSTE", "CeilSTE", "FloorSTE", "ClampSTE", "StepQuantize", "KBitQuantize",
    "AffineKBitQuantize", "ClampByLinear", "DoReFa",
]

DoReFaMode = Literal["activations", "weights"]
_DOREFA_MODES = ("activations", "weights")


# ------------------------------------------------------------------------------------------------
# argument checks


def _check_k(k: object, who: str, arg: str = "k") -> int:
    """``k`` as an int >= 1: a bool or non-integer is a TypeError, k < 1 a ValueError."""
    if isinstance(k, bool):
        raise TypeError(f"{who}: {arg} must be an int >= 1, got the bool {k!r}")
    try:
        value = operator.index(k)
    except TypeError:
        raise TypeError(f"{who}: {arg} must be an int >= 1, got {k!r}") from None
    if value < 1:
        raise ValueError(f"{who}: {arg} must be an int >= 1, got {value}")
    return value


def _check_real(value: object, who: str, arg: str) -> float:
    """Return ``value`` as a float: bools and non-numbers raise TypeError, NaN raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {arg} must be a real number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{who}: {arg} must not be NaN")
    return value


def _check_mode(mode: object, who: str) -> None:
    if mode not in _DOREFA_MODES:
        raise ValueError(f"{who}: mode must be 'activations' or 'weights', got {mode!r}")


def _grid_levels(x: torch.Tensor, k: int) -> torch.Tensor:
    """``2**k - 1`` as a 0-dim tensor of x's dtype and device, unchecked (FX-traceable)."""
    return x.new_full((), float((1 << k) - 1))


def _levels(k: int, x: torch.Tensor, who: str) -> torch.Tensor:
    """``2**k - 1`` as a 0-dim tensor of ``x``'s dtype and device; ValueError if it overflows."""
    levels = (1 << k) - 1
    if levels > torch.finfo(x.dtype).max:
        raise ValueError(f"{who}: k={k} gives 2**k - 1 = {levels}, which overflows {x.dtype}; "
                         "use a smaller k or a wider dtype")
    return x.new_full((), float(levels))


# ------------------------------------------------------------------------------------------------
# round / ceil / floor with an identity gradient (spikingjelly `round`, `ceil`, `floor`)


class _RoundingSTE(torch.autograd.Function):
    """y = op(x) with op in {torch.round, torch.ceil, torch.floor}; dy/dx := 1."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        return op(x)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even with a straight-through (identity) gradient.

    Forward: ``torch.round(x)`` (0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2; -0.0, ±inf and NaN pass
    through). Gradient: ``g`` unchanged everywhere (also at NaN/±inf).

    Follows spikingjelly ``quantize.round``.
    """
    check_floating(x, "round_ste")
    return _RoundingSTE.apply(x, torch.round)


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.ceil(x)`` forward, identity gradient ``g``; spikingjelly ``quantize.ceil``."""
    check_floating(x, "ceil_ste")
    return _RoundingSTE.apply(x, torch.ceil)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """``torch.floor(x)`` forward, identity gradient ``g``; spikingjelly ``quantize.floor``."""
    check_floating(x, "floor_ste")
    return _RoundingSTE.apply(x, torch.floor)


# ------------------------------------------------------------------------------------------------
# clamp with the closed-window gradient (spikingjelly `clamp`)


class _ClampSTE(torch.autograd.Function):
    """y = clamp(x, lo, hi); dy/dx = 1{lo <= x <= hi} (closed; 0 at NaN)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        y = torch.clamp(x, lo, hi)
        if ctx.needs_input_grad[0]:
            # clamp left x unchanged  <=>  lo <= x <= hi (false at NaN): a 1-byte mask
            ctx.save_for_backward(torch.eq(y, x))
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return torch.where(inside, g, g.new_zeros(())), None, None


def clamp_ste(x: torch.Tensor, min_value: float, max_value: float) -> torch.Tensor:
    """Clamp with a straight-through gradient inside the closed window.

    Forward: ``torch.clamp(x, min_value, max_value)`` (NaN stays NaN).
    Gradient: ``g * 1{min_value <= x <= max_value}`` on the original x, both ends included; 0 at
    NaN and at ±inf unless a bound is that infinity. The test is "clamp left x unchanged", so the
    bounds are taken as clamp takes them (rounded to x's dtype). Only a bool mask is saved.

    ``min_value > max_value`` or a NaN bound raises ValueError; infinite bounds are allowed.
    Follows spikingjelly ``quantize.clamp``.
    """
    lo = _check_real(min_value, "clamp_ste", "min_value")
    hi = _check_real(max_value, "clamp_ste", "max_value")
    if lo > hi:
        raise ValueError(f"clamp_ste: min_value must be <= max_value, got {lo} > {hi}")
    check_floating(x, "clamp_ste")
    return _ClampSTE.apply(x, lo, hi)


# ------------------------------------------------------------------------------------------------
# step and k-bit grids (spikingjelly `step_quantize`, `k_bit_quantize`, `affine_k_bit_quantize`)


class _StepQuantize(torch.autograd.Function):
    """y = round(x / step) * step; dy/dx := 1."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        return torch.div(x, step).round_().mul_(step)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def step_quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    """Round to the nearest multiple of ``step`` (half to even), identity gradient.

    Forward: ``y = round(x / step) * step``. Gradient: ``g``.
    ``step`` must be finite and > 0 (ValueError), and stay so when rounded to x's dtype (e.g.
    ``step=1e-8`` is 0 in float16: ValueError). The division is by a 0-dim tensor of x's dtype on
    x's device (exact on CPU and CUDA alike, see the module docstring), equal to spikingjelly's
    ``x / step`` on CPU for float32/float64.

    Follows spikingjelly ``quantize.step_quantize`` (and ``lava_exchange.step_quantize``).
    """
    value = _check_real(step, "step_quantize", "step")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"step_quantize: step must be finite and > 0, got {value}")
    check_floating(x, "step_quantize")
    in_dtype = float(torch.tensor(value, dtype=x.dtype))
    if not (math.isfinite(in_dtype) and in_dtype > 0):
        raise ValueError(f"step_quantize: step={value} becomes {in_dtype} in {x.dtype}")
    return _StepQuantize.apply(x, x.new_full((), value))


class _KBitQuantize(torch.autograd.Function):
    """y = round(x * n) / n with n = 2**k - 1; dy/dx := 1."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, n).round_().div_(n)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


def k_bit_quantize(x: torch.Tensor, k: int) -> torch.Tensor:
    """The DoReFa k-bit grid without clipping, identity gradient.

    Forward: ``y = round(x * n) / n`` with ``n = 2**k - 1`` (half to even, so k=1 maps 0.5 to 0).
    **No clipping**: inputs outside [0, 1] stay on the grid, e.g. 1.5 -> 4/3 and -1 -> -1 for k=2;
    clamp first if [0, 1] is wanted. Gradient: ``g`` everywhere (no [0, 1] mask).

    ``k`` must be an int >= 1: bool or float ``k`` raises TypeError, ``k < 1`` ValueError, and a
    ``k`` whose ``2**k - 1`` overflows x's dtype (k >= 16 for float16) ValueError.

    Follows spikingjelly ``quantize.k_bit_quantize`` (Zhou et al. 2016, arXiv:1606.06160).
    """
    k = _check_k(k, "k_bit_quantize")
    check_floating(x, "k_bit_quantize")
    return _KBitQuantize.apply(x, _levels(k, x, "k_bit_quantize"))


class _AffineKBitQuantize(torch.autograd.Function):
    """y = w * q + b with q = round(x * n) / n and scalar w, b; dq/dx := 1, exact for w and b."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, n: torch.Tensor, w: torch.Tensor | float,
                b: torch.Tensor | float) -> torch.Tensor:
        q = torch.mul(x, n).round_().div_(n)
        need_q = ctx.needs_input_grad[2]
        y = torch.mul(q, w) if need_q else q.mul_(w)  # q is kept only when w needs its gradient
        ctx.w_number = None if isinstance(w, torch.Tensor) else w
        ctx.save_for_backward(q if need_q else None, w if ctx.w_number is None else None)
        return y.add_(b)  # the same two roundings as spikingjelly's w * q + b

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor
                 ) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None]:
        q, w = ctx.saved_tensors
        grad_x = torch.mul(g, ctx.w_number if w is None else w) if ctx.needs_input_grad[0] else None
        grad_w = torch.dot(g.reshape(-1), q.reshape(-1)) if ctx.needs_input_grad[2] else None
        grad_b = g.sum() if ctx.needs_input_grad[3] else None
        return grad_x, None, grad_w, grad_b


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.dim() == 0)


def affine_k_bit_quantize(x: torch.Tensor, k: int, w: torch.Tensor | float,
                          b: torch.Tensor | float) -> torch.Tensor:
    """``y = w * k_bit_quantize(x, k) + b``: a k-bit grid with a (learnable) scale and offset.

    Gradients: ``dL/dx = g * w`` (k_bit_quantize passes gradients straight through),
    ``dL/dw = sum(g * k_bit_quantize(x, k))`` and ``dL/db = sum(g)``, reduced to the shapes of
    ``w`` and ``b`` (``w`` and ``b`` broadcast by the usual rules; 0-dim tensors and Python numbers
    keep x's dtype). The forward is computed as spikingjelly does, ``w * q`` then ``+ b``.

    With 0-dim (or number) ``w`` and ``b`` and a non-0-dim ``x`` (the module's case) a fused
    autograd Function is used: one temporary less, and ``dL/dw`` as a dot product (the same value
    as autograd's ``sum(g * q)`` up to summation order). Otherwise it is the plain composite.

    Follows spikingjelly ``quantize.affine_k_bit_quantize``.
    """
    k = _check_k(k, "affine_k_bit_quantize")
    check_floating(x, "affine_k_bit_quantize")
    n = _levels(k, x, "affine_k_bit_quantize")
    if x.dim() > 0 and _is_scalar(w) and _is_scalar(b):
        return _AffineKBitQuantize.apply(x, n, w, b)
    return w * _KBitQuantize.apply(x, n) + b


# ------------------------------------------------------------------------------------------------
# clamp_by_linear (spikingjelly): min-max normalisation with gradients through min and max


class _ClampByLinear(torch.autograd.Function):
    """y = (x - min x) / ((max x + eps) - min x), differentiated through x, min x and max x."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, eps: float) -> torch.Tensor:
        lo, hi = torch.aminmax(x)
        den = (hi + eps) - lo  # spikingjelly: x_max = max(x) + eps; (x - x_min) / (x_max - x_min)
        y = torch.sub(x, lo).div_(den)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x, y, lo, hi, den)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, y, lo, hi, den = ctx.saved_tensors
        grad = torch.div(g, den)  # through the numerator x - min
        # d/d(den) = -sum(g * y) / den, and den = (max + eps) - min
        grad_den = torch.dot(g.reshape(-1), y.reshape(-1)).neg_().div_(den)
        grad_min = grad.sum().neg_().sub_(grad_den)
        # min and max share their gradient evenly among ties, as torch.min()/torch.max() do
        at = torch.empty_like(x, dtype=torch.bool)
        for extreme, share in ((lo, grad_min), (hi, grad_den)):
            where = torch.eq(x, extreme, out=at).nonzero(as_tuple=True)
            grad.index_put_(where, share / where[0].numel(), accumulate=True)
        return grad, None


def clamp_by_linear(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Min-max normalise the whole tensor into [0, 1]: spikingjelly ``quantize.clamp_by_linear``.

    Forward, exactly as spikingjelly computes it (in x's dtype)::

        y = (x - min(x)) / ((max(x) + eps) - min(x))

    eps is added to ``max(x)`` **before** the subtraction, so it is rounded away with max's ulp:
    in float32 it vanishes completely for ``|max| >= 256`` (one ulp, about 1.5e-5, for
    128 <= |max| < 256). Consequences: ``[100, 300] -> [0, 1]`` (the top element maps to exactly 1)
    and a constant tensor with a large value, e.g. ``[1000, 1000]``, gives ``0/0 = NaN``; a
    constant tensor with small values gives 0. With ``eps=0`` every constant tensor gives NaN.

    Gradient: the exact derivative, also through ``min(x)`` and ``max(x)`` (not an STE); each of
    min and max passes its gradient to its arg-positions, split evenly among ties as
    ``torch.min``/``torch.max`` of a whole tensor do. For an upstream of ones the gradient sums to
    about 0. Results equal plain autograd through the formula up to reduction order (ulps).
    NaN anywhere in x makes the whole output (and gradient) NaN, as min/max propagate NaN.
    An empty tensor gives an empty result. ``eps`` must be finite and >= 0 (ValueError).
    """
    value = _check_real(eps, "clamp_by_linear", "eps")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"clamp_by_linear: eps must be finite and >= 0, got {value}")
    check_floating(x, "clamp_by_linear")
    if x.numel() == 0:
        return x.clone()
    if x.dim() == 0:  # index_put_ needs at least one dimension
        return _ClampByLinear.apply(x.reshape(1), value).reshape(())
    return _ClampByLinear.apply(x, value)


# ------------------------------------------------------------------------------------------------
# DoReFa (larq `DoReFa`, Zhou et al. 2016)


class _DoReFaActivations(torch.autograd.Function):
    """y = round(clip(x, 0, 1) * n) / n; dy/dx = 1{0 <= x <= 1}."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(x, 0.0, 1.0)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(torch.eq(y, x))  # 0 <= x <= 1 (false at NaN)
        return y.mul_(n).round_().div_(n)

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        (inside,) = ctx.saved_tensors
        return torch.where(inside, g, g.new_zeros(())), None


class _DoReFaWeights(torch.autograd.Function):
    """y = 2 round((tanh x / (2 max|tanh x|) + 1/2) n) / n - 1; dy/dx = sech^2(x) / max|tanh x|."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        lo, hi = torch.aminmax(t)
        d = torch.maximum(hi, lo.neg())  # max|t| over the whole tensor; NaN if t holds a NaN
        all_zero = d == 0
        # all-zero t: any non-zero divisor gives t / 2d = 0, i.e. larq's divide_no_nan
        two_d = torch.where(all_zero, 1.0, d * 2)
        # v = t / 2d + 0.5 (addcdiv: the same two roundings); 2 * (r / n) - 1 is computed as
        # r / (n / 2) - 1, bit-identical because scaling by 2 is exact, one pass fewer.
        y = torch.addcdiv(t.new_full((), 0.5), t, two_d).mul_(n).round_().div_(n / 2).sub_(1)
        if ctx.needs_input_grad[0]:
            # t is kept (recomputing tanh costs more than the memory); d = 0 is stored as inf
            # so that g / d gives the 0 gradient of divide_no_nan
            ctx.save_for_backward(t, torch.where(all_zero, math.inf, d))
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        t, d = ctx.saved_tensors
        # (1 - t * t) * g / d in one buffer; larq computes (g / d) * (1 - t * t): equal up to
        # rounding (a few ulps)
        sech2 = torch.addcmul(t.new_ones(()), t, t, value=-1)
        return sech2.mul_(g).div_(d), None


def dorefa(x: torch.Tensor, k_bit: int = 2, mode: DoReFaMode = "activations") -> torch.Tensor:
    """DoReFa k-bit quantizer for activations or weights, exactly as larq ``DoReFa``.

    With ``n = 2**k_bit - 1`` and ``q(v) = round(v * n) / n`` (half to even, identity gradient):

    * ``mode="activations"``: forward ``q(clip(x, 0, 1))``, gradient ``g * 1{0 <= x <= 1}``
      (closed window; 0 at NaN and ±inf). k_bit=1 maps 0.5 to 0. ``-0.0`` stays ``-0.0`` (torch
      clamp; larq returns +0.0). Only a bool mask is saved for backward.
    * ``mode="weights"``: ``t = tanh(x)``, ``d = max|t|`` over the whole tensor (a constant: not
      differentiated), ``v = t / (2d) + 0.5``, forward ``2 * q(v) - 1``; gradient
      ``g * sech^2(x) / d``, computed as ``(1 - t * t) * g / d`` (larq: ``(g / d) * (1 - t * t)``;
      equal up to a few ulps). No clipping before tanh (pair it with a weight clip to [-1, 1] as
      larq advises). ``t`` is saved for backward (one weight-sized float tensor).

      - Zero weights land on an exact half (v = 0.5, v * n = n/2 with n odd) and round to even:
        they become -1 for k_bit=1 and +1/3 for k_bit=2 (float32 0.33333337, as 2 * (2/3) - 1 is
        rounded), as in larq and bitorch. Zero is not preserved.
      - An all-zero tensor (d = 0) gives v = 0.5 everywhere (larq's ``divide_no_nan``; bitorch
        gives NaN) and gradient 0 for a finite upstream (an infinite or NaN upstream gives NaN).
      - A NaN weight makes ``d`` NaN (``torch.max`` propagates NaN), so the **whole** output and
        gradient are NaN, as in bitorch: corrupt weights are not silently rescaled.
      - ±inf weights give ±1 and gradient 0. An empty tensor gives an empty result.

    The forward is computed in larq's order in x's dtype (bit-identical to bitorch
    ``WeightDoReFa``/``InputDoReFa`` and to larq up to TF's own tanh in float32); ``n`` and ``2d``
    are 0-dim tensors on x's device.

    ``k_bit`` must be an int >= 1 (TypeError for bool/float, ValueError below 1 or when
    ``2**k_bit - 1`` overflows x's dtype). An unknown ``mode`` raises ValueError on every call.
    Zhou et al. 2016, arXiv:1606.06160.
    """
    _check_mode(mode, "dorefa")
    k_bit = _check_k(k_bit, "dorefa", "k_bit")
    check_floating(x, "dorefa")
    n = _levels(k_bit, x, "dorefa")
    if mode == "activations":
        return _DoReFaActivations.apply(x, n)
    if x.numel() == 0:
        return x.clone()
    return _DoReFaWeights.apply(x, n)


# ------------------------------------------------------------------------------------------------
# modules


@register("round_ste")
class RoundSTE(Quantizer):
    """Module form of :func:`round_ste` (bits=32: the output is not on a bounded grid)."""

    def __init__(self) -> None:
        super().__init__(bits=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return round_ste(x)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.round(x)``: the eval forward as one plain op (bit-identical)."""
        return torch.round(x)


@register("ceil_ste")
class CeilSTE(Quantizer):
    """Module form of :func:`ceil_ste` (bits=32)."""

    def __init__(self) -> None:
        super().__init__(bits=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ceil_ste(x)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.ceil(x)``: the eval forward as one plain op (bit-identical)."""
        return torch.ceil(x)


@register("floor_ste")
class FloorSTE(Quantizer):
    """Module form of :func:`floor_ste` (bits=32)."""

    def __init__(self) -> None:
        super().__init__(bits=32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return floor_ste(x)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.floor(x)``: the eval forward as one plain op (bit-identical)."""
        return torch.floor(x)


@register("clamp_ste")
class ClampSTE(Quantizer):
    """Module form of :func:`clamp_ste`: clamp to [min_value, max_value], gradient 1 inside
    (closed). bits=32. Bad bounds raise ValueError at construction."""

    def __init__(self, min_value: float, max_value: float) -> None:
        super().__init__(bits=32)
        self.min_value = _check_real(min_value, "ClampSTE", "min_value")
        self.max_value = _check_real(max_value, "ClampSTE", "max_value")
        if self.min_value > self.max_value:
            raise ValueError(f"ClampSTE: min_value must be <= max_value, got {self.min_value} > "
                             f"{self.max_value}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_ste(x, self.min_value, self.max_value)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``torch.clamp(x, min_value, max_value)`` (bit-identical to the eval forward)."""
        return torch.clamp(x, self.min_value, self.max_value)

    def extra_repr(self) -> str:
        return f"min_value={self.min_value}, max_value={self.max_value}"


@register("step_quantize")
class StepQuantize(Quantizer):
    """Module form of :func:`step_quantize` (bits=32: the grid is unbounded)."""

    def __init__(self, step: float = 1.0) -> None:
        super().__init__(bits=32)
        step = _check_real(step, "StepQuantize", "step")
        if not (math.isfinite(step) and step > 0):
            raise ValueError(f"StepQuantize: step must be finite and > 0, got {step}")
        self.step = step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return step_quantize(x, self.step)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``round(x / s) * s`` with ``s = x.new_full((), step)``: bit-identical to eval.

        The check that ``step`` stays > 0 in x's dtype is not repeated: where the forward raises
        ValueError (e.g. ``step=1e-8`` with float16 input, s = 0) this returns NaN.
        """
        step = x.new_full((), self.step)
        return torch.mul(torch.round(torch.div(x, step)), step)

    def extra_repr(self) -> str:
        return f"step={self.step}"


@register("k_bit_quantize")
class KBitQuantize(Quantizer):
    """Module form of :func:`k_bit_quantize` (no clipping, identity gradient); bits = k."""

    def __init__(self, k: int) -> None:
        k = _check_k(k, "KBitQuantize")
        super().__init__(bits=k)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return k_bit_quantize(x, self.k)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``round(x * n) / n`` with ``n = x.new_full((), 2**k - 1)``: bit-identical to eval.

        The overflow check of ``2**k - 1`` in x's dtype is not repeated: where the forward raises
        ValueError (k >= 16 with float16 input, n = inf) this returns NaN.
        """
        n = _grid_levels(x, self.k)
        return torch.div(torch.round(torch.mul(x, n)), n)

    def extra_repr(self) -> str:
        return f"k={self.k}"


@register("affine_k_bit_quantize")
class AffineKBitQuantize(Quantizer):
    """Module form of :func:`affine_k_bit_quantize`: ``w * k_bit_quantize(x, k) + b``; bits = k.

    ``w`` and ``b`` are 0-dim float tensors of the default dtype (float32): ``nn.Parameter`` when
    ``learnable`` (trained by ordinary autograd), else non-persistent buffers (fixed settings,
    rebuilt from the constructor; they still follow ``.to(device)``). Both must be finite numbers.

    ``get_config()`` gives ``k``, ``learnable`` and the **current** ``w`` and ``b`` as Python
    floats (learned values included, so a rebuilt fixed module holds them too); the rebuilt
    tensors are of the default dtype again, whatever dtype the module was moved to.
    """

    w: torch.Tensor
    b: torch.Tensor

    def __init__(self, k: int, w: float = 1.0, b: float = 0.0, learnable: bool = True) -> None:
        k = _check_k(k, "AffineKBitQuantize")
        super().__init__(bits=k)
        self.k = k
        self.learnable = bool(learnable)
        for arg, value in (("w", w), ("b", b)):
            number = _check_real(value, "AffineKBitQuantize", arg)
            if not math.isfinite(number):
                raise ValueError(f"AffineKBitQuantize: {arg} must be finite, got {number}")
            tensor = torch.tensor(number)
            if self.learnable:
                self.register_parameter(arg, nn.Parameter(tensor))
            else:
                self.register_buffer(arg, tensor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine_k_bit_quantize(x, self.k, self.w, self.b)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``q * w + b`` with ``q = round(x * n) / n``: bit-identical to the eval forward.

        ``w`` and ``b`` are read as the module's 0-dim tensors (not Python numbers), so the traced
        graph holds two ``get_attr`` nodes besides call_function/call_method ones (``convert``
        copies them into the model as buffers). Reading them as tensors keeps the forward's type
        promotion: float16 input with the float32 ``w``, ``b`` stays float16 (and a 0-dim input
        gives float32, as the forward's composite does). They are read detached: the output
        needs no gradient, and a tracer whose root does not hold this module (e.g. one tracing
        the bound method ``q.inference``) takes them as tensor constants instead of refusing a
        foreign ``nn.Parameter``. As in :class:`KBitQuantize`, the overflow check of
        ``2**k - 1`` in x's dtype is not repeated (NaN where the forward would raise).
        """
        n = _grid_levels(x, self.k)
        q = torch.div(torch.round(torch.mul(x, n)), n)
        return torch.add(torch.mul(q, self.w.detach()), self.b.detach())

    def extra_repr(self) -> str:
        return (f"k={self.k}, w={float(self.w.detach()):g}, b={float(self.b.detach()):g}, "
                f"learnable={self.learnable}")


@register("clamp_by_linear")
class ClampByLinear(Quantizer):
    """Module form of :func:`clamp_by_linear` (bits=32: a normalisation, not a grid)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__(bits=32)
        eps = _check_real(eps, "ClampByLinear", "eps")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"ClampByLinear: eps must be finite and >= 0, got {eps}")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_by_linear(x, self.eps)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - lo) / ((hi + eps) - lo)`` with ``lo, hi = torch.aminmax(x)``: bit-identical to
        the eval forward on every non-empty input (0-dim included).

        **Empty input**: ``torch.aminmax`` raises RuntimeError (a reduction with no identity),
        where the forward returns an empty tensor; avoiding it with plain ops would cost a copy
        of the input on every call.
        """
        extremes = torch.aminmax(x)
        lo, hi = extremes[0], extremes[1]
        return torch.div(torch.sub(x, lo), (hi + self.eps) - lo)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


@register("dorefa")
class DoReFa(Quantizer):
    """Module form of :func:`dorefa` (larq ``DoReFa``); bits = k_bit.

    ``mode`` is checked at construction and again on every call (a mutated ``.mode`` that is not
    'activations' or 'weights' raises ValueError).
    """

    def __init__(self, k_bit: int = 2, mode: DoReFaMode = "activations") -> None:
        k_bit = _check_k(k_bit, "DoReFa", "k_bit")
        _check_mode(mode, "DoReFa")
        super().__init__(bits=k_bit)
        self.k_bit = k_bit
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dorefa(x, self.k_bit, self.mode)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """The eval forward as plain ops, bit-identical, with ``n = x.new_full((), 2**k_bit - 1)``.

        * ``"activations"``: ``round(clamp(x, 0, 1) * n) / n``.
        * ``"weights"``: ``t = tanh(x)``, ``lo, hi = aminmax(t)``, ``d = maximum(hi, -lo)``,
          ``v = addcdiv(0.5, t, where(d == 0, 1.0, 2 * d))``, ``round(v * n) / (n / 2) - 1``.
          ``addcdiv`` is kept (not ``t / 2d + 0.5``) because it is what the forward runs (on
          CPU the two agree; a CUDA kernel may keep float16/bfloat16 in float32 between the
          division and the addition, rounding once where the two-op form rounds twice).
          Convert folds weight quantizers into constants, so this form matters only where
          DoReFa "weights" quantizes an activation. **Empty input** raises RuntimeError
          (``aminmax`` has no identity) where the forward returns an empty tensor.

        A bad ``mode`` raises ValueError (when traced: at trace time). The overflow check of
        ``2**k_bit - 1`` in x's dtype is not repeated (NaN where the forward would raise).
        """
        _check_mode(self.mode, "DoReFa")
        n = _grid_levels(x, self.k_bit)
        if self.mode == "activations":
            return torch.div(torch.round(torch.mul(torch.clamp(x, 0.0, 1.0), n)), n)
        t = torch.tanh(x)
        extremes = torch.aminmax(t)
        d = torch.maximum(extremes[1], torch.neg(extremes[0]))
        v = torch.addcdiv(t.new_full((), 0.5), t, torch.where(d == 0, 1.0, d * 2))
        return torch.sub(torch.div(torch.round(torch.mul(v, n)), n / 2), 1)

    def extra_repr(self) -> str:
        return f"k_bit={self.k_bit}, mode={self.mode!r}"
