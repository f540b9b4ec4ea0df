"""archc: a compiler for neural-network architectures built around memory, recurrence and depth."""
from archc.errors import ArchError, Span

__all__ = ["ArchError", "Span"]
__version__ = "0.1.0"
