"""to_networkx(): node per FX node, records as attributes, edges follow data flow."""

from __future__ import annotations

import networkx as nx

import fxquant
from tests.models import MLP


def test_nodes_edges_and_records():
    prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
    graph = fxquant.to_networkx(prepared)
    assert set(graph.nodes) == {n.name for n in prepared.graph.nodes}
    assert nx.is_directed_acyclic_graph(graph)
    expected_edges = {(n.name, u.name) for n in prepared.graph.nodes for u in n.users}
    assert set(graph.edges) == expected_edges
    quantizers = {n for n, d in graph.nodes(data=True) if d["is_quantizer"]}
    assert quantizers == {"fc2_weight_quantizer", "fc2_input_quantizer"}
    data = graph.nodes["fc2_weight_quantizer"]
    assert data["role"] == "weight_quantizer" and data["record"].bits == 1
    assert data["op"] == "call_module" and data["target"] == "fc2_weight_quantizer"
    layers = {d["record"].layer for _, d in graph.nodes(data=True) if d["role"] == "layer"}
    assert layers == {"fc1", "fc2", "fc3"}
    # both quantizers feed the fc2 layer node
    (fc2,) = [n for n, d in graph.nodes(data=True) if d["role"] == "layer"
              and d["record"].layer == "fc2"]
    assert graph.has_edge("fc2_input_quantizer", fc2)
    assert graph.has_edge("fc2_weight_quantizer", fc2)
