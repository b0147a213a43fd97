"""Automatic per-layer settings under a budget: the size and accuracy search (``search``: ``auto``),
the latency search (``latency``), the knapsack both solve (``knapsack``), what a search returns
(``found``) and how trials run, here or on a Ray cluster (``sweep``)."""
