"""Symbolic tracing with fxquant quantizers (and user-named modules) kept as leaves.

Tracing failures are re-raised as :class:`TracingError`, which names the module being traced, the
user's source line and the fixes, instead of a bare ``torch.fx`` error.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant.ops import PackedWeight
from fxquant.quantizers.base import Quantizer

__all__ = ["QuantTracer", "TracingError", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXQUANT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TracingError(RuntimeError):
    """The model could not be traced symbolically; the message names the place and the fixes."""


class QuantTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` for which fxquant quantizers and chosen modules are leaves.

    ``leaf_modules`` holds qualified module paths (``"backbone.head"``) and/or module classes.
    """

    def __init__(self, leaf_modules: Iterable[str | type[nn.Module]] = ()) -> None:
        super().__init__()
        leaves = list(leaf_modules)
        bad = [x for x in leaves if not (isinstance(x, str)
                                         or (isinstance(x, type) and issubclass(x, nn.Module)))]
        if bad:
            raise ValueError(f"leaf_modules takes module paths or nn.Module classes, got {bad!r}")
        self.leaf_names = frozenset(x for x in leaves if isinstance(x, str))
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._paths: list[str] = []
        self.failed_path: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (Quantizer, PackedWeight)) or module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        self._paths.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self._paths[-1]
            raise
        finally:
            self._paths.pop()


def _user_frame(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that belongs to neither torch nor fxquant."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith((_TORCH_DIR, _FXQUANT_DIR)) and not frame.filename.startswith("<"):
            return frame
    return None


def trace(model: nn.Module, concrete_args: dict[str, Any] | None = None,
          leaf_modules: Iterable[str | type[nn.Module]] = (),
          graph_module_class: type[torch.fx.GraphModule] = torch.fx.GraphModule
          ) -> torch.fx.GraphModule:
    """Trace ``model`` (not copied: the GraphModule shares its submodules) into a GraphModule
    of ``graph_module_class``."""
    tracer = QuantTracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as err:
        where = tracer.failed_path
        module = f"module {where!r}" if where else "the top-level forward"
        frame = _user_frame(err)
        line = f" at {frame.filename}:{frame.lineno}: `{frame.line}`" if frame else ""
        leaf = f"leaf_modules=[{where!r}]" if where else "leaf_modules=[...]"
        raise TracingError(
            f"fxquant could not trace {type(model).__name__}: {module}{line} failed with "
            f"{type(err).__name__}: {err}\n"
            f"Fixes: pass concrete_args={{'flag': value}} to fix Python-level flags or "
            f"data-dependent branches; or make the module a leaf with {leaf} (it then stays "
            f"in float and opaque to fxquant); or rewrite that line without control flow on "
            f"tensor values, len() or iteration of tensors."
        ) from err
    _keep_concrete_defaults(graph, concrete_args or {})
    return graph_module_class(tracer.root, graph, type(model).__name__)


def _keep_concrete_defaults(graph: torch.fx.Graph, concrete_args: dict[str, Any]) -> None:
    """Keep a fixed argument callable by its own name, defaulting to its fixed value.

    ``torch.fx`` renames a concrete argument's placeholder (``augment`` -> ``augment_1``) and keeps
    the original default, so ``gm(x)`` fails its specialisation assert. Here ``gm(x)`` and
    ``gm(x, augment=False)`` work, and another value still fails the assert.
    """
    taken = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        base = re.sub(r"_\d+$", "", str(node.target))
        value = concrete_args.get(base, torch.fx.PH)
        if base != node.target and base not in taken and value is not torch.fx.PH:
            node.target = base
            node.args = (value,)
            taken.add(base)
