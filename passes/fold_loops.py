"""fold-loops: straight-line repeats of one computation with the same weights become one `loop`.

`x = blk(x); x = blk(x); x = blk(x)` lowers to three copies of blk's nodes, each reading the same
parameters and the previous copy's result. This pass finds such runs in every region and
replaces them with `loop(x) {trips=3, var="fold"}` whose body is the first copy.

A run of k >= 2 copies of p nodes qualifies when (checked, not assumed):

* copy c computes what copy 0 computes up to renaming (`regions.Match`: op, attributes, result
  types, nested regions); atoms (param/const/full/arange reads) are not part of a copy, and two
  reads of the same atom (same op, attributes, type: the same weights) count as one value;
* every value copy c reads from outside itself is either read by every copy (an invariant: the
  same value or the same atom) or is the output of copy c - 1 at one fixed place (a carry, whose
  first value copy 0 reads from before the run); there is at least one carry;
* after the run, only the last copy's carried outputs are read (they become the loop's results
  and keep their names), and no copy records or reads shared K/V (`kv_share`);
* the body is worth a loop: `unroll_pays(body, k)` is false (the rule unroll-small-loops uses, so
  the two passes never undo each other).

Among the runs starting at the earliest node, the one covering the most nodes wins (fewest nodes
per trip on a tie). Atoms inside the run move in front of the loop; the body reads them from
outside, as `hoist-invariants` would leave them.
"""
from __future__ import annotations

from dataclasses import dataclass

from archc.ir.core import Graph, Node, Region, Value, reads_of, value_types
from archc.ir.ops import Op
from archc.ir.shapes import TensorType
from archc.passes.regions import (FreshNames, Match, Renamer, Periods, atom_key, best_run, defined_names, is_atom,
                                  signature)
from archc.passes.unroll_loops import unroll_pays

LOOP_VAR = "fold"


def fold_loops(g: Graph) -> Graph:
    """Fold straight-line repeats of the same block with the same weights, chained through a carried value, into one loop."""
    ctx = _Ctx(FreshNames(g), value_types(g))
    body = _region(g.body, ctx)
    return g if body == g.body else g.replace(body=body)


@dataclass
class _Ctx:
    names: FreshNames
    types: dict[str, TensorType]


def _region(r: Region, ctx: _Ctx) -> Region:
    nodes = [n.replace(regions=tuple(_region(sub, ctx) for sub in n.regions)) if n.regions else n for n in r.nodes]
    while (folded := _fold_once(nodes, r.results, ctx)) is not None:
        nodes = folded
    return Region(r.args, tuple(nodes), r.results)


@dataclass(frozen=True)
class _Run:
    """A run that folds: where it is, its first copy, and its carries (copy 0's output -> initial value)."""

    first: int                  # index in the region's nodes of the run's first node
    last: int                   # ... and of its last
    body: tuple[Node, ...]      # the first copy
    carries: dict[str, str]     # in copy 0's output order
    results: tuple[str, ...]    # the last copy's carried outputs: the loop's result names
    trips: int

    def loop(self, ctx: _Ctx) -> Node:
        order = list(self.carries)
        args = [Value(ctx.names.value(self.carries[o]), ctx.types[o]) for o in order]
        ctx.types.update((a.name, a.type) for a in args)
        rename = Renamer({self.carries[o]: a.name for o, a in zip(order, args)})
        body = Region(tuple(args), tuple(rename.node(n) for n in self.body), tuple(order))
        outs = [Value(r, ctx.types[o]) for r, o in zip(self.results, order)]
        attrs = {"trips": self.trips, "var": ctx.names.symbol(LOOP_VAR)}
        return Node.make(Op.LOOP, list(self.carries.values()), outs, attrs, (body,), self.body[0].span)


