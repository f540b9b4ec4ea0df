"""What a name can denote while lowering: a static expression, a tensor value, a layer, a memory."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy

from archc.errors import Span
from archc.ir.core import Value


@dataclass(frozen=True)
class Static:
    """A compile-time value: an expression over architecture parameters, dims and loop variables."""

    expr: sympy.Basic
    kind: str = "int"          # int | float | bool


@dataclass(frozen=True)
class LayerInst:
    """A declared layer (primitive or block instance); `copies` > 1 for `layer x[k] = ...`."""

    name: str
    kind: str
    path: str                  # parameter-name prefix, e.g. "core.attn"
    args: dict[str, Any]       # bound constructor arguments (Static or str)
    copies: sympy.Basic | None  # None: a single instance
    index: sympy.Basic | None  # the copy used when applied (set by `share` or `x[i]`)
    span: Span
    block: Any = None          # the BlockDef for block instances
    outer_copies: sympy.Basic | None = None  # copies inherited from an enclosing arrayed block
    outer_index: sympy.Basic | None = None


@dataclass
class MemInst:
    """A declared memory; `state` holds its current SSA values (rebound by mutating methods)."""

    name: str
    kind: str
    path: str
    args: dict[str, Any]
    state: tuple[Value, ...]
    span: Span
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StrVal:
    value: str
    span: Span


@dataclass(frozen=True)
class PathRef:
    """A dotted reference to a layer (used by cache policies): `core.attn`."""

    path: str
    span: Span
