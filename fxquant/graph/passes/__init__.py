"""Graph passes: each a small ``GraphModule -> GraphModule`` function named verb_object."""

from fxquant.graph.passes.annotate import annotate_layers
from fxquant.graph.passes.fold import fold_batch_norm, fold_weight_quantizers
from fxquant.graph.passes.insert import (
    insert_error_quantizers,
    insert_input_quantizers,
    insert_output_quantizers,
    insert_weight_quantizers,
)
from fxquant.graph.passes.lower import (
    eliminate_dead_code,
    lower_activation_quantizers,
    pack_weights,
)

__all__ = ["annotate_layers", "insert_weight_quantizers", "insert_input_quantizers",
           "insert_output_quantizers", "insert_error_quantizers", "fold_weight_quantizers",
           "fold_batch_norm", "lower_activation_quantizers", "pack_weights", "eliminate_dead_code"]
