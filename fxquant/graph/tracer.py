"""Symbolic tracing with fxquant quantizers (and user-named modules) kept as leaves.

Tracing failures are re-raised as :class:`TracingError`, which names the module being traced, the
user's source line and the fixes, instead of a bare ``torch.fx`` error.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.fx
from torch import nn

from fxquant._user_code import is_internal
from fxquant.graph import attention  # imported before any trace: registers fx.wrap leaves
from fxquant.graph.meta import BLOCK_KEY, BlockCall
from fxquant.graph.module import graft_module_tree
from fxquant.ops import PackedWeight
from fxquant.quantizers.base import Quantizer

__all__ = ["QuantTracer", "TracingError", "trace", "trace_modes"]



class TracingError(RuntimeError):
    """The model could not be traced symbolically; the message names the place and the fixes."""


class QuantTracer(torch.fx.Tracer):
    """A ``torch.fx.Tracer`` for which fxquant quantizers and chosen modules are leaves.

    ``leaf_modules`` holds qualified module paths (``"backbone.head"``) and/or module classes.
    ``blocks`` holds module paths (checked by :func:`fxquant.graph.blocks.block_paths`): every
    node the tracer creates then carries a :class:`~fxquant.graph.meta.BlockCall` at
    ``node.meta[BLOCK_KEY]`` saying which block call (the outermost) created it.
    """

    def __init__(self, leaf_modules: Iterable[str | type[nn.Module]] = (),
                 leaf_functions: Iterable[Callable[..., Any]] = (),
                 blocks: frozenset[str] = frozenset()) -> None:
        functions = tuple(leaf_functions)
        bad_functions = [f for f in functions if not callable(f)]
        if bad_functions:
            raise ValueError(f"leaf_functions takes functions, got {bad_functions!r}")
        super().__init__(autowrap_functions=functions)
        # Buffers read in traced code become graph reads: an in-place update such as
        # ``self.calls.add_(1)`` is recorded instead of running once on the real buffer.
        self.proxy_buffer_attributes = True
        leaves = list(leaf_modules)
        bad = [x for x in leaves if not (isinstance(x, str)
                                         or (isinstance(x, type) and issubclass(x, nn.Module)))]
        if bad:
            raise ValueError(f"leaf_modules takes module paths or nn.Module classes, got {bad!r}")
        self.leaf_names = frozenset(x for x in leaves if isinstance(x, str))
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._paths: list[str] = []
        self.failed_path: str | None = None
        self.mode_branches: list[str] = []  # where Python control flow read ``training``
        self.blocks = blocks
        self._block = ("", 0)  # (path, call) of the block call being traced ("" outside)
        self._block_calls: dict[str, int] = {}

    def trace(self, root: nn.Module | Callable[..., Any],
              concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        """Trace ``root``; reads of a module's ``training`` flag become reads in the graph.

        ``F.dropout(x, p, self.training)`` then follows ``model.train()``/``model.eval()`` at run
        time instead of the mode of the trace. Where Python control flow branches on the flag
        (``if self.training:``), the branch of the current mode is taken and the place is noted
        in :attr:`mode_branches` (:func:`trace_modes` then traces the other mode too).
        """
        self.mode_branches = []
        self._block, self._block_calls = ("", 0), {}
        with _reading_training(self), attention.composite_attention():
            graph = super().trace(root, concrete_args)
        for node in reversed(graph.nodes):  # reads only used by Python control flow
            if _TRAINING_READ in node.meta and not node.users:
                graph.erase_node(node)
        return graph

    def read_training(self, module: nn.Module, value: bool) -> Any:
        """The value traced code sees for ``module.training``: a graph read of the flag."""
        try:
            path = self.path_of_module(module)
        except NameError:  # not part of the traced model
            return value
        proxy = self.create_proxy("get_attr", f"{path}.training" if path else "training", (), {})
        proxy.node.meta[_TRAINING_READ] = value
        return proxy

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        value = _mode_value(obj.node)
        if value is _UNKNOWN:
            return super().to_bool(obj)
        self.mode_branches.append(self._paths[-1] if self._paths else "")
        return bool(value)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (Quantizer, PackedWeight)) or module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if attention.traces_as_function(m) or _traced_transformer(m):
            return False  # traced (attention as multi_head_attention): projections visible
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if attention.traces_as_function(m):  # traced instead of forward unless made a leaf
            forward = functools.partial(attention.multi_head_attention, m)
        elif _traced_transformer(m):
            if _masked(m, args, kwargs):  # masks are checked by value: a leaf (reported float)
                return self.create_proxy("call_module", path, args, kwargs)
            if isinstance(m, (nn.TransformerEncoder, nn.TransformerDecoder)):
                forward = functools.partial(_layer_stack, m)
        self._paths.append(path)
        outer = self._block
        if path in self.blocks and not outer[0]:
            self._block = (path, self._block_calls.get(path, 0))
            self._block_calls[path] = self._block[1] + 1
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self._paths[-1]
            raise
        finally:
            self._paths.pop()
            self._block = outer

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        if self.blocks:
            node.meta[BLOCK_KEY] = BlockCall(*self._block, node.name)
        return node


# torch.nn transformer layers are FX leaves by default; fxquant traces through them so their
# attention and feed-forward Linears are quantized. Their forward branches on tensor properties
# only to choose the fused inference kernel, which is switched off while tracing: the graph
# always computes the composite (training) path. Masks are checked and converted by value, so a
# call with masks (or is_causal) stays a leaf, which prepare reports as left in float.
_TRANSFORMERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                 nn.TransformerDecoder)


def _traced_transformer(m: nn.Module) -> bool:
    return isinstance(m, _TRANSFORMERS) and any(
        isinstance(m, cls) and type(m).forward is cls.forward for cls in _TRANSFORMERS)


def _masked(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    bound = inspect.signature(type(m).forward).bind(m, *args, **kwargs).arguments
    return any(value is not None and value is not False for name, value in bound.items()
               if "mask" in name or "is_causal" in name)


def _layer_stack(stack: nn.TransformerEncoder | nn.TransformerDecoder, x: Any,
                 memory: Any = None, *args: Any, **kwargs: Any) -> Any:
    """``TransformerEncoder``/``TransformerDecoder`` without masks, as torch computes it."""
    for layer in stack.layers:
        x = layer(x) if memory is None else layer(x, memory)
    return x if stack.norm is None else stack.norm(x)


def _user_frame(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame that belongs to neither torch nor fxquant."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith("<") and not is_internal(frame.filename):
            return frame  # (a file, so its line can be shown)
    return None


def _mode_value(node: torch.fx.Node) -> Any:
    """The value of ``node`` if it is computed from ``training`` reads and constants only."""
    if _TRAINING_READ in node.meta:
        return node.meta[_TRAINING_READ]
    if node.op not in ("call_function", "call_method"):
        return _UNKNOWN
    values = []
    for arg in (*node.args, *node.kwargs.values()):
        value = _mode_value(arg) if isinstance(arg, torch.fx.Node) else arg
        if value is _UNKNOWN or isinstance(arg, (list, tuple, dict, slice)):
            return _UNKNOWN
        values.append(value)
    n = len(node.args)
    args, kwargs = values[:n], dict(zip(node.kwargs, values[n:], strict=True))
    try:
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)  # type: ignore[operator]
    except Exception:
        return _UNKNOWN


_TRAINING_READ = "fxquant_training_read"
_UNKNOWN = object()
_TRACERS: list[QuantTracer] = []


class _TrainingFlag:
    """Installed as ``nn.Module.training`` while a QuantTracer traces: a data descriptor, so it
    sees every read of a module's flag (which lives in the instance ``__dict__``)."""

    def __get__(self, module: nn.Module | None, owner: type | None = None) -> Any:
        if module is None:
            return self
        value = module.__dict__.get("training", True)
        return _TRACERS[-1].read_training(module, value) if _TRACERS else value

    def __set__(self, module: nn.Module, value: bool) -> None:
        module.__dict__["training"] = value


