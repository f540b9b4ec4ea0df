"""Builds IR: appends nodes to the innermost open region, names values, runs shape rules."""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any

from archc.errors import ArchError, Span
from archc.ir.core import Node, Region, Value
from archc.ir.ops import OPS, Op, ShapeError
from archc.ir.shapes import TensorType, substitute

_LEGAL = re.compile(r"[^A-Za-z0-9_]")


class Namer:
    """Unique SSA names: the user's name, then name.1, name.2, ... (deterministic)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def fresh(self, hint: str) -> str:
        base = _LEGAL.sub("_", hint) or "v"
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        return base if n == 0 else f"{base}.{n}"


MAX_NODES = 5_000     # blocks are inlined at every application: a block applying a block twice, nested
                      # 30 deep, would otherwise expand to a billion nodes (a hang, not a diagnostic)


class Builder:
    def __init__(self, defaults: dict | None = None):
        self.emitted = 0
        self.namer = Namer()
        self._stack: list[list[Node]] = [[]]
        self.defaults = defaults if defaults is not None else {}   # symbol -> value, for checks
        self._memo: dict = {}
        self._memo_n = 0

    def value(self, hint: str, type_: TensorType) -> Value:
        return Value(self.namer.fresh(hint), type_)

    def emit(self, op: Op, inputs: list[Value], attrs: dict[str, Any] | None = None, span: Span | None = None,
             names: list[str] | None = None, out_types: list[TensorType] | None = None,
             regions: tuple[Region, ...] = ()) -> list[Value]:
        attrs = {k: v for k, v in (attrs or {}).items() if v is not None}
        self.emitted += 1
        if self.emitted > MAX_NODES:
            raise ArchError(f"this architecture expands to more than {MAX_NODES} IR operations", span,
                            hint="blocks are inlined at every application; a block that applies another block "
                                 "twice doubles the program at every level of nesting")
        if out_types is None:
            rule = OPS[op].rule
            assert rule is not None, f"{op} needs explicit output types"
            try:
                out_types = rule([v.type for v in inputs], attrs)
            except ShapeError as err:
                raise ArchError(str(err), span) from None
            self._check_at_defaults(rule, inputs, attrs, span)
        names = names or [op.value] * len(out_types)
        outs = [self.value(n, t) for n, t in zip(names, out_types)]
        self._stack[-1].append(Node.make(op, [v.name for v in inputs], outs, attrs, regions, span))
        return outs

    def _at_defaults(self, x):
        """`x` with the default parameter values substituted (memoised: the same dims recur in every op)."""
        if not hasattr(x, "subs"):
            return x
        if len(self.defaults) != self._memo_n:      # parameters are still being declared
            self._memo, self._memo_n = {}, len(self.defaults)
        try:
            return self._memo[x]
        except KeyError:
            self._memo[x] = out = substitute(x, self.defaults)
            return out
        except TypeError:           # unhashable
            return x.subs(self.defaults)

    def _check_at_defaults(self, rule, inputs: list[Value], attrs: dict, span):
        """Shapes that are only symbolically compatible must also agree at the default sizes."""
        if not self.defaults:
            return
        at = {k: self._at_defaults(v) for k, v in attrs.items()}
        at = {k: (tuple(self._at_defaults(x) for x in v) if isinstance(v, tuple) else v) for k, v in at.items()}
        types = [v.type.with_shape(tuple(self._at_defaults(d) for d in v.type.shape)) for v in inputs]
        try:
            rule(types, at)
        except ShapeError as err:
            shown = ", ".join(str(v.type) for v in inputs)
            raise ArchError(f"{err} (at the default parameter values)", span,
                            hint=f"operand types: {shown}") from None

    def emit1(self, op: Op, inputs: list[Value], attrs: dict[str, Any] | None = None, span: Span | None = None,
              name: str | None = None) -> Value:
        return self.emit(op, inputs, attrs, span, names=[name] if name else None)[0]

    @contextmanager
    def region(self):
        """Collect the nodes emitted inside the `with` block into a fresh list."""
        nodes: list[Node] = []
        self._stack.append(nodes)
        try:
            yield nodes
        finally:
            self._stack.pop()

    @property
    def top(self) -> list[Node]:
        return self._stack[0]
