"""Small helpers shared by the quantizer test files."""

from __future__ import annotations

import math

import torch


def exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN-aware exact comparison (-0 and +0 compare equal)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


def up(v: float, dtype: torch.dtype) -> float:
    """The next value of ``dtype`` above ``v``."""
    t = torch.tensor(v, dtype=dtype)
    return torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)).item()


def down(v: float, dtype: torch.dtype) -> float:
    """The next value of ``dtype`` below ``v``."""
    t = torch.tensor(v, dtype=dtype)
    return torch.nextafter(t, torch.tensor(-math.inf, dtype=dtype)).item()


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
