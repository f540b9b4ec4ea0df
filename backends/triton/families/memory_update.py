"""Neural-memory update `mem_write` (Titans / Miras style): one inner gradient step with momentum and
a forget gate over a chunk of tokens, with the memory held fixed within the chunk.

For per-sample MLP weights W_0..W_{L-1} ([B, out, in]) and momenta S_i, on the chunk's keys k
and values v ([B, T, d]) with per-token rates lr ([B, T]), momentum eta and forget alpha ([B]):

    h_0 = k;  z_i = h_i W_i^T;  h_{i+1} = act(z_i) (i < L-1);  p = z_{L-1} (+ k if residual)
    dz_{L-1} = lr_t * loss'(p - v) / d            (mse: 2 e, l1: sign e, huber: clamp(e, -1, 1))
    G_i = dz_i^T h_i;   dz_{i-1} = (dz_i W_i) * act'(z_{i-1})
    S_i' = eta * S_i - G_i;   W_i' = (1 - alpha) * W_i + S_i'

Generated kernels (one set per spec): a forward-layer kernel per hidden layer (z and act(z) in its
epilogue), a last-layer kernel whose epilogue is the loss derivative, a data-gradient kernel
(dz W with the act' epilogue) and the *update* kernel: the weight gradient G_i = dz^T h reduced
over the chunk's tokens on chip, with the momentum and forget-gate update fused in its epilogue,
so G is never written to memory. All are batched over samples (grid axis 2) and tile
[BLOCK_T, BLOCK_O, BLOCK_I] with `tl.dot` (fp32, ieee) when every tile is 16 wide.

The chunk semantics are the interpreter's (`torch_runtime.memory_write`): every token of the
write sees the same W; a `scan` over segments makes one `mem_write` per chunk.

Backward (the outer training pass differentiates through the update, second order): the
`torch.autograd.Function`'s backward recomputes the step in torch with `create_graph` (the
reference's formula, generated for this spec) and takes its vector-Jacobian product; it is exact
but not a Triton kernel.

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

# activation and its derivative, in Triton (z is the pre-activation tile)
_ACT = {
    "gelu": ("0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))",
             "0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327"),
    "relu": ("tl.maximum(z, 0.0)", "tl.where(z > 0, 1.0, 0.0)"),
    "silu": ("z * tl.sigmoid(z)", "tl.sigmoid(z) * (1.0 + z * (1.0 - tl.sigmoid(z)))"),
    "tanh": ("2.0 * tl.sigmoid(2.0 * z) - 1.0", "1.0 - (2.0 * tl.sigmoid(2.0 * z) - 1.0) * (2.0 * tl.sigmoid(2.0 * z) - 1.0)"),
}
# derivative of the per-element loss with respect to the error e (before the mean's 1/d)
_DLOSS = {"mse": "2.0 * e", "l1": "tl.where(e > 0, 1.0, tl.where(e < 0, -1.0, 0.0))",
          "huber": "tl.minimum(tl.maximum(e, -1.0), 1.0)"}
# the same step in torch, for the backward's recomputation
_TORCH_ACT = {"gelu": "torch.nn.functional.gelu(h)", "relu": "torch.relu(h)", "silu": "torch.nn.functional.silu(h)",
              "tanh": "torch.tanh(h)"}
_TORCH_LOSS = {"mse": "err.pow(2).mean(-1)", "l1": "err.abs().mean(-1)",
               "huber": "torch.nn.functional.huber_loss(err, torch.zeros_like(err), reduction=\"none\").mean(-1)"}


def matches(node: Node, graph: Graph) -> bool:
    return (node.op is Op.MEM_WRITE and node.attr("act") in _ACT and node.attr("loss") in _DLOSS
            and node.attr("retention") in (None, "l2"))      # lq / kl retention (Miras) are not generated


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
def _@NAME@_layer(x_ptr, w_ptr, b, t, o, T, IN, OUT, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                  BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """z[t, o] = sum_i x[b, t, i] W[b, o, i] for one [BLOCK_T, BLOCK_O] tile."""
    acc = tl.zeros((BLOCK_T, BLOCK_O), tl.float32)
    for i0 in range(0, IN, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        x = tl.load(x_ptr + (b * T + t[:, None]) * IN + i[None, :], mask=(t < T)[:, None] & (i < IN)[None, :],
                    other=0.0)
        w = tl.load(w_ptr + (b * OUT + o[None, :]) * IN + i[:, None], mask=(i < IN)[:, None] & (o < OUT)[None, :],
                    other=0.0)
        acc += _@NAME@_mm(x, w, USE_DOT)
    return acc


@triton.jit
def _@NAME@_hidden(x_ptr, w_ptr, z_ptr, h_ptr, T, IN, OUT, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                   BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    z = _@NAME@_layer(x_ptr, w_ptr, b, t, o, T, IN, OUT, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (o < OUT)[None, :]
    off = (b * T + t[:, None]) * OUT + o[None, :]
    tl.store(z_ptr + off, z, mask=m)
    tl.store(h_ptr + off, @ACT@, mask=m)


@triton.jit
def _@NAME@_last(x_ptr, w_ptr, k_ptr, v_ptr, lr_ptr, dz_ptr, T, IN, OUT, BLOCK_T: tl.constexpr,
                 BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """The last layer with the loss derivative in its epilogue: dz = lr_t * loss'(p - v) / OUT."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    p = _@NAME@_layer(x_ptr, w_ptr, b, t, o, T, IN, OUT, BLOCK_T, BLOCK_O, BLOCK_I, USE_DOT)
    m = (t < T)[:, None] & (o < OUT)[None, :]
    off = (b * T + t[:, None]) * OUT + o[None, :]
