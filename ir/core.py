"""The graph IR: SSA values with symbolic types, immutable nodes, nested regions, parameters.

A `Graph` is one architecture. Its `body` is a `Region` whose arguments are the model inputs and
whose yields are the outputs. A `Node` holds its operands once, as value names (`inputs`); edges
for graph algorithms are derived from them (`Region.to_networkx`). Region ops (loops, routes,
scans) own nested `Region`s; a nested region may read any value defined above it (like MLIR
regions that are not isolated from above). Parameters live in `Graph.params`, keyed by their
dotted name; a `param` node refers to one by name, so every use of the same name is the same
weights (the sharing identity is the name).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace as _dc_replace
from typing import Any, Iterable, Iterator

import networkx as nx
import sympy

from archc.errors import Span
from archc.ir.ops import OPS, Op
from archc.ir.shapes import TensorType


@dataclass(frozen=True, slots=True)
class Value:
    name: str
    type: TensorType


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass(frozen=True, slots=True)
class Node:
    op: Op
    inputs: tuple[str, ...]
    outputs: tuple[Value, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    regions: tuple["Region", ...] = ()
    span: Span | None = field(default=None, compare=False)

    @staticmethod
    def make(op: Op, inputs, outputs, attrs: dict | None = None, regions=(), span=None) -> "Node":
        items = tuple(sorted((k, _freeze(v)) for k, v in (attrs or {}).items()))
        return Node(op, tuple(inputs), tuple(outputs), items, tuple(regions), span)

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def attr_dict(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def out(self) -> Value:
        return self.outputs[0]

    @property
    def opdef(self):
        return OPS[self.op]

    def replace(self, **kw) -> "Node":
        names = {f.name for f in fields(self)}
        bad = set(kw) - names
        if bad:
            raise TypeError(f"Node has no field(s) {sorted(bad)}")
        if "attrs" in kw and isinstance(kw["attrs"], dict):
            kw["attrs"] = tuple(sorted((k, _freeze(v)) for k, v in kw["attrs"].items()))
        return _dc_replace(self, **kw)


@dataclass(frozen=True, slots=True)
class Region:
    args: tuple[Value, ...]
    nodes: tuple[Node, ...]
    results: tuple[str, ...]

    def walk(self) -> Iterator[Node]:
        """Every node in this region and its nested regions, in program order."""
        for n in self.nodes:
            yield n
            for r in n.regions:
                yield from r.walk()

    def to_networkx(self) -> nx.MultiDiGraph:
        """Def-use graph of this region's top-level nodes (edges derived from operands)."""
        g = nx.MultiDiGraph()
        producer: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            g.add_node(i, node=n)
            for o in n.outputs:
                producer[o.name] = i
        for i, n in enumerate(self.nodes):
            for slot, name in enumerate(_all_reads(n)):
                if name in producer:
                    g.add_edge(producer[name], i, slot=slot, value=name)
        return g


def _all_reads(n: Node) -> list[str]:
    """Operands plus the outer values that nested regions read (free variables)."""
    reads = list(n.inputs)
    for r in n.regions:
        reads.extend(free_values(r))
    return reads


def free_values(r: Region) -> list[str]:
    """Values a region reads but does not define, in first-use order."""
    defined = {a.name for a in r.args}
    seen: list[str] = []
    for n in r.nodes:
        for name in n.inputs:
            if name not in defined and name not in seen:
                seen.append(name)
        for sub in n.regions:
            for name in free_values(sub):
                if name not in defined and name not in seen:
                    seen.append(name)
        for o in n.outputs:
            defined.add(o.name)
    for name in r.results:
        if name not in defined and name not in seen:
            seen.append(name)
    return seen


def value_types(g: Graph | Region) -> dict[str, TensorType]:
    """The type of every value in the graph or region, nested regions included (names are unique graph-wide)."""
    r = g.body if isinstance(g, Graph) else g
    types = {a.name: a.type for a in r.args}
    for n in r.walk():
        types.update((o.name, o.type) for o in n.outputs)
        for sub in n.regions:
            types.update((a.name, a.type) for a in sub.args)
    return types