@contextlib.contextmanager
def _reading_training(tracer: QuantTracer) -> Iterator[None]:
    if not _TRACERS:
        nn.Module.training = _TrainingFlag()  # type: ignore[assignment]
    _TRACERS.append(tracer)
    try:
        yield
    finally:
        _TRACERS.pop()
        if not _TRACERS:
            del nn.Module.training


def _failure_site(err: BaseException) -> tuple[str, int] | None:
    frame = _user_frame(err)
    return (frame.filename, frame.lineno or 0) if frame else None


def _called_functions(err: BaseException) -> list[Callable[..., Any]]:
    """Module-level functions of the user's code on the failing call stack, innermost first:
    the candidates for ``leaf_functions`` (a leaf function runs as it is, uninspected)."""
    found: list[Callable[..., Any]] = []
    tb = err.__traceback__
    while tb is not None:
        code, namespace = tb.tb_frame.f_code, tb.tb_frame.f_globals
        fn = namespace.get(code.co_name)
        if (getattr(fn, "__code__", None) is code and code.co_name != "forward"
                and not is_internal(code.co_filename)):
            found.append(fn)
        tb = tb.tb_next
    return found[::-1]


def _advice(model: nn.Module, err: BaseException, tracer: QuantTracer,
            concrete_args: dict[str, Any] | None, leaf_modules: list[str | type[nn.Module]],
            leaf_functions: list[Callable[..., Any]]) -> str:
    """What to do about a failed trace, checked by tracing again: the leaf functions (preferred:
    the layers around them stay quantized) and leaf classes that make the trace succeed."""
    modules: list[type[nn.Module]] = []
    functions: list[Callable[..., Any]] = []
    failed, site = tracer.failed_path, _failure_site(err)
    for _ in range(8):
        candidates: list[Any] = [f for f in _called_functions(err) if f not in functions]
        if failed:
            candidates.append(type(model.get_submodule(failed)))
        for leaf in candidates:
            is_class = isinstance(leaf, type)
            retry = QuantTracer([*leaf_modules, *modules, *([leaf] if is_class else [])],
                                [*leaf_functions, *functions, *([] if is_class else [leaf])])
            try:
                retry.trace(model, concrete_args)
            except Exception as again:
                if _failure_site(again) == site:
                    continue  # this leaf does not get past the failure
                (modules if is_class else functions).append(leaf)
                err, failed, site = again, retry.failed_path, _failure_site(again)
                break
            (modules if is_class else functions).append(leaf)
            return _advice_text(modules, functions)
        else:
            return ""
    return ""


