"""WAGE quantizers with gradients, as graph-ready leaf modules (QPyTorch ``WAGEQuantizer``).

Three quantizers place WAGE (Wu et al., ICLR 2018, arXiv:1802.04680) in a model:

* :class:`WAGEQuantizer` (``"wage"``): activations forward (QA), errors backward (QE), with the
  error zeroed where the forward clamped. It is QPyTorch's / xbtorch's ``WAGEQuantizer``; with
  ``bits_E=-1`` it is the input quantizer, with ``bits_A=-1`` the error quantizer.
* :class:`WAGEError` (``"wage_error"``): identity forward, QE backward
  (``WAGEQuantizer(-1, bits_E)``).
* :class:`WAGEWeight` (``"wage_weight"``): ``QW`` forward, identity (straight-through) backward.

With ``sigma(b) = 2**-(b - 1)`` and ``R`` the rounding of the chosen mode:

* QA: ``y = clip(R(x / sigma) * sigma, -1 + sigma, 1 - sigma)``; ``m = 1{R(x / sigma) * sigma``
  outside that range``}`` (kept as a bool mask for backward).
* QE: ``dx = clip(R(shift(g) / sigma) * sigma, -1 + sigma, 1 - sigma)``, then ``dx[m] = 0``.

In eval mode the modules round their forward to nearest (a stochastic ``A_mode``/``mode`` applies
in training only), and ``inference`` gives that eval forward as plain ops (``mul, round, clamp,
mul``) for ``convert``; ``get_config`` leaves out the ``generator``.

>>> import torch
>>> x = torch.tensor([0.3, 0.999, -2.0], requires_grad=True)
>>> WAGEQuantizer(2, 8)(x).sum().backward()
>>> x.grad
tensor([0.9922, 0.0000, 0.0000])
"""

from __future__ import annotations

from typing import Any

import torch

from fxquant._distributed import world_size
from fxquant.quantizers.base import Quantizer, check_floating, register
from fxquant.quantizers.fixed_point import (
    ROUNDING_MODES,
    _scaled_round_clamp,
    _symmetric_nearest_plain,
)
from fxquant.wage.functional import (
    QW,
    _check_bits,
    _check_generator_device,
    _check_scale,
    _same_device,
    _shift_divisor,
)

__all__ = [
    "wage_quantize",
    "wage_weight_quantize",
    "WAGEQuantizer",
    "WAGEError",
    "WAGEWeight",
]


