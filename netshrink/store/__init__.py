"""Storage: one compressed file (``artifact``: ``save`` / ``load``, safe on a stranger's file), the
coder behind it (``codec/``) and the mutation fuzzer that checks loading (``fuzz``)."""