@RESIDUAL@
    e = p - tl.load(v_ptr + off, mask=m, other=0.0)
    lr = tl.load(lr_ptr + b * T + t, mask=t < T, other=0.0)
    tl.store(dz_ptr + off, lr[:, None] * (@DLOSS@) / OUT, mask=m)


@triton.jit
def _@NAME@_backprop(dz_ptr, w_ptr, z_ptr, dzp_ptr, T, IN, OUT, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """dz_prev[t, i] = (sum_o dz[b, t, o] W[b, o, i]) * act'(z_prev[b, t, i])."""
    b = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_T, BLOCK_I), tl.float32)
    for o0 in range(0, OUT, BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        dz = tl.load(dz_ptr + (b * T + t[:, None]) * OUT + o[None, :], mask=(t < T)[:, None] & (o < OUT)[None, :],
                     other=0.0)
        w = tl.load(w_ptr + (b * OUT + o[:, None]) * IN + i[None, :], mask=(o < OUT)[:, None] & (i < IN)[None, :],
                    other=0.0)
        acc += _@NAME@_mm(dz, w, USE_DOT)
    m = (t < T)[:, None] & (i < IN)[None, :]
    off = (b * T + t[:, None]) * IN + i[None, :]
    z = tl.load(z_ptr + off, mask=m, other=0.0)
    tl.store(dzp_ptr + off, acc * (@DACT@), mask=m)


@triton.jit
def _@NAME@_update(dz_ptr, h_ptr, w_ptr, s_ptr, eta_ptr, alpha_ptr, wo_ptr, so_ptr, T, IN, OUT,
                   BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, USE_DOT: tl.constexpr):
    """G = dz^T h over the chunk's tokens, then S' = eta S - G and W' = (1 - alpha) W + S'."""
    b = tl.program_id(2).to(tl.int64)
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    g = tl.zeros((BLOCK_O, BLOCK_I), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        dzt = tl.load(dz_ptr + (b * T + t[None, :]) * OUT + o[:, None], mask=(o < OUT)[:, None] & (t < T)[None, :],
                      other=0.0)
        h = tl.load(h_ptr + (b * T + t[:, None]) * IN + i[None, :], mask=(t < T)[:, None] & (i < IN)[None, :],
                    other=0.0)
        g += _@NAME@_mm(dzt, h, USE_DOT)
    m = (o < OUT)[:, None] & (i < IN)[None, :]
    off = (b * OUT + o[:, None]) * IN + i[None, :]
    w = tl.load(w_ptr + off, mask=m, other=0.0)
@MOMENTUM@
@FORGET@
    tl.store(so_ptr + off, s, mask=m)
    tl.store(wo_ptr + off, w, mask=m)
'''

_LAUNCHER = '''

@TUNING@


def _@NAME@_run(kernel, tag, config, grid_of, args, sizes, use_dot):
    def run(meta):
        kernel[grid_of(meta)](*args, USE_DOT=use_dot and min(meta["BLOCK_T"], meta["BLOCK_O"], meta["BLOCK_I"]) >= 16,
                              **meta)
    run(_@NAME@_config(tag, sizes, config, run))


def _@NAME@_step(k, v, lr, eta, alpha, ws, ss, create_graph):
    """The step in torch (the reference's formula), for the backward's recomputation."""
    B = k.shape[0]
    x0 = k.reshape(B, -1, k.shape[-1])
    h = x0
    for i, w in enumerate(ws):
        h = torch.einsum("bti,boi->bto", h, w)
        if i < len(ws) - 1:
            h = @TORCH_ACT@
@TORCH_RESIDUAL@
    err = h - v.reshape(h.shape)
    total = (@TORCH_LOSS@.reshape(lr.shape) * lr).sum()
    grads = torch.autograd.grad(total, ws, create_graph=create_graph)
    new_s = [eta.reshape(-1, 1, 1) * s - g for s, g in zip(ss, grads)]
    return [(1 - alpha.reshape(-1, 1, 1)) * w + s for w, s in zip(ws, new_s)] + new_s


class _@NAME@_Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, config, k, v, lr, eta, alpha, *state):
        L = @LAYERS@
        ws = [w.float().contiguous() for w in state[:L]]
        ss = [s.float().contiguous() for s in state[L:]]
        B = k.shape[0]
        x = k.float().reshape(B, -1, k.shape[-1]).contiguous()
        T = x.shape[1]
        vv = v.float().reshape(B, T, -1).contiguous()
        lrv = (lr.float().expand(B, T) if lr.dim() == 0 else lr.float().reshape(B, T)).contiguous()
        etav = eta.float().reshape(-1).expand(B).contiguous()
        alphav = alpha.float().reshape(-1).expand(B).contiguous()
        use_dot = min(w.shape[1] for w in ws) >= 16 and min(w.shape[2] for w in ws) >= 16 and T >= 16
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
        _@NAME@_run(_@NAME@_last, "@NAME@_last", config,
                    lambda m: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(out, m["BLOCK_O"]), B),
                    (hs[-1], ws[-1], x, vv, lrv, dz, T, hs[-1].shape[2], out), (B, T, out), use_dot)
        new_w, new_s = [None] * L, [None] * L
        for i in reversed(range(L)):
            out, inp = ws[i].shape[1], ws[i].shape[2]
            new_w[i], new_s[i] = torch.empty_like(ws[i]), torch.empty_like(ws[i])
            _@NAME@_run(_@NAME@_update, "@NAME@_update", config,
                        lambda m, out=out, inp=inp: (triton.cdiv(out, m["BLOCK_O"]), triton.cdiv(inp, m["BLOCK_I"]), B),
                        (dz, hs[i], ws[i], ss[i], etav, alphav, new_w[i], new_s[i], T, inp, out), (B, out, inp),
                        use_dot)
            if i > 0:
                dzp = torch.empty(B, T, inp, dtype=torch.float32, device=x.device)
                _@NAME@_run(_@NAME@_backprop, "@NAME@_backprop", config,
                            lambda m, inp=inp: (triton.cdiv(T, m["BLOCK_T"]), triton.cdiv(inp, m["BLOCK_I"]), B),
                            (dz, ws[i], zs[i - 1], dzp, T, inp, out), (B, T, inp), use_dot)
                dz = dzp
        ctx.save_for_backward(k, v, lr, eta, alpha, *state)
        return tuple(new_w + new_s)

    @staticmethod
    def backward(ctx, *grads):
        L = @LAYERS@
        saved = ctx.saved_tensors
        create = any(ctx.needs_input_grad[6:6 + L])        # as the reference: G is differentiated only
        with torch.enable_grad():                         # when the weights carry gradients
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in saved]
            outs = _@NAME@_step(*leaves[:5], leaves[5:5 + L], leaves[5 + L:], create)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
        return (None,) + tuple(got)


