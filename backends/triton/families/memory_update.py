"""Neural-memory update `mem_write` (Titans / Miras style): one inner gradient step with momentum and
a forget gate over a chunk of tokens, with the memory held fixed within the chunk; forward and
backward (second order) in generated Triton kernels.

For per-sample MLP weights W_0..W_{L-1} ([B, out, in]) and momenta S_i, on the chunk's keys k
and values v ([B, T, d]) with per-token rates lr ([B, T]), momentum eta and forget alpha ([B]):

    h_0 = k;  z_i = h_i W_i^T;  h_{i+1} = act(z_i) (i < L-1);  p = z_{L-1} (+ k if residual)
    e = p - v;  dz_{L-1} = (lr_t / d) loss'(e)     (mse: 2 e, l1: sign e, huber: clamp(e, -1, 1))
    q_i = dz_i W_i;  dz_{i-1} = q_i * act'(z_{i-1});  G_i = dz_i^T h_i
    S_i' = eta * S_i - G_i;   W_i' = (1 - alpha) * W_i + S_i'

Forward kernels (one set per spec, batched over samples on grid axis 2, tiled [BLOCK_T, BLOCK_O,
BLOCK_I], `tl.dot` in ieee fp32 when every tile is 16 wide): `hidden` (z = h W^T with act in the
epilogue), `last` (the loss derivative in the epilogue), `backprop` (dz W with act' in the
epilogue) and `update`, which reduces G = dz^T h over the chunk's tokens on chip and applies the
momentum and forget gate in its epilogue (G is never written out).

Backward: with cotangents A_i (of W_i') and B_i (of S_i'), U_i = A_i + B_i, the direct terms are
dS_i = eta U_i, dW_i = (1 - alpha) A_i, d eta = sum <U_i, S_i>, d alpha = -sum <A_i, W_i>; the
second-order part differentiates sum_i <C_i, G_i> with C_i = -U_i through the inner forward and
backward above (reverse mode over that computation), which needs act'' and loss''. It recomputes
z, h, q, dz and p with the forward kernels and runs generated kernels for the adjoints:
`xwt` / `xw` (token-major products with accumulate and act' epilogues), `xty` (weight-shaped
products accumulated over the chunk's tokens), `chain` (the act'' terms) and `loss` (loss'' and
the per-token rate gradient, reduced over features on chip). As the reference, G is
differentiated only when the weights carry gradients.

The chunk semantics are the interpreter's (`torch_runtime.memory_write`): every token of the
write sees the same W; a `scan` over segments makes one `mem_write` per chunk.

Specialisation: number of layers, activation, loss, residual, momentum zero or not, forget zero
or not.
"""
from __future__ import annotations

from archc.backends.triton.families._util import config_space, is_zero_fill, kernel_name, render, tuning_source
from archc.backends.triton.kernel import KernelSource
from archc.ir.core import Graph, Node
from archc.ir.ops import Op

FAMILY = "memory_update"

CONFIGS = config_space(BLOCK_T=(16, 32, 64), BLOCK_O=(16, 32, 64), BLOCK_I=(16, 32, 64), num_warps=(4, 8),
                       num_stages=(2, 3))
DEFAULT = {"BLOCK_T": 32, "BLOCK_O": 32, "BLOCK_I": 32, "num_warps": 4, "num_stages": 2}

