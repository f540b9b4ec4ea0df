"""Composite lowerings: attention (masks, positions, grouped KV, K/V sharing), rope, the neural
memory's read and its inner gradient step written out analytically, linear attention and scans,
FIFO banks. Each mirrors the function of the same name in `archc.backends.torch_runtime`.
"""
from __future__ import annotations

import math

import torch
from archc.backends.onnx.builder import BOOL, F32, I64, Scope
from archc.backends.onnx.lower import ACTIVATIONS, DECODE, Lowerer, rule, slice_from
from archc.ir.ops import Op, attend_operands

from archc.errors import ArchError

# -- attention ---------------------------------------------------------------------------------------


#: the additive score bias of a masked key: exp(MASKED - max) underflows to exactly 0 in fp32
MASKED = -1e30


def repeat_kv(sc: Scope, x: str, groups: int, heads: int) -> str:
    """[B, T, Hk, D] -> [B, T, Hk * groups, D], each KV head repeated for the query heads sharing it."""
    e = sc.ex
    u = sc.op("Unsqueeze", x, e.i64([3]))
    u = sc.op("Expand", u, e.i64([1, 1, 1, groups, 1]))
    return sc.op("Reshape", u, e.i64([0, 0, heads, -1]))


def attention(sc: Scope, q: str, k: str, v: str, *, heads: int, kv_heads: int, head_dim: int, causal: bool,
              window, prefix, mask: str | None = None, mask_rank: int = 0, qpos: str | None = None,
              kpos: str | None = None, window_positive: bool = False) -> str:
    """torch_runtime.attention: [B, T, H, D] in and out; rows with no allowed key give zeros.

    `window` and `prefix` are int64 scalar names, or None when they are zero; `window_positive`:
    the window is a constant >= 1 (with default positions every query then sees its own position).
    """
    e = sc.ex
    if kv_heads != heads:
        k = repeat_kv(sc, k, heads // kv_heads, heads)
        v = repeat_kv(sc, v, heads // kv_heads, heads)
    qt = sc.op("Transpose", q, perm=[0, 2, 1, 3])
    kt = sc.op("Transpose", k, perm=[0, 2, 3, 1])
    vt = sc.op("Transpose", v, perm=[0, 2, 1, 3])
    scores = sc.op("Div", sc.op("MatMul", qt, kt), e.f32(math.sqrt(head_dim)))
    allowed = None
    rows_nonempty = mask is None and qpos is None and kpos is None and (window is None or window_positive)
    if causal or window is not None:
        tq, tk = sc.dim(q, 1), sc.dim(k, 1)
        if qpos is None:
            qp = sc.op("Add", sc.op("Range", e.i64(0), tq, e.i64(1)), sc.op("Sub", tk, tq))
            qp = sc.op("Unsqueeze", qp, e.i64([0, 2]))                          # [1, Tq, 1]
        else:
            qp = sc.op("Unsqueeze", qpos, e.i64([2]))                           # [B, Tq, 1]
        kp = (sc.op("Unsqueeze", sc.op("Range", e.i64(0), tk, e.i64(1)), e.i64([0, 1])) if kpos is None
              else sc.op("Unsqueeze", kpos, e.i64([1])))                        # [., 1, Tk]
        if causal:
            allowed = sc.op("LessOrEqual", kp, qp)
        if window is not None:
            dist = sc.op("Sub", qp, kp)
            if not causal:
                dist = sc.op("Abs", dist)
            near = sc.op("Less", dist, window)
            allowed = near if allowed is None else sc.op("And", allowed, near)
        if prefix is not None:
            first = sc.op("Less", sc.op("Range", e.i64(0), tk, e.i64(1)), prefix)
            first = sc.op("Unsqueeze", first, e.i64([0, 1]))
            allowed = first if allowed is None else sc.op("Or", allowed, first)
    if mask is not None:
        m = mask if mask_rank == 3 else sc.op("Unsqueeze", mask, e.i64([0]))
        allowed = m if allowed is None else sc.op("And", allowed, m)
    if allowed is None:
        out = sc.op("MatMul", sc.op("Softmax", scores, axis=-1), vt)
    else:
        # The mask is applied as an additive bias built at the mask's own size ([1|B, 1, Tq, Tk], not
        # [B, H, Tq, Tk]): one broadcast Add on the scores instead of a full-size Where before the
        # softmax and a Where(IsNaN) after it (together 45% of MoR's onnxruntime time at T = 512).
        # exp(-1e30 - max) is exactly 0 in fp32 whenever a row has an allowed key; a row with none
        # softmaxes to uniform weights, and `any` zeroes its output, as torch_runtime.attention does.
        allowed = sc.op("Unsqueeze", allowed, e.i64([1]))
        bias = sc.op("Where", allowed, e.f32(0.0), e.f32(MASKED))
        out = sc.op("MatMul", sc.op("Softmax", sc.op("Add", scores, bias), axis=-1), vt)
        if not rows_nonempty:
            keys = sc.op("Cast", allowed, to=F32)
            out = sc.op("Mul", out, sc.op("ReduceMax", keys, e.i64([-1]), keepdims=1))
    return sc.op("Transpose", out, perm=[0, 2, 1, 3])


def _attend_shape(lw: Lowerer, n, operands) -> dict:
    q, k = operands[:2]
    return {"heads": lw.static_dim(q, 2, "the number of query heads"),
            "kv_heads": lw.static_dim(k, 2, "the number of key/value heads"),
            "head_dim": lw.static_dim(q, 3, "the attention head size")}


def _optional_scalar(sc: Scope, e) -> str | None:
    v = sc.ex.number(e)
    if v is not None:
        return None if v == 0 else sc.ex.i64(int(v))
    return sc.int_expr(e)


def _positive(sc: Scope, e) -> bool:
    v = sc.ex.number(e)
    return v is not None and v >= 1


@rule(Op.ATTEND)
def _attend(lw, sc, n, ins):
    q, k, v, mask, qpos, kpos = attend_operands(n, ins)
    names = attend_operands(n, list(n.inputs))
    share = n.attr("kv_share") or ""
    if share:
        k, v, kpos = _shared_kv(lw, sc, n, k, v, kpos)
    site = n.attr("site")
    if site and ("from", site) in lw.sources:
        if n.attr("copy") is not None:
            raise ArchError(f"`{site}` is an array of layers; K/V sharing cannot read from it", n.span)
        lw.state[("from", site)] = [k, v, kpos if kpos is not None else _default_kpos(sc, k)]
    if site in lw.stores:
        _record(lw, sc, n, k, v, kpos if kpos is not None else _default_kpos(sc, k))
    out = attention(sc, q, k, v, **_attend_shape(lw, n, names), causal=bool(n.attr("causal")),
                    window=_optional_scalar(sc, n.attr("window", 0)), prefix=_optional_scalar(sc, n.attr("prefix", 0)),
                    window_positive=_positive(sc, n.attr("window", 0)), mask=mask, mask_rank=lw.rank(names[3]) if mask is not None else 0, qpos=qpos, kpos=kpos)
    return [out]


def _store(lw: Lowerer, sc: Scope, n) -> tuple[list[str], str]:
    """The per-copy K/V store of `n`'s site (created empty on first use) and `n`'s copy index."""
    from archc.backends.onnx.regions import new_store
    key = ("store", n.attr("site"))
    if key not in lw.state:
        lw.state[key] = new_store(lw, sc, n.attr("site"))
    c = sc.int_expr(n.attr("copy")) if n.attr("copy") is not None else sc.ex.i64(0)
    return lw.state[key], c


def _record(lw: Lowerer, sc: Scope, n, k: str, v: str, kpos: str) -> None:
    """What attention site `n` attended to, kept per copy for a later `kv_read`."""
    seqs, c = _store(lw, sc, n)
    lw.state[("store", n.attr("site"))] = [sc.op("SequenceInsert", sc.op("SequenceErase", s, c), t, c)
                                          for s, t in zip(seqs, (k, v, kpos))]


@rule(Op.KV_READ)
def _kv_read(lw, sc, n, ins):
    """The K, V (and key positions) the site last recorded, at this copy."""
    seqs, c = _store(lw, sc, n)
    return [sc.op("SequenceAt", s, c) for s in seqs][:len(n.outputs)]


def _default_kpos(sc: Scope, k: str) -> str:
    """The key positions attention assumes when none are given: 0 .. Tk-1 (as [1, Tk])."""
    r = sc.op("Range", sc.ex.i64(0), sc.dim(k, 1), sc.ex.i64(1))
    return sc.op("Unsqueeze", r, sc.ex.i64([0]))


def _shared_kv(lw: Lowerer, sc: Scope, n, k: str, v: str, kpos: str | None):
    """K/V under a sharing policy (torch_runtime.kv_lookup; inference: stochastic sharing always reads)."""
    share = n.attr("kv_share")
    if not share.startswith("recursion:"):
        src = share.split(":")[-1]
        if ("from", src) not in lw.state:
            raise ArchError(f"attention `{n.attr('site')}` reads the K/V of `{src}`, which does not run before it",
                            n.span)
        k, v, kpos = lw.state[("from", src)]
        return k, v, kpos
    key = ("recursion", share.split(":", 1)[1], n.attr("site"))
    if key not in lw.state:
        raise ArchError(f"K/V sharing across `{key[1]}`: no enclosing loop binds it", n.span)
    seq_k, seq_v, seq_p, present = lw.state[key]
    e = sc.ex
    c = sc.int_expr(n.attr("copy")) if n.attr("copy") is not None else e.i64(0)
    kp = kpos if kpos is not None else _default_kpos(sc, k)
    have = sc.op("Gather", present, c, axis=0)
    # present: read the stored K/V; absent: store this site's own and use them
    stored = sc.child()
    outs_t = [stored.op("SequenceAt", s, c) for s in (seq_k, seq_v, seq_p)]
    for o, elem, rank in zip(outs_t, (F32, F32, I64), (4, 4, 2)):
        stored.add_output(o, elem, rank)
    for s, elem, rank in zip((seq_k, seq_v, seq_p), (F32, F32, I64), (4, 4, 2)):
        stored.add_output(s, elem, rank, seq=True)
    own = sc.child()
    for t, elem, rank in zip((k, v, kp), (F32, F32, I64), (4, 4, 2)):
        own.add_output(t, elem, rank)
    for s, t, elem, rank in zip((seq_k, seq_v, seq_p), (k, v, kp), (F32, F32, I64), (4, 4, 2)):
        own.add_output(own.op("SequenceInsert", own.op("SequenceErase", s, c), t, c), elem, rank, seq=True)
    outs = sc.op("If", have, outputs=6, then_branch=stored.graph("stored_kv"), else_branch=own.graph("own_kv"))
    present = sc.op("ScatterElements", present, sc.op("Unsqueeze", c, e.i64([0])), e.const([True], BOOL), axis=0)
    lw.state[key] = [outs[3], outs[4], outs[5], present]
    return outs[0], outs[1], outs[2]


# -- rope ---------------------------------------------------------------------------------------------


def rope(sc: Scope, x: str, base: float, head_dim: int, pos: str | None) -> str:
    """Half-split rotary embedding on [B, T, H, D]; positions [B, T] (default 0..T-1)."""
    e = sc.ex
    if head_dim % 2:
        raise ArchError(f"rope needs an even head size, got {head_dim}")
    half = head_dim // 2
    freq = (base ** (-torch.arange(half, dtype=torch.float32) * 2 / head_dim)).numpy()   # as torch computes it
    if pos is None:
        pos = sc.op("Unsqueeze", sc.op("Range", e.i64(0), sc.dim(x, 1), e.i64(1)), e.i64([0]))
    ang = sc.op("Mul", sc.op("Unsqueeze", sc.op("Cast", pos, to=F32), e.i64([-1])), e.const(freq, F32, "rope_freq"))
    cos = sc.op("Unsqueeze", sc.op("Cos", ang), e.i64([2]))
    sin = sc.op("Unsqueeze", sc.op("Sin", ang), e.i64([2]))
    x1 = sc.op("Slice", x, e.i64([0]), e.i64([half]), e.i64([3]))
    x2 = sc.op("Slice", x, e.i64([half]), e.i64([head_dim]), e.i64([3]))
    a = sc.op("Sub", sc.op("Mul", x1, cos), sc.op("Mul", x2, sin))
    b = sc.op("Add", sc.op("Mul", x1, sin), sc.op("Mul", x2, cos))
    return sc.op("Concat", a, b, axis=-1)


@rule(Op.ROPE)
def _rope(lw, sc, n, ins):
    D = lw.static_dim(n.inputs[0], 3, "the rope head size")
    return [rope(sc, ins[0], float(lw.ex.number(n.attr("base"))), D, ins[1] if len(ins) > 1 else None)]


# -- the decode step: rope at absolute positions, attention over cached K/V ---------------------------------


@rule(Op.ROPE, table=DECODE)
def _rope_decode(lw, sc, n, ins):
    D = lw.static_dim(n.inputs[0], 3, "the rope head size")
    return [rope(sc, ins[0], float(lw.ex.number(n.attr("base"))), D, lw.positions)]


@rule(Op.ATTEND, table=DECODE)
def _attend_decode(lw, sc, n, ins):
    """Append the new K/V to this attention's cache slice and attend over all of it (causal).

    K/V stored once (SPEC §21.4): an attend whose K/V values an earlier one already caches
    (`insert-kv-sharing` made them data flow) attends over that one's; a `share_kv(source = ...)` /
    `stochastic_share` consumer (inference: always the source) over its source's latest.
    """
    q, k, v = ins[:3]
    share = n.attr("kv_share") or ""
    if share:
        src = share.split(":")[-1]
        if share.startswith("recursion:") or ("from", src) not in lw.state:
            raise ArchError(f"the decode graph cannot read the K/V `{n.attr('site')}` shares ({share})", n.span)
        k_all, v_all, _ = lw.state[("from", src)]
    elif n.out.name in lw.kv_owner:
        k_all, v_all = lw.kv_values[lw.kv_owner[n.out.name]]
    else:
        past_k, past_v = lw.cache_inputs[n.out.name]
        for it in lw.loop_iters:                      # the slice of this loop step, outermost loop first
            past_k = sc.op("Gather", past_k, it, axis=0)
            past_v = sc.op("Gather", past_v, it, axis=0)
        k_all = sc.op("Concat", past_k, k, axis=1)
        v_all = sc.op("Concat", past_v, v, axis=1)
        base = lw.cache_names[n.out.name]
        lw.exports += [(f"present.{base}.key", k_all, F32, 4), (f"present.{base}.value", v_all, F32, 4)]
    lw.kv_values[n.out.name] = (k_all, v_all)
    site = n.attr("site")
    if site and ("from", site) in lw.sources:
        lw.state[("from", site)] = [k_all, v_all, _default_kpos(sc, k_all)]
    out = attention(sc, q, k_all, v_all, **_attend_shape(lw, n, n.inputs), causal=True,
                    window=_optional_scalar(sc, n.attr("window", 0)), prefix=None, qpos=lw.positions)
    return [out]


# -- neural memory ----------------------------------------------------------------------------------------


def _flat_tokens(sc: Scope, x: str, rank: int, width: int) -> str:
    return x if rank == 3 else sc.op("Reshape", x, sc.ex.i64([0, -1, width]))


def _wt(sc: Scope, w: str) -> str:
    return sc.op("Transpose", w, perm=[0, 2, 1])


def lq_normalize(sc: Scope, ws: list[str], q: float) -> list[str]:
    """Moneta's l_q retention: the memory applies W = A / ||A||_q^(q-2) of its accumulator A, per sample."""
    e = sc.ex
    out = []
    for a in ws:
        norm = sc.op("ReduceSum", sc.op("Pow", sc.op("Abs", a), e.f32(q)), e.i64([-2, -1]), keepdims=1)
        scale = sc.op("Max", sc.op("Pow", norm, e.f32((q - 2) / q)), e.f32(1e-12))
        out.append(sc.op("Div", a, scale))
    return out


def _applied(sc: Scope, n, ws: list[str]) -> list[str]:
    """The weights the memory applies: its state, or the l_q-normalised accumulator."""
    return lq_normalize(sc, ws, float(n.attr("q", 4.0))) if n.attr("retention") == "lq" else ws


@rule(Op.MEM_READ)
def _mem_read(lw, sc, n, ins):
    """mlp_memory: h = act(h W_i^T) per sample, no activation after the last layer (+ q if residual)."""
    q, ws = ins[0], _applied(sc, n, ins[1:])
    rank = lw.rank(n.inputs[0])
    d_in = lw.static_dim(n.inputs[0], -1, "the memory's input size")
    act = ACTIVATIONS[n.attr("act")]
    h = x0 = _flat_tokens(sc, q, rank, d_in)
    for i, w in enumerate(ws):
        h = sc.op("MatMul", h, _wt(sc, w))
        if i < len(ws) - 1:
            h = act(sc, h)
    if n.attr("residual"):
        h = sc.op("Add", h, x0)
    if rank != 3:
        h = sc.op("Reshape", h, sc.op("Concat", sc.shape_of(q, 0, -1), sc.ex.i64([-1]), axis=0))
    return [h]


def _act_grad(sc: Scope, act: str, z: str) -> str:
    """d act(z) / dz, elementwise."""
    e = sc.ex
    if act == "gelu":      # Phi(z) + z * phi(z)
        cdf = sc.op("Mul", sc.op("Add", sc.op("Erf", sc.op("Div", z, e.f32(math.sqrt(2.0)))), e.f32(1.0)), e.f32(0.5))
        pdf = sc.op("Mul", sc.op("Exp", sc.op("Mul", sc.op("Mul", z, z), e.f32(-0.5))), e.f32(1 / math.sqrt(2 * math.pi)))
        return sc.op("Add", cdf, sc.op("Mul", z, pdf))
    if act == "relu":
        return sc.op("Cast", sc.op("Greater", z, e.f32(0.0)), to=F32)
    if act == "silu":      # s (1 + z (1 - s))
        s = sc.op("Sigmoid", z)
        return sc.op("Mul", s, sc.op("Add", e.f32(1.0), sc.op("Mul", z, sc.op("Sub", e.f32(1.0), s))))
    if act == "tanh":
        t = sc.op("Tanh", z)
        return sc.op("Sub", e.f32(1.0), sc.op("Mul", t, t))
    raise ArchError(f"unknown memory activation `{act}`")


def _loss_grad(sc: Scope, n, err: str, width: int, delta: str | None) -> str:
    """d mean_d(loss(err)) / d err (the per-token attentional bias of `memory_write`)."""
    e = sc.ex
    loss = n.attr("loss")
    if loss == "mse":
        g = sc.op("Mul", err, e.f32(2.0))
    elif loss == "l1":
        g = sc.op("Sign", err)
    elif loss == "huber":  # delta = 1: quadratic inside, linear outside
        g = sc.op("Clip", err, e.f32(-1.0), e.f32(1.0))
    elif loss == "lp":     # (e^2 + 1e-6)^(p/2) -> p e (e^2 + 1e-6)^(p/2 - 1)
        p = float(n.attr("p", 3.0))
        smooth = sc.op("Add", sc.op("Mul", err, err), e.f32(1e-6))
        g = sc.op("Mul", sc.op("Mul", err, e.f32(p)), sc.op("Pow", smooth, e.f32(p / 2 - 1)))
    elif loss == "yaad":   # 2e while ||e|| <= delta, else delta * e / sqrt(e^2 + 1e-6)
        dl = sc.op("Unsqueeze", delta, e.i64([-1]))
        small = sc.op("LessOrEqual", sc.op("Sqrt", sc.op("ReduceSum", sc.op("Mul", err, err), e.i64([-1]), keepdims=1)),
                      dl)
        linear = sc.op("Mul", dl, sc.op("Div", err, sc.op("Sqrt", sc.op("Add", sc.op("Mul", err, err), e.f32(1e-6)))))
        g = sc.op("Where", small, sc.op("Mul", err, e.f32(2.0)), linear)
    else:
        raise ArchError(f"unknown memory loss `{loss}`", n.span)
    return sc.op("Div", g, e.f32(float(width)))


@rule(Op.MEM_WRITE)
def _mem_write(lw, sc, n, ins):
    """One inner step, the gradient written out by hand (backpropagation through the memory MLP):

    p = M(k); G_p = lr * d loss / d p; for the last layer down to the first,
    dW_i = G_{z_i}^T h_i (summed over tokens, per sample), G_{h_i} = G_{z_i} W_i, G_{z_{i-1}} = G_{h_i} * act'(z_{i-1});
    S_i' = momentum * S_i - dW_i; then the retention rule: W_i' = (1 - forget) * W_i + S_i' (l2, and the
    l_q accumulator), or W_i' = softmax((1 - forget) * log W_i + S_i') per row (kl).
    """
    e = sc.ex
    L = int(n.attr("layers"))
    k, v, lr, momentum, forget = ins[:5]
    ws, ms = ins[5:5 + L], ins[5 + L:5 + 2 * L]
    delta = None
    if n.attr("has_delta"):
        delta = sc.op("Reshape", ins[5 + 2 * L], e.i64([0, -1]))
    applied = _applied(sc, n, ws)          # the gradient is taken at the weights the memory applies
    act_name = n.attr("act")
    act = ACTIVATIONS[act_name]
    rank = lw.rank(n.inputs[0])
    d_in = lw.static_dim(n.inputs[0], -1, "the memory's input size")
    d_out = lw.static_dim(n.inputs[1], -1, "the memory's output size")
    x0 = _flat_tokens(sc, k, rank, d_in)
    hs, zs = [x0], []
    h = x0
    for i, w in enumerate(applied):
        z = sc.op("MatMul", h, _wt(sc, w))
        zs.append(z)
        if i < L - 1:
            h = act(sc, z)
            hs.append(h)
    p = sc.op("Add", zs[-1], x0) if n.attr("residual") else zs[-1]
    err = sc.op("Sub", p, _flat_tokens(sc, v, lw.rank(n.inputs[1]), d_out))
    rate = sc.op("Reshape", lr, sc.shape_of(err, 0, -1))                     # per token, as [B, T]
    g = sc.op("Mul", _loss_grad(sc, n, err, d_out, delta), sc.op("Unsqueeze", rate, e.i64([-1])))
    grads: list[str] = [""] * L
    for i in range(L - 1, -1, -1):
        if i < L - 1:
            g = sc.op("Mul", g, _act_grad(sc, act_name, zs[i]))
        grads[i] = sc.op("MatMul", sc.op("Transpose", g, perm=[0, 2, 1]), hs[i])
        if i > 0:
            g = sc.op("MatMul", g, applied[i])
    mom = sc.op("Reshape", momentum, e.i64([-1, 1, 1]))
    keep = sc.op("Sub", e.f32(1.0), sc.op("Reshape", forget, e.i64([-1, 1, 1])))
    new_m = [sc.op("Sub", sc.op("Mul", mom, m), gr) for m, gr in zip(ms, grads)]
    if n.attr("retention") == "kl":        # stays on the simplex: softmax(keep * log W + S') per row
        logs = [sc.op("Log", sc.op("Max", w, e.f32(1e-30))) for w in ws]
        new_w = [sc.op("Softmax", sc.op("Add", sc.op("Mul", keep, lg), m), axis=-1) for lg, m in zip(logs, new_m)]
    else:
        new_w = [sc.op("Add", sc.op("Mul", keep, w), m) for w, m in zip(ws, new_m)]
    return new_w + new_m


# -- linear recurrences -------------------------------------------------------------------------------------


@rule(Op.LINEAR_ATTN)
def _linear_attn(lw, sc, n, ins):
    """y_t = (s + sum_{u<=t} v_u k_u^T) q_t; s' = s + sum_t v_t k_t^T."""
    q, k, v, s = ins
    scores = sc.op("Trilu", sc.op("MatMul", q, sc.op("Transpose", k, perm=[0, 2, 1])), upper=0)
    y = sc.op("Add", sc.op("MatMul", q, sc.op("Transpose", s, perm=[0, 2, 1])), sc.op("MatMul", scores, v))
    s_new = sc.op("Add", s, sc.op("MatMul", sc.op("Transpose", v, perm=[0, 2, 1]), k))
    return [y, s_new]


@rule(Op.LINEAR_SCAN)
def _linear_scan(lw, sc, n, ins):
    """h_t = a_t * h_{t-1} + b_t along an axis, as an ONNX Scan (one step per position)."""
    a, b, h0 = ins
    axis = lw.axis(n, n.out.type.rank)
    both = sc.op("Shape", sc.op("Add", a, b))
    a, b = sc.op("Expand", a, both), sc.op("Expand", b, both)
    step_shape = sc.op("Shape", sc.op("Gather", a, sc.ex.i64(0), axis=axis))
    h0 = sc.op("Expand", h0, step_shape)
    body = sc.child()
    rank = n.out.type.rank - 1
    h_in = body.add_input("h", F32, rank)
    a_t = body.add_input("a_t", F32, rank)
    b_t = body.add_input("b_t", F32, rank)
    h_out = body.op("Add", body.op("Mul", a_t, h_in), b_t)
    body.add_output(h_out, F32, rank)
    body.add_output(h_out, F32, rank)
    _, hs = sc.op("Scan", h0, a, b, outputs=2, body=body.graph("linear_scan_step"), num_scan_inputs=2,
                  scan_input_axes=[axis, axis], scan_output_axes=[axis])
    return [hs]


# -- banks -----------------------------------------------------------------------------------------------


def _slots(lw: Lowerer, sc: Scope, n, buf: str) -> str:
    v = lw.ex.number(lw.types[n.inputs[0]].shape[1])
    return lw.ex.i64(int(v)) if v is not None else sc.dim(buf, 1)


@rule(Op.BANK_PUSH)
def _bank_push(lw, sc, n, ins):
    """FIFO push: while count < N the entry goes to slot count; when full, shift toward 0 and append."""
    buf, count, v = ins
    e = sc.ex
    rank = lw.rank(n.inputs[0])
    tail = e.i64(list(range(1, rank))) if rank > 1 else None
    N = _slots(lw, sc, n, buf)
    full = sc.op("Unsqueeze", sc.op("GreaterOrEqual", count, N), tail)
    entry = sc.op("Unsqueeze", v, e.i64([1]))
    shifted = sc.op("Concat", slice_from(sc, buf, e.i64(1), 1), entry, axis=1)
    last = sc.op("Min", count, sc.op("Sub", N, e.i64(1)))
    slot = sc.op("Equal", sc.op("Unsqueeze", sc.op("Range", e.i64(0), N, e.i64(1)), e.i64([0])),
                 sc.op("Unsqueeze", last, e.i64([1])))
    if rank > 2:
        slot = sc.op("Unsqueeze", slot, e.i64(list(range(2, rank))))
    placed = sc.op("Where", slot, entry, buf)
    new_count = sc.op("Min", sc.op("Add", count, e.i64(1)), N)
    return [sc.op("Where", full, shifted, placed), new_count]


@rule(Op.BANK_VALID)
def _bank_valid(lw, sc, n, ins):
    buf, count = ins
    e = sc.ex
    slots = sc.op("Unsqueeze", sc.op("Range", e.i64(0), _slots(lw, sc, n, buf), e.i64(1)), e.i64([0]))
    return [sc.op("Less", slots, sc.op("Unsqueeze", count, e.i64([1])))]

