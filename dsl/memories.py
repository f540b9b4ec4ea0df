"""Memory declarations (`memory M = Kind(...)`) and their methods; state is explicit SSA values.

A memory's state is a tuple of tensors rebound by its mutating methods, so loops and scans carry
it like any variable reassigned in their body.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import sympy

from archc.dsl import ast as A
from archc.dsl.builtins import _REQ, S, Sig, bind_args, int_arg, num_arg, str_arg, tensor_arg
from archc.dsl.values import MemInst, Static, StrVal
from archc.ir.core import Value
from archc.ir.ops import Op
from archc.ir.shapes import BOOL, F32, I64, TensorType, as_expr, dims_equal, expr_str, substitute


@dataclass(frozen=True)
class MemoryKind:
    name: str
    ctor: Sig
    init: Callable            # (al, frame, ctor, span) -> (state values, extra)
    methods: dict[str, tuple[Sig, Callable, bool]]   # name -> (sig, handler, mutates)
    summary: str


def _batch(al, span):
    if al.batch is None:
        raise al.err("a memory needs the batch dimension; declare an input first", span)
    return al.batch


# -- NeuralMemory: an MLP whose weights are per-sample state updated by an inner gradient step -------


#: the deepest NeuralMemory MLP (the fuzzer found 268435456, which exhausted memory building its layer list)
MAX_MEMORY_LAYERS = 64


def _nm_shapes(c):
    d, h, n = c["d"], c["hidden"], int(c["layers"])
    if n == 1:
        return [(d, d)]
    return [(h, d)] + [(h, h)] * (n - 2) + [(d, h)]


def _nm_init(al, frame, c, span):
    B = _batch(al, span)
    ws, ms = [], []
    for i, (o, inp) in enumerate(_nm_shapes(c)):
        w = al.param(frame, f"w{i}", (o, inp), "normal", span, std=as_expr(inp) ** sympy.Rational(-1, 2))
        if c["retention"] == "kl":         # the weights live on the simplex (per row): the parameters are logits
            w = al.b.emit1(Op.SOFTMAX, [w], {"axis": -1}, span, name=f"{frame.path}_simplex{i}")
        ws.append(al.b.emit1(Op.BROADCAST, [w], {"shape": [_av(B), _av(o), _av(inp)]}, span, name=f"{frame.path}_w{i}"))
        ms.append(al.b.emit1(Op.FULL, [], {"shape": [_av(B), _av(o), _av(inp)], "value": 0.0, "dtype": "f32"}, span,
                             name=f"{frame.path}_m{i}"))
    return tuple(ws + ms), {}


def _nm_attrs(c):
    attrs = {"layers": int(c["layers"]), "act": c["act"], "residual": bool(c["residual"])}
    if c["retention"] != "l2":
        attrs["retention"] = c["retention"]
    if c["retention"] == "lq":
        attrs["q"] = float(c["q"])
    return attrs


def _nm_write_attrs(c):
    attrs = dict(_nm_attrs(c), loss=c["loss"])
    if c["loss"] == "lp":
        attrs["p"] = float(c["p"])
    if c["loss"] == "yaad":
        attrs["has_delta"] = True
    return attrs


def _nm_read(al, mem, c, a, span, hint):
    q = tensor_arg(al, a["q"], "query")
    _check_last(al, q, c["d"], a["q"][1])
    n = int(c["layers"])
    return al.b.emit1(Op.MEM_READ, [q, *mem.state[:n]], _nm_attrs(c), span, name=hint or "read"), None


def _nm_weights(al, mem, c, a, span, hint):
    """The current weights, [B, out, in] each (layer order): the memory's state for inspection."""
    n = int(c["layers"])
    return (mem.state[0] if n == 1 else tuple(mem.state[:n])), None


