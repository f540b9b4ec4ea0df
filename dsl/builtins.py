"""Built-in functions of the language, as a table: name -> (signature, handler)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import sympy

from archc.dsl import ast as A
from archc.dsl.exprs import as_tensor, lower_expr
from archc.dsl.values import Static, StrVal
from archc.errors import ArchError, Span
from archc.ir.core import Value
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, as_expr, expr_str, simplified, substitute

_REQ = object()


@dataclass(frozen=True)
class Sig:
    params: tuple[tuple[str, Any], ...]   # (name, default or _REQ)
    variadic: bool = False


def bind_args(al, fname: str, sig: Sig, e: A.Call, scope, frame) -> dict[str, tuple[Any, Span]]:
    """Match a call's arguments to a signature; errors name the function and the argument."""
    out: dict[str, tuple[Any, Span]] = {}
    names = [p for p, _ in sig.params]
    if len(e.args) > len(names) and not sig.variadic:
        raise al.err(f"`{fname}` takes at most {len(names)} positional argument(s), got {len(e.args)}",
                     e.args[len(names)].span, hint=f"signature: {fname}({_sig_text(sig)})")
    for i, a in enumerate(e.args):
        key = names[i] if i < len(names) else f"*{i}"
        out[key] = (lower_expr(al, a, scope, frame), a.span)
    for kw in e.kwargs:
        if kw.name not in names:
            from archc.dsl.lower import suggest
            raise al.err(f"`{fname}` has no argument `{kw.name}`", kw.span,
                         hint=suggest(kw.name, names) or f"signature: {fname}({_sig_text(sig)})")
        if kw.name in out:
            raise al.err(f"argument `{kw.name}` of `{fname}` is given twice", kw.span)
        out[kw.name] = (lower_expr(al, kw.value, scope, frame), kw.value.span)
    for p, default in sig.params:
        if p not in out:
            if default is _REQ:
                raise al.err(f"`{fname}` is missing argument `{p}`", e.span,
                             hint=f"signature: {fname}({_sig_text(sig)})")
            out[p] = (default, e.span)
    return out


def _sig_text(sig: Sig) -> str:
    parts = [p if d is _REQ else f"{p}={_show(d)}" for p, d in sig.params]
    if sig.variadic:
        parts.append("...")
    return ", ".join(parts)


def _show(d):
    from archc.dsl import layers, memories
    if d is layers._NONE or d is memories._NONE:
        return "auto"               # an optional argument whose default is derived from the others
    if isinstance(d, Static):
        return expr_str(d.expr) if d.kind != "bool" else str(d.expr == sympy.true).lower()
    if isinstance(d, StrVal):
        return f'"{d.value}"'
    return repr(d)


def S(v, kind=None) -> Static:
    if isinstance(v, bool):
        return Static(sympy.true if v else sympy.false, "bool")
    if isinstance(v, float):
        return Static(sympy.Float(v), "float")
    return Static(sympy.Integer(v), kind or "int")


# -- argument coercions -------------------------------------------------------------------------


def tensor_arg(al, a, what="argument") -> Value:
    v, span = a
    return as_tensor(al, v, span, what)


def int_arg(al, a, what) -> sympy.Basic:
    v, span = a
    if not isinstance(v, Static) or v.kind != "int":
        raise al.err(f"{what} must be a compile-time integer", span)
    return v.expr


def num_arg(al, a, what):
    v, span = a
    if not isinstance(v, Static) or v.kind == "bool":
        raise al.err(f"{what} must be a compile-time number", span)
    from archc.dsl.lower import _attr_value
    return _attr_value(v.expr)


def bool_arg(al, a, what) -> bool:
    v, span = a
    if not isinstance(v, Static) or v.kind != "bool":
        raise al.err(f"{what} must be true or false", span)
    if v.expr not in (sympy.true, sympy.false):
        raise al.err(f"{what} must be a literal true or false", span,
                     hint="a layer's structure is fixed when it is declared; write two layers for two variants")
    return bool(v.expr)


