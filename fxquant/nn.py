"""Layer functions that keep a binary (±1) input as one byte per value for backward.

A convolution or linear layer saves its input for the weight gradient. After a binary sign
quantizer that input is a float tensor of ±1: 4 bytes to remember 1 bit. These functions take
exactly the arguments of ``F.linear`` / ``F.conv{1,2,3}d`` and compute the same forward with
the same kernel; when the input is the tagged output of a ±1 quantizer they save ``x > 0`` (one
byte per value instead of four) and rebuild ``±1`` in backward, where the gradients come from
the same ATen backward kernels autograd uses. Any other input (a disabled quantizer, a plain
tensor) takes the ordinary path, so they are always safe to call. (A NaN
input, which a sign passes on, is rebuilt as -1 for the weight gradient; the forward is
unaffected.)

``prepare`` routes layers whose input quantizer produces ±1 through them (pass
``compact_binary_inputs``); ``convert`` puts the plain ``torch`` functions back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["linear", "conv1d", "conv2d", "conv3d", "mark_plus_minus_one", "PLAIN_FORM"]

_TAG = "_fxquant_plus_minus_one"


def mark_plus_minus_one(t: Tensor) -> Tensor:
    """Tag ``t`` as holding only -1 and +1 (and NaN); returns ``t``."""
    setattr(t, _TAG, True)
    return t


def _is_plus_minus_one(t: Tensor) -> bool:
    return bool(getattr(t, _TAG, False))


def _unpack_signs(positive: Tensor, dtype: torch.dtype) -> Tensor:
    """The ±1 tensor whose positive entries ``positive`` marks."""
    return positive.to(dtype).mul_(2).sub_(1)


def _tuple(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * n


class _CompactInputConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, n: int,
                stride: Any, padding: Any, dilation: Any, groups: int) -> Tensor:
        conv = _CONV[n]
        ctx.args = (n, _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n), groups)
        ctx.has_bias, ctx.dtype = bias is not None, x.dtype
        ctx.save_for_backward(x > 0, weight)
        return conv(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        signs, weight = ctx.saved_tensors
        n, stride, padding, dilation, groups = ctx.args
        x = _unpack_signs(signs, ctx.dtype)
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if ctx.has_bias else None, stride, padding,
            dilation, False, [0] * n, groups, mask)
        return gx, gw, gb, None, None, None, None, None


class _CompactInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.has_bias, ctx.dtype = bias is not None, x.dtype
        ctx.save_for_backward(x > 0, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        signs, weight = ctx.saved_tensors
        gx = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        flat = grad.reshape(-1, grad.shape[-1])
        gw = gb = None
        if ctx.needs_input_grad[1]:
            x = _unpack_signs(signs, ctx.dtype)
            gw = flat.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = flat.sum(0)
        return gx, gw, gb


def _compact(x: Tensor, weight: Tensor) -> bool:
    return _is_plus_minus_one(x) and torch.is_grad_enabled() and weight.requires_grad


def _traced(fn: Callable[..., Tensor], args: tuple[Any, ...]) -> Any:
    """While torch.fx traces (e.g. when a pickled GraphModule is rebuilt), stay one node."""
    proxy = next(a for a in args if isinstance(a, torch.fx.Proxy))
    return proxy.tracer.create_proxy("call_function", fn, args, {})


def _tracing(*args: Any) -> bool:
    return any(isinstance(a, torch.fx.Proxy) for a in args)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:  # noqa: A002
    """``F.linear`` that saves a tagged ±1 input as one byte per value for backward."""
    if _tracing(input, weight, bias):
        return _traced(linear, (input, weight, bias))
    if not _compact(input, weight):
        return F.linear(input, weight, bias)
    return _CompactInputLinear.apply(input, weight, bias)


def _conv(n: int) -> Callable[..., Tensor]:
    plain = _CONV[n]

    def conv(input: Tensor, weight: Tensor, bias: Tensor | None = None,  # noqa: A002
             stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
        if _tracing(input, weight, bias):
            return _traced(conv, (input, weight, bias, stride, padding, dilation, groups))
        if isinstance(padding, str) or not _compact(input, weight):
            return plain(input, weight, bias, stride, padding, dilation, groups)
        return _CompactInputConv.apply(input, weight, bias, n, stride, padding, dilation, groups)

    conv.__name__ = conv.__qualname__ = f"conv{n}d"
    conv.__doc__ = f"``F.conv{n}d`` that saves a tagged ±1 input as one byte per value."
    return conv


_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
conv1d = _conv(1)
conv2d = _conv(2)
conv3d = _conv(3)

# compact function -> the plain torch function it stands for (used by prepare and convert)
PLAIN_FORM: dict[Callable[..., Tensor], Callable[..., Tensor]] = {
    linear: F.linear, conv1d: F.conv1d, conv2d: F.conv2d, conv3d: F.conv3d}
