"""The WAGE helpers of QPyTorch's example (``examples/WAGE/wage_qtorch.py``), in pure torch.

WAGE (Wu et al., "Training and Inference with Integers in Deep Neural Networks", ICLR 2018,
arXiv:1802.04680) quantizes Weights, Activations, Gradients and Errors to fixed point. With
``sigma(b) = 2**-(b - 1)``, a ``b``-bit WAGE value lies on the grid ``sigma(b)`` in
``[-1 + sigma(b), 1 - sigma(b)]``.

* :func:`shift` scales a tensor by a power of two so that its largest magnitude lies in (0.5, 1].
* :func:`C` is the clip applied to the weight accumulator before each update.
* :func:`QW` quantizes weights (then divides by the layer's power-of-two ``scale``).
* :func:`QG` quantizes a weight gradient into an update (learning rate included).

``QW`` and ``QG`` are raw operations without gradient (as in QPyTorch); ``shift`` and ``C`` are
ordinary differentiable torch expressions. Rounding ``"nearest"`` is half to even on every device.
"""

from __future__ import annotations

import math

import torch

from fxquant.quantizers.base import check_floating
from fxquant.quantizers.fixed_point import _check_args, _work_dtype, fixed_point_quantize

__all__ = ["shift", "C", "QW", "QG"]


