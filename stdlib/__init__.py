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


def load(name: str, arch: str | None = None, **overrides):
    """A stdlib model's generated nn.Module class, or an instance when parameters are given.

    `archc.stdlib.load("mor", d=128)` -> an MoR module with d = 128 (files with several
    architectures take `arch=`; the first one is used when it is omitted).
    """
    from archc.api import load as load_arch
    from archc.api import lower
    if arch is None:
        arch = lower(path(name))[0].name
    return load_arch(path(name), arch=arch, **overrides)
