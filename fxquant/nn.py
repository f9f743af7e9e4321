"""Layer functions that keep a binary (±1) input cheaply for backward.

A convolution or linear layer saves its input for the weight gradient. After a binary sign
quantizer that input is a float tensor of ±1: 4 bytes to remember 1 bit. These functions take
exactly the arguments of ``F.linear`` / ``F.conv{1,2,3}d`` and compute the same forward with the
same kernel; when the input is the tagged output of a ±1 quantizer they keep less:

* if the tag names the sign's *source* (the quantizer's input, which the quantizer keeps for its
  own backward) and its surrogate gradient (:meth:`fxquant.quantizers.Quantizer.sign_gradient`),
  the layer takes the source as its autograd input and keeps it (no bytes of its own), rebuilds
  the ±1 tensor in backward and applies the surrogate gradient there, in the rebuilt buffer;
  a ±1 *weight* tagged the same way (a binary latent parameter) is handled alike;
* otherwise it keeps where the input is +1, one byte per value, and rebuilds ``±1`` from it.

The gradients come from the same ATen backward kernels autograd uses and equal the unfused
quantizer-then-layer gradients bit for bit, under autocast too: backward computes in the dtype
the forward's kernel did and returns each gradient in its input's dtype, as autocast's casts do.
Any other input (a disabled quantizer, a plain tensor) takes the ordinary path, so they are always
safe to call. (With the one-byte form a NaN input, which a sign passes on, is rebuilt as +1 for
the weight gradient; the forward is unaffected.)

``prepare`` routes layers whose input quantizer produces ±1 through them (pass
``compact_binary_inputs``); ``convert`` puts the plain ``torch`` functions back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from fxquant.quantizers._common import (
    Surrogate,
    _binary_sign,
    is_plus_minus_one,
    mark_plus_minus_one,
    sign_source,
)

__all__ = ["linear", "conv1d", "conv2d", "conv3d", "mark_plus_minus_one", "PLAIN_FORM"]

def _pack_signs(x: Tensor) -> Tensor:
    """Bool: True where the ±1 tensor ``x`` is +1 (and at NaN).

    ``relu`` then a narrowing cast: on CPU about three times faster than ``x > 0``, which
    writes bool from a comparison.
    """
    return torch.relu(x).to(torch.bool)


def _unpack_signs(positive: Tensor, dtype: torch.dtype) -> Tensor:
    """The ±1 tensor whose positive entries ``positive`` marks (read as bytes: a bool -> float
    cast is several times slower on CPU than a uint8 -> float one)."""
    return positive.view(torch.uint8).to(dtype).mul_(2).sub_(1)


@dataclass(frozen=True)
class _Plan:
    """What a compact layer was handed besides its autograd inputs (not seen by autograd).

    ``x`` and ``weight`` are the ±1 (or plain) tensors the forward computes with. When a tensor
    was tagged with its sign source, the layer's autograd input is that source instead, and
    ``x_gradient`` / ``w_gradient`` is the quantizer's surrogate gradient, applied in backward.
    """

    x: Tensor
    weight: Tensor
    x_gradient: Surrogate | None
    w_gradient: Surrogate | None


def _plan(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, _Plan]:
    """The autograd inputs (x or its source, weight or its source) and the plan."""
    x_src, w_src = sign_source(x), sign_source(weight)
    plan = _Plan(x, weight, None if x_src is None else x_src[1],
                 None if w_src is None else w_src[1])
    return (x if x_src is None else x_src[0]), (weight if w_src is None else w_src[0]), plan


def _save(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan,
          out: Tensor) -> None:
    """Save the sources (kept alive by their quantizers anyway), or ``x`` as one byte per value,
    and the dtypes: the one the kernel computed in (``out``'s: under autocast the kernel casts
    its float32 operands to bfloat16 or float16) and those of the autograd inputs, which their
    gradients must have."""
    ctx.gradients = (plan.x_gradient, plan.w_gradient)
    ctx.compute_dtype = out.dtype
    ctx.input_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.save_for_backward(x if plan.x_gradient is not None else _pack_signs(plan.x), weight)


def _saved(ctx: FunctionCtx) -> tuple[Tensor, ...]:
    """``ctx.saved_tensors``, unpacked once per backward: non-reentrant activation checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=False)``) allows a single unpack."""
    if "unpacked" not in ctx.__dict__:
        ctx.unpacked = ctx.saved_tensors
    return ctx.unpacked


def _rebuild(ctx: FunctionCtx) -> tuple[Tensor, Tensor]:
    """``(x, weight)`` as the forward's kernel used them, rebuilt exactly from what :func:`_save`
    kept, in the dtype it computed in (a cast of ±1 is exact; a plain weight is rounded as
    autocast rounded it)."""
    x_saved, w_saved = _saved(ctx)
    x_grad, w_grad = ctx.gradients
    dtype = ctx.compute_dtype
    if x_grad is not None:
        x = _binary_sign(x_saved).to(dtype)
    else:
        x = _unpack_signs(x_saved, dtype)
    return x, (_binary_sign(w_saved) if w_grad is not None else w_saved).to(dtype)


def _to_inputs(ctx: FunctionCtx, gx: Tensor | None, gw: Tensor | None, gb: Tensor | None,
               x: Tensor, weight: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The kernel's gradients for autograd: each cast to its autograd input's dtype (as autocast's
    cast back does in the plain path), then the quantizers' surrogate gradients applied at the
    saved sources. The rebuilt ``x`` and ``weight`` (no longer needed) serve as their scratch
    buffers when they have the sources' dtype."""
    x_saved, w_saved = _saved(ctx)
    x_grad, w_grad = ctx.gradients
    x_dtype, w_dtype, b_dtype = ctx.input_dtypes
    gx = None if gx is None else gx.to(x_dtype)
    gw = None if gw is None else gw.to(w_dtype)
    gb = None if gb is None else gb.to(b_dtype)
    if x_grad is not None and gx is not None:
        gx = x_grad(x_saved, gx, _scratch(x, x_saved))
    if w_grad is not None and gw is not None:
        gw = w_grad(w_saved, gw, _scratch(weight, w_saved))
    return gx, gw, gb


