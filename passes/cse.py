"""cse: a node that recomputes a value already available in scope reads that value instead.

Two nodes are the same computation when op, operands (in canonical order for commutative ops),
attributes and result types agree. The earlier one must be visible: defined before, in the same
region or an enclosing one (a value defined inside a region is never visible outside it). An
entry whose attributes or types mention a symbol that a region rebinds (a loop variable, a
`route_mask`'s B and T) does not cross into that region. Region ops and nodes with effects are
never merged.
"""
from __future__ import annotations

from archc.ir.core import Graph, Node
from archc.ir.ops import Op
from archc.passes.rewrite import Alias, Ctx, Rule, free_symbols, has_effects, rewrite

COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.MAXIMUM, Op.MINIMUM, Op.EQ, Op.NE, Op.AND, Op.OR})


def _key(n: Node) -> tuple:
    inputs = tuple(sorted(n.inputs)) if n.op in COMMUTATIVE else n.inputs
    return n.op, inputs, n.attrs, tuple(o.type for o in n.outputs)


def _reuse(n: Node, ctx: Ctx) -> Alias | None:
    # f(a, b) {attrs} ; f(a, b) {attrs} -> the first
    key = _key(n)
    symbols = free_symbols(tuple(v for _, v in n.attrs)) | free_symbols(tuple(o.type for o in n.outputs))
    seen = ctx.recall(key, symbols)
    if seen is not None:
        return Alias(seen)
    ctx.remember(key, tuple(o.name for o in n.outputs))
    return None


def _mergeable(n: Node) -> bool:
    return not n.regions and not has_effects(n)


RULES = (Rule("reuse-available-value", _mergeable, _reuse),)


def cse(g: Graph) -> Graph:
    """Merge nodes with the same op, operands, attributes and types into the first visible one (e.g. repeated param reads)."""
    return rewrite(g, RULES)