def _check_bits(bits: int, who: str, name: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise ValueError(f"{who}: {name} must be an int >= 1, got {bits!r}")


def _check_scale(scale: float, who: str) -> None:
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
            or scale <= 0):
        raise ValueError(f"{who}: scale must be a finite number > 0, got {scale!r}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same type, and same index where both name one (a generator may say ``cuda``)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_generator_device(generator: torch.Generator | None, x: torch.Tensor, who: str) -> None:
    """Raise a ValueError naming both devices when ``generator`` cannot draw noise for ``x``."""
    if generator is None:
        return
    g, d = generator.device, x.device
    if not _same_device(g, d):
        raise ValueError(f"{who}: the generator for stochastic rounding is on {g} but the tensor "
                         f"is on {d}; give it a torch.Generator(device={str(d)!r}). A WAGE "
                         "quantizer's generator follows model.to(device); "
                         "fxquant.wage.seed_rounding(model, seed) reseeds them all on the "
                         "model's device")


def _shift_divisor(x: torch.Tensor) -> torch.Tensor:
    """0-dim ``2**ceil(log2(max|x|))`` without gradient, as QPyTorch's ``shift`` computes it.

    One read-only pass (``aminmax``), no temporary of ``x``'s size. Computed in ``x``'s dtype
    (float32 for float16/bfloat16), so float32 matches QPyTorch's float32 ``torch.log2`` bit for
    bit. An all-zero ``x`` gives 1 (QPyTorch: 0, hence 0/0 = NaN); ``±inf`` in ``x`` gives
    ``inf``; NaN gives NaN.
    """
    x = x.detach()
    dtype = _work_dtype(x.dtype)
    if x.numel() == 0:
        return torch.ones((), dtype=dtype, device=x.device)
    lo, hi = torch.aminmax(x)
    biggest = torch.maximum(hi.to(dtype), lo.to(dtype).neg())
    divisor = torch.exp2(torch.ceil(torch.log2(biggest)))
    return divisor.masked_fill_(divisor == 0, 1.0)


def shift(x: torch.Tensor) -> torch.Tensor:
    """Scale ``x`` by a power of two so that ``max|x|`` lands in (0.5, 1].

    ``shift(x) = x / 2**ceil(log2(max|x|))`` with one global maximum (QPyTorch WAGE ``shift``);
    a power-of-two maximum maps exactly to 1.

    Gradient: ``dy / 2**ceil(log2(max|x|))`` (the exponent is a constant; in QPyTorch ``ceil``
    blocks the path through ``max`` in the same way).

    Edge cases: an all-zero ``x`` returns zeros (signs kept). **Deliberate difference**: QPyTorch
    divides by ``2**-inf = 0`` and returns NaN everywhere. Any NaN in ``x`` gives NaN everywhere;
    an infinite entry makes every finite entry 0 and the infinite ones NaN (as QPyTorch). The
    exponent is computed in ``x``'s dtype (float32 for float16/bfloat16), so, exactly as in
    QPyTorch, a maximum a few ulps above a power of two can map slightly above 1 where ``log2``
    rounds down to the integer.
    """
    check_floating(x, "shift")
    divisor = _shift_divisor(x)
    if divisor.dtype == x.dtype:
        return x / divisor
    return (x.to(divisor.dtype) / divisor).to(x.dtype)  # float16/bfloat16: 2**e may overflow


def C(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clip to the ``bits``-bit WAGE range: ``clamp(x, -1 + delta, 1 - delta)``.

    ``delta = 2**-(bits - 1)``, except ``delta = 0`` when ``bits == 1`` or ``bits > 15`` (QPyTorch
    WAGE ``C``). Gradient: that of ``torch.clamp`` (``dy`` inside the closed range, 0 outside).
    NaN passes through.
    """
    check_floating(x, "C")
    _check_bits(bits, "C")
    delta = 0.0 if bits > 15 or bits == 1 else 2.0 ** -(bits - 1)
    return torch.clamp(x, -1.0 + delta, 1.0 - delta)


def QW(
    x: torch.Tensor,
    bits: int,
    scale: float = 1.0,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize weights: ``fixed_point_quantize(x, bits, bits - 1, clamp, symmetric, mode)``, then
    divide by ``scale`` when ``scale > 1.8``.

    That is ``clip(R(x / sigma) * sigma, -1 + sigma, 1 - sigma)`` with ``sigma = 2**-(bits - 1)``
    (QPyTorch WAGE ``QW``). For ``bits=2`` the values are ``{-0.5, 0, 0.5}``: ``0.25 -> 0`` (tie to
    even), ``0.75 -> 0.5`` (clamped). ``scale`` is the layer's power-of-two scale from
    :func:`fxquant.wage.wage_init_`; QPyTorch's exact condition ``scale > 1.8`` is kept (a scale
    of 1 is ignored, 2 halves). ``bits=1`` maps everything to 0 (the symmetric 1-bit range is
    ``[0, 0]``).

    Gradient: none (raw operation, like QPyTorch's; see :class:`fxquant.wage.WAGEWeight` for the
    straight-through version used in a model).
    """
    check_floating(x, "QW")
    _check_bits(bits, "QW")
    _check_args(bits, bits - 1, mode, "QW")
    _check_scale(scale, "QW")
    if mode == "stochastic":
        _check_generator_device(generator, x, "QW")
    y = fixed_point_quantize(x, bits, bits - 1, clamp=True, symmetric=True, rounding=mode,
                             generator=generator)
    if scale > 1.8:
        y.div_(scale)
    return y


def QG(
    x: torch.Tensor,
    bits_G: int,
    lr: float,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize a weight gradient into a weight update (QPyTorch WAGE ``QG``, xbtorch signature).

    ``s = shift(x)``; ``lr' = lr / 2**(bits_G - 1)``;
    ``out = fixed_point_quantize(lr' * s, bits_G, bits_G - 1, clamp=False, symmetric=True, mode)``,
    computed in that order (``lr' * s`` rounded to ``x``'s dtype first) so that it matches QPyTorch
    bit for bit. For a power-of-two ``lr`` this is ``R(lr * s) * 2**-(bits_G - 1)``: with
    ``lr=8, bits_G=8`` integers in ``[-8, 8]`` times 1/128. No clamp: the update may exceed 1.

    Gradient: none (raw operation). Edge cases: an all-zero ``x`` gives zeros (QPyTorch: NaN, see
    :func:`shift`); NaN anywhere gives NaN everywhere.
    """
    check_floating(x, "QG")
    _check_bits(bits_G, "QG", "bits_G")
    _check_args(bits_G, bits_G - 1, mode, "QG")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"QG: lr must be a finite number > 0, got {lr!r}")
    if mode == "stochastic":
        _check_generator_device(generator, x, "QG")
    s = shift(x.detach())
    s.mul_(lr / 2.0 ** (bits_G - 1))
    return fixed_point_quantize(s, bits_G, bits_G - 1, clamp=False, symmetric=True,
                                rounding=mode, generator=generator)
