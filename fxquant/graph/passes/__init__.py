"""Graph passes: each a small ``GraphModule -> GraphModule`` function named verb_object."""

from fxquant.graph.passes.annotate import annotate_layers
from fxquant.graph.passes.insert import (
    insert_error_quantizers,
    insert_input_quantizers,
    insert_output_quantizers,
    insert_weight_quantizers,
)

__all__ = ["annotate_layers", "insert_weight_quantizers", "insert_input_quantizers",
           "insert_output_quantizers", "insert_error_quantizers"]
