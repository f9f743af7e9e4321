"""ONNX export of packed binary layers: the weights stay packed bytes in the file.

``torch.onnx.export`` knows nothing of ``torch.ops.fxquant.binary_conv2d`` / ``binary_linear``.
This module writes each of them as a small subgraph of standard ONNX ops that unpacks the
``uint8`` weight bits (kept as an initializer) and runs a float ``Conv`` / ``MatMul``::

    weight_bits ─ Unsqueeze ─ BitShift ─ BitwiseAnd ─ Reshape ─ Slice ─ Cast(bool)
      ─ Where(-1, +1) [─ Transpose] ───────────────────────┐
    x ─ GreaterOrEqual / IsNaN / Where (the sign) ──────── Conv | MatMul ─ Mul(scale) ─ Add(bias)

The chain reads only the packed bytes, so onnxruntime folds it when it loads the file (it then
convolves with a float ±1 weight). The channel scale multiplies the convolution's output as
``Mul(scale, y)``: onnxruntime's Conv-Mul fusion only takes ``Mul(y, constant)``, and fused, the
scale would be multiplied into the weight and round differently; so onnxruntime's output equals
the op's (and the model's) exactly (a ±1 convolution is a sum of integers).

The exporters' own constant folding must stay off the unpacking: the dynamo exporter's optimizer
stores small layers' bits unpacked (8x larger, or as float), and the legacy exporter's folds
:class:`fxquant.ops.PackedWeight` codes into float weights. :func:`export` sees to that; calling
``torch.onnx.export`` yourself, pass ``optimize=False`` (dynamo) or
``do_constant_folding=False`` (legacy).

Use :func:`export` (both exporters), or hand :func:`custom_translation_table` to
``torch.onnx.export(..., dynamo=True)`` / call :func:`register_legacy_symbolics` before
``torch.onnx.export(..., dynamo=False)``. ``onnx``, ``onnxscript`` and ``onnxruntime`` come
with ``pip install "fxquant[onnx]"``; this module imports them only when called.

:class:`fxquant.ops.PackedWeight` (the packed 1-, 2- and k-bit weights of converted models)
exports its codes and table with the plain-op unpack of :func:`fxquant.ops.unpack`, which
:func:`export` keeps from being folded too, so these weights also stay packed. onnxruntime then
convolves with the unpacked float weight in its own summation order: equal to ``converted(x)``
up to float rounding when the weights are scaled (``±α``), exactly when they are integers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["export", "custom_translation_table", "register_legacy_symbolics",
           "LEGACY_MIN_OPSET"]

LEGACY_MIN_OPSET = 18  # BitwiseAnd
_BOOL = 9  # onnx.TensorProto.BOOL


class _ScriptBuilder:
    """Writes ONNX nodes through onnxscript (the dynamo exporter's translation functions)."""

    def __init__(self) -> None:
        import onnx_ir
        from onnxscript import opset18

        self._op, self._ir = opset18, onnx_ir

    def __call__(self, name: str, *inputs: Any, **attributes: Any) -> Any:
        return getattr(self._op, name)(*inputs, **attributes)

    def const(self, value: torch.Tensor) -> Any:
        return self._op.Constant(value=self._ir.tensor(value.numpy()))

    @staticmethod
    def sizes(value: Any) -> list[int | None]:
        return [d if isinstance(d, int) else None for d in value.shape]


class _LegacyBuilder:
    """Writes ONNX nodes into a TorchScript graph (the legacy exporter's symbolic functions)."""

    def __init__(self, g: Any) -> None:
        self._g = g

    def __call__(self, name: str, *inputs: Any, **attributes: Any) -> Any:
        suffix = {int: "_i", list: "_i", str: "_s", float: "_f"}
        return self._g.op(name, *inputs,
                          **{k + suffix[type(v)]: v for k, v in attributes.items()})

    def const(self, value: torch.Tensor) -> Any:
        return self._g.op("Constant", value_t=value)

    @staticmethod
    def sizes(value: Any) -> list[int | None]:
        from torch.onnx import symbolic_helper

        return list(symbolic_helper._get_tensor_sizes(value) or [])


def _static(sizes: list[int | None], what: str) -> list[int]:
    if not sizes or any(d is None for d in sizes):
        raise ValueError(f"fxquant ONNX export: the {what} needs a static shape, got {sizes}; "
                         "export with fixed channel counts (dynamic batch and spatial sizes "
                         "are fine)")
    return [int(d) for d in sizes]  # type: ignore[arg-type]


def _signs(b: Any, x: Any, weight_bits: Any, in_channels: int) -> Any:
    """The ±1 weight ``(out, [kh, kw,] in)``, in ``x``'s dtype, unpacked from ``weight_bits``."""
    shape = _static(b.sizes(weight_bits), "packed weight")
    bits = b("Unsqueeze", weight_bits, b.const(torch.tensor([-1])))
    bits = b("BitShift", bits, b.const(torch.arange(8, dtype=torch.uint8)), direction="RIGHT")
    bits = b("BitwiseAnd", bits, b.const(torch.tensor(1, dtype=torch.uint8)))
    bits = b("Reshape", bits, b.const(torch.tensor([*shape[:-1], 8 * shape[-1]])))
    bits = b("Slice", bits, b.const(torch.tensor([0])), b.const(torch.tensor([in_channels])),
             b.const(torch.tensor([-1])))
    one = b("CastLike", b.const(torch.tensor(1.0)), x)
    minus_one = b("CastLike", b.const(torch.tensor(-1.0)), x)
    return b("Where", b("Cast", bits, to=_BOOL), minus_one, one)


def _sign(b: Any, x: Any) -> Any:
    """``binary_sign(x)``: +1 where ``x >= 0``, -1 below, NaN kept."""
    zero = b("CastLike", b.const(torch.tensor(0.0)), x)
    one = b("CastLike", b.const(torch.tensor(1.0)), x)
    minus_one = b("CastLike", b.const(torch.tensor(-1.0)), x)
    signs = b("Where", b("GreaterOrEqual", x, zero), one, minus_one)
    return b("Where", b("IsNaN", x), x, signs)


def _scale_and_bias(b: Any, y: Any, scale: Any, bias: Any | None, channel_shape: list[int]
                    ) -> Any:
    shape = b.const(torch.tensor(channel_shape))
    y = b("Mul", b("Reshape", b("CastLike", scale, y), shape), y)  # see the module docstring
    return y if bias is None else b("Add", y, b("Reshape", b("CastLike", bias, y), shape))


def _binary_conv2d(b: Any, x: Any, weight_bits: Any, scale: Any, bias: Any | None,
                   stride: list[int], padding: list[int], dilation: list[int], groups: int
                   ) -> Any:
    channels = _static(b.sizes(x)[-3:-2], "input channel count")[0]
    weight = b("Transpose", _signs(b, x, weight_bits, channels // groups), perm=[0, 3, 1, 2])
    y = b("Conv", _sign(b, x), weight, strides=list(stride), pads=[*padding, *padding],
          dilations=list(dilation), group=int(groups))
    return _scale_and_bias(b, y, scale, bias, [-1, 1, 1])


def _binary_linear(b: Any, x: Any, weight_bits: Any, scale: Any, bias: Any | None) -> Any:
    features = _static(b.sizes(x)[-1:], "input feature count")[0]
    weight = b("Transpose", _signs(b, x, weight_bits, features), perm=[1, 0])
    return _scale_and_bias(b, b("MatMul", _sign(b, x), weight), scale, bias, [-1])


def _conv_translation(x: Any, weight_bits: Any, scale: Any, bias: Any | None,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int
                      ) -> Any:
    return _binary_conv2d(_ScriptBuilder(), x, weight_bits, scale, bias, stride, padding,
                          dilation, groups)


def _linear_translation(x: Any, weight_bits: Any, scale: Any, bias: Any | None) -> Any:
    return _binary_linear(_ScriptBuilder(), x, weight_bits, scale, bias)


def custom_translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """The translations of the fxquant ops for ``torch.onnx.export(..., dynamo=True)``.

    ``torch.onnx.export(model, args, path, custom_translation_table=custom_translation_table())``
    writes every ``torch.ops.fxquant.binary_conv2d`` / ``binary_linear`` call as the standard-op
    subgraph of this module's docstring, the weight bits as ``uint8`` initializers (with
    ``optimize=False``: the default optimizer would fold small layers' bits; :func:`export`
    optimizes without folding them).
    """
    from fxquant.kernels import ops  # noqa: F401 - registers torch.ops.fxquant

    return {torch.ops.fxquant.binary_conv2d.default: _conv_translation,
            torch.ops.fxquant.binary_linear.default: _linear_translation}


def _conv_symbolic(g: Any, x: Any, weight_bits: Any, scale: Any, bias: Any, stride: Any,
                   padding: Any, dilation: Any, groups: Any) -> Any:
    from torch.onnx import symbolic_helper as sh

    return _binary_conv2d(_LegacyBuilder(g), x, weight_bits, scale,
                          None if sh._is_none(bias) else bias, sh._parse_arg(stride, "is"),
                          sh._parse_arg(padding, "is"), sh._parse_arg(dilation, "is"),
                          sh._parse_arg(groups, "i"))


def _linear_symbolic(g: Any, x: Any, weight_bits: Any, scale: Any, bias: Any) -> Any:
    from torch.onnx import symbolic_helper as sh

    return _binary_linear(_LegacyBuilder(g), x, weight_bits, scale,
                          None if sh._is_none(bias) else bias)


def register_legacy_symbolics() -> None:
    """Teach the legacy exporter (``torch.onnx.export(..., dynamo=False)``) the fxquant ops.

    Registered for opset :data:`LEGACY_MIN_OPSET` (18, the first with ``BitwiseAnd``) and above;
    calling it again is harmless. Export with ``do_constant_folding=False`` to keep the bits
    packed (as :func:`export` does).
    """
    from fxquant.kernels import ops  # noqa: F401 - registers torch.ops.fxquant

    torch.onnx.register_custom_op_symbolic("fxquant::binary_conv2d", _conv_symbolic,
                                           LEGACY_MIN_OPSET)
    torch.onnx.register_custom_op_symbolic("fxquant::binary_linear", _linear_symbolic,
                                           LEGACY_MIN_OPSET)


def _reads_packed_bytes(node: Any) -> bool | None:
    """``should_fold`` for onnxscript's optimizer: never fold a node reading a uint8 initializer
    (packed codes), so no unpacked weight is stored; other nodes follow the default rules."""
    import onnx_ir

    for value in node.inputs:
        if (value is not None and value.is_initializer()
                and value.dtype == onnx_ir.DataType.UINT8):
            return False
    return None


def export(model: nn.Module, args: tuple[Any, ...], path: str | os.PathLike[str], *,
           dynamo: bool = True, opset_version: int | None = None, **kwargs: Any) -> None:
    """Write ``model`` (e.g. a converted GraphModule) to the ONNX file ``path``, weights packed.

    ``dynamo=True`` uses the torch.export-based exporter with :func:`custom_translation_table`,
    ``dynamo=False`` the legacy TorchScript exporter with :func:`register_legacy_symbolics` (its
    deprecation warning is silenced: choosing it here is deliberate). Either way the file is one
    self-contained ``.onnx`` (no external data, no per-node stack traces) whose packed bytes stay
    ``uint8`` initializers: the exporters' constant folding is kept off the nodes that unpack
    them (dynamo: onnxscript's optimizer runs with a ``should_fold`` that skips nodes reading a
    ``uint8`` initializer; legacy: ``do_constant_folding=False`` unless you pass it, so
    :class:`fxquant.ops.PackedWeight` codes are not folded into float weights; onnxruntime
    folds constants when it loads the file anyway). ``opset_version``
    defaults to the exporter's own default; other keyword arguments (``input_names``,
    ``dynamic_shapes`` / ``dynamic_axes``, ...) go to ``torch.onnx.export``.

    Example (``tests/kernels/test_onnx_export.py`` runs the same)::

        export(converted, (x,), "model.onnx", input_names=["x"])
        session = onnxruntime.InferenceSession("model.onnx")
        assert torch.equal(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]),
                           converted(x))
    """
    if opset_version is not None and opset_version < LEGACY_MIN_OPSET:
        raise ValueError(f"fxquant ONNX export: opset_version={opset_version} lacks BitwiseAnd; "
                         f"use {LEGACY_MIN_OPSET} or later")
    if dynamo:
        import onnxscript.optimizer

        program = torch.onnx.export(model, args, dynamo=True, opset_version=opset_version,
                                    custom_translation_table=custom_translation_table(),
                                    optimize=False, verbose=False, **kwargs)
        onnxscript.optimizer.optimize_ir(program.model, should_fold=_reads_packed_bytes)
        for node in program.model.graph.all_nodes():
            node.metadata_props.clear()  # stack traces and scopes: most of a small file
        program.save(path, external_data=False)
        return
    register_legacy_symbolics()
    with warnings.catch_warnings():  # the exporter's own deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, args, path, dynamo=False, opset_version=opset_version,
                          **{"do_constant_folding": False, **kwargs})