def @NAME@(k, v, lr, momentum, forget, *state, config=None):
    """mem_write (@DOC@): (W_0'.., S_0'..) after one inner step on this chunk."""
    return _@NAME@_Fn.apply(config, k, v, lr, momentum, forget, *state)
'''


def generate(node: Node, graph: Graph) -> KernelSource:
    layers, act, loss, residual, no_momentum, no_forget = sp = spec(node, graph)
    name = kernel_name(FAMILY, sp)
    fwd, dact = _ACT[act]
    momentum = "    s = -g" if no_momentum else \
        "    s = tl.load(eta_ptr + b) * tl.load(s_ptr + off, mask=m, other=0.0) - g"
    forget = "    w = w + s" if no_forget else "    w = (1.0 - tl.load(alpha_ptr + b)) * w + s"
    kernels = render(_KERNELS, NAME=name, ACT=fwd, DACT=dact, DLOSS=_DLOSS[loss],
                     RESIDUAL="    p += tl.load(k_ptr + off, mask=m, other=0.0)" if residual else "",
                     MOMENTUM=momentum, FORGET=forget)
    doc = f"{layers} layer{'s' if layers > 1 else ''}, {act}, {loss}{', residual' if residual else ''}" + \
        ("" if no_momentum else ", momentum") + ("" if no_forget else ", forget gate")
    launcher = render(_LAUNCHER, NAME=name, TUNING=tuning_source(name, CONFIGS, DEFAULT), LAYERS=str(layers),
                      TORCH_ACT=_TORCH_ACT[act], TORCH_LOSS=_TORCH_LOSS[loss], DOC=doc,
                      TORCH_RESIDUAL="    h = h + x0" if residual else "")
    return KernelSource(name=name, family=FAMILY, source=kernels + launcher, configs=CONFIGS, default=DEFAULT,
                        key=("k", "W"), needs_grad=True, doc=f"memory update ({doc})")


def call(node: Node, ks: KernelSource, args: list[str]) -> str:
    """args = the node's operands (k, v, lr, momentum, forget, W_0.., S_0..); returns the tuple (W'.., S'..)."""
    return f"{ks.name}({', '.join(args)})"