_TANH = "(2.0 * tl.sigmoid(2.0 * z) - 1.0)"
# activation, its first and second derivative, in Triton (z is the pre-activation tile)
_ACT = {
    "gelu": ("0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))",
             "0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327",
             "tl.exp(-0.5 * z * z) * 0.3989422804014327 * (2.0 - z * z)"),
    "relu": ("tl.maximum(z, 0.0)", "tl.where(z > 0, 1.0, 0.0)", "0.0 * z"),
    "silu": ("z * tl.sigmoid(z)", "tl.sigmoid(z) * (1.0 + z * (1.0 - tl.sigmoid(z)))",
             "tl.sigmoid(z) * (1.0 - tl.sigmoid(z)) * (2.0 + z * (1.0 - 2.0 * tl.sigmoid(z)))"),
    "tanh": (_TANH, f"1.0 - {_TANH} * {_TANH}", f"-2.0 * {_TANH} * (1.0 - {_TANH} * {_TANH})"),
}
# first and second derivative of the per-element loss with respect to the error e (before 1/d)
_LOSS = {"mse": ("2.0 * e", "2.0 + 0.0 * e"),
         "l1": ("tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))", "0.0 * e"),
         "huber": ("tl.minimum(tl.maximum(e, -1.0), 1.0)", "tl.where(tl.abs(e) < 1.0, 1.0, 0.0)")}


def matches(node: Node, graph: Graph) -> bool:
    """mse / l1 / huber losses with the l2 retention (Miras' lp / yaad losses and lq / kl retention
    run in torch)."""
    return (node.op is Op.MEM_WRITE and node.attr("act") in _ACT and node.attr("loss") in _LOSS
            and node.attr("retention") in (None, "l2") and not node.attr("has_delta"))


def spec(node: Node, graph: Graph) -> tuple:
    return (int(node.attr("layers")), node.attr("act"), node.attr("loss"), bool(node.attr("residual")),
            is_zero_fill(graph, node.inputs[3]), is_zero_fill(graph, node.inputs[4]))


