"""Expression lowering: arithmetic on statics folds at compile time; on tensors it emits IR."""
from __future__ import annotations

from typing import Any

import sympy

from archc.dsl import ast as A
from archc.dsl.values import LayerInst, MemInst, PathRef, Static, StrVal
from archc.errors import ArchError, Span
from archc.ir.core import Value
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, TensorType, as_expr, expr_str, substitute

_BIN_TENSOR = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV, "**": Op.POW, "==": Op.EQ, "!=": Op.NE,
               "<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "and": Op.AND, "or": Op.OR}


def lower_expr(al, e: A.Expr, scope, frame, hint: str | None = None):
    """Lower one expression; `hint` names the value it produces (the assignment target)."""
    fn = _DISPATCH.get(type(e))
    if fn is None:
        raise al.err("this expression is not supported here", e.span)
    return fn(al, e, scope, frame, hint)


def as_tensor(al, v, span: Span, what: str = "operand", like: Value | None = None) -> Value:
    """Coerce a lowered value to a tensor Value (statics become `const`)."""
    if isinstance(v, Value):
        return v
    if isinstance(v, Static):
        dtype = None
        if like is not None and v.kind != "bool":
            dtype = F32 if (like.type.dtype is F32 or v.kind == "float") else I64
        return al.const(v, span, dtype)
    if isinstance(v, LayerInst):
        raise al.err(f"layer `{v.name}` is used as a value; call it: `{v.name}(x)`", span)
    if isinstance(v, MemInst):
        raise al.err(f"memory `{v.name}` is used as a value; use a method such as `{v.name}.read(q)`", span)
    if isinstance(v, tuple):
        raise al.err(f"{what} is a tuple of {len(v)} values; unpack it: `a, b = ...`", span)
    raise al.err(f"{what} must be a tensor", span)


def _num(al, e: A.Num, scope, frame, hint):
    if isinstance(e.value, float):
        return Static(sympy.Float(e.value), "float")
    if e.value > 2**62:
        raise al.err(f"integer {e.value} is too large", e.span, hint="archc integers must fit in 62 bits")
    return Static(sympy.Integer(e.value), "int")


def _bool(al, e: A.Bool, scope, frame, hint):
    return Static(sympy.true if e.value else sympy.false, "bool")


def _str(al, e: A.Str, scope, frame, hint):
    return StrVal(e.value, e.span)


def _name(al, e: A.Name, scope, frame, hint):
    v = scope.lookup(e.id)
    if v is None:
        from archc.dsl.lower import suggest
        hint_text = suggest(e.id, scope.names())
        loop_local = scope.loop_local(e.id)
        if loop_local is not None:
            hint_text = (f"`{e.id}` is defined inside a loop body at line {loop_local.line}; "
                         f"assign it before the loop to carry it out")
        raise al.err(f"unknown name `{e.id}`", e.span, hint=hint_text)
    return v


def _list(al, e: A.ListLit, scope, frame, hint):
    return [lower_expr(al, x, scope, frame) for x in e.items]


def _values_at_defaults(al, e, frame=None) -> list:
    """`e` with the parameters at their defaults (and each value of the loop variables in scope)."""
    try:
        if frame is not None and getattr(frame, "loop_vars", None):
            return al.sample_values(e, frame)
        return [substitute(sympy.sympify(e), al.defaults)]
    except (ZeroDivisionError, TypeError, ValueError):
        return [sympy.nan]


def check_finite(al, r, span: Span, frame=None):
    """A compile-time number must be finite and real where it is evaluated (1 / (d - 4) at d = 4 is not)."""
    for v in _values_at_defaults(al, r, frame):
        if v.is_number and (v.has(sympy.nan) or v.is_finite is False or v.is_real is False):
            what = "is undefined" if v.has(sympy.nan) else "is infinite" if v.is_finite is False else "is not a real number"
            at = "" if sympy.sympify(r).is_number else f" ({expr_str(r)} with the parameters at their defaults)"
            raise al.err(f"this value {what}{at}", span,
                         hint="compile-time values are checked at the parameter defaults and every loop step")


