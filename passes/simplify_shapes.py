"""simplify-shapes: every shape and attribute expression in its simplest form that still parses."""
from __future__ import annotations

import sympy

from archc.ir.core import Graph
from archc.ir.shapes import simplified
from archc.passes.rewrite import map_exprs
from archc.passes.symbols import Assumptions, parses_back


def simplify_expr(e: sympy.Basic, assume: Assumptions, max_rounds: int = 3) -> sympy.Basic:
    """Simplify under `assume`; keep the result only if it has strictly fewer operations and parses."""
    if not isinstance(e, sympy.Basic) or not e.free_symbols or isinstance(e, sympy.Symbol):
        return e
    for _ in range(max_rounds):
        assumed, back = assume.apply(e)
        cand = simplified(assumed).xreplace(back)
        if not (isinstance(cand, sympy.Expr) and sympy.count_ops(cand) < sympy.count_ops(e) and parses_back(cand)):
            return e
        e = cand
    return e


def simplify_shapes(g: Graph) -> Graph:
    """Simplify every shape and attribute expression, e.g. Max(1, floor(T)) -> T, so later passes compare like with like."""
    assume = Assumptions(g)
    memo: dict[sympy.Basic, sympy.Basic] = {}

    def simplify(e: sympy.Basic) -> sympy.Basic:
        if e not in memo:
            memo[e] = simplify_expr(e, assume)
        return memo[e]

    out = map_exprs(g, simplify)
    return out if any(k != v for k, v in memo.items()) else g
