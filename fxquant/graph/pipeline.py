"""The visible pipelines and the one tiny driver that runs them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx

from fxquant.graph.passes import (
    annotate_layers,
    compact_binary_inputs,
    eliminate_dead_code,
    fold_batch_norm,
    fold_weight_quantizers,
    insert_error_quantizers,
    insert_input_quantizers,
    insert_output_quantizers,
    insert_weight_quantizers,
    lower_activation_quantizers,
    pack_weights,
    restore_plain_layers,
)

__all__ = ["PREPARE", "LOWER", "run"]

Pass = Callable[..., torch.fx.GraphModule]

PREPARE: tuple[Pass, ...] = (
    annotate_layers,
    insert_weight_quantizers,
    insert_input_quantizers,
    insert_output_quantizers,
    insert_error_quantizers,
    compact_binary_inputs,
)

LOWER: tuple[Pass, ...] = (
    restore_plain_layers,
    fold_weight_quantizers,
    fold_batch_norm,
    lower_activation_quantizers,
    pack_weights,
    eliminate_dead_code,
)


CHECK_EVERY_PASS = False  # lint after every pass (the test suite turns this on)


def run(gm: torch.fx.GraphModule, passes: Sequence[Pass], *args: Any) -> torch.fx.GraphModule:
    """Apply ``passes`` in order (each called as ``p(gm, *args)``), lint, recompile once.

    The graph is linted after the last pass, or after every pass when ``CHECK_EVERY_PASS`` is
    set; a pass that breaks the graph is named in the error. Linting and recompiling once rather
    than after every pass keeps prepare's cost close to a single trace.
    """
    for i, p in enumerate(passes):
        gm = p(gm, *args)
        if CHECK_EVERY_PASS or i == len(passes) - 1:
            try:
                gm.graph.lint()
            except Exception as err:
                raise RuntimeError(f"fxquant pass {p.__name__} produced an invalid graph: "
                                   f"{err}") from err
    gm.recompile()
    return gm
