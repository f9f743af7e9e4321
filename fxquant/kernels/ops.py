"""The ``torch.ops.fxquant`` custom ops: packed binary convolution and linear layers.

Registered with :mod:`torch.library` (with fake kernels), so a converted GraphModule's code
shows ``torch.ops.fxquant.binary_conv2d(...)``, ``torch.export`` keeps the op and its packed
weights, and ``torch.compile`` treats it as one opaque call. Each op runs the native kernel
(:mod:`fxquant.kernels._native`) when it can and the plain-PyTorch reference
(:mod:`fxquant.kernels.reference`) otherwise; both compute the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format  # ATen's rule, as F.conv2d applies it

from fxquant.kernels import _native, reference

__all__ = ["binary_conv2d", "binary_linear"]


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@torch.library.custom_op("fxquant::binary_conv2d", mutates_args=())
def binary_conv2d(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int
                  ) -> Tensor:
    """``conv2d(sign(x), ±1 weight) * scale + bias`` on packed weight bits (NCHW input).

    Depthwise-like convolutions (fewer than 4 output channels per group) run the reference,
    which is faster there; see :mod:`fxquant.kernels._native` for every fallback."""
    native = _native.binary_conv2d(x, weight_bits, scale, bias, stride, padding, dilation, groups)
    if native is not None:  # in the memory format F.conv2d gives: successors run alike
        return native.contiguous(memory_format=suggest_memory_format(x))
    return reference.binary_conv2d(x, weight_bits, scale, bias, stride, padding, dilation,
                                   groups)


@binary_conv2d.register_fake
def _(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None, stride: list[int],
      padding: list[int], dilation: list[int], groups: int) -> Tensor:
    kh, kw = weight_bits.shape[1], weight_bits.shape[2]
    h = _conv_out(x.shape[-2], kh, stride[0], padding[0], dilation[0])
    w = _conv_out(x.shape[-1], kw, stride[1], padding[1], dilation[1])
    shape = (*x.shape[:-3], weight_bits.shape[0], h, w)
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=suggest_memory_format(x))


@torch.library.custom_op("fxquant::binary_linear", mutates_args=())
def binary_linear(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None
                  ) -> Tensor:
    """``linear(sign(x), ±1 weight) * scale + bias`` on packed weight bits."""
    native = _native.binary_linear(x, weight_bits, scale, bias)
    if native is not None:
        return native
    return reference.binary_linear(x, weight_bits, scale, bias)


@binary_linear.register_fake
def _(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight_bits.shape[0]))


# Gradients. The sign of the input is piecewise constant, so the gradient reaching ``x`` is
# zero, as in the plain ops the converted graph held before (``torch.where`` on a comparison).
# ``scale`` and ``bias`` are buffers in converted models, but a caller may train them (e.g.
# fine-tuning a converted head): their gradients are the exact ones. ``weight_bits`` is integer.

def _setup(ctx: object, inputs: tuple[object, ...], output: Tensor) -> None:
    x, weight_bits, scale = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(x, weight_bits, scale)  # type: ignore[attr-defined]
    ctx.rest = inputs[4:]  # type: ignore[attr-defined]  # stride, padding, dilation, groups


def _backward(op: object, channel_dim: int, ctx: object, grad: Tensor
              ) -> tuple[Tensor | None, ...]:
    x, weight_bits, scale = ctx.saved_tensors  # type: ignore[attr-defined]
    needs = ctx.needs_input_grad  # type: ignore[attr-defined]
    reduce_dims = [d for d in range(grad.dim()) if d != grad.dim() + channel_dim]
    grad_scale = grad_bias = None
    if needs[2]:
        dot = op(x, weight_bits, torch.ones_like(scale), None, *ctx.rest)  # type: ignore
        grad_scale = (grad * dot).sum(reduce_dims).to(scale.dtype)
    if needs[3]:
        grad_bias = grad.sum(reduce_dims)
    return (torch.zeros_like(x) if needs[0] else None, None, grad_scale, grad_bias,
            *([None] * len(ctx.rest)))  # type: ignore[attr-defined]


binary_conv2d.register_autograd(
    lambda ctx, grad: _backward(binary_conv2d, -3, ctx, grad), setup_context=_setup)
binary_linear.register_autograd(
    lambda ctx, grad: _backward(binary_linear, -1, ctx, grad), setup_context=_setup)


# Autocast: the ops cast their floating inputs as F.conv2d / F.linear do (to the autocast dtype
# of the device, e.g. bfloat16 on CPU), so a converted model under torch.autocast computes what
# the prepared model computes there (torch.library.register_autocast fixes one dtype instead).

_LIBRARY = torch.library.Library("fxquant", "FRAGMENT")


def _register_autocast(name: str, device: str) -> None:
    op = getattr(torch.ops.fxquant, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))

    def cast(value: object) -> object:
        if isinstance(value, Tensor) and value.is_floating_point() and value.device.type == device:
            return value.to(torch.get_autocast_dtype(device))
        return value

    def kernel(keyset: object, *args: object, **kwargs: object) -> Tensor:
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})

    _LIBRARY.impl(name, kernel, key_name, with_keyset=True)


for _name in ("binary_conv2d", "binary_linear"):
    for _device in ("cpu", "cuda"):
        _register_autocast(_name, _device)
