"""Primitive layers (a table) and the application of layers: primitives emit IR, blocks inline."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import sympy

from archc.dsl import ast as A
from archc.dsl.builtins import (_REQ, S, Sig, _check_divides, bind_args, bool_arg, int_arg, num_arg, str_arg,
                                tensor_arg)
from archc.dsl.lower import shown
from archc.dsl.values import LayerInst, Static, StrVal
from archc.errors import Span
from archc.ir.core import Value
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, as_expr, dims_equal, expr_str, substitute


@dataclass(frozen=True)
class Primitive:
    name: str
    ctor: Sig
    call: Sig
    apply: Callable
    summary: str
    validate: Callable | None = None


_NONE = Static(sympy.Integer(-1), "int")   # "not given" marker for optional int arguments


def _given(a, key) -> bool:
    v = a[key][0]
    return not (isinstance(v, Static) and v is _NONE)


def _lin(al, frame, x: Value, name: str, out, inp, span, bias=False):
    """A sub-projection of a primitive: weight `name.weight` [out, in], normal(std = in^-1/2)."""
    w = al.param(frame, f"{name}.weight", (out, inp), "normal", span, std=as_expr(inp) ** sympy.Rational(-1, 2))
    ins = [x, w]
    if bias:
        ins.append(al.param(frame, f"{name}.bias", (out,), "zeros", span))
    return al.b.emit1(Op.LINEAR, ins, {}, span, name=name.split(".")[-1])


# -- primitives -----------------------------------------------------------------------------------


def _embedding(al, frame, c, a, span, hint):
    ids = tensor_arg(al, a["ids"], "token ids")
    if ids.type.dtype is not I64:
        raise al.err(f"embedding ids must be i64, got {ids.type}", a["ids"][1])
    w = al.param(frame, "weight", (c["vocab"], c["d"]), "normal", span, std=c["std"])
    return al.b.emit1(Op.EMBEDDING, [ids, w], {}, span, name=hint)


def _linear(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["in_features"], a["x"][1], "Linear")
    init = c["init"]
    std = c["std"] if c["std"] != -1 else as_expr(c["in_features"]) ** sympy.Rational(-1, 2)
    init_args = {"std": std} if init == "normal" else {}
    w = al.param(frame, "weight", (c["out_features"], c["in_features"]), init, span, **init_args)
    ins = [x, w]
    if c["bias"]:
        if c["bias_init"] == 0:
            ins.append(al.param(frame, "bias", (c["out_features"],), "zeros", span))
        else:
            ins.append(al.param(frame, "bias", (c["out_features"],), "const", span, value=c["bias_init"]))
    return al.b.emit1(Op.LINEAR, ins, {}, span, name=hint)


def _check_last(al, x: Value, d, span, what):
    if x.type.rank == 0 or dims_equal(x.type.shape[-1], d, al.defaults) is False:
        raise al.err(f"{what} expects inputs with last dimension {expr_str(d)}, got {x.type}", span)


def _rmsnorm(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["d"], a["x"][1], "RMSNorm")
    w = al.param(frame, "weight", (c["d"],), "ones", span)
    return al.b.emit1(Op.RMS_NORM, [x, w], {"eps": c["eps"]}, span, name=hint)


def _layernorm(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["d"], a["x"][1], "LayerNorm")
    w = al.param(frame, "weight", (c["d"],), "ones", span)
    b = al.param(frame, "bias", (c["d"],), "zeros", span)
    return al.b.emit1(Op.LAYER_NORM, [x, w, b], {"eps": c["eps"]}, span, name=hint)


_ACTS = {"gelu": Op.GELU, "relu": Op.RELU, "silu": Op.SILU, "tanh": Op.TANH, "sigmoid": Op.SIGMOID}


def _mlp(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["d"], a["x"][1], "MLP")
    out = c["out"] if c["out"] != -1 else c["d"]
    h = _lin(al, frame, x, "fc1", c["hidden"], c["d"], span, bias=c["bias"])
    h = al.b.emit1(_ACTS[c["act"]], [h], {}, span, name=c["act"])
    return _lin(al, frame, h, "fc2", out, c["hidden"], span, bias=c["bias"])


def _swiglu(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["d"], a["x"][1], "SwiGLU")
    g = _lin(al, frame, x, "gate", c["hidden"], c["d"], span)
    u = _lin(al, frame, x, "up", c["hidden"], c["d"], span)
    h = al.b.emit1(Op.MUL, [al.b.emit1(Op.SILU, [g], {}, span, name="silu"), u], {}, span, name="h")
    return _lin(al, frame, h, "down", c["d"], c["hidden"], span)


def _attention_validate(al, c, spans):
    d, heads = c["d"], c["heads"]
    kvh = c["kv_heads"] if c["kv_heads"] != -1 else heads
    if c["head_dim"] == -1:
        _check_divides(al, d, heads, spans["heads"], "the model width d", "heads")
    _check_divides(al, heads, kvh, spans.get("kv_heads", spans["heads"]), "heads", "kv_heads")
    for key in ("window", "prefix"):
        v = substitute(as_expr(c[key]), al.defaults)
        if v.is_number and v < 0:
            raise al.err(f"{key} must be >= 0, got {v}", spans[key])


def _attention(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["d"], a["x"][1], "Attention")
    heads = c["heads"]
    kvh = c["kv_heads"] if c["kv_heads"] != -1 else heads
    hd = c["head_dim"] if c["head_dim"] != -1 else as_expr(c["d"]) / as_expr(heads)
    ctx_v, ctx_span = a["context"]
    cross = not (isinstance(ctx_v, Static) and ctx_v.kind == "bool")
    src = tensor_arg(al, a["context"], "context") if cross else x
    if cross:
        _check_last(al, src, c["d"], ctx_span, "Attention context")
        if c["causal"] and "causal" in c.get("given", ()):
            raise al.err("a cross-attention (`context`) has no causal order between its queries and the context "
                         "positions, so `causal = true` cannot hold", ctx_span,
                         hint="declare the layer with `causal = false`: a cross-attention reads every context "
                              "position (SPEC §7)")
    d = c["d"]
    q = _lin(al, frame, x, "q", as_expr(heads) * hd, d, span)
    k = _lin(al, frame, src, "k", as_expr(kvh) * hd, d, span)
    v = _lin(al, frame, src, "v", as_expr(kvh) * hd, d, span)
    q = al.b.emit1(Op.SPLIT_HEADS, [q], {"heads": _av(heads)}, span, name="q")
    k = al.b.emit1(Op.SPLIT_HEADS, [k], {"heads": _av(kvh)}, span, name="k")
    v = al.b.emit1(Op.SPLIT_HEADS, [v], {"heads": _av(kvh)}, span, name="v")
    pos = frame.positions
    if c["rope"] and not cross:
        q = al.b.emit1(Op.ROPE, [q] + ([pos] if pos is not None else []), {"base": c["rope_base"]}, span, name="q")
        k = al.b.emit1(Op.ROPE, [k] + ([pos] if pos is not None else []), {"base": c["rope_base"]}, span, name="k")
    ins = [q, k, v]
    attrs: dict[str, Any] = {"causal": bool(c["causal"]) and not cross, "window": _av(c["window"]),
                             "prefix": _av(c["prefix"]), "site": frame.path}
    if frame.copies is not None:
        attrs["copy"] = _av(frame.index)          # which copy of an arrayed layer this site is
    mv, ms = a["mask"]
    if not (isinstance(mv, Static) and mv.kind == "bool"):
        m = tensor_arg(al, a["mask"], "mask")
        if m.type.dtype is not BOOL:
            raise al.err(f"an attention mask must be bool, got {m.type}", ms)
        ins.append(m)
        attrs["has_mask"] = True
    if pos is not None and not cross:
        ins.extend([pos, pos])
        attrs["has_pos"] = True
    al.attention_sites.setdefault(frame.path, {"heads": heads, "kv_heads": kvh, "head_dim": hd, "span": span,
                                               "cross": cross, "loops": dict(frame.loop_vars),
                                               "copies": frame.copies})
    o = al.b.emit1(Op.ATTEND, ins, attrs, span, name="attn")
    o = al.b.emit1(Op.MERGE_HEADS, [o], {}, span, name="attn")
    return _lin(al, frame, o, "o", d, as_expr(heads) * hd, span)


def _lstm(al, frame, c, a, span, hint):
    x, h, cc = (tensor_arg(al, a[k]) for k in ("x", "h", "c"))
    n, inp = c["hidden"], c["input"]
    _check_last(al, x, inp, a["x"][1], "LSTMCell")
    _check_last(al, h, n, a["h"][1], "LSTMCell state h")
    gx = _lin(al, frame, x, "ih", 4 * as_expr(n), inp, span)
    gh = _lin(al, frame, h, "hh", 4 * as_expr(n), n, span)
    g = al.b.emit1(Op.ADD, [gx, gh], {}, span, name="gates")
    g = al.b.emit1(Op.ADD, [g, al.param(frame, "bias", (4 * as_expr(n),), "zeros", span)], {}, span, name="gates")
    ax = g.type.rank - 1
    parts = [al.b.emit1(Op.SLICE, [g], {"axis": ax, "start": _av(i * as_expr(n)), "stop": _av((i + 1) * as_expr(n))},
                        span, name=nm) for i, nm in enumerate(("i", "f", "g", "o"))]
    i, f, gg, o = parts
    sig = lambda t, nm: al.b.emit1(Op.SIGMOID, [t], {}, span, name=nm)
    c_new = al.b.emit1(Op.ADD, [al.b.emit1(Op.MUL, [sig(f, "f"), cc], {}, span, name="fc"),
                                al.b.emit1(Op.MUL, [sig(i, "i"), al.b.emit1(Op.TANH, [gg], {}, span, name="g")], {},
                                           span, name="ig")], {}, span, name="c")
    h_new = al.b.emit1(Op.MUL, [sig(o, "o"), al.b.emit1(Op.TANH, [c_new], {}, span, name="tc")], {}, span, name="h")
    return (h_new, c_new)


def _gru(al, frame, c, a, span, hint):
    x, h = tensor_arg(al, a["x"]), tensor_arg(al, a["h"])
    n, inp = c["hidden"], c["input"]
    _check_last(al, x, inp, a["x"][1], "GRUCell")
    _check_last(al, h, n, a["h"][1], "GRUCell state h")
    gx = _lin(al, frame, x, "ih", 3 * as_expr(n), inp, span, bias=True)
    gh = _lin(al, frame, h, "hh", 3 * as_expr(n), n, span, bias=True)
    ax = gx.type.rank - 1
    sl = lambda t, i, nm: al.b.emit1(Op.SLICE, [t], {"axis": ax, "start": _av(i * as_expr(n)),
                                                      "stop": _av((i + 1) * as_expr(n))}, span, name=nm)
    r = al.b.emit1(Op.SIGMOID, [al.b.emit1(Op.ADD, [sl(gx, 0, "xr"), sl(gh, 0, "hr")], {}, span)], {}, span, name="r")
    z = al.b.emit1(Op.SIGMOID, [al.b.emit1(Op.ADD, [sl(gx, 1, "xz"), sl(gh, 1, "hz")], {}, span)], {}, span, name="z")
    nn_ = al.b.emit1(Op.TANH, [al.b.emit1(Op.ADD, [sl(gx, 2, "xn"), al.b.emit1(Op.MUL, [r, sl(gh, 2, "hn")], {}, span)],
                                          {}, span)], {}, span, name="n")
    # h' = n + z * (h - n)  ==  (1 - z) * n + z * h
    return al.b.emit1(Op.ADD, [nn_, al.b.emit1(Op.MUL, [z, al.b.emit1(Op.SUB, [h, nn_], {}, span)], {}, span)], {},
                      span, name=hint or "h")


def _conv1d(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["input"], a["x"][1], "Conv1d")
    k = c["kernel"]
    w = al.param(frame, "weight", (c["output"], c["input"], k), "normal", span,
                 std=(as_expr(c["input"]) * as_expr(k)) ** sympy.Rational(-1, 2))
    ins = [x, w]
    if c["bias"]:
        ins.append(al.param(frame, "bias", (c["output"],), "zeros", span))
    return al.b.emit1(Op.CONV1D, ins, {"causal": bool(c["causal"])}, span, name=hint)


def _layerscale(al, frame, c, a, span, hint):
    x = tensor_arg(al, a["x"])
    _check_last(al, x, c["d"], a["x"][1], "LayerScale")
    g = al.param(frame, "gamma", (c["d"],), "const", span, value=c["init"])
    return al.b.emit1(Op.MUL, [x, g], {}, span, name=hint)


def _av(v):
    from archc.dsl.lower import _attr_value
    return _attr_value(as_expr(v) if not isinstance(v, (bool, str)) else v)


_X = (("x", _REQ),)
PRIMITIVES: dict[str, Primitive] = {p.name: p for p in [
    Primitive("Embedding", Sig((("vocab", _REQ), ("d", _REQ), ("std", S(1.0)))), Sig((("ids", _REQ),)), _embedding,
              "token embedding table [vocab, d]"),
    Primitive("Linear", Sig((("in_features", _REQ), ("out_features", _REQ), ("bias", S(False)), ("init", StrVal("normal", None)),
                             ("std", _NONE), ("bias_init", S(0.0)))), Sig(_X), _linear,
              "y = x W^T (+ b); W is [out, in], init normal(std = in^-1/2) or zeros"),
    Primitive("RMSNorm", Sig((("d", _REQ), ("eps", S(1e-6)))), Sig(_X), _rmsnorm, "RMS normalisation with a gain"),
    Primitive("LayerNorm", Sig((("d", _REQ), ("eps", S(1e-5)))), Sig(_X), _layernorm, "layer normalisation"),
    Primitive("MLP", Sig((("d", _REQ), ("hidden", _REQ), ("out", _NONE), ("act", StrVal("gelu", None)), ("bias", S(False)))),
              Sig(_X), _mlp, "fc2(act(fc1(x)))"),
    Primitive("SwiGLU", Sig((("d", _REQ), ("hidden", _REQ))), Sig(_X), _swiglu, "down(silu(gate(x)) * up(x))"),
    Primitive("Attention", Sig((("d", _REQ), ("heads", _REQ), ("kv_heads", _NONE), ("head_dim", _NONE), ("causal", S(True)),
                                ("window", S(0)), ("prefix", S(0)), ("rope", S(True)), ("rope_base", S(10000.0)))),
              Sig((("x", _REQ), ("context", S(False)), ("mask", S(False)))), _attention,
              "multi-head / grouped-query attention with RoPE, causal, sliding-window and prefix masks",
              validate=_attention_validate),
    Primitive("LSTMCell", Sig((("input", _REQ), ("hidden", _REQ))), Sig((("x", _REQ), ("h", _REQ), ("c", _REQ))), _lstm,
              "one LSTM step: (h, c) -> (h', c')"),
    Primitive("GRUCell", Sig((("input", _REQ), ("hidden", _REQ))), Sig((("x", _REQ), ("h", _REQ))), _gru,
              "one GRU step: h -> h'"),
    Primitive("Conv1d", Sig((("input", _REQ), ("output", _REQ), ("kernel", _REQ), ("causal", S(True)), ("bias", S(True)))),
              Sig(_X), _conv1d, "1-D convolution over the sequence axis"),
    Primitive("LayerScale", Sig((("d", _REQ), ("init", S(1e-4)))), Sig(_X), _layerscale, "x * diag(gamma), gamma = init"),
]}

_FLOAT_KEYS = {"std", "eps", "bias_init", "init", "rope_base"}
_CHOICES = {("Linear", "init"): ("normal", "zeros", "xavier"), ("MLP", "act"): tuple(_ACTS)}


def bind_ctor(al, kind: str, decl, scope, frame) -> dict[str, Any]:
    """Evaluate a primitive layer's constructor arguments (all compile-time)."""
    prim = PRIMITIVES[kind]
    call = A.Call(func=A.Name(id=kind, span=decl.span), args=decl.args, kwargs=decl.kwargs, span=decl.span)
    raw = bind_args(al, kind, prim.ctor, call, scope, frame)
    out: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    for key, (v, span) in raw.items():
        spans[key] = span
        default = dict(prim.ctor.params)[key]
        if isinstance(default, StrVal) or isinstance(v, StrVal):
            out[key] = str_arg(al, (v, span), f"`{key}` of {kind}", _CHOICES.get((kind, key)))
        elif v is _NONE:
            out[key] = -1
        elif isinstance(v, Static) and v.kind == "bool":
            out[key] = bool_arg(al, (v, span), f"`{key}` of {kind}")
        elif isinstance(v, Static):
            if (isinstance(default, Static) and default.kind == "float") or key in _FLOAT_KEYS:
                out[key] = num_arg(al, (v, span), f"`{key}` of {kind}")
            else:
                out[key] = int_arg(al, (v, span), f"`{key}` of {kind}")
                val = substitute(out[key], al.defaults)
                if val.is_number and val < 1 and key not in ("window", "prefix"):
                    raise al.err(f"`{key}` of {kind} must be at least 1, got {shown(out[key], val)}", span)
        else:
            raise al.err(f"`{key}` of {kind} must be a compile-time value", span)
    if prim.validate:
        prim.validate(al, out, spans)
    defaults = dict(prim.ctor.params)
    out["given"] = frozenset(k for k, (v, _) in raw.items() if v is not defaults[k])   # written, not defaulted
    return out


def apply_layer(al, inst: LayerInst, e: A.Call, scope, frame, hint):
    """Apply a layer instance at a call site: primitives emit ops, blocks are inlined."""
    copies = inst.copies if inst.copies is not None else inst.outer_copies
    index = inst.index if inst.copies is not None else inst.outer_index
    if inst.copies is not None and inst.index is None:
        raise al.err(f"layer array `{inst.name}` needs an index here", e.span,
                     hint=f"call `{inst.name}[i](x)` or add `share {inst.name} as cycle` to the enclosing repeat")
    inner = replace(frame, path=inst.path, copies=copies, index=index)
    if inst.block is None:
        prim = PRIMITIVES[inst.kind]
        a = bind_args(al, f"{inst.name} ({inst.kind})", prim.call, e, scope, frame)
        return prim.apply(al, inner, inst.args, a, e.span, hint)
    from archc.dsl.stmts import StmtLowering
    return StmtLowering(al).apply_block(inst, e, scope, frame, inner, hint)