def _static_binop(al, op: str, a: Static, b: Static, span: Span, frame=None) -> Static:
    x, y = a.expr, b.expr
    if op in ("and", "or"):
        if a.kind != "bool" or b.kind != "bool":
            raise al.err(f"`{op}` needs bool operands", span)
        return Static(sympy.And(x, y) if op == "and" else sympy.Or(x, y), "bool")
    if a.kind == "bool" or b.kind == "bool":
        if op in ("==", "!="):
            eq = sympy.true if x == y else sympy.false
            return Static(eq if op == "==" else sympy.Not(eq), "bool")
        raise al.err(f"operator `{op}` does not apply to bool values", span)
    kind = "float" if "float" in (a.kind, b.kind) else "int"
    if op in ("/", "//", "%") and y.is_number and y == 0:
        raise al.err("division by zero", span)
    if op in ("/", "//", "%") and not y.is_number and any(v.is_number and v == 0 for v in _values_at_defaults(al, y, frame)):
        raise al.err(f"division by zero: the divisor {expr_str(y)} is 0", span,
                     hint="compile-time values are checked at the parameter defaults and every loop step")
    if op == "+":
        r = x + y
    elif op == "-":
        r = x - y
    elif op == "*":
        r = x * y
    elif op == "/":
        # d / heads stays an (exact) int expression; 3 / 2 becomes a float
        r = x / y
        at = substitute(r, al.defaults)
        kind = "int" if (kind == "int" and (r.is_Integer or (not r.is_number and (not at.is_number or at.is_Integer)))) \
            else "float"
    elif op == "//":
        r = sympy.floor(x / y)
    elif op == "%":
        r = sympy.Mod(x, y)
    elif op == "**":
        if y.is_number and abs(y) > 64:
            raise al.err("exponent too large", span)
        r = x ** y
        if not (y.is_Integer and y >= 0):
            kind = "float"
    elif op in ("==", "!=", "<", "<=", ">", ">="):
        rel = {"==": sympy.Eq, "!=": sympy.Ne, "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}[op]
        return Static(rel(x, y), "bool")
    elif op == "@":
        raise al.err("`@` needs tensor operands", span)
    else:
        raise al.err(f"unknown operator `{op}`", span)
    if r.is_number and (r.has(sympy.zoo) or r.has(sympy.nan)):
        raise al.err("this expression has no finite value", span)
    if op in ("/", "//", "%", "**"):
        check_finite(al, r, span, frame)
    return Static(r, kind)


def _binop(al, e: A.BinOp, scope, frame, hint):
    a = lower_expr(al, e.left, scope, frame)
    b = lower_expr(al, e.right, scope, frame)
    if isinstance(a, Static) and isinstance(b, Static):
        return _static_binop(al, e.op, a, b, e.span, frame)
    for v, side in ((a, e.left), (b, e.right)):
        if isinstance(v, (StrVal, list)):
            raise al.err(f"operator `{e.op}` needs numbers or tensors", side.span)
    ta = as_tensor(al, a, e.left.span, like=b if isinstance(b, Value) else None)
    tb = as_tensor(al, b, e.right.span, like=ta)
    if e.op == "@":
        return al.b.emit1(Op.MATMUL, [ta, tb], {}, e.span, name=hint)
    if e.op in ("//", "%"):
        raise al.err(f"`{e.op}` on tensors is not supported", e.span, hint="it works on compile-time integers")
    op = _BIN_TENSOR[e.op]
    if op in (Op.AND, Op.OR):
        for t, side in ((ta, e.left), (tb, e.right)):
            if t.type.dtype is not BOOL:
                raise al.err(f"`{e.op}` needs bool tensors, got {t.type}", side.span)
    return al.b.emit1(op, [ta, tb], {}, e.span, name=hint)


def _unary(al, e: A.UnaryOp, scope, frame, hint):
    v = lower_expr(al, e.operand, scope, frame)
    if isinstance(v, Static):
        if e.op == "not":
            if v.kind != "bool":
                raise al.err("`not` needs a bool", e.span)
            return Static(sympy.Not(v.expr), "bool")
        if v.kind == "bool":
            raise al.err("cannot negate a bool", e.span)
        return Static(-v.expr, v.kind)
    t = as_tensor(al, v, e.operand.span)
    if e.op == "not":
        if t.type.dtype is not BOOL:
            raise al.err(f"`not` needs a bool tensor, got {t.type}", e.span)
        return al.b.emit1(Op.NOT, [t], {}, e.span, name=hint)
    return al.b.emit1(Op.NEG, [t], {}, e.span, name=hint)


def _attr(al, e: A.Attr, scope, frame, hint):
    path = _path_of(e)
    if path is None:
        raise al.err("attribute access is only used for memory methods and cache targets", e.span)
    return PathRef(path, e.span)


def _path_of(e) -> str | None:
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Attr):
        base = _path_of(e.base)
        return None if base is None else f"{base}.{e.name}"
    if isinstance(e, A.Index) and len(e.subs) == 1 and isinstance(e.subs[0], A.Num):
        base = _path_of(e.base)
        return None if base is None else f"{base}[{e.subs[0].value}]"
    return None


