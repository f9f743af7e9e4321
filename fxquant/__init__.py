"""fxquant: torch.fx graph-rewriting low-bit quantization (binary, ternary, k-bit, WAGE).

>>> import torch, torch.nn as nn, fxquant
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
>>> prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
>>> "_2_weight_quantizer" in prepared.code
True
"""

from fxquant import quantizers, training, wage
from fxquant.api import convert, is_converted, prepare
from fxquant.graph.blocks import blocks
from fxquant.graph.meta import QuantRecord
from fxquant.graph.recipe import Recipe
from fxquant.graph.tracer import TracingError
from fxquant.inspect import summary, to_networkx
from fxquant.io import load, save

__all__ = ["prepare", "convert", "is_converted", "blocks", "Recipe", "QuantRecord", "TracingError",
           "summary", "to_networkx", "save", "load",
           "quantizers", "training", "wage"]
__version__ = "0.1.0"
