"""WAGE weight initialisation (QPyTorch ``examples/WAGE/models/wage_initializer.py``, xbtorch API).

WAGE draws every weight tensor uniformly from ``[-L, L]`` with ``L = max(Wm, sqrt(3 * factor /
fan_in))``, ``Wm = 1.5 / 2**(bits_W - 1)``, and gives its layer a power-of-two ``scale`` by which
:func:`fxquant.wage.QW` divides the quantized weights. Following xbtorch, the scale is stored on
the tensor as the attribute ``weight_scale`` (QPyTorch keeps a ``scale_dict[name]`` instead).

>>> import torch
>>> w = torch.empty(16, 128, 3, 3)
>>> wage_init_(w, bits_W=2, factor=1.0)
16.0
>>> w.weight_scale, bool(w.abs().max() <= 0.75)
(16.0, True)
"""

from __future__ import annotations

import math

import torch

from fxquant.quantizers.base import check_floating
from fxquant.wage.functional import _check_bits

__all__ = ["truncated_normal_", "scale_limit", "wage_init_"]

# Each round keeps a N(0, 1) draw with probability 0.954; 100 rounds leave nothing behind unless
# the interval holds no value of the tensor's dtype.
_MAX_ROUNDS = 100


def _check_positive(value: float, who: str, name: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise ValueError(f"{who}: {name} must be a finite number > 0, got {value!r}")


def truncated_normal_(
    tensor: torch.Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` in place with ``N(mean, std**2)`` truncated to ``(mean ± 2 std)``.

    Every value lies **strictly** inside the interval, as the tensor's dtype holds it: values are
    drawn (in float32, float64 for float64 tensors), scaled, rounded to the dtype, and those not
    strictly inside are drawn again until none is left. **Difference from QPyTorch/xbtorch**: they
    draw 4 samples per element and keep the first valid one, so an element whose 4 samples are all
    out of range (probability ``0.0455**4``, about 4e-6) keeps an out-of-range value. The random
    stream therefore differs from theirs. Not used by :func:`wage_init_` (as upstream).

    Raises ``ValueError`` for a non-finite ``mean`` or a ``std`` that is not > 0, ``RuntimeError``
    when no value of the dtype can be found in the interval. Returns ``tensor``.
    """
    check_floating(tensor, "truncated_normal_")
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise ValueError(f"truncated_normal_: mean must be a finite number, got {mean!r}")
    _check_positive(std, "truncated_normal_", "std")
    lo, hi = mean - 2.0 * std, mean + 2.0 * std
    sample_dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        out = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        pending = torch.arange(tensor.numel(), device=tensor.device)
        for _ in range(_MAX_ROUNDS):
            if pending.numel() == 0:
                break
            z = torch.randn(pending.numel(), generator=generator, dtype=sample_dtype,
                            device=tensor.device)
            z = z.mul_(std).add_(mean).to(tensor.dtype)
            out[pending] = z
            pending = pending[~((z > lo) & (z < hi))]
        else:
            if pending.numel() > 0:
                raise RuntimeError(f"truncated_normal_: no {tensor.dtype} value found strictly "
                                   f"inside ({lo}, {hi}) after {_MAX_ROUNDS} rounds; is std "
                                   "too small for this dtype?")
        tensor.copy_(out.view(tensor.shape))
    return tensor


def scale_limit(param: torch.Tensor, limit: float, bits_W: int) -> float:
    """Set ``param.weight_scale``; return the WAGE initialisation limit (xbtorch ``scale_limit``).

    ``Wm = 1.5 / 2**(bits_W - 1)``; ``scale = max(2**round(log2(Wm / limit)), 1.0)`` (Python
    ``round``: half to even); ``param.weight_scale = scale``; returns ``max(Wm, limit)``. The scale
    is always a float (QPyTorch's is an int when ``>= 2``; the values are equal).
    """
    _check_positive(limit, "scale_limit", "limit")
    _check_bits(bits_W, "scale_limit", "bits_W")
    w_max = 1.5 / 2.0 ** (bits_W - 1)
    scale = max(2.0 ** round(math.log2(w_max / limit)), 1.0)
    param.weight_scale = scale  # type: ignore[attr-defined]
    return max(w_max, limit)


def wage_init_(
    tensor: torch.Tensor,
    bits_W: int,
    factor: float = 2.0,
    mode: str = "fan_in",
    generator: torch.Generator | None = None,
) -> float:
    """WAGE initialisation in place: ``tensor ~ U(-L, L)``; returns the layer scale.

    ``fan_in = size(1) * prod(size(2:))``; ``limit = sqrt(3 * factor / fan_in)``;
    ``L = scale_limit(tensor, limit, bits_W)`` = ``max(1.5 / 2**(bits_W - 1), limit)``, which also
    sets ``tensor.weight_scale``. For ``bits_W=2, factor=1`` (QPyTorch's VGG7LP): ``L = 0.75`` and
    scale 2 for fan_in 27, 16 for 1024/1152/2304, 32 for 3456/4608/8192.

    Follows QPyTorch/xbtorch ``wage_init_`` (xbtorch signature; QPyTorch's ``name, scale_dict`` are
    replaced by the attribute and the return value). ``mode`` other than ``"fan_in"`` raises
    ``NotImplementedError``; a tensor with fewer than 2 dimensions or no input elements raises
    ``ValueError``.
    """
    check_floating(tensor, "wage_init_")
    if mode != "fan_in":
        raise NotImplementedError(f"wage_init_: only mode='fan_in' is supported, got {mode!r}")
    if tensor.dim() < 2:
        raise ValueError(f"wage_init_: tensor must have at least 2 dimensions, got shape "
                         f"{tuple(tensor.shape)}")
    _check_positive(factor, "wage_init_", "factor")
    fan_in = math.prod(tensor.shape[1:])
    if fan_in == 0:
        raise ValueError(f"wage_init_: fan_in is 0 for shape {tuple(tensor.shape)}")
    limit = scale_limit(tensor, math.sqrt(3.0 * factor / fan_in), bits_W)
    with torch.no_grad():
        tensor.uniform_(-limit, limit, generator=generator)
    return tensor.weight_scale  # type: ignore[attr-defined,no-any-return]
