"""Structure tools the loop passes share: fresh names, renaming and symbol substitution over
nested regions, and a matcher for "the same computation up to renaming" (graph-wide value types and
the names nodes read are `archc.ir.core.value_types` / `reads_of`).

Nothing here is a pass; `fold_loops`, `hoist_invariants`, `unroll_loops` and `recur_blocks` are
built from these pieces (SPEC.md §18), and so are `insert_kv_sharing` and `schedule_depth` (§22).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

import sympy

from archc.ir.core import Graph, Node, Region, Value
from archc.ir.ops import Op
from archc.ir.shapes import TensorType, as_expr, replaced

# Ops with no operands and no regions: reading one twice gives the same value (a parameter, a
# constant, a fill). Loop passes treat them as atoms: equal when their op, attributes and type are.
ATOM_OPS = frozenset({Op.PARAM, Op.CONST, Op.FULL, Op.ARANGE})


def is_atom(n: Node) -> bool:
    return n.op in ATOM_OPS and not n.inputs and not n.regions


def atom_key(n: Node) -> tuple:
    return n.op, n.attrs, tuple(o.type for o in n.outputs)


def static_int(v: Any) -> int | None:
    """The value of a trip count that is a literal integer (not a symbol a user may override)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, sympy.Basic) and v.is_Integer:
        return int(v)
    return None


# -- names ----------------------------------------------------------------------------------------


def defined_names(r: Region) -> Iterator[str]:
    """Every value a region defines: its arguments and every node output, nested regions included."""
    for a in r.args:
        yield a.name
    for n in r.nodes:
        for o in n.outputs:
            yield o.name
        for sub in n.regions:
            yield from defined_names(sub)


def loop_vars(g: Graph) -> set[str]:
    return {n.attr("var") for n in g.walk() if n.attr("var")}


class FreshNames:
    """Unused SSA names in the builder's style (`x`, `x.1`, `x.2`, ...) and unused symbol names."""

    def __init__(self, g: Graph):
        self.taken = set(defined_names(g.body))
        for _, r in g.policy_regions():        # names are unique graph-wide, policy regions included
            self.taken.update(defined_names(r))
        self.symbols = {s.name for s in g.symbols} | loop_vars(g)

    def value(self, like: str) -> str:
        base = like.split(".")[0]
        i = 1
        while f"{base}.{i}" in self.taken:
            i += 1
        name = f"{base}.{i}"
        self.taken.add(name)
        return name

    def symbol(self, base: str) -> str:
        name, i = base, 1
        while name in self.symbols:
            name, i = f"{base}{i}", i + 1
        self.symbols.add(name)
        return name


# -- renaming and substitution ---------------------------------------------------------------------


def attr_value(v: Any) -> Any:
    """Numbers as Python numbers, other expressions as sympy (as the lowering stores attributes)."""
    if isinstance(v, sympy.Basic):
        if v in (sympy.true, sympy.false):
            return bool(v)
        if v.is_Integer:
            return int(v)
        if v.is_Float:
            return float(v)
    if isinstance(v, tuple):
        return tuple(attr_value(x) for x in v)
    return v


def _subs(v: Any, subs: dict) -> Any:
    if isinstance(v, sympy.Basic):
        return attr_value(replaced(v, subs)) if v.free_symbols & set(subs) else v
    if isinstance(v, tuple):
        return tuple(_subs(x, subs) for x in v)
    return v


def _type_subs(t: TensorType, subs: dict) -> TensorType:
    if not subs:
        return t
    shape = tuple(replaced(as_expr(d), subs) for d in t.shape)
    return t if shape == t.shape else TensorType(t.dtype, shape)


@dataclass
class Renamer:
    """Copies nodes with values renamed (`names`, old -> new) and symbols substituted (`subs`).

    `fresh`, when given, names every value the copied nodes define (a new copy of a loop body);
    the map grows as definitions are copied. A region op that rebinds a substituted symbol keeps
    it unsubstituted inside (its own loop variable shadows it).
    """

    names: dict[str, str] = field(default_factory=dict)
    subs: dict[sympy.Symbol, sympy.Expr] = field(default_factory=dict)
    fresh: Callable[[str], str] | None = None

    def read(self, name: str) -> str:
        return self.names.get(name, name)

    def define(self, v: Value) -> Value:
        if self.fresh is not None and v.name not in self.names:
            self.names[v.name] = self.fresh(v.name)
        return Value(self.read(v.name), _type_subs(v.type, self.subs))

    def node(self, n: Node) -> Node:
        inputs = tuple(self.read(x) for x in n.inputs)
        attrs = tuple((k, _subs(v, self.subs)) for k, v in n.attrs)
        inner = self
        if n.attr("var") and self.subs:
            shadowed = {s: e for s, e in self.subs.items() if s.name != n.attr("var")}
            inner = Renamer(self.names, shadowed, self.fresh)
        regions = tuple(inner.region(r) for r in n.regions)
        outputs = tuple(self.define(o) for o in n.outputs)
        return n.replace(inputs=inputs, attrs=attrs, regions=regions, outputs=outputs)

    def region(self, r: Region) -> Region:
        args = tuple(self.define(a) for a in r.args)
        nodes = tuple(self.node(n) for n in r.nodes)
        return Region(args, nodes, tuple(self.read(x) for x in r.results))


