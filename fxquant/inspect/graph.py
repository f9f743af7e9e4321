"""to_networkx(): the rewritten graph as a networkx.DiGraph."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.fx

from fxquant.graph.meta import get_record

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["to_networkx"]


def to_networkx(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """One networkx node per FX node, keyed by the FX node name, with attributes

    ``op`` (placeholder, call_module, ...), ``target`` (str), ``record`` (the fxquant
    ``QuantRecord`` or None), ``role`` (the record's role or None) and ``is_quantizer``.
    Edges go from each node to its users, in data-flow order.

    >>> import torch.nn as nn, fxquant
    >>> g = fxquant.to_networkx(fxquant.prepare(nn.Sequential(nn.Linear(2, 2)),
    ...                                         fxquant.Recipe(weight="ste_sign")))
    >>> sorted(n for n, d in g.nodes(data=True) if d["is_quantizer"])
    ['_0_weight_quantizer']
    """
    import networkx as nx  # here, not at import time: it costs 0.17 s, most of fxquant's import

    graph = nx.DiGraph(name=type(gm).__name__)
    for node in gm.graph.nodes:
        record = get_record(node)
        role = record.role if record is not None else None
        graph.add_node(node.name, op=node.op, target=str(node.target), record=record, role=role,
                       is_quantizer=role is not None and role.endswith("_quantizer"))
    for node in gm.graph.nodes:
        for user in node.users:
            graph.add_edge(node.name, user.name)
    return graph
