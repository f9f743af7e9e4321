"""WAGE (Wu et al., ICLR 2018): QPyTorch's / xbtorch's WAGE functions in pure torch.

* :mod:`fxquant.wage.functional`: ``shift``, ``C``, ``QW``, ``QG`` (raw operations).
* :mod:`fxquant.wage.quantizer`: the graph-ready quantizers ``WAGEQuantizer`` (``"wage"``),
  ``WAGEError`` (``"wage_error"``), ``WAGEWeight`` (``"wage_weight"``) and their functions.
* :mod:`fxquant.wage.init`: ``truncated_normal_``, ``scale_limit``, ``wage_init_``.
* :mod:`fxquant.wage.training`: ``initialize``, ``WAGEOptimizer`` (the WAGE update rule),
  ``seed_rounding``, ``wage_weights`` for training a prepared model.
"""

from fxquant.wage.functional import QG, QW, C, shift
from fxquant.wage.init import scale_limit, truncated_normal_, wage_init_
from fxquant.wage.quantizer import (
    WAGEError,
    WAGEQuantizer,
    WAGEWeight,
    wage_quantize,
    wage_weight_quantize,
)
from fxquant.wage.training import WAGEOptimizer, initialize, seed_rounding, wage_weights

__all__ = [
    "shift", "C", "QW", "QG",
    "wage_quantize", "wage_weight_quantize", "WAGEQuantizer", "WAGEError", "WAGEWeight",
    "truncated_normal_", "scale_limit", "wage_init_",
    "initialize", "WAGEOptimizer", "seed_rounding", "wage_weights",
]
