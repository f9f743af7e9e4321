"""Inspection: a summary table and a networkx view of a (prepared) GraphModule."""

from fxquant.inspect.graph import to_networkx
from fxquant.inspect.summary import LayerStats, layer_stats, record_shapes, summary

__all__ = ["summary", "layer_stats", "LayerStats", "record_shapes", "to_networkx"]