def _index(al, e: A.Index, scope, frame, hint):
    base = lower_expr(al, e.base, scope, frame)
    if isinstance(base, LayerInst):
        return _index_layer(al, base, e, scope, frame)
    if isinstance(base, list):
        if len(e.subs) != 1:
            raise al.err("a list takes one index", e.span)
        i = al.static_int(e.subs[0], scope, frame, "a list index")
        if not i.is_Integer or not -len(base) <= int(i) < len(base):
            raise al.err(f"index {expr_str(i)} is out of range for a list of {len(base)}", e.subs[0].span)
        return base[int(i)]
    x = as_tensor(al, base, e.base.span, "indexed value")
    if len(e.subs) > x.type.rank:
        raise al.err(f"{len(e.subs)} indices for a tensor of rank {x.type.rank} ({x.type})", e.span)
    axis = 0
    for i, sub in enumerate(e.subs):
        last = i == len(e.subs) - 1
        name = hint if last else None
        dim = x.type.shape[axis]
        if isinstance(sub, A.Slice):
            start = sympy.Integer(0) if sub.start is None else al.static(sub.start, scope, frame, "a slice bound").expr
            stop = dim if sub.stop is None else al.static(sub.stop, scope, frame, "a slice bound").expr
            start = _wrap(start, dim)
            stop = _wrap(stop, dim)
            s0, s1, n = (substitute(sympy.sympify(v), al.defaults) for v in (start, stop, dim))
            if s0.is_number and s1.is_number and (s0 < 0 or s1 < s0 or (n.is_number and s1 > n)):
                raise al.err(f"slice {expr_str(start)}:{expr_str(stop)} does not fit a dimension of size "
                             f"{expr_str(dim)}" + (f" = {n}" if n.is_number and not sympy.sympify(dim).is_number else ""),
                             sub.span, hint="slice bounds must satisfy 0 <= start <= stop <= size")
            if sub.start is None and sub.stop is None:
                axis += 1
                continue
            x = al.b.emit1(Op.SLICE, [x], {"axis": axis, "start": _av(start), "stop": _av(stop)}, sub.span, name=name)
            axis += 1
        else:
            idx = lower_expr(al, sub, scope, frame)
            if isinstance(idx, Static):
                if idx.kind != "int":
                    raise al.err("a tensor index must be an integer", sub.span)
                j = _wrap(idx.expr, dim)
                x = al.b.emit1(Op.SELECT, [x], {"axis": axis, "index": _av(j)}, sub.span, name=name)
            else:
                t = as_tensor(al, idx, sub.span)
                if t.type.dtype is not I64 or t.type.rank != 0:
                    raise al.err(f"a tensor index must be an i64 scalar, got {t.type}", sub.span,
                                 hint="use gather(x, indices, axis) for per-sample indices")
                x = al.b.emit1(Op.SELECT, [x, t], {"axis": axis}, sub.span, name=name)
    return x