def _advice_text(modules: list[type[nn.Module]], functions: list[Callable[..., Any]]) -> str:
    name = lambda x: f"{x.__module__}.{x.__qualname__}"  # noqa: E731
    args = []
    if functions:
        args.append(f"leaf_functions=[{', '.join(map(name, functions))}]")
    if modules:
        args.append(f"leaf_modules=[{', '.join(map(name, modules))}]")
    text = f"Fix (checked: tracing then succeeds): prepare(..., {', '.join(args)})."
    if functions:
        text += " A leaf function is called as it is at run time (fxquant does not look inside)."
    if modules:
        which = "these classes" if len(modules) > 1 else "that class"
        text += (f" Leaf modules keep every instance of {which} opaque: those modules run as "
                 f"they are and stay in float (their layers are not quantized).")
    return text + " "


def trace(model: nn.Module, concrete_args: dict[str, Any] | None = None,
          leaf_modules: Iterable[str | type[nn.Module]] = (),
          graph_module_class: type[torch.fx.GraphModule] = torch.fx.GraphModule,
          leaf_functions: Iterable[Callable[..., Any]] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` (not copied: the GraphModule shares its submodules) into a GraphModule
    of ``graph_module_class`` in its current train/eval mode (see :func:`trace_modes`)."""
    leaves = _Leaves(list(leaf_modules), list(leaf_functions), frozenset())
    return _trace(model, concrete_args, leaves, graph_module_class)[0]


def trace_modes(model: nn.Module, concrete_args: dict[str, Any] | None = None,
                leaf_modules: Iterable[str | type[nn.Module]] = (),
                graph_module_class: type[torch.fx.GraphModule] = torch.fx.GraphModule,
                leaf_functions: Iterable[Callable[..., Any]] = (),
                blocks: frozenset[str] = frozenset()) -> dict[bool, torch.fx.GraphModule]:
    """Trace ``model`` once per train/eval mode its control flow depends on.

    Returns ``{model.training: gm}`` when Python control flow never branched on a ``training``
    flag, or when the other mode gives the same graph; otherwise ``{True: gm_train,
    False: gm_eval}`` (the model is traced in the other mode, then put back in its own).
    ``leaf_functions`` are called as they are (``torch.fx``'s ``autowrap_functions``: functions
    called by name from the modules of traced code). ``blocks``: see :class:`QuantTracer`.
    """
    leaves = _Leaves(list(leaf_modules), list(leaf_functions), blocks)
    mode = model.training
    gm, branches = _trace(model, concrete_args, leaves, graph_module_class)
    if not branches:
        return {mode: gm}
    model.train(not mode)
    try:
        other, _ = _trace(model, concrete_args, leaves, graph_module_class)
    finally:
        model.train(mode)
    if _same_graph(gm.graph, other.graph):
        return {mode: gm}
    return {mode: gm, not mode: other}


class _Leaves(NamedTuple):
    modules: list[str | type[nn.Module]]
    functions: list[Callable[..., Any]]
    blocks: frozenset[str]


def _same_graph(a: torch.fx.Graph, b: torch.fx.Graph) -> bool:
    if len(a.nodes) != len(b.nodes):
        return False
    index: dict[torch.fx.Node, int] = {}
    for i, (x, y) in enumerate(zip(a.nodes, b.nodes, strict=True)):
        index[x] = index[y] = i
        same = (x.op, x.target) == (y.op, y.target)
        if same:
            key = lambda n: ("node", index[n])  # noqa: E731
            try:
                same = bool(torch.fx.node.map_arg((x.args, x.kwargs), key)
                            == torch.fx.node.map_arg((y.args, y.kwargs), key))
            except Exception:  # an argument without a plain ``==`` (a tensor)
                same = False
        if not same:
            return False
    return True


def _trace(model: nn.Module, concrete_args: dict[str, Any] | None,
           leaves: _Leaves, graph_module_class: type[torch.fx.GraphModule]
           ) -> tuple[torch.fx.GraphModule, list[str]]:
    tracer = QuantTracer(*leaves)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as err:
        where = tracer.failed_path
        module = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where \
            else "the top-level forward"
        frame = _user_frame(err)
        line = f" at {frame.filename}:{frame.lineno}: `{frame.line}`" if frame else ""
        advice = _advice(model, err, tracer, concrete_args, leaves.modules, leaves.functions)
        raise TracingError(
            f"fxquant could not trace {type(model).__name__}: {module}{line} failed with "
            f"{type(err).__name__}: {err}\n{advice}"
            f"Other fixes: rewrite that line without Python control flow on tensor values or "
            f"shapes, len() or iteration of tensors (branches on self.training are fine); "
            f"pass concrete_args={{'flag': value}} to fix Python-level arguments of the "
            f"top-level forward; list a function in leaf_functions=[...] (called as it is); or "
            f"a module path or class in leaf_modules=[...] (it then stays in float and opaque "
            f"to fxquant)."
        ) from err
    _keep_concrete_defaults(graph, concrete_args or {})
    gm = graph_module_class(tracer.root, graph, type(model).__name__)
    graft_module_tree(gm, tracer.root)
    return gm, tracer.mode_branches


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
