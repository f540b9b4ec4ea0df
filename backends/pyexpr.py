"""sympy expressions -> Python source (shapes, indices, trip counts, capacities)."""
from __future__ import annotations

import sympy


def py_expr(e, names: dict[str, str], integer: bool = False) -> str:
    """Render `e` with symbols renamed by `names`; `integer` renders exact division as `//`."""
    return _R(names, integer).render(sympy.sympify(e), 0)


# precedence: 0 lowest .. 4 atom
_ADD, _MUL, _POW, _ATOM = 1, 2, 3, 4


class _R:
    def __init__(self, names, integer):
        self.names = names
        self.integer = integer

    def wrap(self, text: str, prec: int, ctx: int) -> str:
        return f"({text})" if prec < ctx else text

    def render(self, e, ctx: int) -> str:
        if e in (sympy.true, sympy.false):
            return "True" if e == sympy.true else "False"
        if e.is_Integer:
            return self.wrap(str(int(e)), _ATOM if e >= 0 else _ADD, ctx)
        if e.is_Float:
            f = float(e)
            return self.wrap(repr(f), _ATOM if f >= 0 else _ADD, ctx)
        if e.is_Rational:
            text = f"{e.p} // {e.q}" if self.integer else f"{e.p} / {e.q}"
            return self.wrap(text, _MUL, ctx)
        if e.is_Symbol:
            return self.names.get(e.name, e.name)
        if isinstance(e, sympy.Add):
            terms = sorted(e.args, key=sympy.default_sort_key)
            out = self.render(terms[0], _ADD)
            for t in terms[1:]:
                coeff, rest = t.as_coeff_Mul()
                if coeff.is_number and coeff < 0:
                    out += " - " + self.render(-t, _MUL)
                else:
                    out += " + " + self.render(t, _MUL)
            return self.wrap(out, _ADD, ctx)
        if isinstance(e, sympy.Mul):
            num, den = sympy.fraction(e)
            coeff, rest = num.as_coeff_Mul()
            if coeff == -1 and den == 1:
                return self.wrap("-" + self.render(rest, _POW), _ADD, ctx)
            if den != 1:
                op = " // " if self.integer else " / "
                return self.wrap(self.render(num, _MUL) + op + self.render(den, _POW), _MUL, ctx)
            factors = sorted(e.args, key=lambda a: (not a.is_number, sympy.default_sort_key(a)))
            return self.wrap(" * ".join(self.render(f, _MUL + 1 if i else _MUL) for i, f in enumerate(factors)), _MUL, ctx)
        if isinstance(e, sympy.Pow):
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return f"math.sqrt({self.render(base, 0)})"
            if exp == sympy.Rational(-1, 2):
                return self.wrap(f"1 / math.sqrt({self.render(base, 0)})", _MUL, ctx)
            if exp.is_Integer and exp < 0:
                op = " // " if self.integer else " / "
                return self.wrap("1" + op + self.render(base ** -exp, _POW), _MUL, ctx)
            return self.wrap(self.render(base, _POW + 1) + " ** " + self.render(exp, _POW), _POW, ctx)
        if isinstance(e, sympy.Mod):
            return self.wrap(self.render(e.args[0], _MUL + 1) + " % " + self.render(e.args[1], _MUL + 1), _MUL, ctx)
        if isinstance(e, sympy.floor):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if den != 1 and num.is_integer is not False:
                return self.wrap(self.render(num, _MUL) + " // " + self.render(den, _POW), _MUL, ctx)
            return f"math.floor({self.render(e.args[0], 0)})"
        if isinstance(e, sympy.ceiling):
            return f"math.ceil({_R(self.names, False).render(e.args[0], 0)})"
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = "max" if isinstance(e, sympy.Max) else "min"
            args = sorted(e.args, key=sympy.default_sort_key)
            return f"{fn}({', '.join(self.render(a, 0) for a in args)})"
        if isinstance(e, sympy.exp):
            return f"math.exp({self.render(e.args[0], 0)})"
        if isinstance(e, sympy.log):
            return f"math.log({self.render(e.args[0], 0)})"
        if isinstance(e, sympy.Abs):
            return f"abs({self.render(e.args[0], 0)})"
        if isinstance(e, (sympy.And, sympy.Or)):
            op = " and " if isinstance(e, sympy.And) else " or "
            return self.wrap(op.join(self.render(a, _ATOM) for a in e.args), 0, ctx)
        if isinstance(e, sympy.Not):
            return self.wrap("not " + self.render(e.args[0], _ATOM), 0, ctx)
        if isinstance(e, sympy.core.relational.Relational):
            real = _R(self.names, False)             # a condition compares values: no integer division
            return self.wrap(f"{real.render(e.lhs, _ADD)} {e.rel_op} {real.render(e.rhs, _ADD)}", 0, ctx)
        if isinstance(e, sympy.Piecewise):
            return self.piecewise(e)
        if e is sympy.pi:
            return "math.pi"
        raise ValueError(f"cannot render {e} as Python")

    def piecewise(self, e) -> str:
        """`(a if c1 else b if c2 else c)`: the pieces in order, the first true condition wins."""
        parts = []
        for value, cond in e.args:
            if cond == sympy.true:
                parts.append(self.render(value, 0))
                return "(" + "".join(parts) + ")"
            parts.append(f"{self.render(value, 1)} if {self.render(cond, 1)} else ")
        raise ValueError(f"cannot render {e} as Python: no piece applies when every condition is false")