def _wrap(i, dim):
    i = as_expr(i)
    if i.is_number and i < 0:
        return dim + i
    return i


def _av(v):
    from archc.dsl.lower import _attr_value
    return _attr_value(v)


def _index_layer(al, inst: LayerInst, e: A.Index, scope, frame):
    if inst.copies is None:
        raise al.err(f"layer `{inst.name}` is not an array; it cannot be indexed", e.span,
                     hint=f"declare `layer {inst.name}[k] = ...` for k copies")
    if len(e.subs) != 1 or isinstance(e.subs[0], A.Slice):
        raise al.err("a layer array takes one integer index", e.span)
    i = al.static(e.subs[0], scope, frame, "a layer index")
    if i.kind != "int":
        raise al.err("a layer index must be an integer", e.subs[0].span)
    for val in al.sample_values(i.expr, frame):
        cv = substitute(as_expr(inst.copies), al.defaults)
        if val.is_number and cv.is_number and not (0 <= val < cv):
            raise al.err(f"index {val} is out of range for layer array `{inst.name}` of {cv} copies", e.subs[0].span)
    from dataclasses import replace
    return replace(inst, index=i.expr)


def _call(al, e: A.Call, scope, frame, hint):
    from archc.dsl.builtins import BUILTINS, call_builtin
    from archc.dsl.layers import PRIMITIVES, apply_layer
    from archc.dsl.memories import call_memory_method
    f = e.func
    if isinstance(f, A.Attr) and isinstance(f.base, A.Name):
        target = scope.lookup(f.base.id)
        if isinstance(target, MemInst):
            return call_memory_method(al, target, f.name, e, scope, frame, hint)
        if isinstance(target, LayerInst):
            raise al.err(f"layers have no methods; call the layer: `{f.base.id}(x)`", e.span)
    if isinstance(f, A.Name) and scope.lookup(f.id) is None:
        if f.id in BUILTINS:
            return call_builtin(al, f.id, e, scope, frame, hint)
        if f.id in PRIMITIVES or f.id in al.lw.blocks:
            raise al.err(f"`{f.id}` is a layer kind; declare an instance first", e.span,
                         hint=f"`layer my_{f.id.lower()} = {f.id}(...)`, then call `my_{f.id.lower()}(x)`")
        from archc.dsl.lower import suggest
        raise al.err(f"unknown function `{f.id}`", f.span,
                     hint=suggest(f.id, list(BUILTINS) + scope.names()))
    callee = lower_expr(al, f, scope, frame)
    if isinstance(callee, LayerInst):
        return apply_layer(al, callee, e, scope, frame, hint)
    raise al.err("only layers, memories and built-in functions can be called", f.span)


_DISPATCH = {A.Num: _num, A.Bool: _bool, A.Str: _str, A.Name: _name, A.ListLit: _list, A.BinOp: _binop,
             A.UnaryOp: _unary, A.Attr: _attr, A.Index: _index, A.Call: _call}


def static_or_tensor_args(al, e: A.Call, scope, frame) -> tuple[list[Any], dict[str, Any]]:
    args = [lower_expr(al, a, scope, frame) for a in e.args]
    kwargs: dict[str, Any] = {}
    for kw in e.kwargs:
        if kw.name in kwargs:
            raise al.err(f"argument `{kw.name}` is given twice", kw.span)
        kwargs[kw.name] = (lower_expr(al, kw.value, scope, frame), kw.value.span)
    return args, kwargs