def _nm_write(al, mem, c, a, span, hint):
    k, v = tensor_arg(al, a["k"], "keys"), tensor_arg(al, a["v"], "values")
    _check_last(al, k, c["d"], a["k"][1])
    _check_last(al, v, c["d"], a["v"][1])
    B = _batch(al, span)
    T = k.type.shape[1] if k.type.rank >= 2 else sympy.Integer(1)
    lr = _gate(al, a["lr"], (B, T), span, "lr")
    mom = _gate(al, a["momentum"], (B,), span, "momentum")
    fg = _gate(al, a["forget"], (B,), span, "forget")
    n = int(c["layers"])
    extra = []
    if c["loss"] == "yaad":              # the per-token threshold between the l2 and l1 regimes
        extra = [_gate(al, a["delta"], (B, T), span, "delta")]
    elif not (isinstance(a["delta"][0], Static) and a["delta"][0] is _NO_DELTA):
        raise al.err("`delta` is the threshold of the \"yaad\" loss; this memory's loss is "
                     f"\"{c['loss']}\"", a["delta"][1])
    outs = al.b.emit(Op.MEM_WRITE, [k, v, lr, mom, fg, *mem.state, *extra], _nm_write_attrs(c), span,
                     names=[f"{mem.name}_w{i}" for i in range(n)] + [f"{mem.name}_m{i}" for i in range(n)])
    return None, tuple(outs)


def _gate(al, a, shape, span, what) -> Value:
    """A write-strength argument: a number (broadcast) or a tensor of the given shape."""
    v, vspan = a
    if isinstance(v, Static):
        return al.b.emit1(Op.FULL, [], {"shape": [_av(s) for s in shape], "value": _float(num_arg(al, a, what)),
                                         "dtype": "f32"}, vspan, name=what)
    t = tensor_arg(al, a, what)
    if t.type.rank != len(shape) or any(dims_equal(x, y, al.defaults) is False for x, y in zip(t.type.shape, shape)):
        want = "[" + ", ".join(expr_str(s) for s in shape) + "]"
        raise al.err(f"`{what}` must have shape {want}, got {t.type}", vspan,
                     hint="per-token rates are [B, T]; momentum and forget gates are per sample [B]")
    return t


def _float(v):
    return v if isinstance(v, sympy.Basic) else float(v)


def _check_last(al, x, d, span):
    if x.type.rank == 0 or dims_equal(x.type.shape[-1], d, al.defaults) is False:
        raise al.err(f"memory expects vectors of size {expr_str(d)}, got {x.type}", span)


# -- LinearMemory: a matrix state S [B, dv, dk] updated by outer products (linear attention) ---------


def _lm_init(al, frame, c, span):
    B = _batch(al, span)
    s = al.b.emit1(Op.FULL, [], {"shape": [_av(B), _av(c["dv"]), _av(c["dk"])], "value": 0.0, "dtype": "f32"}, span,
                   name=f"{frame.path}_S")
    return (s,), {}


def _lm_step(al, mem, c, a, span, hint):
    q, k, v = (tensor_arg(al, a[x]) for x in ("q", "k", "v"))
    _check_last(al, q, c["dk"], a["q"][1])
    _check_last(al, k, c["dk"], a["k"][1])
    _check_last(al, v, c["dv"], a["v"][1])
    y, s = al.b.emit(Op.LINEAR_ATTN, [q, k, v, mem.state[0]], {}, span, names=[hint or "y", f"{mem.name}_S"])
    return y, (s,)


def _lm_read(al, mem, c, a, span, hint):
    q = tensor_arg(al, a["q"])
    _check_last(al, q, c["dk"], a["q"][1])
    return al.b.emit1(Op.EINSUM, [mem.state[0], q], {"equation": "bvk,btk->btv"}, span, name=hint or "read"), None


def _lm_state(al, mem, c, a, span, hint):
    return mem.state[0], None


# -- Bank: a FIFO of per-sample entries (memory embeddings, cached states, chunk summaries) ----------


