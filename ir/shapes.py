"""Dtypes, tensor types with symbolic (sympy) shapes, and the canonical text form of shape expressions."""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

import sympy


class DType(Enum):
    F32 = "f32"
    I64 = "i64"
    BOOL = "bool"


Dim = sympy.Expr


def sym(name: str) -> sympy.Symbol:
    """Every archc symbol is an integer-or-real symbol by name; one symbol object per name."""
    return sympy.Symbol(name)


def as_expr(x) -> sympy.Expr:
    if isinstance(x, sympy.Basic):
        return x
    if isinstance(x, bool):
        return sympy.Integer(int(x))
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        return sympy.Float(x) if not x.is_integer() else sympy.Integer(int(x))
    raise TypeError(f"not a shape expression: {x!r}")


@dataclass(frozen=True, slots=True)
class TensorType:
    dtype: DType
    shape: tuple[sympy.Expr, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(as_expr(s) for s in shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.value}[{', '.join(expr_str(d) for d in self.shape)}]"


def tensor(dtype: DType, *shape) -> TensorType:
    return TensorType(dtype, tuple(as_expr(s) for s in shape))


F32 = DType.F32
I64 = DType.I64
BOOL = DType.BOOL


def expr_str(e) -> str:
    """Canonical, parseable text for a shape/attribute expression (symbols sorted by sympy)."""
    e = as_expr(e)
    if isinstance(e, sympy.Float):
        return _float_str(float(e))
    if e.is_Rational and not e.is_Integer:
        return f"{e.p}/{e.q}"
    return sympy.sstr(e, order="lex")


def _float_str(f: float) -> str:
    r = repr(f)
    return r if ("." in r or "e" in r or "inf" in r or "nan" in r) else r + ".0"


# --- fast, exact stand-ins for `subs` and `simplify` (compile time is mostly sympy) -------------
#
# Lowering substitutes the parameter defaults into every shape it checks, and the shape rules ask
# `simplify` whether two dims are equal. Both are pure functions of their arguments, so their
# results are memoised per process; `substitute` also replaces `subs`'s generic machinery (one
# full tree walk per key of the mapping, through every class's `_eval_subs` hook) by `xreplace`
# of just the symbols the expression contains, where that provably gives the same expression.

_MEMO_MAX = 1 << 15
_SUBS_MEMO: dict = {}
_SIMPLIFY_MEMO: dict = {}
_PLAIN_MEMO: dict = {}
_PLAIN_CLASSES: dict[type, bool] = {}


def _memo_put(memo: dict, key, value):
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    memo[key] = value
    return value


def _plain_class(cls: type) -> bool:
    """`subs` of a symbol by a number rebuilds this class from its substituted args, as `xreplace` does.

    That is the default (`Basic._eval_subs` returns None) and what Add, Mul, Symbol, Number and
    applied functions do for a symbol key; Pow's hook returns `new**exp`, the same rebuild.
    Piecewise, And, Or, Xor and the rest override it to skip or short-circuit arguments.
    """
    known = _PLAIN_CLASSES.get(cls)
    if known is None:
        hook = getattr(cls, "_eval_subs", None)
        plain = {sympy.Basic._eval_subs, sympy.Add._eval_subs, sympy.Mul._eval_subs, sympy.Pow._eval_subs,
                 sympy.Symbol._eval_subs, sympy.Number._eval_subs, sympy.Function._eval_subs}
        known = _PLAIN_CLASSES[cls] = hook in plain or (
            issubclass(cls, sympy.Function) and hook is sympy.exp._eval_subs)
    return known


def _plain(e: sympy.Basic) -> bool:
    """Every node of `e` substitutes plainly (see `_plain_class`)."""
    hit = _PLAIN_MEMO.get(e)
    if hit is None:
        hit = _plain_class(type(e)) and all(_plain(a) for a in e.args if isinstance(a, sympy.Basic))
        _memo_put(_PLAIN_MEMO, e, hit)
    return hit


def substitute(e: sympy.Basic, values) -> sympy.Basic:
    """`e.subs(values)`, same result, for a mapping from symbols (or their names) to numbers.

    `subs` walks the whole tree once per key, in sympy's key order, rebuilding each node through
    its class's substitution hook. For symbol keys and number values, on expressions whose classes
    all substitute plainly, that equals replacing just the symbols `e` contains, one at a time in
    the same order, with `xreplace`; anything else (a Piecewise, a symbolic value) goes to `subs`.
    """
    pairs = []
    for s in e.free_symbols:
        if type(s) is not sympy.Symbol:
            return e.subs(values)
        if s in values:
            v = values[s]
        elif s.name in values and s == sympy.Symbol(s.name):
            v = values[s.name]
        else:
            continue
        if isinstance(v, (str, type)):
            return e.subs(values)
        v = sympy.sympify(v, strict=True)
        if not v.is_number or v.free_symbols or v in (sympy.nan, sympy.oo, -sympy.oo, sympy.zoo):
            return e.subs(values)
        pairs.append((s, v))
    if not pairs:
        return e
    pairs.sort(key=lambda p: p[0].name)           # sympy's order for plain symbols: by name
    key = (e, tuple(pairs))
    hit = _SUBS_MEMO.get(key)
    if hit is not None:
        return hit
    if not _plain(e):
        out = e.subs(values)
    else:
        out = e
        for s, v in pairs:
            out = out.xreplace({s: v})
    return _memo_put(_SUBS_MEMO, key, out)


_XREPLACE_MEMO: dict = {}


def replaced(e, subs: dict):
    """`e.xreplace(subs)` for a map from symbols, memoised on the symbols `e` contains.

    Rebuilding an expression re-evaluates it (a `Max` compares its arguments, a product collects
    terms); passes substitute the same few dims into every type of a graph, so most calls repeat.
    (archc's expressions bind no symbols, so the symbols `e` contains are its free symbols.)
    """
    if not isinstance(e, sympy.Basic) or not subs:
        return e
    pairs = [(s, subs[s]) for s in e.free_symbols if s in subs]
    if not pairs:
        return e
    pairs.sort(key=lambda p: p[0].name)
    key = (e, tuple(pairs))
    hit = _XREPLACE_MEMO.get(key)
    if hit is None:
        hit = _memo_put(_XREPLACE_MEMO, key, e.xreplace(dict(pairs)))
    return hit


def simplified(e: sympy.Basic) -> sympy.Basic:
    """`sympy.simplify(e)`, memoised (it is a pure function of the expression)."""
    hit = _SIMPLIFY_MEMO.get(e)
    if hit is None:
        hit = _memo_put(_SIMPLIFY_MEMO, e, sympy.simplify(e))
    return hit


def simplify(e) -> sympy.Expr:
    return simplified(as_expr(e))


def _nonconstant_polynomial(e: sympy.Basic) -> bool:
    """`e` is a polynomial over the rationals in plain symbols that is not constant.

    No form `simplify` returns for such an `e` is 0 or a number, so `dims_equal` can skip it.
    """
    if not all(isinstance(a, (sympy.Symbol, sympy.Rational)) for a in e.atoms()):
        return False
    if not e.is_polynomial():
        return False
    return bool(sympy.expand(e).free_symbols)


def dims_equal(a, b, bindings: dict | None = None) -> bool | None:
    """True if provably equal, False if provably different (or different at `bindings`), None if unknown."""
    a, b = as_expr(a), as_expr(b)
    if a == b:
        return True
    diff = a - b
    if not diff.args:                         # a number or a symbol: simplify returns it as is
        if diff == 0:
            return True
        if diff.is_number:
            return False
    elif not _nonconstant_polynomial(diff):
        diff = simplified(diff)
        if diff == 0:
            return True
        if diff.is_number:
            return False
    if bindings:
        da = substitute(a, bindings)
        db = substitute(b, bindings)
        if da.is_number and db.is_number:
            return bool(simplified(da - db) == 0)
    return None


# --- a small, eval-free parser for expression text (IR files and `archc cost --set`) -------------

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*(?:e[+-]?\d+)?|\d+e[+-]?\d+|\d+)|([A-Za-z_][A-Za-z_0-9]*)"
                    r"|(\*\*|//|<=|>=|==|!=|[-+*/(),%<>&|~]))")