def reads_of(nodes: Iterable[Node], results: Iterable[str] = ()) -> set[str]:
    """Every name these nodes (and their nested regions) read, plus `results`."""
    out = set(results)
    for n in nodes:
        out.update(n.inputs)
        for r in n.regions:
            out |= reads_of(r.nodes, r.results)
    return out


@dataclass(frozen=True, slots=True)
class Param:
    """A trainable tensor. `copies` > 1 stacks k independent weight sets on a leading axis."""

    name: str
    type: TensorType            # full stored type, including the copies axis
    init: str                   # init scheme: normal, zeros, ones, const, uniform, trunc_normal, xavier
    init_args: tuple[tuple[str, Any], ...] = ()
    copies: int | sympy.Expr = 1
    span: Span | None = field(default=None, compare=False)

    @property
    def init_dict(self) -> dict:
        return dict(self.init_args)


@dataclass(frozen=True, slots=True)
class Policy:
    """A caching policy attached to attention sites; see SPEC.md 'Caching policies'.

    `region` is the network a policy runs on the decode cache (`rewrite_kv`'s processor): its
    arguments are the gathered entries `k, v: f32[1, N, Hk, Dh]` and their positions `i64[1, N]`,
    where `N` is the region's own dimension; it yields the rewritten `k, v`. It reads parameters
    but no value of the graph body (it runs at decode time, outside `forward`).
    """

    kind: str
    targets: tuple[str, ...]
    args: tuple[tuple[str, Any], ...] = ()
    span: Span | None = field(default=None, compare=False)
    region: Region | None = None

    @property
    def arg_dict(self) -> dict:
        return dict(self.args)


@dataclass(frozen=True, slots=True)
class Schedule:
    """A function of one training-time variable (progress, supervision step, a uniform draw) that
    sets architecture parameters and defines values for a training loop; see SPEC.md 'Schedules'.

    `values` are (name, expression) in source order; an expression uses the architecture's
    parameters and `var` only. A name that is an architecture parameter is an override.
    """

    name: str
    var: str
    kind: str                   # int | float: the variable's kind
    values: tuple[tuple[str, Any], ...]
    span: Span | None = field(default=None, compare=False)

    def overrides(self, g: "Graph") -> tuple[str, ...]:
        params = {s.name for s in g.symbols if s.kind != "dim"}
        return tuple(k for k, _ in self.values if k in params)


@dataclass(frozen=True, slots=True)
class Symbol:
    """An architecture parameter (compile-time, overridable) or a free dimension (runtime)."""

    name: str
    kind: str                   # int | float | bool | dim
    default: Any = None


@dataclass(frozen=True)
class Graph:
    name: str
    symbols: tuple[Symbol, ...]
    params: tuple[Param, ...]
    body: Region
    policies: tuple[Policy, ...] = ()
    doc: str = ""
    source_file: str = ""
    schedules: tuple[Schedule, ...] = ()
    noncausal: str | None = None     # declared non-causal (`noncausal "why"`): the reason, "" if none given

    @property
    def inputs(self) -> tuple[Value, ...]:
        return self.body.args

    @property
    def output_names(self) -> tuple[str, ...]:
        """User-facing output names: the result value names without their `.N` suffix."""
        return tuple(r.split(".")[0] for r in self.body.results)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def symbol_defaults(self) -> dict[str, Any]:
        return {s.name: s.default for s in self.symbols if s.kind != "dim"}

    def replace(self, **kw) -> "Graph":
        return _dc_replace(self, **kw)

    def walk(self) -> Iterator[Node]:
        return self.body.walk()

    def policy_regions(self) -> Iterator[tuple[Policy, Region]]:
        """The policies that carry a region (a network run on the decode cache), with it."""
        return ((p, p.region) for p in self.policies if p.region is not None)

    def __str__(self) -> str:
        from archc.ir.printer import print_graph
        return print_graph(self)
