"""Small helpers shared by the test files (constants, exact comparisons, oracles' plumbing)."""

from __future__ import annotations

import math

import torch

NAN, INF = math.nan, math.inf
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def t(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN-aware exact comparison (-0 and +0 compare equal)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def up(v: float, dtype: torch.dtype = torch.float32) -> float:
    """The next value of ``dtype`` above ``v``."""
    t = torch.tensor(v, dtype=dtype)
    return torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)).item()


def down(v: float, dtype: torch.dtype = torch.float32) -> float:
    """The next value of ``dtype`` below ``v``."""
    t = torch.tensor(v, dtype=dtype)
    return torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)).item()


def forward_backward(fn, x: torch.Tensor, upstream: torch.Tensor | None = None):
    """``(fn(x), dfn/dx)`` for the upstream gradient (ones by default) at a leaf copy of ``x``."""
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(torch.ones_like(y) if upstream is None else upstream)
    return y.detach(), x.grad


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, label: str = "") -> None:
    """Same dtype, shape and bit patterns (so -0 != +0); NaN matches NaN of any payload or sign.

    NaN payloads are unspecified: the bfloat16 forwards return the canonical NaN for any NaN,
    ``inference`` forms pass the input's NaN through, TWN's NaN at ±inf comes from ``0 * inf``.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, label
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=label)
    as_int = {16: torch.int16, 32: torch.int32, 64: torch.int64}[torch.finfo(actual.dtype).bits]
    keep = ~torch.isnan(expected)
    assert torch.equal(actual[keep].view(as_int), expected[keep].view(as_int)), label


class InferenceOf(torch.nn.Module):
    """What convert traces: a wrapper whose forward is ``q.inference(x)``."""

    def __init__(self, q: torch.nn.Module) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q.inference(x)


def traced_inference(q: torch.nn.Module) -> torch.fx.GraphModule:
    """``q.inference`` traced by ``torch.fx.symbolic_trace``, linted."""
    gm = torch.fx.symbolic_trace(InferenceOf(q))
    gm.graph.lint()
    return gm