def _fold_once(nodes: list[Node], results: tuple[str, ...], ctx: _Ctx) -> list[Node] | None:
    compute = [i for i, n in enumerate(nodes) if not is_atom(n)]
    ids: dict[tuple, int] = {}
    periods = Periods([ids.setdefault(signature(nodes[i]), len(ids)) for i in compute])
    atoms = {n.out.name: atom_key(n) for n in nodes if is_atom(n)}
    home = {name: c for c, i in enumerate(compute) for name in defined_names(Region((), (nodes[i],), ()))}
    # the atoms each node reads, by operand: where copy 1's first node reads an atom, copy 0's must read an
    # equal one (a cheap necessary condition of _second_copy_fits, checked before building a Match)
    reads_atom = [tuple(atoms.get(x) for x in nodes[i].inputs) for i in compute]

    def first_fits(s: int, p: int) -> bool:
        a, b = reads_atom[s], reads_atom[s + p]
        return len(a) == len(b) and all(y is None or x == y for x, y in zip(a, b))

    for s in range(len(compute)):
        viable: dict[int, bool] = {}

        def fits(p: int, s=s, viable=viable) -> bool:
            if p not in viable:
                viable[p] = first_fits(s, p) and _second_copy_fits(nodes, compute, s, p, atoms, home)
            return viable[p]

        def plan(p: int, k: int, s=s) -> _Run | None:
            return _plan(nodes, compute, s, p, k, results, atoms, ctx) if fits(p) else None

        found = best_run(periods, s, plan, fits)
        if found is not None:
            best = found[0]
            span = nodes[best.first:best.last + 1]
            return nodes[:best.first] + [n for n in span if is_atom(n)] + [best.loop(ctx)] + nodes[best.last + 1:]
    return None


class _Copy:
    """The values copy number `c` of period p starting at s defines (membership without building the set)."""

    def __init__(self, home: dict[str, int], lo: int, hi: int):
        self.home, self.lo, self.hi = home, lo, hi

    def __contains__(self, name: str) -> bool:
        return self.lo <= self.home.get(name, -1) < self.hi


def _second_copy_fits(nodes, compute, s, p, atoms, home) -> bool:
    """A necessary condition for a run of any length with period p at s, checked node by node so a
    mismatch stops early: copy 1 matches copy 0, and where copy 0 reads an outside value copy 1 reads
    the same value (or the same atom) or an output of copy 0 (a carry). Without it a chain of n
    distinct layers costs O(n^3) full `_plan` checks (a 400-layer chain took minutes)."""
    m = Match(_Copy(home, s + p, s + 2 * p))
    for t in range(p):
        seen = len(m.free)
        if not m.node(nodes[compute[s + t]], nodes[compute[s + p + t]]):
            return False
        for a, b in list(m.free.items())[seen:]:
            same = b == a or (a in atoms and atoms.get(b) == atoms[a])
            if not same and not s <= home.get(b, -1) < s + p:
                return False
    return True


def _plan(nodes, compute, s, p, k, results, atoms, ctx: _Ctx) -> _Run | None:
    copies = [[nodes[compute[s + c * p + t]] for t in range(p)] for c in range(k)]
    if any(m.op is Op.ATTEND and m.attr("kv_share") for copy in copies for n in copy for m in [n, *_inner(n)]):
        return None
    matches: list[Match] = []
    for copy in copies[1:]:
        m = Match(set(defined_names(Region((), tuple(copy), ()))))
        if not m.nodes(copies[0], copy):
            return None
        matches.append(m)
    outputs0 = [o.name for n in copies[0] for o in n.outputs]
    carries: dict[str, str] = {}          # copy 0's output -> the value copy 0 reads in its place
    for a in matches[0].free:
        reads = [m.free[a] for m in matches]
        if all(b == a for b in reads) or (a in atoms and all(atoms.get(b) == atoms[a] for b in reads)):
            continue                                            # invariant
        out0 = reads[0]
        chained = out0 in outputs0 and all(reads[c] == matches[c - 1].defined[out0] for c in range(1, k - 1))
        if not chained or out0 in carries or ctx.types[a] != ctx.types[out0]:
            return None
        carries[out0] = a
    if not carries:
        return None
    first, last = compute[s], compute[s + k * p - 1]
    after = reads_of(nodes[last + 1:], results)
    for copy in copies[:-1]:
        if after & set(defined_names(Region((), tuple(copy), ()))):
            return None
    last_names = {matches[-1].defined[o]: o for o in outputs0}
    if any(last_names[x] not in carries for x in after if x in last_names):
        return None
    order = [o for o in outputs0 if o in carries]
    trial = Region(tuple(Value(carries[o], ctx.types[o]) for o in order), tuple(copies[0]), tuple(order))
    if unroll_pays(trial, k, ctx.types):
        return None
    return _Run(first, last, tuple(copies[0]), {o: carries[o] for o in order},
                tuple(matches[-1].defined[o] for o in order), k)


def _inner(n: Node):
    for r in n.regions:
        yield from r.walk()