def _check_wage_bits(bits: int, who: str, name: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or (bits < 1 and bits != -1):
        raise ValueError(f"{who}: {name} must be an int >= 1, or -1 to disable, got {bits!r}")


def _check_mode(mode: str, who: str, name: str) -> None:
    if mode not in ROUNDING_MODES:
        raise ValueError(f"{who}: {name} must be one of {ROUNDING_MODES}, got {mode!r}")


def _check_sync_scale(sync_scale: bool, who: str) -> None:
    if not isinstance(sync_scale, bool):
        raise ValueError(f"{who}: sync_scale must be a bool, got {sync_scale!r}")


def _check_generator(generator: torch.Generator | None, who: str) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{who}: generator must be a torch.Generator or None, got {generator!r}")


class _WAGEQuantize(torch.autograd.Function):
    """QA forward with the clamp mask, QE backward masked by it (QPyTorch ``quantizer(...,
    clamping_grad_zero=True, backward_hooks=[shift])`` with two symmetric ``FixedPoint``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        bits_A: int,
        bits_E: int,
        A_mode: str,
        E_mode: str,
        generator: torch.Generator | None,
        sync_scale: bool = False,
    ) -> torch.Tensor:
        mask = None
        if bits_A == -1:
            y = x.clone()  # not a view: a later in-place op must not clash with this backward
        else:
            want_mask = bits_E != -1 and ctx.needs_input_grad[0]
            y, mask = _scaled_round_clamp(x, None, bits_A, bits_A - 1, True, True, A_mode,
                                          generator, want_mask)
        ctx.bits_E, ctx.E_mode, ctx.generator = bits_E, E_mode, generator
        ctx.sync_scale = sync_scale
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.save_for_backward(mask)  # 1 byte per element, the only thing saved
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        bits_E = ctx.bits_E
        if bits_E == -1:
            return g, None, None, None, None, None, None
        mask = ctx.saved_tensors[0] if ctx.has_mask else None
        dx, _ = _scaled_round_clamp(g, _error_divisor(g, ctx.sync_scale), bits_E, bits_E - 1,
                                    True, True, ctx.E_mode, ctx.generator, False,
                                    zero_where=mask)
        return dx, None, None, None, None, None, None


def _error_divisor(g: torch.Tensor, sync_scale: bool) -> torch.Tensor:
    """QE's ``2**ceil(log2(max|g|))``; with ``sync_scale`` under a process group of several
    ranks, of the largest ``max|g|`` over all ranks (one all-reduce MAX of a float64 scalar,
    exact for every floating dtype), so each rank scales its part of the batch as one process
    scales the whole batch."""
    if not (sync_scale and world_size() > 1):
        return _shift_divisor(g)
    biggest = (g.detach().abs().amax() if g.numel() else g.new_zeros(())).to(torch.float64)
    torch.distributed.all_reduce(biggest, op=torch.distributed.ReduceOp.MAX)
    return _shift_divisor(biggest.to(g.dtype))


def wage_quantize(
    x: torch.Tensor,
    bits_A: int = 8,
    bits_E: int = 8,
    A_mode: str = "nearest",
    E_mode: str = "nearest",
    generator: torch.Generator | None = None,
    sync_scale: bool = True,
) -> torch.Tensor:
    """Quantize activations forward (QA) and errors backward (QE), as QPyTorch's ``WAGEQuantizer``.

    Forward (``bits_A != -1``), with ``sigma = 2**-(bits_A - 1)``:
    ``y = clip(R_A(x / sigma) * sigma, -1 + sigma, 1 - sigma)`` (fixed point ``wl=bits_A,
    fl=bits_A - 1``, clamped, symmetric). A bool mask records where the **rounded** value was
    clamped (a value rounding onto a bound is not masked).

    Gradient (``bits_E != -1``), with ``sigma = 2**-(bits_E - 1)``:
    ``dx = clip(R_E(shift(g) / sigma) * sigma, -1 + sigma, 1 - sigma)``, then ``dx = 0`` where the
    mask is set, ``shift(g) = g / 2**ceil(log2(max|g|))``.

    ``bits_A = -1``: forward identity (a copy) and no mask. ``bits_E = -1``: the gradient passes
    unchanged (no shift, no quantization, no mask), exactly as QPyTorch.

    Edge cases (QPyTorch unless noted): ``bits_A=8`` gives the grid 1/128 on [-127/128, 127/128];
    every ``|x| >= 127.5/128`` is masked (so ``x = 1`` and ``x = 0.99999994`` get gradient 0). An
    all-ones upstream gradient gives ``127/128 = 0.9921875``. NaN input: NaN output, not masked
    (its gradient is the quantized upstream gradient). ``±inf`` input: ``±(1 - sigma)``, gradient
    0. An all-zero upstream gradient gives a zero gradient (**QPyTorch: NaN**, from 0/0 in
    ``shift``); a NaN anywhere in ``g`` makes the whole gradient NaN (except masked entries, 0).
    ``R`` is ``"nearest"`` (half to even, every device) or ``"stochastic"`` (``floor(v + U[0, 1))``
    drawn from ``generator``, shared by both directions).

    ``sync_scale`` (distributed data parallel training): while a ``torch.distributed`` process
    group of more than one rank is initialised, ``max|g|`` in ``shift`` is the maximum over
    all ranks (an all-reduce MAX in the backward), so DDP with nearest ``E_mode`` computes
    exactly the errors one process computes on the global batch; ``max|g|`` of the local
    batch alone (``sync_scale=False``) gives each rank its own scale. Without a process group,
    or with one rank, both are the same. The all-reduce is a collective: every rank must run
    this backward, as DDP's ranks do.
    """
    check_floating(x, "wage_quantize")
    _check_wage_bits(bits_A, "wage_quantize", "bits_A")
    _check_wage_bits(bits_E, "wage_quantize", "bits_E")
    _check_mode(A_mode, "wage_quantize", "A_mode")
    _check_mode(E_mode, "wage_quantize", "E_mode")
    _check_sync_scale(sync_scale, "wage_quantize")
    if bits_A == -1 and bits_E == -1:
        return x
    if (bits_A != -1 and A_mode == "stochastic") or (bits_E != -1 and E_mode == "stochastic"):
        _check_generator_device(generator, x, "wage_quantize")
    return _WAGEQuantize.apply(x, bits_A, bits_E, A_mode, E_mode, generator, sync_scale)


class _WAGEWeightQuantize(torch.autograd.Function):
    """QW forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        w: torch.Tensor,
        bits: int,
        scale: float,
        mode: str,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        return QW(w, bits, scale, mode, generator)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return g, None, None, None, None


def wage_weight_quantize(
    w: torch.Tensor,
    bits: int = 2,
    scale: float = 1.0,
    mode: str = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """WAGE weight quantization ``QW`` with a straight-through gradient.

    Forward: ``QW(w, bits, scale, mode)`` = ``clip(R(w / sigma) * sigma, -1 + sigma, 1 - sigma)``
    with ``sigma = 2**-(bits - 1)``, divided by ``scale`` when ``scale > 1.8`` (see
    :func:`fxquant.wage.QW`). Gradient: ``dw = dy`` (identity, no window, not divided by ``scale``).

    This reproduces the QPyTorch/xbtorch WAGE training step: there, the layer's weight *is* the
    quantized value, the gradient is taken at it and then applied (through ``QG``) to a latent
    float accumulator; here the latent accumulator is the parameter and the quantized weight is
    computed in the graph, so the accumulator receives exactly that gradient. Clip the
    accumulator with :func:`fxquant.wage.C` and quantize the update with :func:`fxquant.wage.QG`
    to reproduce the WAGE update rule.
    """
    check_floating(w, "wage_weight_quantize")
    _check_bits(bits, "wage_weight_quantize")
    _check_scale(scale, "wage_weight_quantize")
    _check_mode(mode, "wage_weight_quantize", "mode")
    if mode == "stochastic":
        _check_generator_device(generator, w, "wage_weight_quantize")
    return _WAGEWeightQuantize.apply(w, bits, scale, mode, generator)


class _WAGEModule(Quantizer):
    """Shared by the WAGE modules: ``get_config`` without the generator; ``.to()`` moves it.

    ``generator`` is a plain attribute, not a buffer, so ``nn.Module.to`` would leave it behind.
    :meth:`_apply` (what ``.to(device)``, ``.cuda()`` and ``.cpu()`` call) replaces a generator
    the move sends to another device with a new one there, seeded with the old one's
    ``initial_seed()``: CPU and CUDA generator states differ in kind, so the position in the
    stream is not carried over, and ``seed_rounding(m, s)`` then ``m.to(d)`` equals ``m.to(d)``
    then ``seed_rounding(m, s)``. A dtype-only ``.to()`` keeps the very same generator. The
    ``meta`` device has no generators: there the old one stays (and stochastic rounding says so).
    """

    generator: torch.Generator | None

    def _apply(self, fn: Any, recurse: bool = True) -> _WAGEModule:
        module = super()._apply(fn, recurse)
        old = self.generator
        if old is not None:
            target = fn(torch.empty(0, device=old.device)).device  # where this move sends tensors
            if target.type != "meta" and not _same_device(target, old.device):
                self.generator = torch.Generator(device=target).manual_seed(old.initial_seed())
        return module

    def get_config(self) -> dict[str, Any]:
        """Constructor arguments as plain data; ``generator`` is dropped.

        A ``torch.Generator`` is not plain data (and its state is not a setting), so a rebuilt
        quantizer ``type(q)(**q.get_config())`` has ``generator=None`` and draws stochastic noise
        from torch's global generator; outputs are equal wherever no noise is drawn (nearest
        rounding, or eval mode). ``sync_scale`` (error quantizers) is stored only when False.
        """
        config = super().get_config()
        del config["generator"]
        if config.get("sync_scale") is True:  # the default: files stay as they were
            del config["sync_scale"]
        return config


@register("wage")
class WAGEQuantizer(_WAGEModule):
    """QPyTorch/xbtorch ``WAGEQuantizer``: QA forward, QE backward masked where QA clamped.

    See :func:`wage_quantize` for the formulas and edge cases. ``bits_A=-1`` or ``bits_E=-1``
    disables that direction: ``WAGEQuantizer(bits_A, -1)`` is WAGE's input quantizer,
    ``WAGEQuantizer(-1, bits_E)`` its final error quantizer (also :class:`WAGEError`). Defaults
    are xbtorch's (8 and 8, nearest; QPyTorch's ``reproduce.sh`` uses ``E_mode="stochastic"``).
    ``bits`` is ``bits_A``, or 32 when ``bits_A == -1`` (the output is then not on a grid).

    ``sync_scale`` (default True): under a ``torch.distributed`` process group of several ranks,
    the error scale is the maximum over all ranks, so that data-parallel training equals one
    process on the global batch; see :func:`wage_quantize`. No effect in a single process.

    ``generator`` is used for stochastic rounding. A deep copy of the module (e.g. through
    ``fxquant.quantizers.get(instance)``) copies the generator's state, so copies draw the same
    noise sequence; give each copy its own generator if that matters. ``get_config`` drops it.

    Eval mode (``module.eval()``): the forward rounds to nearest whatever ``A_mode`` is, so that
    inference is deterministic and :meth:`inference` (plain ops, used by ``convert``) equals it bit
    for bit; the backward keeps ``E_mode``. **Difference from QPyTorch**, whose modules have no
    eval mode and keep drawing noise for ``A_mode="stochastic"`` at test time (its
    ``reproduce.sh`` and xbtorch use ``A_mode="nearest"``, where nothing changes; its test-time
    weights ``QW(weight_acc, scale)`` are nearest as well).
    """

    def __init__(
        self,
        bits_A: int = 8,
        bits_E: int = 8,
        A_mode: str = "nearest",
        E_mode: str = "nearest",
        generator: torch.Generator | None = None,
        sync_scale: bool = True,
    ) -> None:
        _check_wage_bits(bits_A, "WAGEQuantizer", "bits_A")
        _check_wage_bits(bits_E, "WAGEQuantizer", "bits_E")
        _check_mode(A_mode, "WAGEQuantizer", "A_mode")
        _check_mode(E_mode, "WAGEQuantizer", "E_mode")
        _check_generator(generator, "WAGEQuantizer")
        _check_sync_scale(sync_scale, "WAGEQuantizer")
        super().__init__(bits=bits_A if bits_A != -1 else 32)
        self.bits_A = bits_A
        self.bits_E = bits_E
        self.A_mode = A_mode
        self.E_mode = E_mode
        self.generator = generator
        self.sync_scale = sync_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_mode = self.A_mode if self.training else "nearest"
        return wage_quantize(x, self.bits_A, self.bits_E, a_mode, self.E_mode, self.generator,
                             self.sync_scale)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """The eval forward in plain ops: ``clamp(round(x * 2**(b-1)), -hi, hi) * 2**-(b-1)``.

        ``b = bits_A``, ``hi = 2**(b-1) - 1``; QA with nearest (half-to-even) rounding, equal to
        ``self.eval()(x)`` bit for bit on every floating dtype (float16/bfloat16 with
        ``bits_A > 16`` go through float32 casts). ``bits_A == -1``: ``x`` itself.
        """
        if self.bits_A == -1:
            return x
        return _symmetric_nearest_plain(x, self.bits_A, self.bits_A - 1)

    def forward_is_identity(self) -> bool:
        """True for ``bits_A == -1`` (only the backward is quantized)."""
        return self.bits_A == -1

    def extra_repr(self) -> str:
        return (f"bits_A={self.bits_A}, bits_E={self.bits_E}, A_mode={self.A_mode!r}, "
                f"E_mode={self.E_mode!r}" + ("" if self.sync_scale else ", sync_scale=False"))


@register("wage_error")
class WAGEError(_WAGEModule):
    """WAGE error quantizer: identity forward, QE backward (``WAGEQuantizer(-1, bits_E)``).

    Forward: ``y = x`` (a copy). Gradient: ``dx = clip(R(shift(g) / sigma) * sigma, -1 + sigma,
    1 - sigma)`` with ``sigma = 2**-(bits_E - 1)``; no mask. An all-zero ``g`` gives zeros
    (QPyTorch: NaN). ``bits`` is 32 (the forward is not quantized). The last quantizer of a WAGE
    model (QPyTorch VGG7LP, xbtorch). ``get_config`` drops ``generator``.

    ``shift`` normalises by the largest error of the batch. In data-parallel training each rank
    sees only its part of the batch, so by default (``sync_scale=True``, while a
    ``torch.distributed`` process group of more than one rank is initialised) that maximum is
    all-reduced (MAX) over the ranks in the backward, and DDP with ``mode="nearest"`` equals one
    process on the global batch; ``sync_scale=False`` keeps each rank's own maximum. No effect
    in a single process. The all-reduce is a collective: every rank must run the backward.
    """

    def __init__(
        self,
        bits_E: int = 8,
        mode: str = "nearest",
        generator: torch.Generator | None = None,
        sync_scale: bool = True,
    ) -> None:
        _check_bits(bits_E, "WAGEError", "bits_E")
        _check_mode(mode, "WAGEError", "mode")
        _check_generator(generator, "WAGEError")
        _check_sync_scale(sync_scale, "WAGEError")
        super().__init__(bits=32)
        self.bits_E = bits_E
        self.mode = mode
        self.generator = generator
        self.sync_scale = sync_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wage_quantize(x, -1, self.bits_E, "nearest", self.mode, self.generator,
                             self.sync_scale)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: the forward is the identity."""
        return x

    def forward_is_identity(self) -> bool:
        """Always True: only the backward is quantized."""
        return True

    def extra_repr(self) -> str:
        return (f"bits_E={self.bits_E}, mode={self.mode!r}"
                + ("" if self.sync_scale else ", sync_scale=False"))


@register("wage_weight")
class WAGEWeight(_WAGEModule):
    """WAGE weight quantizer: ``QW`` forward, straight-through (identity) backward.

    See :func:`wage_weight_quantize`. ``scale`` is a plain attribute, normally set from the scale
    :func:`fxquant.wage.wage_init_` returns (and stores as ``weight.weight_scale``); ``QW`` divides
    by it only when ``scale > 1.8``. ``bits`` = ``bits`` (2 in WAGE 2-8-8-8). ``get_config``
    drops ``generator``.

    Eval mode (``module.eval()``, and so ``convert``'s weight folding): the forward rounds to
    nearest whatever ``mode`` is, as QPyTorch's test loop does (``QW(weight_acc, scale)``, default
    ``mode="nearest"``), and equals :meth:`inference` bit for bit.
    """

    def __init__(
        self,
        bits: int = 2,
        scale: float = 1.0,
        mode: str = "nearest",
        generator: torch.Generator | None = None,
    ) -> None:
        _check_bits(bits, "WAGEWeight")
        _check_scale(scale, "WAGEWeight")
        _check_mode(mode, "WAGEWeight", "mode")
        _check_generator(generator, "WAGEWeight")
        super().__init__(bits=bits)
        self.scale = scale
        self.mode = mode
        self.generator = generator

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        mode = self.mode if self.training else "nearest"
        return wage_weight_quantize(w, self.bits, self.scale, mode, self.generator)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """The eval forward in plain ops: nearest ``QW``, then ``/ scale`` when ``scale > 1.8``.

        ``clamp(round(x * 2**(b-1)), -hi, hi) * 2**-(b-1)`` with ``hi = 2**(b-1) - 1``, equal to
        ``self.eval()(x)`` bit for bit on every floating dtype (float16/bfloat16 with
        ``bits > 16`` go through float32 casts).
        """
        y = _symmetric_nearest_plain(x, self.bits, self.bits - 1)
        if self.scale > 1.8:
            y = y / self.scale
        return y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale}, mode={self.mode!r}"
