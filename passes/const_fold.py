"""const-fold: scalar arithmetic on `const` nodes becomes one `const`; x*1, x+0 and kin become x.

Values are sympy expressions, so folding stays exact and symbolic (`<alpha>` * 2 -> `<2*alpha>`).
A fold happens only where the interpreter would compute the same scalar: i64 operands must be
provably integers (under `Assumptions`), i64 division and powers are left alone (torch computes
them in floats), comparisons fold only to a definite true/false, and the result must print as
text that parses back (numbers that do not, such as `E`, become floats; symbolic ones stay unfolded).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import sympy

from archc.ir.core import Graph, Node
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, DType, as_expr
from archc.passes.rewrite import Alias, Ctx, Rule, on, rewrite
from archc.passes.symbols import Assumptions, parses_back


def _sigmoid(x):
    return 1 / (1 + sympy.exp(-x))


def _gelu(x):
    return x / 2 * (1 + sympy.erf(x / sympy.sqrt(2)))


# elementwise semantics on scalars, per result dtype
F32_FNS: dict[Op, Callable[..., sympy.Expr]] = {
    Op.NEG: operator.neg, Op.ABS: sympy.Abs, Op.DETACH: lambda x: x,
    Op.EXP: sympy.exp, Op.LOG: sympy.log, Op.SQRT: sympy.sqrt, Op.RSQRT: lambda x: 1 / sympy.sqrt(x),
    Op.TANH: sympy.tanh, Op.SIGMOID: _sigmoid, Op.RELU: lambda x: sympy.Max(0, x),
    Op.SILU: lambda x: x * _sigmoid(x), Op.SOFTPLUS: lambda x: sympy.log(1 + sympy.exp(x)), Op.GELU: _gelu,
    Op.SIN: sympy.sin, Op.COS: sympy.cos,
    Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul, Op.DIV: operator.truediv,
    Op.POW: operator.pow, Op.MAXIMUM: sympy.Max, Op.MINIMUM: sympy.Min,
}
I64_FNS: dict[Op, Callable[..., sympy.Expr]] = {
    op: F32_FNS[op] for op in (Op.NEG, Op.ABS, Op.DETACH, Op.ADD, Op.SUB, Op.MUL, Op.MAXIMUM, Op.MINIMUM)}
COMPARE_FNS: dict[Op, Callable[..., Any]] = {
    Op.GT: sympy.Gt, Op.LT: sympy.Lt, Op.GE: sympy.Ge, Op.LE: sympy.Le, Op.EQ: sympy.Eq, Op.NE: sympy.Ne}
LOGIC_FNS: dict[Op, Callable[..., bool]] = {
    Op.AND: operator.and_, Op.OR: operator.or_, Op.NOT: operator.not_}
FOLDABLE = frozenset(F32_FNS) | frozenset(COMPARE_FNS) | frozenset(LOGIC_FNS) | {Op.CAST}


# -- helpers --------------------------------------------------------------------------------------


def const_operand(name: str, ctx: Ctx) -> tuple[DType, Any] | None:
    """(dtype, value) when `name` is produced by a `const` node."""
    p = ctx.producer(name)
    if p is None or p.op is not Op.CONST:
        return None
    return DType(p.attr("dtype")), p.attr("value")


def _is_literally(name: str, ctx: Ctx, number: int) -> bool:
    c = const_operand(name, ctx)
    return c is not None and c[0] is not BOOL and not isinstance(c[1], bool) and as_expr(c[1]) == number


def _literal(v: Any, dtype: DType, assume: Assumptions) -> Any:
    """`v` as a `const` value attribute of `dtype`, or None when it cannot be one exactly."""
    if dtype is BOOL:
        if v in (sympy.true, sympy.false, True, False):
            return bool(v)
        return None
    v = sympy.sympify(v)
    if not isinstance(v, sympy.Expr) or v.has(sympy.nan, sympy.zoo, sympy.oo, -sympy.oo, sympy.I):
        return None
    if dtype is I64:
        if not assume.is_integer(v):
            return None
        return int(v) if v.is_Integer else v if parses_back(v) else None
    if v.is_Integer:
        return int(v)
    if v.is_Float:
        return float(v)
    if v.is_number:
        return v if v.is_Rational else float(v.evalf())
    return v if parses_back(v) else None


def _cast(dtype: DType, src: DType, v: Any) -> Any:
    if src is BOOL:
        return sympy.Integer(int(bool(v))) if dtype is not BOOL else bool(v)
    if dtype is BOOL:
        e = as_expr(v)
        return bool(e != 0) if e.is_number else None
    if dtype is I64 and src is F32:
        e = as_expr(v)
        return sympy.Integer(int(e)) if e.is_number else None        # torch truncates toward zero
    return v


# -- rules --------------------------------------------------------------------------------------


def fold(n: Node, ctx: Ctx) -> Node | None:
    # op(const a, const b, ...) -> const(op(a, b, ...))
    assume = ctx.assume
    if len(n.outputs) != 1 or n.out.type.rank != 0 or not n.inputs:
        return None
    operands = [const_operand(x, ctx) for x in n.inputs]
    if any(c is None for c in operands):
        return None
    dtype = n.out.type.dtype
    value = _evaluate(n, dtype, operands, assume)
    if value is None:
        return None
    value = _literal(value, dtype, assume)
    if value is None:
        return None
    return Node.make(Op.CONST, (), n.outputs, {"dtype": dtype.value, "value": value}, span=n.span)


def _evaluate(n: Node, dtype: DType, operands: list[tuple[DType, Any]], assume: Assumptions) -> Any:
    dtypes = [d for d, _ in operands]
    if any(d is I64 and not assume.is_integer(as_expr(v)) for d, v in operands):
        return None                                  # the interpreter would truncate it first
    if n.op is Op.CAST:
        return _cast(dtype, dtypes[0], operands[0][1])
    if n.op in LOGIC_FNS:
        if any(d is not BOOL for d in dtypes):
            return None
        return LOGIC_FNS[n.op](*(bool(v) for _, v in operands))
    if BOOL in dtypes:
        return None
    args = [as_expr(v) for _, v in operands]
    if n.op in COMPARE_FNS:
        assumed = [assume.apply(a)[0] for a in args]
        return COMPARE_FNS[n.op](*assumed)
    fns = F32_FNS if dtype is F32 else I64_FNS if dtype is I64 else {}
    if n.op not in fns:
        return None
    assumed, back = zip(*(assume.apply(a) for a in args))
    mapping = {k: v for b in back for k, v in b.items()}
    return sympy.sympify(fns[n.op](*assumed)).xreplace(mapping)


def _same_as(n: Node, x: str, ctx: Ctx) -> Alias | None:
    """Alias n to x when that changes neither dtype nor shape (no broadcast, no promotion)."""
    return Alias((x,)) if ctx.types.get(x) == n.out.type else None


def identity(n: Node, ctx: Ctx) -> Alias | None:
    a, b = n.inputs
    if n.op is Op.MUL:
        if _is_literally(b, ctx, 1):                 # x * 1 -> x
            return _same_as(n, a, ctx)
        if _is_literally(a, ctx, 1):                 # 1 * x -> x
            return _same_as(n, b, ctx)
    if n.op is Op.ADD:
        if _is_literally(b, ctx, 0):                 # x + 0 -> x
            return _same_as(n, a, ctx)
        if _is_literally(a, ctx, 0):                 # 0 + x -> x
            return _same_as(n, b, ctx)
    if n.op is Op.SUB and _is_literally(b, ctx, 0):  # x - 0 -> x
        return _same_as(n, a, ctx)
    if n.op in (Op.DIV, Op.POW) and _is_literally(b, ctx, 1):   # x / 1 -> x, x ** 1 -> x
        return _same_as(n, a, ctx)
    return None


RULES = (
    Rule("fold-constants", on(*FOLDABLE), fold),
    Rule("drop-identity", on(Op.MUL, Op.ADD, Op.SUB, Op.DIV, Op.POW), identity),
)


def const_fold(g: Graph) -> Graph:
    """Fold scalar ops on constants into one const (exact, symbolic via sympy) and drop x*1, x+0, x-0, x/1, x**1."""
    return rewrite(g, RULES)
