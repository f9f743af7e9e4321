"""Fixed-point quantization: QPyTorch's ``fixed_point_quantize`` CPU kernel in pure torch.

A fixed-point number with word length ``wl`` and fractional length ``fl`` is an integer ``n`` of
``wl`` bits (two's complement) scaled by ``2**-fl``. Quantizing ``x`` rounds ``x * 2**fl`` to an
integer, scales back and (optionally) clamps to the representable range. Scaling by a power of
two is exact, so the result equals QPyTorch's C++ kernel bit for bit (float32, ``"nearest"``,
``|x * 2**fl| < 2**22``).

These are raw operations, like QPyTorch's: the output carries no autograd graph (the input is
detached). The WAGE quantizers in :mod:`fxquant.wage` wrap them with custom gradients.

>>> import torch
>>> fixed_point_quantize(torch.tensor([0.3, 0.25, 0.75, -2.0]), wl=2, fl=1, symmetric=True)
tensor([ 0.5000,  0.0000,  0.5000, -0.5000])
"""

from __future__ import annotations

import torch

from fxquant.quantizers.base import check_floating

__all__ = ["fixed_point_quantize", "fixed_point_quantize_mask", "ROUNDING_MODES"]

#: The rounding modes every fixed-point function accepts.
ROUNDING_MODES: tuple[str, ...] = ("nearest", "stochastic")

# Limit on wl and |fl|: 2**fl and 2**-fl stay normal float32 numbers (no inf * 0 = NaN).
_MAX_EXPONENT = 126


def _check_args(wl: int, fl: int, rounding: str, who: str) -> None:
    if isinstance(wl, bool) or not isinstance(wl, int) or wl < 1:
        raise ValueError(f"{who}: wl (word length) must be an int >= 1, got {wl!r}")
    if isinstance(fl, bool) or not isinstance(fl, int):
        raise ValueError(f"{who}: fl (fractional length) must be an int, got {fl!r}")
    if abs(fl) > _MAX_EXPONENT or wl > _MAX_EXPONENT:
        raise ValueError(f"{who}: wl and |fl| must be <= {_MAX_EXPONENT}, got wl={wl}, fl={fl}")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"{who}: rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 (no overflow of ``x * 2**fl``, fine noise)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scaled_round_clamp(
    x: torch.Tensor,
    divisor: torch.Tensor | None,
    wl: int,
    fl: int,
    clamp: bool,
    symmetric: bool,
    rounding: str,
    generator: torch.Generator | None,
    with_mask: bool,
    zero_where: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``R(x / divisor * 2**fl) * 2**-fl``, clamped, and the clamp mask (when ``with_mask``).

    ``divisor`` (a 0-dim power of two in the working dtype, or None for 1) is applied first, as a
    division, then the exact ``* 2**fl``: that is QPyTorch's ``shift`` followed by its kernel, bit
    for bit, even where one combined factor would over- or underflow. Rounding, clamping and the
    mask are done on the integer grid, before the exact unscale (``n > 2**(wl-1) - 1`` is the same
    test as ``n * 2**-fl > t_max``). The result is 0 where the bool tensor ``zero_where`` is set
    (applied to the input for ``"nearest"``, fused with the one allocation; 0 stays 0 unless the
    divisor is NaN). One float tensor is allocated (the output, plus the noise for
    ``"stochastic"``, which becomes the output); every later step is in place.
    """
    src = x.detach()
    dtype = _work_dtype(x.dtype)
    if dtype != src.dtype:
        src = src.to(dtype)
    scale = 2.0**fl
    if rounding == "nearest" and clamp and symmetric and with_mask and zero_where is None:
        return _nearest_symmetric_with_mask(src, x.dtype, scale, wl, fl, divisor)
    if rounding == "nearest":
        if zero_where is not None:
            a = torch.where(zero_where, torch.zeros((), dtype=dtype, device=src.device), src)
            if divisor is not None:
                a.div_(divisor)
            a.mul_(scale)
        elif divisor is not None:
            a = torch.div(src, divisor).mul_(scale)
        else:
            a = torch.mul(src, scale)
        a.round_()  # half to even on every device
    else:
        # floor(a + u), u ~ U[0, 1): the noise buffer becomes the output (a + u rounded once).
        a = torch.rand(src.shape, generator=generator, device=src.device, dtype=dtype)
        if divisor is None:
            a.add_(src, alpha=scale)
        else:
            a.addcdiv_(src, divisor, value=scale)
        a.floor_()
    mask = None
    if clamp:
        hi = 2.0 ** (wl - 1) - 1.0
        lo = -(2.0 ** (wl - 1)) + (1.0 if symmetric else 0.0)
        if with_mask:
            # Strict comparisons: a value rounding onto a bound is not masked; NaN never is.
            mask = a > hi
            mask |= a < lo
        a.clamp_(lo, hi)
    a.mul_(2.0**-fl)
    if rounding != "nearest" and zero_where is not None:
        a.masked_fill_(zero_where, 0.0)
    if a.dtype != x.dtype:
        a = a.to(x.dtype)
    return a, mask


def _nearest_symmetric_with_mask(
    src: torch.Tensor,
    dtype: torch.dtype,
    scale: float,
    wl: int,
    fl: int,
    divisor: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric, nearest, masked case of :func:`_scaled_round_clamp` with one comparison.

    Half-to-even rounding and the symmetric range commute with ``abs``, so the magnitude is
    rounded, compared (``|n| > hi``) and clamped, and the sign of the input is put back at the end
    (``copysign`` keeps ``-0.0`` and NaN as they are). Same result as the general path, one bool
    temporary fewer.
    """
    a = torch.mul(src, scale) if divisor is None else torch.div(src, divisor).mul_(scale)
    a.abs_().round_()
    hi = 2.0 ** (wl - 1) - 1.0
    mask = a > hi
    a.clamp_(max=hi).mul_(2.0**-fl).copysign_(src)
    if a.dtype != dtype:
        a = a.to(dtype)
    return a, mask


