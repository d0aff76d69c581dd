"""Triton kernels (imported lazily: only when the triton backend runs)."""
