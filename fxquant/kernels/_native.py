"""The native (C++) packed binary kernels: built on first use, or None where they cannot run.

Placeholder until the C++ extension lands: every call returns None, so the ops use the
reference implementation.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["binary_conv2d", "binary_linear", "available"]


def available() -> bool:
    """Whether the native kernels are built and loaded."""
    return False


def binary_conv2d(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None,
                  stride: list[int], padding: list[int], dilation: list[int], groups: int
                  ) -> Tensor | None:
    return None


def binary_linear(x: Tensor, weight_bits: Tensor, scale: Tensor, bias: Tensor | None
                  ) -> Tensor | None:
    return None