def _scratch(buffer: Tensor, like: Tensor) -> Tensor:
    """``buffer`` if a surrogate gradient may compute in it for ``like``, else a fresh one."""
    return buffer if buffer.dtype == like.dtype else torch.empty_like(like)


def _not_a_view(out: Tensor) -> Tensor:
    """``out``, or an alias of it that is not a view when the kernel returned one.

    ``F.linear`` with a bias returns a view for inputs of more than two dimensions, and a
    convolution does for an unbatched input. Autograd forbids in-place ops (``ReLU(inplace=True)``,
    ``+=``) on a view made inside a custom Function; ``detach`` gives the same storage without
    the view's link to its (otherwise unused) base, so they work as after the plain layer.
    """
    return out.detach() if out._is_view() else out


def _tuple(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * n


class _CompactConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan,
                n: int, stride: Any, padding: Any, dilation: Any, groups: int) -> Tensor:
        ctx.args = (n, _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n), groups)
        ctx.has_bias = bias is not None
        out = _CONV[n](plan.x, plan.weight, bias, stride, padding, dilation, groups)
        _save(ctx, x, weight, bias, plan, out)
        return _not_a_view(out)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = _rebuild(ctx)
        n, stride, padding, dilation, groups = ctx.args
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        grad, x_in = grad.to(ctx.compute_dtype), x
        unbatched = x.dim() == n + 1  # the kernel wants a batch (of one)
        if unbatched:
            grad, x_in = grad.unsqueeze(0), x.unsqueeze(0)
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x_in, weight, bias_sizes, stride, padding, dilation, False, [0] * n, groups, mask)
        if unbatched and gx is not None:
            gx = gx.squeeze(0)
        return (*_to_inputs(ctx, gx, gw, gb, x, weight), None, None, None, None, None, None)


class _CompactLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None,
                plan: _Plan) -> Tensor:
        ctx.has_bias = bias is not None
        out = F.linear(plan.x, plan.weight, bias)
        _save(ctx, x, weight, bias, plan, out)
        return _not_a_view(out)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = _rebuild(ctx)
        grad = grad.to(ctx.compute_dtype)
        gx = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.shape[-1])
        gw = gb = None
        if ctx.needs_input_grad[1]:
            gw = flat.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = flat.sum(0)
        return (*_to_inputs(ctx, gx, gw, gb, x, weight), None)


def _compact(x: Tensor, weight: Tensor) -> bool:
    """Whether to take the compact path: not under torch.compile, whose partitioner chooses
    what backward keeps (and recomputes a sign far cheaper than this path's bookkeeping)."""
    return (not torch.compiler.is_compiling() and is_plus_minus_one(x)
            and torch.is_grad_enabled() and weight.requires_grad)


def _traced(fn: Callable[..., Tensor], args: tuple[Any, ...]) -> Any:
    """While torch.fx traces (e.g. when a pickled GraphModule is rebuilt), stay one node."""
    proxy = next(a for a in args if isinstance(a, torch.fx.Proxy))
    return proxy.tracer.create_proxy("call_function", fn, args, {})


def _tracing(*args: Any) -> bool:
    return any(isinstance(a, torch.fx.Proxy) for a in args)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:  # noqa: A002
    """``F.linear`` that keeps a tagged ±1 input cheaply for backward (see the module doc)."""
    if _tracing(input, weight, bias):
        return _traced(linear, (input, weight, bias))
    if not _compact(input, weight):
        return F.linear(input, weight, bias)
    x, w, plan = _plan(input, weight)
    return _CompactLinear.apply(x, w, bias, plan)


def _conv(n: int) -> Callable[..., Tensor]:
    plain = _CONV[n]

    def conv(input: Tensor, weight: Tensor, bias: Tensor | None = None,  # noqa: A002
             stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
        if _tracing(input, weight, bias):
            return _traced(conv, (input, weight, bias, stride, padding, dilation, groups))
        if isinstance(padding, str) or not _compact(input, weight):
            return plain(input, weight, bias, stride, padding, dilation, groups)
        x, w, plan = _plan(input, weight)
        return _CompactConv.apply(x, w, bias, plan, n, stride, padding, dilation, groups)

    conv.__name__ = conv.__qualname__ = f"conv{n}d"
    conv.__doc__ = f"``F.conv{n}d`` that keeps a tagged ±1 input cheaply for backward."
    return conv


_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
conv1d = _conv(1)
conv2d = _conv(2)
conv3d = _conv(3)

# compact function -> the plain torch function it stands for (used by prepare and convert)
PLAIN_FORM: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    linear: F.linear, conv1d: F.conv1d, conv2d: F.conv2d, conv3d: F.conv3d}
