"""The visible pipelines and the one tiny driver that runs them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx

from fxquant.graph.blocks import inline_blocks
from fxquant.graph.module import QuantGraphModule
from fxquant.graph.passes import (
    annotate_layers,
    check_nonnegative_inputs,
    compact_binary_inputs,
    eliminate_dead_code,
    fold_batch_norm,
    fold_weight_quantizers,
    insert_error_quantizers,
    insert_input_quantizers,
    insert_output_quantizers,
    insert_weight_quantizers,
    lower_activation_quantizers,
    lower_binary_layers,
    pack_weights,
    report_float_layers,
    restore_plain_layers,
)

__all__ = ["PREPARE", "LOWER", "run", "DeferredGraphModule"]

Pass = Callable[..., torch.fx.GraphModule]

PREPARE: tuple[Pass, ...] = (
    annotate_layers,
    report_float_layers,
    insert_weight_quantizers,
    insert_input_quantizers,
    check_nonnegative_inputs,
    insert_output_quantizers,
    insert_error_quantizers,
    compact_binary_inputs,
)

LOWER: tuple[Pass, ...] = (
    inline_blocks,
    restore_plain_layers,
    fold_weight_quantizers,
    fold_batch_norm,
    lower_binary_layers,
    lower_activation_quantizers,
    pack_weights,
    eliminate_dead_code,
)


CHECK_EVERY_PASS = False  # lint after every pass (the test suite turns this on)

_DEFERRED = "_fxquant_codegen_deferred"


class DeferredGraphModule(QuantGraphModule):
    """A GraphModule whose Python code is generated once :func:`run` is done with it.

    Building a ``torch.fx.GraphModule`` generates and compiles the code of its graph, which the
    passes are about to rewrite; for the inputs of a pipeline that work is wasted. Until
    :meth:`finish`, :meth:`recompile` does nothing (the module cannot be called yet); afterwards
    it behaves as an ordinary GraphModule, and so do its copies (pickling gives plain ones).
    """

    def __init__(self, root: torch.nn.Module, graph: torch.fx.Graph,
                 class_name: str = "GraphModule") -> None:
        self.__dict__[_DEFERRED] = True  # read by recompile(), which __init__ calls
        super().__init__(root, graph, class_name)

    def recompile(self) -> torch.fx.graph.PythonCode:
        if self.__dict__.get(_DEFERRED, False):
            return None  # type: ignore[return-value]  # the graph setter ignores it
        return super().recompile()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get(_DEFERRED, False):
            raise RuntimeError("this GraphModule has no code yet: call finish() first")
        return super().__call__(*args, **kwargs)

    def finish(self) -> None:
        """Generate the code now; from here on this is an ordinary GraphModule."""
        self.__dict__.pop(_DEFERRED, None)
        self.recompile()


def run(gm: torch.fx.GraphModule, passes: Sequence[Pass], *args: Any) -> torch.fx.GraphModule:
    """Apply ``passes`` in order (each called as ``p(gm, *args)``), lint, generate code once.

    The graph is linted after the last pass, or after every pass when ``CHECK_EVERY_PASS`` is
    set; a pass that breaks the graph is named in the error. Linting and generating code once
    rather than after every pass (and not for the input either, when it is a
    :class:`DeferredGraphModule`) keeps prepare's cost close to a single trace.
    """
    for i, p in enumerate(passes):
        gm = p(gm, *args)
        if CHECK_EVERY_PASS or i == len(passes) - 1:
            try:
                gm.graph.lint()
            except Exception as err:
                raise RuntimeError(f"fxquant pass {p.__name__} produced an invalid graph: "
                                   f"{err}") from err
    if isinstance(gm, DeferredGraphModule):
        gm.finish()
    else:
        gm.recompile()
    return gm
