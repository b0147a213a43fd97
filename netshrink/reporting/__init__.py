"""What was won and lost: per-layer tables with real file bytes (``summary``) and the self-contained
HTML report page (``page``)."""
