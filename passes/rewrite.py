"""The one rewrite driver: a table of local rules applied over every region, to a fixpoint.

A `Rule` pairs a node predicate with a function `fn(node, ctx)` that returns a replacement or
`None` ("no match"). A replacement is either a `Node` defining the same output names, or an
`Alias` naming existing values that take the place of the node's outputs (the node disappears
and every later read is renamed). The driver walks each region in program order, rewriting a
region op's nested regions before the op itself (bottom-up), and sweeps until nothing changes.

Per-sweep state travels in `Ctx` (defining nodes, value types, a scoped memo for rules such as
CSE) and what is known about the symbols (`Assumptions`), never in globals or closures.
See SPEC.md §16.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import sympy

from archc.ir.core import Graph, Node, Param, Region, Value
from archc.ir.ops import Op
from archc.ir.shapes import TensorType
from archc.passes.symbols import Assumptions


@dataclass(frozen=True, slots=True)
class Alias:
    """The node is removed; each of its outputs is replaced by the named existing value."""

    names: tuple[str, ...]


Replacement = Node | Alias
RuleFn = Callable[[Node, "Ctx"], Replacement | None]


@dataclass(frozen=True)
class Rule:
    """`when(node)` is the cheap op predicate; `fn` does the match proper and builds the replacement."""

    name: str
    when: Callable[[Node], bool]
    fn: RuleFn


def on(*ops: Op) -> Callable[[Node], bool]:
    """A predicate matching nodes of these ops."""
    chosen = frozenset(ops)
    return lambda n: n.op in chosen


# -- what a rewrite may assume about a node -------------------------------------------------------


def has_effects(n: Node) -> bool:
    """Attention sites record (and K/V sharing and `kv_read` read) the K/V store: order matters.

    A region op has the effects of the nodes inside it. Every other op is a pure function of its
    operands, attributes and the symbols in scope.
    """
    if (n.op is Op.ATTEND and (n.attr("site") or n.attr("kv_share"))) or n.op is Op.KV_READ:
        return True
    return any(has_effects(m) for r in n.regions for m in r.walk())


def rebound_symbols(n: Node) -> frozenset[str]:
    """Symbols that mean something else inside `n`'s regions than outside it."""
    if n.op in (Op.LOOP, Op.HALT_LOOP) and n.attr("var"):
        return frozenset({n.attr("var")})
    if n.op is Op.ROUTE_MASK:                 # the region sees one sample's masked tokens
        return frozenset(d for d in n.attr("dims", ("B", "T")) if d)
    return frozenset()


def free_symbols(v: Any) -> frozenset[str]:
    """Names of the symbols an attribute value or type mentions."""
    if isinstance(v, sympy.Basic):
        return frozenset(s.name for s in v.free_symbols)
    if isinstance(v, TensorType):
        return free_symbols(v.shape)
    if isinstance(v, (tuple, list)):
        return frozenset().union(*(free_symbols(x) for x in v))
    return frozenset()


# -- the driver -------------------------------------------------------------------------------


@dataclass
class _Frame:
    owner: Node | None
    rebound: frozenset[str]
    memo: dict = field(default_factory=dict)


@dataclass
class Ctx:
    """One sweep's view of the graph: visible definitions, types, renames and a scoped memo."""

    graph: Graph
    assume: Assumptions
    producers: dict[str, Node] = field(default_factory=dict)   # SSA: names are unique graph-wide
    types: dict[str, TensorType] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)
    frames: list[_Frame] = field(default_factory=list)
    changed: bool = False
    protected: frozenset[str] = field(init=False)   # graph results: the model's output names

    def __post_init__(self):
        self.protected = frozenset(self.graph.body.results)

    def producer(self, name: str) -> Node | None:
        """The node defining `name` (None for graph inputs and region arguments)."""
        return self.producers.get(name)

    def recall(self, key: Any, symbols: Iterable[str] = ()) -> Any:
        """The memo entry for `key` visible here; entries mentioning a rebound symbol stay inside."""
        symbols = frozenset(symbols)
        for frame in reversed(self.frames):
            if key in frame.memo:
                return frame.memo[key]
            if frame.rebound & symbols:
                return None
        return None

    def remember(self, key: Any, value: Any) -> None:
        self.frames[-1].memo[key] = value


def rewrite(g: Graph, rules: Sequence[Rule], max_sweeps: int = 16) -> Graph:
    """Apply `rules` everywhere until a sweep changes nothing; returns `g` itself when no rule fires."""
    assume = Assumptions(g)
    for _ in range(max_sweeps):
        ctx = Ctx(g, assume)
        body = _region(g.body, rules, ctx, None)
        if not ctx.changed:
            return g
        g = g.replace(body=body)
    return g