_FUNCS = {
    "ceiling": sympy.ceiling, "floor": sympy.floor, "Max": sympy.Max, "Min": sympy.Min,
    "Mod": sympy.Mod, "sqrt": sympy.sqrt, "log": sympy.log, "exp": sympy.exp,
    "Eq": sympy.Eq, "Ne": sympy.Ne,
}
_CONSTS = {"oo": sympy.oo, "inf": sympy.oo, "nan": sympy.nan}   # every other name is a symbol (E = experts)
_RELATIONS = {"<": sympy.StrictLessThan, "<=": sympy.LessThan, ">": sympy.StrictGreaterThan,
              ">=": sympy.GreaterThan}


class ExprSyntaxError(ValueError):
    pass


def parse_expr(text: str) -> sympy.Expr:
    toks = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExprSyntaxError(f"unexpected character {text[pos]!r} in expression {text!r}")
        pos = m.end()
        num, name, op = m.groups()
        toks.append(("num", num) if num else ("name", name) if name else ("op", op))
    p = _ExprParser(toks, text)
    first: ExprSyntaxError | None = None
    try:
        e = p.sum()
    except ExprSyntaxError as err:
        first = err
    if first is None and p.i == len(toks):
        return e
    q = _ExprParser(toks, text)                # a compile-time condition: `T > 0.0`, `(d > 2) & (T < 8)`
    try:
        e = q.condition()
        if q.i == len(toks):
            return e
    except ExprSyntaxError:
        pass
    raise first or ExprSyntaxError(f"trailing input in expression {text!r}")