def _symmetric_nearest_plain(x: torch.Tensor, wl: int, fl: int) -> torch.Tensor:
    """``fixed_point_quantize(x, wl, fl, clamp=True, symmetric=True, rounding="nearest")`` in plain,
    out-of-place torch ops (FX-traceable: only ``wl`` and ``fl`` are Python constants).

    ``clamp(round(x * 2**fl), -hi, hi) * 2**-fl`` with ``hi = 2**(wl-1) - 1``: the pattern
    ``mul, round, clamp, mul`` in ``x``'s dtype. Equal to the in-place kernel bit for bit (values;
    a zero's sign may differ for ``wl = 1``) on every floating dtype, including float16/bfloat16,
    which the kernel computes in float32: for ``wl <= 16`` and ``0 <= fl <= 15`` the scalings by
    ``2**±fl`` are exact in float16 (or overflow to ``inf``, which the clamp sends to the bound
    as float32 would), and clamping to a bound rounded to the dtype equals rounding the clamped
    value (monotone rounding). Outside that range (``hi`` above float16's maximum, or
    subnormal results) it computes in ``promote_types(x.dtype, float32)`` and casts back, like
    the kernel; those graphs carry the two ``to`` casts.
    """
    scale, hi = 2.0**fl, 2.0 ** (wl - 1) - 1.0
    lo = -(2.0 ** (wl - 1)) + 1.0  # +0.0 for wl = 1, as the kernel
    if wl <= 16 and 0 <= fl <= 15:
        return torch.clamp(torch.round(x * scale), lo, hi) * 2.0**-fl
    work = x.to(torch.promote_types(x.dtype, torch.float32))
    y = torch.clamp(torch.round(work * scale), lo, hi) * 2.0**-fl
    return y.to(x.dtype)


