"""Inspection: a summary table and a networkx view of a (prepared) GraphModule."""

from fxquant.inspect.graph import to_networkx
from fxquant.inspect.summary import LayerStats, layer_stats, summary

__all__ = ["summary", "layer_stats", "LayerStats", "to_networkx"]