def _region(r: Region, rules: Sequence[Rule], ctx: Ctx, owner: Node | None) -> Region:
    ctx.frames.append(_Frame(owner, rebound_symbols(owner) if owner is not None else frozenset()))
    for a in r.args:
        ctx.types[a.name] = a.type
    nodes: list[Node] = []
    for n in r.nodes:
        n = _rename_inputs(n, ctx)
        if n.regions:
            n = n.replace(regions=tuple(_region(sub, rules, ctx, n) for sub in n.regions))
        kept = _apply(n, rules, ctx)
        if kept is not None:
            nodes.append(kept)
            for o in kept.outputs:
                ctx.producers[o.name] = kept
                ctx.types[o.name] = o.type
    ctx.frames.pop()
    results = tuple(ctx.renamed.get(x, x) for x in r.results)
    return Region(r.args, tuple(nodes), results)


def _rename_inputs(n: Node, ctx: Ctx) -> Node:
    inputs = tuple(ctx.renamed.get(x, x) for x in n.inputs)
    if inputs == n.inputs:
        return n
    ctx.changed = True
    return n.replace(inputs=inputs)


def _apply(n: Node, rules: Sequence[Rule], ctx: Ctx, budget: int = 8) -> Node | None:
    """Rewrite `n` until no rule matches; None when it was replaced by an alias."""
    for _ in range(budget):
        for rule in rules:
            if not rule.when(n):
                continue
            rep = rule.fn(n, ctx)
            if rep is None:
                continue
            if isinstance(rep, Alias):
                if not _alias_ok(n, rep, ctx):
                    continue
                for o, name in zip(n.outputs, rep.names):
                    ctx.renamed[o.name] = name
                ctx.changed = True
                return None
            if rep == n:
                continue
            if tuple(o.name for o in rep.outputs) != tuple(o.name for o in n.outputs):
                raise ValueError(f"rule {rule.name} must keep the output names of the node it replaces")
            ctx.changed = True
            n = rep.replace(span=rep.span or n.span)
            break
        else:
            return n
    return n


def _alias_ok(n: Node, rep: Alias, ctx: Ctx) -> bool:
    """An alias keeps every output's type and never renames a graph result."""
    if len(rep.names) != len(n.outputs):
        return False
    if any(o.name in ctx.protected for o in n.outputs):
        return False
    return all(ctx.types.get(name) == o.type for o, name in zip(n.outputs, rep.names))


# -- a structural map over every expression ----------------------------------------------------------


def _map_value(v: Any, fn: Callable[[sympy.Basic], sympy.Basic]) -> Any:
    if isinstance(v, sympy.Basic):
        return fn(v)
    if isinstance(v, tuple):
        return tuple(_map_value(x, fn) for x in v)
    return v


def map_type(t: TensorType, fn: Callable[[sympy.Basic], sympy.Basic]) -> TensorType:
    shape = tuple(fn(d) for d in t.shape)
    return t if shape == t.shape else TensorType(t.dtype, shape)


def _map_val(v: Value, fn) -> Value:
    t = map_type(v.type, fn)
    return v if t is v.type else Value(v.name, t)


def map_node_exprs(n: Node, fn: Callable[[sympy.Basic], sympy.Basic]) -> Node:
    """`n` (and its regions) with `fn` applied to every symbolic expression in types and attributes."""
    return n.replace(outputs=tuple(_map_val(o, fn) for o in n.outputs),
                     attrs=tuple((k, _map_value(v, fn)) for k, v in n.attrs),
                     regions=tuple(map_region_exprs(r, fn) for r in n.regions))


def map_region_exprs(r: Region, fn: Callable[[sympy.Basic], sympy.Basic]) -> Region:
    return Region(tuple(_map_val(a, fn) for a in r.args), tuple(map_node_exprs(n, fn) for n in r.nodes), r.results)


def map_exprs(g: Graph, fn: Callable[[sympy.Basic], sympy.Basic]) -> Graph:
    """Rebuild `g` with `fn` applied to every symbolic expression in types, attributes and params."""

    def param(p: Param) -> Param:
        return replace(p, type=map_type(p.type, fn), init_args=tuple((k, _map_value(v, fn)) for k, v in p.init_args),
                       copies=_map_value(p.copies, fn))

    return g.replace(params=tuple(param(p) for p in g.params), body=map_region_exprs(g.body, fn))