def _bank_init(al, frame, c, span):
    B = _batch(al, span)
    shape = [_av(B), _av(c["slots"])] + [_av(s) for s in c["shape"]]
    buf = al.b.emit1(Op.FULL, [], {"shape": shape, "value": 0.0, "dtype": "f32"}, span, name=f"{frame.path}_buf")
    cnt = al.b.emit1(Op.FULL, [], {"shape": [_av(B)], "value": 0, "dtype": "i64"}, span, name=f"{frame.path}_count")
    return (buf, cnt), {}


def _bank_push(al, mem, c, a, span, hint):
    v = tensor_arg(al, a["entry"], "entry")
    want = (mem.state[0].type.shape[0],) + mem.state[0].type.shape[2:]
    if v.type.rank != len(want) or any(dims_equal(x, y, al.defaults) is False for x, y in zip(v.type.shape, want)):
        raise al.err(f"bank `{mem.name}` holds entries of shape [{', '.join(expr_str(s) for s in want)}], got {v.type}",
                     a["entry"][1])
    buf, cnt = al.b.emit(Op.BANK_PUSH, [mem.state[0], mem.state[1], v], {}, span,
                         names=[f"{mem.name}_buf", f"{mem.name}_count"])
    return None, (buf, cnt)


def _bank_items(al, mem, c, a, span, hint):
    return mem.state[0], None


def _bank_valid(al, mem, c, a, span, hint):
    return al.b.emit1(Op.BANK_VALID, [mem.state[0], mem.state[1]], {}, span, name=hint or "valid"), None


def _av(v):
    from archc.dsl.lower import _attr_value
    return _attr_value(as_expr(v))


_NONE = Static(sympy.Integer(-1), "int")
_NO_DELTA = Static(sympy.Float(1.0), "float")
MEMORIES: dict[str, MemoryKind] = {m.name: m for m in [
    MemoryKind("NeuralMemory",
               Sig((("d", _REQ), ("hidden", _NONE), ("layers", S(2)), ("act", StrVal("gelu", None)),
                    ("residual", S(False)), ("loss", StrVal("mse", None)), ("p", S(3.0)),
                    ("retention", StrVal("l2", None)), ("q", S(4.0)))),
               _nm_init,
               {"read": (Sig((("q", _REQ),)), _nm_read, False),
                "weights": (Sig(()), _nm_weights, False),
                "write": (Sig((("k", _REQ), ("v", _REQ), ("lr", _REQ), ("momentum", S(0.0)), ("forget", S(0.0)),
                               ("delta", _NO_DELTA))),
                          _nm_write, True)},
               "an MLP memory trained at test time: S = eta*S - grad(lr*loss(M(k), v)); M = (1-forget)*M + S"),
    MemoryKind("LinearMemory", Sig((("dk", _REQ), ("dv", _REQ))), _lm_init,
               {"step": (Sig((("q", _REQ), ("k", _REQ), ("v", _REQ))), _lm_step, True),
                "read": (Sig((("q", _REQ),)), _lm_read, False),
                "state": (Sig(()), _lm_state, False)},
               "a matrix memory S += v k^T read as S q (causal linear attention within a segment)"),
    MemoryKind("Bank", Sig((("slots", _REQ), ("shape", _REQ))), _bank_init,
               {"push": (Sig((("entry", _REQ),)), _bank_push, True),
                "items": (Sig(()), _bank_items, False),
                "valid": (Sig(()), _bank_valid, False)},
               "a FIFO of `slots` entries of a given shape per sample"),
]}

MUTATING = {(k, m) for k, mk in MEMORIES.items() for m, (_, _, mut) in mk.methods.items() if mut}


