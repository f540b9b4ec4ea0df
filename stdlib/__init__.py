"""The standard library: every seed paper's architecture written in the archc language."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from archc.ir.core import Graph


def names() -> list[str]:
    """Names of the stdlib files (`mor`, `hrm`, ...)."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".arch"))


def path(name: str) -> Path:
    p = resources.files(__name__).joinpath(f"{name}.arch")
    if not p.is_file():
        from archc.errors import ArchError
        raise ArchError(f"no stdlib model named `{name}`; available: {', '.join(names())}")
    return Path(str(p))


def source(name: str) -> str:
    return path(name).read_text()


def graphs(name: str) -> list[Graph]:
    """The checked IR of every architecture in a stdlib file."""
    from archc.api import check
    return check(path(name))
