"""The model: its config, layers, the block, the scanned transformer, the kept-block plan, loading."""
