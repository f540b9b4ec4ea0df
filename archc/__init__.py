"""archc: a compiler for neural-network architectures built around memory, recurrence and depth."""
from archc.errors import ArchError, Span


def load(path_or_source, arch=None, **overrides):
    """The generated PyTorch nn.Module class for an architecture (an instance when overrides are given)."""
    from archc.api import load as _load
    return _load(path_or_source, arch=arch, **overrides)


def compile(path_or_source, target="torch", optimize=None, recur_blocks=None, recur_order="sequence"):  # noqa: A001
    """Generated source and IR for a .arch file or source string (mirrors `archc compile`)."""
    from archc.api import compile as _compile
    return _compile(path_or_source, target=target, optimize=optimize, recur_blocks=recur_blocks,
                    recur_order=recur_order)


__all__ = ["ArchError", "Span", "compile", "load"]
__version__ = "0.1.0"
