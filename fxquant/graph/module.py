"""QuantGraphModule: the GraphModule fxquant returns, whose facts survive copies and pickles.

A plain ``torch.fx.GraphModule`` keeps only what its graph references, and pickles only its code
(``torch.save``, ``mp.spawn`` and ``copy.deepcopy`` rebuild it from that). fxquant needs more:

* the **whole module tree** of the float model, so ``state_dict`` keys (and buffer persistence)
  stay the float model's even for submodules the traced forward never touches;
* the **records** at ``node.meta["fxquant"]`` that ``quantizers()``, ``convert`` and ``summary``
  read, and attributes such as the saved recipe;
* one **graph per train/eval mode** when the model's control flow depends on ``self.training``
  (an auxiliary head in train mode only, batch statistics vs. running statistics): the active
  graph follows :meth:`train`/:meth:`eval` of the root module.

All three survive ``copy.deepcopy`` and pickling here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant.graph.meta import META_KEY, QuantRecord

__all__ = ["QuantGraphModule", "graft_module_tree", "mode_graph", "set_mode_graphs", "merge_modes",
           "adopt", "preserve", "all_nodes"]

MODE_GRAPHS = "_fxquant_mode_graphs"
PRESERVED = "_fxquant_preserved"  # names of extra attributes that copies and pickles keep
_TREE_KEYS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "training")


class QuantGraphModule(torch.fx.GraphModule):
    """A ``torch.fx.GraphModule`` that keeps fxquant's records, the whole module tree and
    per-mode graphs through ``copy.deepcopy`` and pickling (see the module docstring)."""

    def train(self, mode: bool = True) -> QuantGraphModule:
        super().train(mode)
        graphs = self.__dict__.get(MODE_GRAPHS)
        if graphs is not None and self.graph is not graphs[mode]:
            self.graph = graphs[mode]  # the setter generates the code again
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantGraphModule:
        res = super().__deepcopy__(memo)
        # GraphModule's copy keeps only what the active graph references; everything it copied
        # is in ``memo`` now, so this takes the same copies for the rest of the state.
        state = copy.deepcopy(self.__dict__, memo)
        _restore(res, state)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        _, (body, import_block) = super().__reduce__()
        body.pop(MODE_GRAPHS, None)
        other: dict[bool, torch.fx.GraphModule] = {}
        for mode, graph in (self.__dict__.get(MODE_GRAPHS) or {}).items():
            if graph is not self.graph:  # pickled as its own GraphModule over the same modules
                other[mode] = QuantGraphModule(self, copy.deepcopy(graph), "ModeGraph")
        return (_rebuild, (body, import_block, _records(self.graph), other))


def _records(graph: torch.fx.Graph) -> dict[str, QuantRecord]:
    return {n.name: r for n in graph.nodes if (r := n.meta.get(META_KEY)) is not None}


def _restore(gm: torch.fx.GraphModule, state: dict[str, Any]) -> None:
    """Put back the module tree, the per-mode graphs and the preserved attributes of ``state``."""
    for key in _TREE_KEYS:
        if key in state:
            gm.__dict__[key] = state[key]
    for key in (*state.get(PRESERVED, ()), PRESERVED):
        if key in state:
            gm.__dict__[key] = state[key]
    graphs = state.get(MODE_GRAPHS)
    if graphs is not None:
        graphs = {mode: gm.graph if mode == gm.training else g for mode, g in graphs.items()}
        gm.__dict__[MODE_GRAPHS] = graphs


def adopt(gm: torch.fx.GraphModule) -> QuantGraphModule:
    """Make the GraphModule ``gm`` a :class:`QuantGraphModule` in place and return it."""
    if not isinstance(gm, QuantGraphModule):
        # GraphModule gives every instance its own class (its generated forward lives there).
        gm.__class__ = type("GraphModuleImpl", (QuantGraphModule,), {})
        gm.recompile()
    return gm


def _rebuild(body: dict[str, Any], import_block: str, records: dict[str, QuantRecord],
             other: dict[bool, torch.fx.GraphModule]) -> QuantGraphModule:
    """Unpickle: torch.fx rebuilds the graph from the code; fxquant puts back the rest."""
    gm = adopt(torch.fx.graph_module.reduce_graph_module(body, import_block))
    _set_records(gm.graph, records)
    _restore(gm, body)
    if other:
        graphs = {mode: g.graph for mode, g in other.items()}
        graphs[gm.training] = gm.graph
        for graph in graphs.values():
            graph.owning_module = None
        gm.__dict__[MODE_GRAPHS] = graphs
        gm.graph = graphs[gm.training]
    return gm


def _set_records(graph: torch.fx.Graph, records: dict[str, QuantRecord]) -> None:
    names = {n.name: n for n in graph.nodes}
    missing = [name for name in records if name not in names]
    if missing:  # torch.fx names the re-traced nodes after the code's variables, as before
        raise RuntimeError(f"fxquant: cannot restore the records of nodes {missing[:5]} after "
                           "unpickling (the rebuilt graph names its nodes differently)")
    for name, record in records.items():
        names[name].meta[META_KEY] = record


def mode_graph(gm: torch.fx.GraphModule, training: bool) -> torch.fx.Graph:
    """The graph ``gm`` runs in train (``True``) or eval (``False``) mode."""
    graphs = gm.__dict__.get(MODE_GRAPHS)
    return gm.graph if graphs is None else graphs[training]


def set_mode_graphs(gm: QuantGraphModule, graphs: dict[bool, torch.fx.Graph]) -> None:
    """Give ``gm`` one graph per mode; the one for ``gm.training`` becomes active."""
    for graph in graphs.values():
        graph.owning_module = None
    gm.__dict__[MODE_GRAPHS] = dict(graphs)
    gm.graph = graphs[gm.training]


def graft_module_tree(gm: nn.Module, root: nn.Module) -> None:
    """Make ``root``'s submodules ``gm``'s, with ``root``'s parameters and buffers.

    ``torch.fx.GraphModule`` copies only what the graph references, into bare ``nn.Module``
    containers, and registers every tensor as a persistent buffer. After this, ``gm`` holds
    ``root``'s own submodules (their classes, unused branches, ``_load_from_state_dict`` and
    train/eval flags included), so ``gm.state_dict()`` has exactly ``root``'s keys: buffers
    keep their persistence, and tensors ``root`` does not hold as persistent buffers
    (``_tensor_constant*`` of the trace) are not saved.
    """
    gm.training = root.training
    for name, child in root._modules.items():
        gm._modules[name] = child
    for name, param in root._parameters.items():
        if name not in gm._parameters and name not in gm.__dict__:
            gm.register_parameter(name, param)
    for name, buffer in root._buffers.items():
        if name not in gm._buffers and name not in gm.__dict__:
            gm.register_buffer(name, buffer)
    persistent = set(root._buffers) - root._non_persistent_buffers_set
    gm._non_persistent_buffers_set = set(gm._buffers) - persistent


def merge_modes(gms: dict[bool, torch.fx.GraphModule], mode: bool) -> torch.fx.GraphModule:
    """One module running ``gms[True].graph`` in train mode and ``gms[False].graph`` in eval.

    Both were prepared from traces of the same model, so they share its submodules; quantizers
    serving the same layer slot under the same name are the same module in both modes (the one
    of ``gms[mode]``, which is returned); one found in the other mode only is added under a free
    name.
    """
    main = gms[mode]
    if len(gms) == 1:
        return main
    other = gms[not mode]
    owners = {str(n.target): n.meta.get(META_KEY) for n in main.graph.nodes
              if n.op == "call_module"}
    for node in other.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        record, mine = node.meta.get(META_KEY), owners.get(target)
        if record is not None and record.role.endswith("_quantizer"):
            if mine is not None and (mine.layer, mine.role) == (record.layer, record.role):
                continue
            name, i = target, 0
            while hasattr(main, name):
                i += 1
                name = f"{target}_{i}"
            main.add_submodule(name, other.get_submodule(target))
            node.target = name
        elif not _has_path(main, target):
            *path, field = target.split(".")
            owner = other.get_submodule(".".join(path))
            main.get_submodule(".".join(path)).register_buffer(
                field, getattr(owner, field), persistent=False)
    set_mode_graphs(main, {mode: main.graph, not mode: other.graph})
    return main


def _has_path(module: nn.Module, target: str) -> bool:
    for atom in target.split("."):
        if not hasattr(module, atom):
            return False
        module = getattr(module, atom)
    return True


def preserve(gm: torch.fx.GraphModule, name: str, value: Any) -> None:
    """Set the attribute ``name`` of ``gm``, kept by its copies and pickles."""
    setattr(gm, name, value)
    gm.__dict__[PRESERVED] = (*[n for n in gm.__dict__.get(PRESERVED, ()) if n != name], name)


def all_nodes(gm: torch.fx.GraphModule) -> Iterator[torch.fx.Node]:
    """The nodes of ``gm``'s active graph, then those of its other mode's graph, if any; for a
    model prepared with blocks, of its flat graphs (:func:`fxquant.graph.blocks.flat_graphs`:
    copies whose targets are full paths from ``gm``)."""
    from fxquant.graph.blocks import flat_graphs  # (blocks builds on this module)

    graphs = flat_graphs(gm)
    yield from graphs[gm.training].nodes
    if graphs[not gm.training] is not graphs[gm.training]:
        yield from graphs[not gm.training].nodes