def str_arg(al, a, what, choices=None) -> str:
    v, span = a
    if not isinstance(v, StrVal):
        raise al.err(f"{what} must be a string", span)
    if choices is not None and v.value not in choices:
        raise al.err(f"{what} must be one of {', '.join(map(repr, choices))}, got {v.value!r}", span)
    return v.value


def shape_arg(al, a, what) -> list:
    v, span = a
    if not isinstance(v, list):
        raise al.err(f"{what} must be a list like [B, T, d]", span)
    out = []
    for x in v:
        if not isinstance(x, Static) or x.kind != "int":
            raise al.err(f"{what} must contain compile-time integers", span)
        xv = substitute(as_expr(x.expr), al.defaults)
        if xv.is_number and xv < 0:
            from archc.dsl.lower import shown
            raise al.err(f"{what} has a negative dimension {shown(x.expr, xv)}", span,
                         hint="archc does not infer a dimension from -1; write every dimension out")
        out.append(_attr(x.expr))
    return out


def axis_arg(al, a, rank: int, what="axis") -> int:
    v, span = a
    ax = int_arg(al, a, what)
    if not ax.is_Integer:
        raise al.err(f"{what} must be a literal integer", span)
    ax = int(ax)
    if not -rank <= ax < rank:
        raise al.err(f"{what} {ax} is out of range for a tensor of rank {rank}", span)
    return ax % rank if rank else 0


def _attr(v):
    from archc.dsl.lower import _attr_value
    return _attr_value(v)


# -- handlers -------------------------------------------------------------------------------------

_STATIC_UNARY = {"sqrt": sympy.sqrt, "exp": sympy.exp, "log": sympy.log, "abs": sympy.Abs, "sin": sympy.sin,
                 "cos": sympy.cos}
_UNARY = {"exp": Op.EXP, "log": Op.LOG, "sqrt": Op.SQRT, "rsqrt": Op.RSQRT, "tanh": Op.TANH,
          "sigmoid": Op.SIGMOID, "relu": Op.RELU, "gelu": Op.GELU, "silu": Op.SILU, "softplus": Op.SOFTPLUS,
          "sin": Op.SIN, "cos": Op.COS, "abs": Op.ABS, "detach": Op.DETACH}


def _unary(name):
    def h(al, a, span, hint):
        v, vspan = a["x"]
        if isinstance(v, Static):
            if name in _STATIC_UNARY and v.kind != "bool":
                from archc.dsl.exprs import check_finite
                r = _STATIC_UNARY[name](v.expr)
                check_finite(al, r, span)          # sqrt(-1), log(0)
                return Static(r, "float")
            raise al.err(f"`{name}` of a compile-time value is not supported", span)
        x = as_tensor(al, v, vspan)
        if x.type.dtype is not F32 and name not in ("abs", "detach"):
            raise al.err(f"`{name}` needs a float tensor, got {x.type}", vspan, hint="convert with float(x)")
        return al.b.emit1(_UNARY[name], [x], {}, span, name=hint)
    return h


def _minmax(name):
    op = Op.MAXIMUM if name == "max" else Op.MINIMUM

    def h(al, a, span, hint):
        (x, xs), (y, ys) = a["a"], a["b"]
        if isinstance(x, Static) and isinstance(y, Static):
            f = sympy.Max if name == "max" else sympy.Min
            return Static(f(x.expr, y.expr), "float" if "float" in (x.kind, y.kind) else "int")
        tx = as_tensor(al, x, xs, like=y if isinstance(y, Value) else None)
        return al.b.emit1(op, [tx, as_tensor(al, y, ys, like=tx)], {}, span, name=hint)
    return h


