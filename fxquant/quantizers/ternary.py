"""Ternary quantizer {-1, 0, +1} with a straight-through gradient (larq ``SteTern``).

>>> import torch
>>> ste_tern(torch.tensor([-0.5, -0.05, 0.0, 0.1, 0.7]))
tensor([-1.,  0.,  0.,  1.,  1.])
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fxquant.quantizers._common import (
    _check_clip,
    _check_real,
    _keep_nan,
    _rounded,
    _saturate_into,
    _select,
    _track_grad,
    _window,
)
from fxquant.quantizers.base import Quantizer, check_floating, register

__all__ = ["ste_tern", "SteTern"]

_TWN_FACTOR = 0.7  # Li & Liu 2016: Delta = 0.7 * mean(abs(x))


def _twn_threshold(magnitude: Tensor) -> Tensor:
    """TWN threshold ``(0.7 * sum(abs(x))) / numel`` over the whole tensor, as a 0-dim tensor.

    The sum is accumulated in at least float32 (a float16 sum of a large tensor would overflow)
    and the result is rounded to ``x``'s dtype. It stays on the device: no host synchronisation.
    FX-traceable (``dtype`` and ``numel`` become graph nodes), so :meth:`SteTern.inference`
    computes Delta with this very function.
    """
    accumulate = torch.promote_types(magnitude.dtype, torch.float32)
    total = magnitude.sum(dtype=accumulate)
    return (total * _TWN_FACTOR / magnitude.numel()).to(magnitude.dtype)


class _SteTern(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, threshold: float, twn: bool,
                clip_value: float | None) -> Tensor:
        out = torch.abs(x)  # |x|, then reused as the output buffer
        window = _window(out, clip_value)
        ctx.window = window is not None
        if window is not None:
            ctx.save_for_backward(window)
        if twn:
            delta: Tensor | float = _twn_threshold(out)
            # +0, or NaN when Delta is NaN (x holds a NaN): then every output is NaN.
            bias: Tensor | float = torch.where(delta.isnan(), delta, torch.zeros_like(delta))
        else:
            # Delta rounded to x's dtype (0.1 -> 0.100000001 in float32), then compared exactly.
            delta = _rounded(threshold, x.dtype)
            bias = 0.0
        out.ge_(delta)  # 1{|x| >= Delta} as 0.0 / 1.0: ties at ±Delta give 1, NaN gives 0
        out.mul_(x)  # x where |x| >= Delta, ±0 elsewhere, NaN where x is NaN
        return _saturate_into(out, out, bias, -1.0)  # sign, with ±0 -> +0

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        if not ctx.window:
            return grad, None, None, None
        (window,) = ctx.saved_tensors
        return _select(window, grad), None, None, None


def ste_tern(x: Tensor, threshold_value: float = 0.1, ternary_weight_networks: bool = False,
             clip_value: float | None = 1.0) -> Tensor:
    """Ternarize to {-1, 0, +1} with a straight-through gradient (larq ``ste_tern``).

    Forward: ``sign(x) * 1{abs(x) >= Delta}``: ``+1`` for ``x >= Delta``, ``-1`` for
    ``x <= -Delta``, ``+0`` in between. A value exactly at ``±Delta`` maps to ``±1`` (larq's
    ``sign(sign(x + Delta) + sign(x - Delta))`` does the same although its docs say ``>``); one
    ulp inside maps to 0. ``Delta`` is rounded to ``x``'s dtype before the exact comparison (float32
    0.1 is 0.100000001). ``Delta = 0`` gives ``sign(x)`` with ``sign(±0) = 0``. NaN gives NaN.

    ``Delta`` is ``threshold_value``, default **0.1** (larq's default is 0.05: fxquant deliberately
    uses 0.1, so pass ``threshold_value=0.05`` to reproduce larq's default), or, when
    ``ternary_weight_networks`` is True, the TWN threshold ``0.7 * sum(abs(x)) / numel(x)`` over
    the **whole** tensor (not per channel, not differentiated, ``threshold_value`` ignored). With
    TWN, a NaN anywhere in ``x`` makes ``Delta`` and so every output NaN; an infinite element
    makes ``Delta = inf``, so only the infinite elements map to ``±1``.

    Gradient: ``g * 1{abs(x) <= clip_value}`` (closed window, independent of ``Delta``; NaN and
    ``±inf`` get ``+0``); ``clip_value=None`` passes ``g`` unchanged. Only a bool mask is saved.

    Li & Liu 2016 (Ternary Weight Networks), arXiv:1605.04711.
    """
    check_floating(x, "ste_tern")
    threshold = _check_real(threshold_value, "ste_tern", "threshold_value", minimum=0.0,
                            allow_inf=True)
    if not isinstance(ternary_weight_networks, bool):
        raise ValueError("ste_tern: ternary_weight_networks must be a bool, "
                         f"got {ternary_weight_networks!r}")
    clip = _check_clip(clip_value, "ste_tern")
    return _SteTern.apply(x, threshold, ternary_weight_networks, clip if _track_grad(x) else None)


@register("ste_tern")
class SteTern(Quantizer):
    """Module form of :func:`ste_tern`: {-1, 0, +1} forward (2 bits), STE gradient."""

    def __init__(self, threshold_value: float = 0.1, ternary_weight_networks: bool = False,
                 clip_value: float | None = 1.0) -> None:
        super().__init__(bits=2)
        self.threshold_value = _check_real(threshold_value, "SteTern", "threshold_value",
                                           minimum=0.0, allow_inf=True)
        if not isinstance(ternary_weight_networks, bool):
            raise ValueError("SteTern: ternary_weight_networks must be a bool, "
                             f"got {ternary_weight_networks!r}")
        self.ternary_weight_networks = ternary_weight_networks
        self.clip_value = _check_clip(clip_value, "SteTern")

    def forward(self, x: Tensor) -> Tensor:
        return ste_tern(x, self.threshold_value, self.ternary_weight_networks, self.clip_value)

    def inference(self, x: Tensor) -> Tensor:
        """Plain ops: ``(x >= Delta) - (x <= -Delta)`` in x's dtype, NaN kept.

        The difference of the two comparisons is ``+1``, ``-1`` or ``+0`` (also ``1 - 1`` at
        ``x = ±0`` when Delta is 0). A Python ``threshold_value`` is rounded to x's dtype by the
        comparison itself, as the forward rounds it. With TWN, Delta is computed from ``x`` in the
        graph by the forward's own :func:`_twn_threshold` (which records ``x.dtype`` and
        ``x.numel()`` as nodes); a NaN Delta (a NaN anywhere in ``x``) makes every output NaN.
        Equal to the eval forward bit for bit, except NaN sign and payload bits, which are
        unspecified (the input's or Delta's NaN here, an arithmetic one in the forward).
        """
        if self.ternary_weight_networks:  # a Python bool: fixed when the graph is traced
            delta = _twn_threshold(torch.abs(x))
            out = (x >= delta).type_as(x) - (x <= -delta).type_as(x)
            return torch.where(torch.isnan(delta), delta, out)
        out = (x >= self.threshold_value).type_as(x) - (x <= -self.threshold_value).type_as(x)
        return _keep_nan(x, out)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, threshold_value={self.threshold_value}, "
                f"ternary_weight_networks={self.ternary_weight_networks}, "
                f"clip_value={self.clip_value}")