_KERNELS = '''
@triton.jit
def _@NAME@_mm(a, b, USE_DOT: tl.constexpr):
    """[M, K] x [K, N] -> [M, N]."""
    if USE_DOT:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return c


@triton.jit
def _@NAME@_xwt(x_ptr, w_ptr, b, t, j, T, K, J, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """acc[t, j] = sum_k x[b, t, k] w[b, j, k]  (x W^T, W stored [J, K])."""
    acc = tl.zeros((BLOCK_T, BLOCK_O), tl.float32)
    for k0 in range(0, K, BLOCK_I):
        k = k0 + tl.arange(0, BLOCK_I)
        x = tl.load(x_ptr + (b * T + t[:, None]) * K + k[None, :], mask=(t < T)[:, None] & (k < K)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + (b * J + j[None, :]) * K + k[:, None], mask=(k < K)[:, None] & (j < J)[None, :],
                    other=0.0)
        acc += _@NAME@_mm(x, w, USE_DOT)
    return acc


@triton.jit
def _@NAME@_xw(x_ptr, w_ptr, b, t, j, T, K, J, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
               BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """acc[t, j] = sum_k x[b, t, k] w[b, k, j]  (x W, W stored [K, J])."""
    acc = tl.zeros((BLOCK_T, BLOCK_I), tl.float32)
    for k0 in range(0, K, BLOCK_O):
        k = k0 + tl.arange(0, BLOCK_O)
        x = tl.load(x_ptr + (b * T + t[:, None]) * K + k[None, :], mask=(t < T)[:, None] & (k < K)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + (b * K + k[:, None]) * J + j[None, :], mask=(k < K)[:, None] & (j < J)[None, :],
                    other=0.0)
        acc += _@NAME@_mm(x, w, USE_DOT)
    return acc


@triton.jit
def _@NAME@_xty(x_ptr, y_ptr, b, j, i, T, J, I, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """acc[j, i] = sum_t x[b, t, j] y[b, t, i]  (a weight-shaped product over the chunk's tokens)."""
    acc = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        xt = tl.load(x_ptr + (b * T + t[None, :]) * J + j[:, None], mask=(j < J)[:, None] & (t < T)[None, :],
                     other=0.0)
        y = tl.load(y_ptr + (b * T + t[:, None]) * I + i[None, :], mask=(t < T)[:, None] & (i < I)[None, :],
                    other=0.0)
        acc += _@NAME@_mm(xt, y, USE_DOT)
    return acc


@triton.jit
def _@NAME@_hidden(x_ptr, w_ptr, z_ptr, h_ptr, T, IN, OUT, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                   BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """z = x W^T and act(z) (a hidden layer)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    z = _@NAME@_xwt(x_ptr, w_ptr, b, t, o, T, IN, OUT, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (o < OUT)[None, :]
    off = (b * T + t[:, None]) * OUT + o[None, :]
    tl.store(z_ptr + off, z, mask=m)
    tl.store(h_ptr + off, @ACT@, mask=m)


@triton.jit
def _@NAME@_last(x_ptr, w_ptr, k_ptr, v_ptr, lr_ptr, dz_ptr, p_ptr, T, IN, OUT, BLOCK_T: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr, STORE_P: tl.constexpr):
    """The last layer with the loss derivative in its epilogue: dz = lr_t * loss'(p - v) / OUT."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    p = _@NAME@_xwt(x_ptr, w_ptr, b, t, o, T, IN, OUT, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (o < OUT)[None, :]
    off = (b * T + t[:, None]) * OUT + o[None, :]
@RESIDUAL@
    if STORE_P:
        tl.store(p_ptr + off, p, mask=m)
    e = p - tl.load(v_ptr + off, mask=m, other=0.0)
    lr = tl.load(lr_ptr + b * T + t, mask=t < T, other=0.0)
    tl.store(dz_ptr + off, lr[:, None] * (@DLOSS@) / OUT, mask=m)


@triton.jit
def _@NAME@_backprop(dz_ptr, w_ptr, z_ptr, dzp_ptr, q_ptr, T, IN, OUT, BLOCK_T: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr, STORE_Q: tl.constexpr):
    """q = dz W and dz_prev = q * act'(z_prev)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    q = _@NAME@_xw(dz_ptr, w_ptr, b, t, i, T, OUT, IN, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (i < IN)[None, :]
    off = (b * T + t[:, None]) * IN + i[None, :]
    if STORE_Q:
        tl.store(q_ptr + off, q, mask=m)
    z = tl.load(z_ptr + off, mask=m, other=0.0)
    tl.store(dzp_ptr + off, q * (@DACT@), mask=m)


@triton.jit
def _@NAME@_update(dz_ptr, h_ptr, w_ptr, s_ptr, eta_ptr, alpha_ptr, wo_ptr, so_ptr, T, IN, OUT,
                   BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """G = dz^T h over the chunk's tokens, then S' = eta S - G and W' = (1 - alpha) W + S'."""
    b = tl.program_id(2).to(tl.int64)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    g = _@NAME@_xty(dz_ptr, h_ptr, b, o, i, T, OUT, IN, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (o < OUT)[:, None] & (i < IN)[None, :]
    off = (b * OUT + o[:, None]) * IN + i[None, :]
    w = tl.load(w_ptr + off, mask=m, other=0.0)
@MOMENTUM@
@FORGET@
    tl.store(so_ptr + off, s, mask=m)
    tl.store(wo_ptr + off, w, mask=m)


@triton.jit
def _@NAME@_bwd_xwt(x_ptr, w_ptr, o_ptr, T, K, J, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                    BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr):
    """out (+)= x W^T, token-major."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = _@NAME@_xwt(x_ptr, w_ptr, b, t, j, T, K, J, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (j < J)[None, :]
    off = (b * T + t[:, None]) * J + j[None, :]
    if ACC:
        acc += tl.load(o_ptr + off, mask=m, other=0.0)
    tl.store(o_ptr + off, acc, mask=m)


@triton.jit
def _@NAME@_bwd_xw(x_ptr, w_ptr, hb_ptr, zp_ptr, zb_ptr, T, K, J, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                   BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr, ACC: tl.constexpr, PREV: tl.constexpr):
    """hbar (+)= x W; with PREV, also zbar_prev += hbar * act'(z_prev) (hbar's path into the layer below)."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    hb = _@NAME@_xw(x_ptr, w_ptr, b, t, j, T, K, J, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (j < J)[None, :]
    off = (b * T + t[:, None]) * J + j[None, :]
    if ACC:
        hb += tl.load(hb_ptr + off, mask=m, other=0.0)
    tl.store(hb_ptr + off, hb, mask=m)
    if PREV:
        z = tl.load(zp_ptr + off, mask=m, other=0.0)
        zb = tl.load(zb_ptr + off, mask=m, other=0.0)
        tl.store(zb_ptr + off, zb + hb * (@DACT@), mask=m)


@triton.jit
def _@NAME@_bwd_xty(x_ptr, y_ptr, o_ptr, T, J, I, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                    BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """Wbar += x^T y over the chunk's tokens."""
    b = tl.program_id(2).to(tl.int64)
    j = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = _@NAME@_xty(x_ptr, y_ptr, b, j, i, T, J, I, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (j < J)[:, None] & (i < I)[None, :]
    off = (b * J + j[:, None]) * I + i[None, :]
    tl.store(o_ptr + off, acc + tl.load(o_ptr + off, mask=m, other=0.0), mask=m)


@triton.jit
def _@NAME@_bwd_chain(dzb_ptr, z_ptr, q_ptr, qb_ptr, zb_ptr, N, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """Through dz_prev = q * act'(z): qbar = dzbar * act'(z); zbar = dzbar * q * act''(z) (flat tiles)."""
    off = tl.program_id(0).to(tl.int64) * (BLOCK_T * BLOCK_O) + tl.arange(0, BLOCK_T * BLOCK_O)
    m = off < N
    dzb = tl.load(dzb_ptr + off, mask=m, other=0.0)
    z = tl.load(z_ptr + off, mask=m, other=0.0)
    q = tl.load(q_ptr + off, mask=m, other=0.0)
    tl.store(qb_ptr + off, dzb * (@DACT@), mask=m)
    tl.store(zb_ptr + off, dzb * q * (@DDACT@), mask=m)


@triton.jit
def _@NAME@_bwd_loss(dzb_ptr, p_ptr, v_ptr, lr_ptr, eb_ptr, lrb_ptr, T, OUT, BLOCK_T: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """Through dz = lr_t loss'(p - v) / OUT: ebar = dzbar lr_t loss''(e) / OUT, lrbar_t = sum_o dzbar loss'(e) / OUT."""
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    lr = tl.load(lr_ptr + b * T + t, mask=t < T, other=0.0)
    total = tl.zeros((BLOCK_T,), tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        m = (t < T)[:, None] & (o < OUT)[None, :]
        off = (b * T + t[:, None]) * OUT + o[None, :]
        dzb = tl.load(dzb_ptr + off, mask=m, other=0.0)
        e = tl.load(p_ptr + off, mask=m, other=0.0) - tl.load(v_ptr + off, mask=m, other=0.0)
        tl.store(eb_ptr + off, dzb * lr[:, None] * (@DDLOSS@) / OUT, mask=m)
        total += tl.sum(dzb * (@DLOSS@), axis=1)
    tl.store(lrb_ptr + b * T + t, total / OUT, mask=t < T)
'''

