"""fuse-elementwise: group runs of elementwise, normalisation and residual ops into `fused` regions.

A `fused` node (SPEC §19) holds a region with no arguments that reads outer values directly; its
results are the region's yields. The interpreter runs the body as written; the PyTorch backend
emits it inline; the Triton backend turns each region into one generated kernel.

Grouping is one walk per region in program order, keeping one open group:

* a fusible node (`FUSIBLE_OPS`, f32/bool results, f32/bool operands except for `cast`) joins the
  open group when its result provably broadcasts with the group's iteration shape S (the
  broadcast of every member's result shape: dims equal or 1). A group with a norm keeps S fixed:
  a norm reduces over S's last axis, so its result and its input must be exactly S;
* a node that is not a member but reads a member's value closes the group (the fused node is
  placed where the group's last member was, so every node it skips over must not depend on it);
  other nodes are skipped over, which lets a chain absorb ops separated by parameter reads,
  matmuls or attention that feed it;
* a member whose value is read outside the group (a later node, a nested region, a yield) becomes
  a result; a result must have the shape S (a kernel writes each result once per element), so a
  member that would be a smaller result is left out and the region is planned again;
* a group is kept when it has a norm or at least two ops other than `cast` and `detach` (one
  elementwise op is one kernel already).

Nested regions (loop, scan and route bodies) are fused first, independently.

A split can leave two ops that a fresh grouping would fuse (an open group of shape [B, T, d] took
them, then they had to leave it as smaller results), so the grouping runs to a fixpoint: applying
the pass to its own output changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from archc.ir.core import Graph, Node, Region, Value, _all_reads
from archc.ir.ops import FUSIBLE_OPS, NORM_OPS, Op
from archc.ir.shapes import BOOL, F32

_VALUE_DTYPES = (F32, BOOL)


def fuse_elementwise(g: Graph) -> Graph:
    """Group chains of elementwise, norm and residual ops into `fused` regions: one Triton kernel each."""
    body = g.body
    for _ in range(8):        # a split can leave a chain that a second grouping fuses: run to a fixpoint
        types = _all_types(g.replace(body=body))
        new = _region(body, set(types), types)
        if new == body:
            break
        body = new
    return g if body == g.body else g.replace(body=body)


def _all_types(g: Graph) -> dict:
    """The type of every value in the graph (names are unique graph-wide: SSA)."""
    types = {a.name: a.type for a in g.body.args}
    for _, r in g.policy_regions():         # names only: no pass rewrites a policy region
        types.update({a.name: a.type for a in r.args})
        types.update({o.name: o.type for n in r.walk() for o in n.outputs})
    for n in g.walk():
        types.update({o.name: o.type for o in n.outputs})
        for r in n.regions:
            types.update({a.name: a.type for a in r.args})
    return types


def fusible(n: Node, types: dict) -> bool:
    """Can `n` be a member of a fusion region?"""
    if n.op not in FUSIBLE_OPS or any(o.type.dtype not in _VALUE_DTYPES for o in n.outputs):
        return False
    if any(isinstance(v, sympy.Basic) and not v.is_number for _, v in n.attrs):
        return False          # a symbolic eps: kernels take attributes as literals
    return n.op is Op.CAST or all(types[i].dtype in _VALUE_DTYPES for i in n.inputs)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """The broadcast of two shapes when it is provable (equal or unit dims), else None."""
    rank = max(len(a), len(b))
    a, b = (1,) * (rank - len(a)) + tuple(a), (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            return None
    return tuple(sympy.Integer(d) if isinstance(d, int) else d for d in out)


@dataclass
class _Group:
    members: list[int] = field(default_factory=list)
    values: set[str] = field(default_factory=set)
    shape: tuple = ()
    has_norm: bool = False

    def accepts(self, n: Node, types: dict) -> bool:
        grown = _broadcast(self.shape, n.out.type.shape)
        if grown is None:
            return False
        if grown != self.shape and self.has_norm:
            return False
        if n.op in NORM_OPS:
            if grown != n.out.type.shape or types[n.inputs[0]].shape != n.out.type.shape:
                return False
        return True

    def add(self, i: int, n: Node) -> None:
        self.shape = _broadcast(self.shape, n.out.type.shape) if self.members else n.out.type.shape
        self.members.append(i)
        self.values.update(o.name for o in n.outputs)
        self.has_norm |= n.op in NORM_OPS


def _plan(nodes: tuple[Node, ...], types: dict, splits: set[int]) -> list[_Group]:
    groups: list[_Group] = []
    cur: _Group | None = None
    for i, n in enumerate(nodes):
        touches = cur is not None and bool(set(_all_reads(n)) & cur.values)
        if fusible(n, types):
            if cur is not None and i not in splits and cur.accepts(n, types):
                cur.add(i, n)
                continue
            if cur is not None:
                groups.append(cur)
            cur = _Group()
            cur.add(i, n)
            continue
        if touches:
            groups.append(cur)
            cur = None
    if cur is not None:
        groups.append(cur)
    return groups


def _results_of(group: _Group, nodes: tuple[Node, ...], region_results: tuple[str, ...]) -> list[Value]:
    """Member values read outside the group, in member order."""
    inside = set(group.members)
    outside: set[str] = set(region_results)
    for j, m in enumerate(nodes):
        if j not in inside:
            outside.update(_all_reads(m))
    return [o for i in group.members for o in nodes[i].outputs if o.name in outside]


def _region(r: Region, names: set[str], types: dict) -> Region:
    nodes = tuple(n.replace(regions=tuple(_region(sub, names, types) for sub in n.regions))
                  if n.regions and n.op is not Op.FUSED else n for n in r.nodes)
    splits: set[int] = set()       # members that must start a new group
    while True:
        plan, split = [], None
        for grp in _plan(nodes, types, splits):
            results = _results_of(grp, nodes, r.results)
            wrong = [o for o in results if o.type.shape != grp.shape]
            if wrong:             # split before the smaller result, or after it when it comes first
                bad = next(k for k, i in enumerate(grp.members) if wrong[0] in nodes[i].outputs)
                split = grp.members[bad] if bad else grp.members[1]
                break
            ops = sum(1 for i in grp.members if nodes[i].op not in (Op.CAST, Op.DETACH))
            if results and (grp.has_norm or ops >= 2):
                plan.append((grp, results))
        if split is None:
            break
        splits.add(split)
    if not plan:
        return r if nodes == r.nodes else Region(r.args, nodes, r.results)
    last = {grp.members[-1]: (grp, results) for grp, results in plan}
    members = {i for grp, _ in plan for i in grp.members}
    out: list[Node] = []
    for i, n in enumerate(nodes):
        if i in last:
            out.append(_fused_node(nodes, *last[i], names))
        elif i not in members:
            out.append(n)
    return Region(r.args, tuple(out), r.results)


def _fresh(name: str, names: set[str]) -> str:
    root, k = name.split(".")[0], 1
    while f"{root}.{k}" in names:
        k += 1
    names.add(f"{root}.{k}")
    return f"{root}.{k}"


def _fused_node(nodes: tuple[Node, ...], grp: _Group, results: list[Value], names: set[str]) -> Node:
    """The `fused` node for a group: inner copies of the results get fresh names, outer ones keep theirs."""
    rename = {o.name: _fresh(o.name, names) for o in results}
    body = []
    for i in grp.members:
        n = nodes[i]
        body.append(n.replace(inputs=tuple(rename.get(x, x) for x in n.inputs),
                              outputs=tuple(Value(rename.get(o.name, o.name), o.type) for o in n.outputs)))
    region = Region((), tuple(body), tuple(rename[o.name] for o in results))
    span = nodes[grp.members[0]].span
    return Node.make(Op.FUSED, (), results, {}, (region,), span)