def _where(al, a, span, hint):
    (cv, cs), (x, xs), (y, ys) = a["cond"], a["a"], a["b"]
    if all(isinstance(v, Static) for v in (cv, x, y)):       # compile time: a piecewise value
        if cv.kind != "bool":
            raise al.err("the condition of `where` must be a comparison or a bool", cs)
        if (x.kind == "bool") != (y.kind == "bool"):
            raise al.err("both branches of `where` must be numbers, or both bools", span)
        kind = "bool" if x.kind == "bool" else "float" if "float" in (x.kind, y.kind) else "int"
        return Static(sympy.piecewise_fold(sympy.Piecewise((x.expr, cv.expr), (y.expr, True))), kind)
    c = tensor_arg(al, a["cond"], "condition")
    (x, xs), (y, ys) = a["a"], a["b"]
    tx = as_tensor(al, x, xs, like=y if isinstance(y, Value) else c)
    ty = as_tensor(al, y, ys, like=tx)
    return al.b.emit1(Op.WHERE, [c, tx, ty], {}, span, name=hint)


def _reduce(op):
    def h(al, a, span, hint):
        x = tensor_arg(al, a["x"])
        attrs = {"axis": axis_arg(al, a["axis"], x.type.rank)}
        if "keepdim" in a:
            attrs["keepdim"] = bool_arg(al, a["keepdim"], "keepdim")
        return al.b.emit1(op, [x], attrs, span, name=hint)
    return h