def declare_memory(al, decl: A.MemoryDecl, scope, frame) -> MemInst:
    from archc.dsl.lower import suggest
    kind = MEMORIES.get(decl.kind)
    if kind is None:
        raise al.err(f"unknown memory kind `{decl.kind}`", decl.kind_span, hint=suggest(decl.kind, MEMORIES)
                     or f"memory kinds: {', '.join(MEMORIES)}")
    call = A.Call(func=A.Name(id=decl.kind, span=decl.span), args=decl.args, kwargs=decl.kwargs, span=decl.span)
    raw = bind_args(al, decl.kind, kind.ctor, call, scope, frame)
    c: dict = {}
    for key, (v, span) in raw.items():
        if isinstance(v, StrVal):
            choices = {"act": ("gelu", "relu", "silu", "tanh"), "loss": ("mse", "l1", "huber", "lp", "yaad"),
                       "retention": ("l2", "lq", "kl")}.get(key)
            c[key] = str_arg(al, (v, span), f"`{key}`", choices)
        elif isinstance(v, list):
            c[key] = [int_arg(al, (x, span), f"`{key}`") if isinstance(x, Static) else _bad(al, span, key) for x in v]
        elif isinstance(v, Static) and v.kind == "bool":
            c[key] = v.expr == sympy.true
        elif v is _NONE:
            c[key] = None
        elif key in ("p", "q"):
            c[key] = _exponent(al, (v, span), key)
        else:
            c[key] = int_arg(al, (v, span), f"`{key}` of {decl.kind}")
            val = substitute(as_expr(c[key]), al.defaults)
            if val.is_number and val < 1:
                raise al.err(f"`{key}` of {decl.kind} must be at least 1, got {val}", span)
    if decl.kind == "NeuralMemory":
        if c.get("hidden") is None:
            c["hidden"] = as_expr(c["d"])
        if not c["layers"].is_Integer:
            raise al.err("`layers` of NeuralMemory must be a literal integer", raw["layers"][1])
        if int(c["layers"]) > MAX_MEMORY_LAYERS:    # each layer is a weight and an unrolled inner-gradient step
            raise al.err(f"`layers` of NeuralMemory is {int(c['layers'])}; at most {MAX_MEMORY_LAYERS} are supported",
                         raw["layers"][1], hint="a memory MLP is typically 1-4 layers deep")
    path = f"{frame.path}.{decl.name}" if frame.path else decl.name
    from dataclasses import replace
    state, extra = kind.init(al, replace(frame, path=path), c, decl.span)
    return MemInst(decl.name, decl.kind, path, c, state, decl.span, extra)


def _exponent(al, a, key) -> float:
    v, span = a
    if not isinstance(v, Static) or v.kind == "bool" or not sympy.sympify(v.expr).is_number:
        raise al.err(f"`{key}` of NeuralMemory must be a literal number", span)
    x = float(v.expr)
    if (key == "p" and x < 1) or (key == "q" and x <= 1):
        raise al.err(f"`{key}` of NeuralMemory must be {'at least 1' if key == 'p' else 'above 1'}, got {x:g}", span)
    return x


def _bad(al, span, key):
    raise al.err(f"`{key}` must list compile-time integers", span)


def call_memory_method(al, mem: MemInst, method: str, e: A.Call, scope, frame, hint):
    kind = MEMORIES[mem.kind]
    if method not in kind.methods:
        from archc.dsl.lower import suggest
        raise al.err(f"{mem.kind} `{mem.name}` has no method `{method}`", e.func.span,
                     hint=suggest(method, kind.methods) or f"methods: {', '.join(kind.methods)}")
    sig, handler, mutates = kind.methods[method]
    if mutates and scope.any_scope(lambda s: s.no_mutation):
        raise al.err(f"`{mem.name}.{method}` changes memory state and is not allowed inside a route", e.span)
    a = bind_args(al, f"{mem.name}.{method}", sig, e, scope, frame)
    result, new_state = handler(al, mem, mem.args, a, e.span, hint)
    if new_state is not None:
        from dataclasses import replace
        scope.set(mem.name, replace(mem, state=new_state))
    return result