_LAUNCHER = '''

@TUNING@


def _@NAME@_run(kernel, tag, config, grid_of, args, sizes, use_dot, **flags):
    def run(meta):
        kernel[grid_of(meta)](*args, USE_DOT=use_dot and min(meta["BLOCK_T"], meta["BLOCK_O"], meta["BLOCK_I"]) >= 16,
                              **flags, **meta)
    run(_@NAME@_config(tag, sizes, config, run))


def _@NAME@_forward(config, x, vv, lrv, ws, keep):
    """The inner forward and backward: h_i, z_i, dz_i (and q_i, p when `keep`, for the outer backward)."""
    B, T = x.shape[0], x.shape[1]
    L = len(ws)
    use_dot = min(min(w.shape[1], w.shape[2]) for w in ws) >= 16 and T >= 16
    hs, zs = [x], []
    for i in range(L - 1):
        out = ws[i].shape[1]
        z = torch.empty(B, T, out, dtype=torch.float32, device=x.device)
        h = torch.empty_like(z)
        _@NAME@_run(_@NAME@_hidden, "@NAME@_hidden", config,
                    lambda m, out=out: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(out, m["BLOCK_O"]), B),
                    (hs[-1], ws[i], z, h, T, hs[-1].shape[2], out), (B, T, out), use_dot)
        zs.append(z)
        hs.append(h)
    out = ws[-1].shape[1]
    dz = torch.empty(B, T, out, dtype=torch.float32, device=x.device)
    p = torch.empty_like(dz) if keep else dz
    _@NAME@_run(_@NAME@_last, "@NAME@_last", config,
                lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(out, m["BLOCK_O"]), B),
                (hs[-1], ws[-1], x, vv, lrv, dz, p, T, hs[-1].shape[2], out), (B, T, out), use_dot, STORE_P=keep)
    dzs, qs = [None] * L, [None] * L
    dzs[L - 1] = dz
    for i in range(L - 1, 0, -1):
        out, inp = ws[i].shape[1], ws[i].shape[2]
        dzs[i - 1] = torch.empty(B, T, inp, dtype=torch.float32, device=x.device)
        qs[i] = torch.empty_like(dzs[i - 1]) if keep else dzs[i - 1]
        _@NAME@_run(_@NAME@_backprop, "@NAME@_backprop", config,
                    lambda m, inp=inp: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(inp, m["BLOCK_I"]), B),
                    (dzs[i], ws[i], zs[i - 1], dzs[i - 1], qs[i], T, inp, out), (B, T, inp), use_dot, STORE_Q=keep)
    return hs, zs, dzs, qs, p, use_dot


def _@NAME@_inputs(k, v, lr, eta, alpha, state, L):
    ws = [w.float().contiguous() for w in state[:L]]
    ss = [s.float().contiguous() for s in state[L:]]
    B = k.shape[0]
    x = k.float().reshape(B, -1, k.shape[-1]).contiguous()
    T = x.shape[1]
    vv = v.float().reshape(B, T, -1).contiguous()
    lrv = (lr.float().expand(B, T) if lr.dim() == 0 else lr.float().reshape(B, T)).contiguous()
    etav = eta.float().reshape(-1).expand(B).contiguous()
    alphav = alpha.float().reshape(-1).expand(B).contiguous()
    return x, vv, lrv, etav, alphav, ws, ss


class _@NAME@_Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, k, v, lr, eta, alpha, *state):
        L = @LAYERS@
        x, vv, lrv, etav, alphav, ws, ss = _@NAME@_inputs(k, v, lr, eta, alpha, state, L)
        B, T = x.shape[0], x.shape[1]
        hs, _, dzs, _, _, use_dot = _@NAME@_forward(config, x, vv, lrv, ws, False)
        new_w = [torch.empty_like(w) for w in ws]
        new_s = [torch.empty_like(w) for w in ws]
        for i in range(L):
            out, inp = ws[i].shape[1], ws[i].shape[2]
            _@NAME@_run(_@NAME@_update, "@NAME@_update", config,
                        lambda m, out=out, inp=inp: (triton.cdiv(out, m["BLOCK_O"]), triton.cdiv(inp, m["BLOCK_I"]), B),
                        (dzs[i], hs[i], ws[i], ss[i], etav, alphav, new_w[i], new_s[i], T, inp, out), (B, out, inp),
                        use_dot)
        ctx.save_for_backward(k, v, lr, eta, alpha, *state)
        ctx.config = config
        return tuple(new_w + new_s)

    @staticmethod
    def backward(ctx, *grads):
        L = @LAYERS@
        k, v, lr, eta, alpha, *state = ctx.saved_tensors
        config = ctx.config
        x, vv, lrv, etav, alphav, ws, ss = _@NAME@_inputs(k, v, lr, eta, alpha, state, L)
        # cotangents may be strided views (einsum backward): the kernels index dense [B, out, in]
        A = [torch.zeros_like(w) if g is None else g.float().contiguous() for w, g in zip(ws, grads[:L])]
        U = [a if g is None else a + g.float() for a, g in zip(A, grads[L:])]
        e3 = etav.reshape(-1, 1, 1)
        d_s = [e3 * u for u in U]
        d_w = [((1 - alphav.reshape(-1, 1, 1)) * a).contiguous() for a in A]
        d_eta = sum((u * s).sum((1, 2)) for u, s in zip(U, ss))
        d_alpha = -sum((a * w).sum((1, 2)) for a, w in zip(A, ws))
        d_k = d_v = d_lr = None
        if any(ctx.needs_input_grad[6:6 + L]):       # as the reference: G is differentiated only when
            C = [(-u).contiguous() for u in U]          # the weights carry gradients
            d_k, d_v, d_lr = _@NAME@_second_order(config, x, vv, lrv, ws, C, d_w)
            d_k, d_v, d_lr = d_k.reshape(k.shape), d_v.reshape(v.shape), d_lr.reshape(lr.shape)
        return (None, d_k, d_v, d_lr, d_eta.reshape(eta.shape) if eta.dim() else d_eta.sum(),
                d_alpha.reshape(alpha.shape) if alpha.dim() else d_alpha.sum(), *d_w, *d_s)


def _@NAME@_second_order(config, x, vv, lrv, ws, C, d_w):
    """Reverse mode through the inner forward and backward for sum_i <C_i, G_i>; adds into d_w."""
    L = len(ws)
    B, T = x.shape[0], x.shape[1]
    hs, zs, dzs, qs, p, use_dot = _@NAME@_forward(config, x, vv, lrv, ws, True)

    def tokens(width):
        return torch.zeros(B, T, width, dtype=torch.float32, device=x.device)

    def xwt(out, xx, w, acc):        # out (+)= xx w^T
        J, K = w.shape[1], w.shape[2]
        _@NAME@_run(_@NAME@_bwd_xwt, "@NAME@_bwd_xwt", config,
                    lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(J, m["BLOCK_O"]), B),
                    (xx, w, out, T, K, J), (B, T, J), use_dot, ACC=acc)

    def xw(hb, xx, w, acc, zp=None, zb=None):       # hb (+)= xx w; zb += hb act'(zp)
        K, J = w.shape[1], w.shape[2]
        prev = zp is not None
        _@NAME@_run(_@NAME@_bwd_xw, "@NAME@_bwd_xw", config,
                    lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(J, m["BLOCK_I"]), B),
                    (xx, w, hb, zp if prev else hb, zb if prev else hb, T, K, J), (B, T, J), use_dot, ACC=acc,
                    PREV=prev)

    def xty(out, xx, yy):            # out += xx^T yy over tokens
        J, I = out.shape[1], out.shape[2]
        _@NAME@_run(_@NAME@_bwd_xty, "@NAME@_bwd_xty", config,
                    lambda m: (triton.cdiv(J, m["BLOCK_O"]), triton.cdiv(I, m["BLOCK_I"]), B),
                    (xx, yy, out, T, J, I), (B, J, I), use_dot)

    # G_i = dz_i^T h_i: dzbar_i = h_i C_i^T, hbar_i = dz_i C_i
    dzb = [tokens(w.shape[1]) for w in ws]
    hb = [tokens(w.shape[2]) for w in ws]
    for i in range(L):
        xwt(dzb[i], hs[i], C[i], False)
        xw(hb[i], dzs[i], C[i], False)
    # the inner backward, reversed: dz_{i-1} = q_i act'(z_{i-1}), q_i = dz_i W_i
    zb = [None] * L
    for i in range(1, L):
        qb, zb[i - 1] = tokens(ws[i].shape[2]), tokens(ws[i].shape[2])
        n = qb.numel()
        _@NAME@_run(_@NAME@_bwd_chain, "@NAME@_bwd_chain", config,
                    lambda m, n=n: (triton.cdiv(n, m["BLOCK_T"] * m["BLOCK_O"]),),
                    (dzb[i - 1], zs[i - 1], qs[i], qb, zb[i - 1], n), (n,), False)
        xwt(dzb[i], qb, ws[i], True)
        xty(d_w[i], dzs[i], qb)
    # dz_{L-1} = lr loss'(p - v) / d
    out = ws[-1].shape[1]
    eb = tokens(out)
    d_lr = torch.empty(B, T, dtype=torch.float32, device=x.device)
    _@NAME@_run(_@NAME@_bwd_loss, "@NAME@_bwd_loss", config,
                lambda m: (triton.cdiv(T, m["BLOCK_T"]), B),
                (dzb[L - 1], p, vv, lrv, eb, d_lr, T, out), (B, T, out), False)
    # the inner forward, reversed: p = z_{L-1} (+ k), z_i = h_i W_i^T, h_i = act(z_{i-1})
    zb[L - 1] = eb
    for i in range(L - 1, -1, -1):
        xty(d_w[i], zb[i], hs[i])
        if i > 0:
            xw(hb[i], zb[i], ws[i], True, zs[i - 1], zb[i - 1])
        else:
            xw(hb[0], zb[0], ws[0], True)
    d_k = hb[0]@RESIDUAL_GRAD@
    return d_k, -eb, d_lr


def @NAME@(k, v, lr, momentum, forget, *state, config=None):
    """mem_write (@DOC@): (W_0'.., S_0'..) after one inner step on this chunk."""
    return _@NAME@_Fn.apply(config, k, v, lr, momentum, forget, *state)
'''


