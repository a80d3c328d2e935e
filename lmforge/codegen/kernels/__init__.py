"""Triton kernel families, one per file. Imported lazily: the CPU runtime does not need Triton."""
