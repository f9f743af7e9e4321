"""Graph passes: each a small ``GraphModule -> GraphModule`` function named verb_object."""

from fxquant.graph.passes.annotate import annotate_layers, report_float_layers
from fxquant.graph.passes.binary import lower_binary_layers
from fxquant.graph.passes.fold import fold_batch_norm, fold_weight_quantizers
from fxquant.graph.passes.insert import (
    compact_binary_inputs,
    insert_error_quantizers,
    insert_input_quantizers,
    insert_output_quantizers,
    insert_weight_quantizers,
)
from fxquant.graph.passes.lower import (
    eliminate_dead_code,
    lower_activation_quantizers,
    pack_weights,
    restore_plain_layers,
)
from fxquant.graph.passes.nonnegative import check_nonnegative_inputs

__all__ = ["annotate_layers", "report_float_layers", "insert_weight_quantizers",
           "insert_input_quantizers", "insert_output_quantizers", "insert_error_quantizers",
           "check_nonnegative_inputs", "compact_binary_inputs",
           "restore_plain_layers", "fold_weight_quantizers",
           "fold_batch_norm", "lower_binary_layers", "lower_activation_quantizers",
           "pack_weights", "eliminate_dead_code"]