def map_loop_bodies(r: Region, fn: Callable[[Node], tuple[list[Node], list[Node]]]) -> Region:
    """Rebuild `r` bottom-up: every node's nested regions first, then `fn(node)` -> (nodes placed
    before it, nodes that replace it)."""
    out: list[Node] = []
    for n in r.nodes:
        if n.regions:
            n = n.replace(regions=tuple(map_loop_bodies(sub, fn) for sub in n.regions))
        before, instead = fn(n)
        out.extend(before)
        out.extend(instead)
    return Region(r.args, tuple(out), r.results)


def splice(r: Region, target: str, fn: Callable[[Node], list[Node]]) -> Region:
    """`r` with the node whose first result is `target` replaced by `fn(node)` (searched in nested regions)."""
    return map_loop_bodies(r, lambda n: ([], fn(n) if n.outputs and n.outputs[0].name == target else [n]))


def ancestors(r: Region, target: Node, path: tuple[Node, ...] = ()) -> tuple[Node, ...] | None:
    """The region ops between `r` and `target` (found by identity), outermost first; None if absent."""
    for n in r.nodes:
        if n is target:
            return path
        for sub in n.regions:
            found = ancestors(sub, target, path + (n,))
            if found is not None:
                return found
    return None


# -- the same computation, up to renaming ------------------------------------------------------------


AttrsEqual = Callable[[Node, Node], bool]


def _same_attrs(a: Node, b: Node) -> bool:
    return a.attrs == b.attrs


class Match:
    """Decides whether node sequence B computes what A computes, up to the names they define.

    `defined` maps each value A defines to B's; `free` maps each value A reads but does not
    define to the value B reads in the same place (one B value per A value). Region arguments
    map positionally. `attrs_equal` may relax attribute equality (the default is exact).
    """

    def __init__(self, b_defines: set[str], attrs_equal: AttrsEqual = _same_attrs):
        self.defined: dict[str, str] = {}
        self.free: dict[str, str] = {}
        self.b_defines = b_defines
        self.attrs_equal = attrs_equal

    def nodes(self, a: Iterable[Node], b: Iterable[Node]) -> bool:
        a, b = list(a), list(b)
        return len(a) == len(b) and all(self.node(x, y) for x, y in zip(a, b))

    def read(self, x: str, y: str) -> bool:
        if x in self.defined:
            return self.defined[x] == y
        if x in self.free:
            return self.free[x] == y
        if y in self.b_defines:
            return False
        self.free[x] = y
        return True

    def define(self, x: Value, y: Value) -> bool:
        if x.type != y.type:
            return False
        self.defined[x.name] = y.name
        return True

    def node(self, a: Node, b: Node) -> bool:
        if (a.op is not b.op or len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs)
                or len(a.regions) != len(b.regions) or not self.attrs_equal(a, b)):
            return False
        if not all(self.read(x, y) for x, y in zip(a.inputs, b.inputs)):
            return False
        for ra, rb in zip(a.regions, b.regions):
            if len(ra.args) != len(rb.args) or len(ra.results) != len(rb.results):
                return False
            if not all(self.define(x, y) for x, y in zip(ra.args, rb.args)):
                return False
            if not self.nodes(ra.nodes, rb.nodes):
                return False
            if not all(self.read(x, y) for x, y in zip(ra.results, rb.results)):
                return False
        return all(self.define(x, y) for x, y in zip(a.outputs, b.outputs))


def signature(n: Node) -> tuple:
    """A cheap key two matching nodes share (the op, attributes and result types)."""
    return n.op, n.attrs, tuple(o.type for o in n.outputs), len(n.inputs), len(n.regions)


T = TypeVar("T")


class Periods:
    """Node signatures with, per period p, how far each position keeps matching p nodes later
    (m[i] = consecutive t >= i with sig[t] == sig[t + p]), built once per period and shared by every
    start: recomputing it per start made a chain of n like statements cost O(n^3)."""

    def __init__(self, sig: list[int]):
        self.sig = sig
        self._runs: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.sig)

    def copies(self, s: int, p: int) -> int:
        """How many back-to-back copies of sig[s:s + p] start at s."""
        if p not in self._runs:
            sig, m = self.sig, [0] * (len(self.sig) + 1)
            for i in range(len(sig) - p - 1, -1, -1):
                m[i] = m[i + 1] + 1 if sig[i] == sig[i + p] else 0
            self._runs[p] = m
        return 1 + self._runs[p][s] // p


def best_run(periods: Periods, s: int, plan: Callable[[int, int], T | None],
             viable: Callable[[int], bool] | None = None) -> tuple[T, int] | None:
    """The run of k >= 2 back-to-back copies of p nodes starting at `s` that covers the most nodes
    and that `plan(p, k)` accepts (fewest nodes per copy on a tie), with its node count.

    `periods` holds one id per node (equal ids: `signature`s agree), so most candidates are
    rejected before `plan` does the full check.
    """
    best, size = None, 0
    for p in range(1, (len(periods) - s) // 2 + 1):
        k = periods.copies(s, p)
        if k < 2 or k * p <= size or (viable is not None and not viable(p)):
            continue                              # (`viable(p)`: no run of period p at s can fold)
        for copies in range(k, 1, -1):
            if copies * p <= size:
                break
            found = plan(p, copies)
            if found is not None:
                best, size = found, copies * p
                break
    return (best, size) if best is not None else None