class _ExprParser:
    def __init__(self, toks, text):
        self.toks, self.i, self.text = toks, 0, text

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def take(self, op=None):
        t = self.peek()
        if t[0] is None or (op is not None and t != ("op", op)):
            raise ExprSyntaxError(f"expected {op or 'a term'} in expression {self.text!r}")
        self.i += 1
        return t

    def sum(self):
        e = self.product()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            r = self.product()
            e = e + r if op == "+" else e - r
        return e

    def product(self):
        e = self.unary()
        while self.peek() in (("op", "*"), ("op", "/"), ("op", "//"), ("op", "%")):
            op = self.take()[1]
            r = self.unary()
            e = e * r if op == "*" else e / r if op == "/" else sympy.floor(e / r) if op == "//" else sympy.Mod(e, r)
        return e

    def unary(self):
        if self.peek() == ("op", "-"):
            self.take()
            return -self.unary()
        return self.power()

    def power(self):
        e = self.atom()
        if self.peek() == ("op", "**"):
            self.take()
            e = e ** self.unary()
        return e

    def atom(self):
        kind, val = self.take()
        if kind == "num":
            return sympy.Float(val) if ("." in val or "e" in val) else sympy.Integer(int(val))
        if kind == "name":
            if val == "Piecewise" and self.peek() == ("op", "("):
                return self.piecewise()
            if self.peek() == ("op", "("):
                if val not in _FUNCS:
                    raise ExprSyntaxError(f"unknown function {val!r} in expression {self.text!r}")
                self.take("(")
                args = [self.sum()]
                while self.peek() == ("op", ","):
                    self.take()
                    args.append(self.sum())
                self.take(")")
                return _FUNCS[val](*args)
            if val in _CONSTS:
                return _CONSTS[val]
            return sym(val)
        if val == "(":
            e = self.sum()
            self.take(")")
            return e
        raise ExprSyntaxError(f"unexpected {val!r} in expression {self.text!r}")

    # Piecewise((value, condition), ...): the printed form of `where` on compile-time values
    def piecewise(self):
        self.take("(")
        pieces = [self.piece()]
        while self.peek() == ("op", ","):
            self.take()
            pieces.append(self.piece())
        self.take(")")
        return sympy.Piecewise(*pieces)

    def piece(self):
        self.take("(")
        value = self.sum()
        self.take(",")
        cond = self.condition()
        self.take(")")
        return (value, cond)

    def condition(self):
        e = self.conjunction()
        while self.peek() == ("op", "|"):
            self.take()
            e = sympy.Or(e, self.conjunction())
        return e

    def conjunction(self):
        e = self.literal()
        while self.peek() == ("op", "&"):
            self.take()
            e = sympy.And(e, self.literal())
        return e

    def literal(self):
        if self.peek() == ("op", "~"):
            self.take()
            return sympy.Not(self.literal())
        if self.peek() in (("name", "True"), ("name", "False")):
            return sympy.true if self.take()[1] == "True" else sympy.false
        start = self.i
        try:                                   # a relation `a < b`, whose left side may be parenthesised
            left = self.sum()
        except ExprSyntaxError:
            left = None
        if left is not None and self.peek()[0] == "op" and self.peek()[1] in _RELATIONS:
            op = self.take()[1]
            return _RELATIONS[op](left, self.sum())
        if isinstance(left, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational)):
            return left                        # Eq(a, b), Ne(a, b)
        self.i = start                         # a parenthesised condition
        self.take("(")
        e = self.condition()
        self.take(")")
        return e
