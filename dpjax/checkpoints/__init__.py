"""Checkpoints in and out: the family table, HF safetensors, GGUF, conversion to Orbax, slices onto the mesh, export."""
