"""What passes may assume about symbols, and which expressions survive the text form."""
from __future__ import annotations

import sympy

from archc.errors import ArchError
from archc.ir.core import Graph
from archc.ir.shapes import ExprSyntaxError, expr_str, parse_expr, sym


class Assumptions:
    """What archc knows about its symbols, as sympy assumptions.

    Dims are positive integers; int parameters are integers, positive when their default is (the
    cost model assumes the same); float parameters are real; any other symbol in an expression is
    a loop variable (the verifier allows no others): a non-negative integer.
    """

    def __init__(self, g: Graph):
        try:
            from archc.ir.interpret import resolve_bindings
            defaults = resolve_bindings(g)
        except ArchError:
            defaults = {}
        self.graph_symbols = {s.name for s in g.symbols}
        self.known: dict[str, sympy.Symbol] = {}
        for s in g.symbols:
            if s.kind == "dim":
                self.known[s.name] = sympy.Symbol(s.name, integer=True, positive=True)
            elif s.kind == "int":
                positive = isinstance(defaults.get(s.name), int) and defaults[s.name] > 0
                self.known[s.name] = sympy.Symbol(s.name, integer=True, positive=positive or None)
            elif s.kind == "float":
                self.known[s.name] = sympy.Symbol(s.name, real=True)

    def symbol(self, name: str) -> sympy.Symbol | None:
        if name in self.known:
            return self.known[name]
        if name in self.graph_symbols:
            return None                                   # bool parameters: nothing to assume
        return sympy.Symbol(name, integer=True, nonnegative=True)

    def apply(self, e: sympy.Basic) -> tuple[sympy.Basic, dict]:
        """`e` over assumption-carrying symbols, and the map that takes the result back."""
        fwd = {}
        for s in e.free_symbols:
            a = self.symbol(s.name)
            if a is not None:
                fwd[s] = a
        return e.xreplace(fwd), {v: sym(k.name) for k, v in fwd.items()}

    def is_integer(self, e: sympy.Basic) -> bool:
        assumed, _ = self.apply(e)
        return assumed.is_integer is True


def parses_back(e: sympy.Basic) -> bool:
    """The printer's text for `e` reads back as `e` (no `E`, `pi`, `Abs`, `Piecewise`, ...)."""
    try:
        return parse_expr(expr_str(e)) == e
    except (ExprSyntaxError, TypeError, ValueError):
        return False
