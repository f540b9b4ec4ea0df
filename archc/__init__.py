"""archc: a compiler for neural-network architectures built around memory, recurrence and depth."""
from archc.errors import ArchError, Span


def load(path_or_source, arch=None, **overrides):
    """The generated PyTorch nn.Module class for an architecture (an instance when overrides are given)."""
    from archc.api import load as _load
    return _load(path_or_source, arch=arch, **overrides)


def compile(path_or_source, target="torch"):  # noqa: A001 - mirrors `archc compile`
    """Generated source and IR for a .arch file or source string."""
    from archc.api import compile as _compile
    return _compile(path_or_source, target=target)


__all__ = ["ArchError", "Span", "compile", "load"]
__version__ = "0.1.0"
