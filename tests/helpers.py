"""Small helpers shared by the quantizer test files."""

from __future__ import annotations

import torch


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
