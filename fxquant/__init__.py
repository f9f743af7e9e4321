"""fxquant: torch.fx graph-rewriting low-bit quantization (binary, ternary, k-bit, WAGE)."""

from fxquant import quantizers, wage

__all__ = ["quantizers", "wage"]
__version__ = "0.1.0"