def _topk_mask(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    k = int_arg(al, a["k"], "k")
    ax = axis_arg(al, a["axis"], x.type.rank)
    kv, nv = substitute(as_expr(k), al.defaults), substitute(as_expr(x.type.shape[ax]), al.defaults)
    if kv.is_number and (kv < 1 or (nv.is_number and kv > nv)):
        raise al.err(f"k = {kv} is out of range for an axis of size {expr_str(x.type.shape[ax])}"
                     + (f" = {nv}" if nv.is_number and not as_expr(x.type.shape[ax]).is_number else ""), a["k"][1])
    return al.b.emit1(Op.TOPK_MASK, [x], {"axis": ax, "k": _attr(k)}, span, name=hint)


def _l2(al, a, span, hint):
    return al.b.emit1(Op.L2_NORMALIZE, [tensor_arg(al, a["x"])], {"eps": num_arg(al, a["eps"], "eps")}, span, name=hint)


def _matmul(al, a, span, hint):
    return al.b.emit1(Op.MATMUL, [tensor_arg(al, a["a"]), tensor_arg(al, a["b"])], {}, span, name=hint)


_EINSUM = re.compile(r"^[a-z]+(,[a-z]+)*->[a-z]*$")


def _einsum(al, a, span, hint):
    eq = str_arg(al, a["equation"], "the einsum equation").replace(" ", "")
    if not _EINSUM.match(eq):
        raise al.err(f"malformed einsum equation {eq!r}", a["equation"][1], hint='e.g. "bhtd,bhsd->bhts"')
    ops = [as_tensor(al, v, s) for k, (v, s) in sorted(a.items(), key=lambda kv: _star(kv[0])) if k.startswith("*")]
    if not ops:
        raise al.err("einsum needs at least one operand", span)
    return al.b.emit1(Op.EINSUM, ops, {"equation": eq}, span, name=hint)


def _star(k):
    return int(k[1:]) if k.startswith("*") else -1


def _reshape(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    shape = shape_arg(al, a["shape"], "shape")
    n, m = sympy.prod(x.type.shape), sympy.prod([as_expr(s) for s in shape])
    ratio = substitute(simplified(as_expr(n) / as_expr(m)), al.defaults) if as_expr(m) != 0 else None
    if ratio is not None and ratio.is_number and ratio != 1:      # sizes differ by a factor, not just symbolically
        raise al.err(f"cannot reshape {x.type} to [{', '.join(expr_str(as_expr(d)) for d in shape)}]: "
                     f"{expr_str(n)} elements vs {expr_str(m)}", a["shape"][1],
                     hint="the element counts must match (checked at the parameter defaults)")
    return al.b.emit1(Op.RESHAPE, [x], {"shape": shape}, span, name=hint)


def _permute(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    perm = shape_arg(al, a["perm"], "perm")
    if not all(isinstance(p, int) for p in perm):
        raise al.err("perm must list literal axes", a["perm"][1])
    return al.b.emit1(Op.PERMUTE, [x], {"perm": perm}, span, name=hint)


def _transpose(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    i = axis_arg(al, a["a"], x.type.rank, "first axis")
    j = axis_arg(al, a["b"], x.type.rank, "second axis")
    perm = list(range(x.type.rank))
    perm[i], perm[j] = perm[j], perm[i]
    return al.b.emit1(Op.PERMUTE, [x], {"perm": perm}, span, name=hint)


def _concat(al, a, span, hint):
    v, vspan = a["xs"]
    if not isinstance(v, list) or not v:
        raise al.err("concat takes a non-empty list of tensors: concat([a, b], axis=1)", vspan)
    xs = [as_tensor(al, x, vspan) for x in v]
    return al.b.emit1(Op.CONCAT, xs, {"axis": axis_arg(al, a["axis"], xs[0].type.rank)}, span, name=hint)


def _unsqueeze(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    return al.b.emit1(Op.UNSQUEEZE, [x], {"axis": axis_arg(al, a["axis"], x.type.rank + 1)}, span, name=hint)


def _broadcast(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    shape = shape_arg(al, a["shape"], "shape")
    if len(shape) < x.type.rank:
        raise al.err(f"cannot broadcast {x.type} to [{', '.join(expr_str(as_expr(d)) for d in shape)}]: "
                     "the target has fewer dimensions", a["shape"][1], hint="broadcasting adds or expands dimensions; "
                     "use reshape or a reduction to remove them")
    return al.b.emit1(Op.BROADCAST, [x], {"shape": shape}, span, name=hint)


def _split_heads(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    h = int_arg(al, a["heads"], "heads")
    if x.type.rank < 1:
        raise al.err(f"split_heads splits the last dimension, but its argument is a scalar ({x.type})",
                     a["x"][1], hint="split a tensor such as f32[B, T, d]")
    _check_divides(al, x.type.shape[-1], h, a["heads"][1], "the last dimension", "heads")
    return al.b.emit1(Op.SPLIT_HEADS, [x], {"heads": _attr(h)}, span, name=hint)


def _check_divides(al, n, k, span, what_n, what_k):
    nv, kv = substitute(as_expr(n), al.defaults), substitute(as_expr(k), al.defaults)
    if nv.is_number and kv.is_number and (kv == 0 or not (nv / kv).is_Integer):
        from archc.dsl.lower import shown
        raise al.err(f"{what_n} ({shown(n, nv)}) is not divisible by {what_k} ({shown(k, kv)})", span)


def _merge_heads(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    if x.type.rank < 2:
        raise al.err(f"merge_heads merges the last two dimensions, but its argument has rank {x.type.rank} "
                     f"({x.type})", a["x"][1], hint="merge a tensor such as f32[B, T, H, Dh]")
    return al.b.emit1(Op.MERGE_HEADS, [x], {}, span, name=hint)


def _gather(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    idx = tensor_arg(al, a["index"])
    return al.b.emit1(Op.GATHER, [x, idx], {"axis": axis_arg(al, a["axis"], x.type.rank)}, span, name=hint)


def _fill(value):
    def h(al, a, span, hint):
        shape = shape_arg(al, a["shape"], "shape")
        v = value if value is not None else num_arg(al, a["value"], "value")
        dtype = "f32"
        if "dtype" in a:
            dtype = str_arg(al, a["dtype"], "dtype", ("f32", "i64", "bool"))
        if not isinstance(v, sympy.Basic):        # symbolic values stay expressions, evaluated at run time
            v = bool(v) if dtype == "bool" else int(v) if dtype == "i64" else float(v)
        return al.b.emit1(Op.FULL, [], {"shape": shape, "value": v, "dtype": dtype}, span, name=hint)
    return h


def _floor(al, a, span, hint):
    """floor of a compile-time number: an int (e.g. a schedule picking a depth from a uniform draw)."""
    v, vspan = a["x"]
    if not isinstance(v, Static) or v.kind == "bool":
        raise al.err("`floor` takes a compile-time number", vspan,
                     hint="it computes integers for sizes, depths and schedules; tensors have no floor op")
    return Static(sympy.floor(v.expr), "int")


def _arange(al, a, span, hint):
    return al.b.emit1(Op.ARANGE, [], {"n": _attr(int_arg(al, a["n"], "n"))}, span, name=hint)


def _cast(dtype):
    def h(al, a, span, hint):
        v, vspan = a["x"]
        if isinstance(v, Static):
            if dtype == "f32":
                return Static(v.expr, "float") if v.kind != "bool" else Static(sympy.Integer(int(v.expr == sympy.true)), "float")
            if dtype == "i64" and v.kind != "bool":
                if v.kind == "int":
                    return v
                if not v.expr.is_number:
                    raise al.err("int() of a symbolic value is ambiguous", vspan, hint="use `//` for floor division")
                return Static(sympy.Integer(int(float(v.expr))), "int")     # truncation, as for tensors
        x = as_tensor(al, v, vspan)
        return al.b.emit1(Op.CAST, [x], {"dtype": dtype}, span, name=hint)
    return h


def _linear_scan(al, a, span, hint):
    ta, tb, h0 = (tensor_arg(al, a[k]) for k in ("a", "b", "h0"))
    return al.b.emit1(Op.LINEAR_SCAN, [ta, tb, h0], {"axis": axis_arg(al, a["axis"], ta.type.rank)}, span, name=hint)


def _attend(al, a, span, hint):
    q, k, v = (tensor_arg(al, a[x]) for x in ("q", "k", "v"))
    ins = [q, k, v]
    attrs: dict[str, Any] = {"causal": bool_arg(al, a["causal"], "causal"), "window": _attr(int_arg(al, a["window"], "window")),
                             "prefix": _attr(int_arg(al, a["prefix"], "prefix"))}
    mv, ms = a["mask"]
    if not (isinstance(mv, Static) and mv.kind == "bool" and mv.expr == sympy.false):
        m = as_tensor(al, mv, ms, "mask")
        if m.type.dtype is not BOOL:
            raise al.err(f"an attention mask must be bool, got {m.type}", ms)
        ins.append(m)
        attrs["has_mask"] = True
    pos = getattr(al, "_positions_hint", None)
    if pos is not None and min(q.type.rank, k.type.rank) >= 2 and q.type.shape[1] == pos.type.shape[1] \
            and k.type.shape[1] == pos.type.shape[1]:
        ins += [pos, pos]          # inside a route: mask by the tokens' original positions
        attrs["has_pos"] = True
    return al.b.emit1(Op.ATTEND, ins, attrs, span, name=hint)


def _lookup(al, a, span, hint):
    table, ids = tensor_arg(al, a["table"], "table"), tensor_arg(al, a["ids"], "ids")
    return al.b.emit1(Op.EMBEDDING, [ids, table], {}, span, name=hint)


def _rope(al, a, span, hint):
    x = tensor_arg(al, a["x"])
    ins = [x]
    if al_positions := getattr(al, "_positions_hint", None):
        ins.append(al_positions)
    return al.b.emit1(Op.ROPE, ins, {"base": num_arg(al, a["base"], "base")}, span, name=hint)


X = (("x", _REQ),)
AXIS_LAST = (("x", _REQ), ("axis", S(-1)), ("keepdim", S(False)))
BUILTINS: dict[str, tuple[Sig, Callable]] = {
    **{n: (Sig(X), _unary(n)) for n in _UNARY},
    "max": (Sig((("a", _REQ), ("b", _REQ))), _minmax("max")),
    "min": (Sig((("a", _REQ), ("b", _REQ))), _minmax("min")),
    "where": (Sig((("cond", _REQ), ("a", _REQ), ("b", _REQ))), _where),
    "sum": (Sig(AXIS_LAST), _reduce(Op.SUM)),
    "mean": (Sig(AXIS_LAST), _reduce(Op.MEAN)),
    "amax": (Sig(AXIS_LAST), _reduce(Op.AMAX)),
    "logsumexp": (Sig(AXIS_LAST), _reduce(Op.LOGSUMEXP)),
    "argmax": (Sig(AXIS_LAST), _reduce(Op.ARGMAX)),
    "softmax": (Sig((("x", _REQ), ("axis", S(-1)))), _reduce(Op.SOFTMAX)),
    "cumsum": (Sig((("x", _REQ), ("axis", S(1)))), _reduce(Op.CUMSUM)),
    "topk_mask": (Sig((("x", _REQ), ("k", _REQ), ("axis", S(-1)))), _topk_mask),
    "l2_normalize": (Sig((("x", _REQ), ("eps", S(1e-6)))), _l2),
    "matmul": (Sig((("a", _REQ), ("b", _REQ))), _matmul),
    "einsum": (Sig((("equation", _REQ),), variadic=True), _einsum),
    "reshape": (Sig((("x", _REQ), ("shape", _REQ))), _reshape),
    "permute": (Sig((("x", _REQ), ("perm", _REQ))), _permute),
    "transpose": (Sig((("x", _REQ), ("a", S(-2)), ("b", S(-1)))), _transpose),
    "concat": (Sig((("xs", _REQ), ("axis", S(-1)))), _concat),
    "unsqueeze": (Sig((("x", _REQ), ("axis", _REQ))), _unsqueeze),
    "broadcast": (Sig((("x", _REQ), ("shape", _REQ))), _broadcast),
    "split_heads": (Sig((("x", _REQ), ("heads", _REQ))), _split_heads),
    "merge_heads": (Sig(X), _merge_heads),
    "gather": (Sig((("x", _REQ), ("index", _REQ), ("axis", S(1)))), _gather),
    "zeros": (Sig((("shape", _REQ),)), _fill(0.0)),
    "ones": (Sig((("shape", _REQ),)), _fill(1.0)),
    "full": (Sig((("shape", _REQ), ("value", _REQ))), _fill(None)),
    "arange": (Sig((("n", _REQ),)), _arange),
    "floor": (Sig(X), _floor),
    "float": (Sig(X), _cast("f32")),
    "int": (Sig(X), _cast("i64")),
    "linear_scan": (Sig((("a", _REQ), ("b", _REQ), ("h0", _REQ), ("axis", S(1)))), _linear_scan),
    "attend": (Sig((("q", _REQ), ("k", _REQ), ("v", _REQ), ("causal", S(False)), ("window", S(0)),
                    ("prefix", S(0)), ("mask", S(False)))), _attend),
    "rope": (Sig((("x", _REQ), ("base", S(10000.0)))), _rope),
    "lookup": (Sig((("table", _REQ), ("ids", _REQ))), _lookup),
}
# zeros/ones/full also take dtype=
for _n in ("zeros", "ones", "full"):
    _sig, _h = BUILTINS[_n]
    BUILTINS[_n] = (Sig(_sig.params + (("dtype", StrVal("f32", Span("<builtin>", 1, 1, 1, 1))),)), _h)


def call_builtin(al, name: str, e: A.Call, scope, frame, hint):
    sig, handler = BUILTINS[name]
    args = bind_args(al, name, sig, e, scope, frame)
    al._positions_hint = frame.positions
    try:
        return handler(al, args, e.span, hint)
    finally:
        al._positions_hint = None
