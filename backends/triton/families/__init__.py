"""Kernel families: each module turns one kind of IR node into a `KernelSource` (see ../kernel.py)."""