def fixed_point_quantize(
    x: torch.Tensor,
    wl: int,
    fl: int,
    clamp: bool = True,
    symmetric: bool = False,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize ``x`` to signed fixed point with word length ``wl`` and fractional length ``fl``.

    Follows QPyTorch ``qtorch.quant.fixed_point_quantize`` (CPU kernel), per element:

    * ``a = x * 2**fl`` (exact: multiplication by a power of two);
    * ``"nearest"``: ``n = round_half_to_even(a)`` (``torch.round``) on **every** device (QPyTorch's
      CUDA kernel rounds half away from zero; we do not follow it);
      ``"stochastic"``: ``n = floor(a + u)``, ``u ~ U[0, 1)`` drawn with ``torch.rand`` from
      ``generator`` (pass a seeded ``torch.Generator`` for reproducible runs);
    * ``q = n * 2**-fl``;
    * if ``clamp``: ``q = clip(q, t_min, t_max)`` with ``t_min = -2**(wl-fl-1)``,
      ``t_max = 2**(wl-fl-1) - 2**-fl``; ``symmetric`` raises ``t_min`` by ``2**-fl``. The
      **rounded** value is clamped.

    Gradient: none. This is a raw operation like QPyTorch's; ``x`` is detached, so the output
    never requires grad even when ``x`` does. Use :mod:`fxquant.wage` for quantizers with
    gradients.

    Edge cases: NaN passes through unchanged; ``±inf`` clamps to ``t_max``/``t_min`` (stays
    ``±inf`` without ``clamp``); ``-0.0`` stays ``-0.0`` for ``"nearest"`` (QPyTorch's CPU kernel
    returns ``+0.0``; the two compare equal). ``wl=1, fl=0, symmetric`` maps everything (but NaN)
    to 0.

    Differences from QPyTorch: every floating dtype is accepted (QPyTorch: float32 only) and kept;
    float16 and bfloat16 are computed in float32 and rounded back once (so ``x * 2**fl`` cannot
    overflow, and a grid value the dtype cannot hold is rounded to the dtype); the default
    rounding is ``"nearest"`` (QPyTorch: ``"stochastic"``).

    Args:
        x: floating-point tensor (integer and bool tensors raise ``TypeError``).
        wl: word length, an int in ``[1, 126]``. The grid is exact in the dtype while ``wl`` fits
            its significand (24 bits for float32, as in QPyTorch).
        fl: fractional length, an int with ``|fl| <= 126`` (may be negative or ``>= wl``).
        clamp: clamp to ``[t_min, t_max]``.
        symmetric: use ``t_min = -t_max``.
        rounding: ``"nearest"`` or ``"stochastic"``.
        generator: random generator for ``"stochastic"`` (on ``x``'s device); ignored otherwise.
    """
    check_floating(x, "fixed_point_quantize")
    _check_args(wl, fl, rounding, "fixed_point_quantize")
    out, _ = _scaled_round_clamp(x, None, wl, fl, clamp, symmetric, rounding, generator, False)
    return out


def fixed_point_quantize_mask(
    x: torch.Tensor,
    wl: int,
    fl: int,
    symmetric: bool = False,
    rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fixed_point_quantize` with ``clamp=True``, also returning the clamp mask.

    Follows QPyTorch ``fixed_point_quantize_{nearest,stochastic}_mask``. The mask is a bool tensor,
    True where the rounded value lay **outside** ``[t_min, t_max]`` and was replaced by a bound
    (a value rounding exactly onto a bound is not masked; NaN is never masked; ``±inf`` is).
    QPyTorch returns a uint8 mask; this one is bool (same truth values, usable in
    ``masked_fill``). No gradient, as for :func:`fixed_point_quantize`.

    Returns:
        ``(quantized, mask)``.
    """
    check_floating(x, "fixed_point_quantize_mask")
    _check_args(wl, fl, rounding, "fixed_point_quantize_mask")
    out, mask = _scaled_round_clamp(x, None, wl, fl, True, symmetric, rounding, generator, True)
    assert mask is not None
    return out, mask
