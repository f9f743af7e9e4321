"""Graph side of fxquant: tracing, recipes, node records, passes and pipelines."""
