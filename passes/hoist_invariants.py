"""hoist-invariants: loop-invariant code motion out of `loop`, `halt_loop` and `scan` bodies.

A top-level node of a loop body moves in front of the loop when it computes the same value on
every trip: it is not a region op, has no effects (`has_effects`: no attention site recording or
reading shared K/V), reads no value defined in the body (region arguments included), and its
attributes and result types do not mention a symbol the loop rebinds (its variable). The body is
scanned in program order, so a chain of invariants (a weight read, then its re-layout) moves
together. Regions are rebuilt innermost first, so a value hoisted out of an inner loop is
considered again for the loop around it: HRM's input injection `z_H + x` leaves the L loop, and
every parameter read leaves all three loops.

Every op left to move is a pure function of its operands, so computing it once instead of on
every trip changes no value. Gradients are unchanged too: under `grad last K` the early trips
run without gradients whether or not the value was computed outside (the loop's last trips,
which run with gradients, read it exactly as before). A body that may run zero times could turn
a skipped computation into an executed one, so loops are hoisted from only when their trip
count is provably >= 1 under the assumptions of SPEC.md §16.4 (a scan always runs at least one
segment: its sequence length is a positive multiple of the segment size). `route_topk` and
`route_mask` bodies run on a subset of tokens and are not loops: nothing leaves them.
"""
from __future__ import annotations

import sympy

from archc.ir.core import Graph, Node, Region
from archc.ir.ops import Op
from archc.ir.shapes import as_expr
from archc.passes.regions import map_loop_bodies
from archc.passes.rewrite import free_symbols, has_effects, rebound_symbols
from archc.passes.symbols import Assumptions

LOOPS = frozenset({Op.LOOP, Op.HALT_LOOP, Op.SCAN})


def hoist_invariants(g: Graph) -> Graph:
    """Move pure loop-invariant nodes (weight reads and re-layouts, HRM's input injection) out of loop, halt_loop and scan bodies."""
    assume = Assumptions(g)

    def visit(n: Node) -> tuple[list[Node], list[Node]]:
        if n.op not in LOOPS or not _runs(n, assume):
            return [], [n]
        return _hoist(n)

    body = map_loop_bodies(g.body, visit)
    return g if body == g.body else g.replace(body=body)


def _runs(n: Node, assume: Assumptions) -> bool:
    """The body runs at least once."""
    if n.op is Op.SCAN:
        return True
    trips, _ = assume.apply(as_expr(n.attr("trips")))
    return (trips >= 1) is sympy.true


def _hoist(n: Node) -> tuple[list[Node], list[Node]]:
    body = n.regions[0]
    inside = {a.name for a in body.args}
    bound = rebound_symbols(n)
    moved: list[Node] = []
    kept: list[Node] = []
    for m in body.nodes:
        if _invariant(m, inside, bound):
            moved.append(m)
        else:
            kept.append(m)
            inside.update(o.name for o in m.outputs)
    if not moved:
        return [], [n]
    return moved, [n.replace(regions=(Region(body.args, tuple(kept), body.results),))]


def _invariant(m: Node, inside: set[str], bound: frozenset[str]) -> bool:
    if m.regions or has_effects(m) or any(x in inside for x in m.inputs):
        return False
    mentions = free_symbols(tuple(v for _, v in m.attrs)) | free_symbols(tuple(o.type for o in m.outputs))
    return not (mentions & bound)