def generate(node: Node, graph: Graph) -> KernelSource:
    layers, act, loss, residual, no_momentum, no_forget = sp = spec(node, graph)
    name = kernel_name(FAMILY, sp)
    fwd, dact, ddact = _ACT[act]
    dloss, ddloss = _LOSS[loss]
    momentum = "    s = -g" if no_momentum else \
        "    s = tl.load(eta_ptr + b) * tl.load(s_ptr + off, mask=m, other=0.0) - g"
    forget = "    w = w + s" if no_forget else "    w = (1.0 - tl.load(alpha_ptr + b)) * w + s"
    kernels = render(_KERNELS, NAME=name, ACT=fwd, DACT=dact, DDACT=ddact, DLOSS=dloss, DDLOSS=ddloss,
                     RESIDUAL="    p += tl.load(k_ptr + off, mask=m, other=0.0)" if residual else "",
                     MOMENTUM=momentum, FORGET=forget)
    doc = f"{layers} layer{'s' if layers > 1 else ''}, {act}, {loss}{', residual' if residual else ''}" + \
        ("" if no_momentum else ", momentum") + ("" if no_forget else ", forget gate")
    launcher = render(_LAUNCHER, NAME=name, TUNING=tuning_source(name, CONFIGS, DEFAULT), LAYERS=str(layers),
                      DOC=doc, RESIDUAL_GRAD=" + eb" if residual else "")
    return KernelSource(name=name, family=FAMILY, source=kernels + launcher, configs=CONFIGS, default=DEFAULT,
                        key=("k", "W"), needs_grad=True, doc=f"memory update ({doc})")


def call(node: Node, ks: KernelSource, args: list[str]) -> str:
    """args = the node's operands (k, v, lr, momentum, forget, W_0.., S_0..); returns the tuple (W'.., S'..)."""
    return f"{ks.name}({', '.join(args)})"
