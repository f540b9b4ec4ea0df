"""The Python API: parse, check, lower .arch sources; load stdlib models by name."""
from __future__ import annotations

from pathlib import Path

from archc.dsl.ast import Module
from archc.dsl.lower import lower_module
from archc.dsl.parse import parse as _parse
from archc.ir.core import Graph


def _read(path_or_source: str | Path) -> tuple[str | bytes, str]:
    p = Path(path_or_source) if not (isinstance(path_or_source, str) and "\n" in path_or_source) else None
    if p is not None and p.suffix == ".arch" and p.exists():
        return p.read_bytes(), str(p)
    if isinstance(path_or_source, str) and "\n" not in path_or_source and path_or_source.endswith(".arch"):
        from archc.errors import ArchError
        raise ArchError(f"no such file: {path_or_source}")
    return str(path_or_source), "<string>"


def parse(path_or_source: str | Path, file: str | None = None) -> Module:
    src, name = _read(path_or_source)
    return _parse(src, file or name)


def lower(path_or_source: str | Path, file: str | None = None) -> list[Graph]:
    """Parse and lower every `arch` in a file or source string to IR graphs (checked)."""
    return lower_module(parse(path_or_source, file))


def check(path_or_source: str | Path, file: str | None = None) -> list[Graph]:
    """Lower and verify; raises ArchError on the first problem."""
    from archc.ir.interpret import resolve_bindings
    from archc.ir.verify import verify
    graphs = lower(path_or_source, file)
    for g in graphs:
        verify(g, resolve_bindings(g))     # symbolic checks, then again at the default sizes
    return graphs


def load_ir(path_or_source: str | Path, arch: str | None = None) -> Graph:
    """The IR graph of one architecture in a file (the only one, or the one named `arch`)."""
    graphs = lower(path_or_source)
    if arch is None:
        if len(graphs) > 1:
            from archc.errors import ArchError
            raise ArchError(f"this file defines {len(graphs)} architectures ({', '.join(g.name for g in graphs)}); "
                            "name one")
        return graphs[0]
    for g in graphs:
        if g.name == arch:
            return g
    from archc.errors import ArchError
    raise ArchError(f"no architecture named `{arch}`; this file defines {', '.join(g.name for g in graphs)}")
