"""unroll-small-loops: a `loop` with a literal trip count whose body is too small to be worth a
loop becomes straight-line code, one renamed copy of the body per trip with the loop variable
replaced by its value (so const-fold and CSE can then fold `const <i>`, `index=<Mod(i, 2)>`, ...).

The rule (`unroll_pays`, shared with fold-loops so the two never undo each other):

* a loop of 1 trip always unrolls (it is pure overhead);
* otherwise the unrolled code must stay small (trips x body nodes <= MAX_UNROLLED_NODES) and the
  body must be dispatch-bound by the cost model (ir/cost.py): no nested region, and its FLOPs per
  trip divided by the elements it carries is a constant <= LIGHT_FLOPS_PER_ELEMENT (elementwise
  and movement work; any contraction or attention over symbolic sizes makes the ratio symbolic).

Only `loop` unrolls: a symbolic trip count may be overridden at run time, `halt_loop` exits on
data, and `scan`'s trip count is the sequence length. A loop with `grad last K` < trips (its
early trips run without gradients, which straight-line IR cannot say) or with a recursion K/V
share (keyed by the loop variable) stays a loop.
"""
from __future__ import annotations

from collections import ChainMap
from typing import Mapping

import sympy

from archc.ir.core import Graph, Node, Region, Value, value_types
from archc.ir.cost import FLOPS, numel
from archc.ir.ops import Op
from archc.ir.shapes import TensorType, sym
from archc.passes.regions import FreshNames, Renamer, map_loop_bodies, static_int

MAX_UNROLLED_NODES = 64
LIGHT_FLOPS_PER_ELEMENT = 32


def unroll_pays(body: Region, trips: int, types: Mapping[str, TensorType]) -> bool:
    """The cost rule: True when `trips` straight copies of `body` beat a loop (see the module doc)."""
    if trips <= 1:
        return True
    nodes = list(body.walk())
    if trips * len(nodes) > MAX_UNROLLED_NODES or any(n.regions for n in nodes):
        return False
    scope = ChainMap({a.name: a.type for a in body.args}, types)
    flops = sympy.Integer(0)
    for n in body.nodes:
        flops += FLOPS[n.op](n, [scope[i] for i in n.inputs], [o.type for o in n.outputs])
        scope.maps[0].update((o.name, o.type) for o in n.outputs)
    carried = sum((numel(a.type) for a in body.args), sympy.Integer(0))
    if carried == 0:
        return False
    ratio = sympy.cancel(flops / carried)
    return bool(ratio.is_number and ratio <= LIGHT_FLOPS_PER_ELEMENT)


def _unrollable(n: Node) -> int | None:
    """The trip count when `n` is a loop this pass may unroll (semantics permitting), else None."""
    trips = static_int(n.attr("trips")) if n.op is Op.LOOP else None
    if trips is None or trips < 1:
        return None
    if n.attr("grad_last") is not None:
        last = static_int(n.attr("grad_last"))
        if last is None or last < trips:
            return None
    if any(m.op is Op.ATTEND and m.attr("kv_share") for m in n.regions[0].walk()):
        return None
    return trips


def unroll_small_loops(g: Graph) -> Graph:
    """Unroll loops with a literal trip count when the cost rule says straight-line code is cheaper (1 trip, or a tiny elementwise body)."""
    names = FreshNames(g)
    types = value_types(g)

    def visit(n: Node) -> tuple[list[Node], list[Node]]:
        trips = _unrollable(n)
        if trips is None or not unroll_pays(n.regions[0], trips, types):
            return [], [n]
        return [], _unroll(n, trips, names)

    body = map_loop_bodies(g.body, visit)
    return g if body == g.body else g.replace(body=body)


def _unroll(n: Node, trips: int, names: FreshNames) -> list[Node]:
    body = n.regions[0]
    var = n.attr("var")
    carry = list(n.inputs)
    out: list[Node] = []
    yielded_once = {y for y in body.results if body.results.count(y) == 1}
    defined_by_body = {o.name for m in body.nodes for o in m.outputs}
    for i in range(trips):
        seed = {a.name: c for a, c in zip(body.args, carry)}
        if i == trips - 1:      # the last copy defines the loop's result names where it can
            seed.update({y: r.name for y, r in zip(body.results, n.outputs)
                         if y in yielded_once and y in defined_by_body})
        subs = {sym(var): sympy.Integer(i)} if var else {}
        copy = Renamer(seed, subs, names.value if i > 0 else None)   # the first copy keeps the body's names
        out.extend(copy.node(m) for m in body.nodes)
        carry = [copy.read(y) for y in body.results]
    for r, c in zip(n.outputs, carry):
        if r.name != c:         # a yield that passes an argument or outer value through
            out.append(Node.make(Op.CAST, [c], [Value(r.name, r.type)], {"dtype": r.type.dtype.value}, span=n.span))
    return out
