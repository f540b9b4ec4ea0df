"""Routing: gather of the routed tokens and the gated scatter back (`route_topk`), and `gather`.

For `route_topk` the emitter selects `idx` with `route_select` (top-k then sort, in torch: a
[B, T] score), gathers the active tokens with `<name>_gather(x, idx)`, runs the region on them
and writes back with `<name>(x, idx, x_sel, y, weight, among) -> (x_out, sel)`:

    new   = y                                   (no weight)
          = x_sel + w[b, idx] * (y - x_sel)     (weight)
    new   = where(among[b, idx], new, x_sel)    (among)
    x_out = x with rows idx replaced by new;   sel = one_hot(idx) & among

Both are `torch.autograd.Function`s. Top-k indices are distinct within a row, so the gather's
backward and the scatter write rows without atomics; a generic `gather` node (indices may repeat)
accumulates its backward with `tl.atomic_add`. One program owns BLOCK_K routed rows of one sample
and walks the row's trailing features in BLOCK_R slices, so the weight's gradient (a sum over the
features) is reduced on chip.

Specialisation: weight on/off, among on/off, unique (route) or repeating (gather) indices, dtype.
"""
from __future__ import annotations

from archc.backends.triton.families._util import config_space, kernel_name, render, tuning_source
from archc.backends.triton.kernel import KernelSource
from archc.ir.core import Graph, Node, value_types
from archc.ir.ops import Op, norm_axis

FAMILY = "routing"

CONFIGS = config_space(BLOCK_K=(1, 4, 16), BLOCK_R=(64, 128, 256), num_warps=(2, 4, 8), num_stages=(1,))
DEFAULT = {"BLOCK_K": 4, "BLOCK_R": 128, "num_warps": 4, "num_stages": 1}

_TL_DTYPES = {"f32": "tl.float32", "i64": "tl.int64", "bool": "tl.int1"}


def matches(node: Node, graph: Graph) -> bool:
    """`gather` nodes. A `route_topk` node is a region: the emitter asks `region_matches` and
    emits the selection, `gather_call`, the region body and `call` itself."""
    return node.op is Op.GATHER and value_types(graph)[node.inputs[0]].dtype.value in ("f32", "i64")


def region_matches(node: Node, graph: Graph) -> bool:
    """Compacted routes (a masked route, SPEC §22.2, has no gather or scatter to run)."""
    return (node.op is Op.ROUTE_TOPK and node.attr("schedule") != "mask"
            and value_types(graph)[node.inputs[0]].dtype.value == "f32")


def spec(node: Node, graph: Graph) -> tuple:
    x = value_types(graph)[node.inputs[0]]
    if node.op is Op.ROUTE_TOPK:
        return ("route", bool(node.attr("has_weight")), bool(node.attr("has_among")), x.dtype.value)
    return ("gather", norm_axis(int(node.attr("axis")), x.rank), x.dtype.value)


_GATHER = '''
@triton.jit
def _@NAME@_gather_fwd(x_ptr, idx_ptr, out_ptr, L, K, R, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    mask_j = j < K
    row = tl.load(idx_ptr + p * K + j, mask=mask_j, other=0)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[None, :]
        m = mask_j & (r < R)
        v = tl.load(x_ptr + (p * L + row) * R + r, mask=m)
        tl.store(out_ptr + (p * K + j) * R + r, v, mask=m)


@triton.jit
def _@NAME@_gather_bwd(g_ptr, idx_ptr, dx_ptr, L, K, R, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    mask_j = j < K
    row = tl.load(idx_ptr + p * K + j, mask=mask_j, other=0)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[None, :]
        m = mask_j & (r < R)
        g = tl.load(g_ptr + (p * K + j) * R + r, mask=m, other=0.0)
@ACCUMULATE@


@TUNING@


class _@NAME@_Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, axis, config):
        P = torch.Size(x.shape[:axis]).numel()
        L = x.shape[axis]
        R = torch.Size(x.shape[axis + 1:]).numel()
        K = idx.shape[-1]
        xc = x.contiguous()
        ic = idx.reshape(P, K).contiguous()
        out = torch.empty(tuple(idx.shape) + tuple(x.shape[axis + 1:]), dtype=x.dtype, device=x.device)
        if P * K * R:
            def run(meta):
                _@NAME@_gather_fwd[(P, triton.cdiv(K, meta["BLOCK_K"]))](xc, ic, out, L, K, R, **meta)
            run(_@NAME@_config("@NAME@_gather_fwd", (P, K, R), config, run))
        ctx.save_for_backward(ic)
        ctx.meta = (config, x.shape, P, L, K, R)
        return out

    @staticmethod
    def backward(ctx, g):
        (ic,) = ctx.saved_tensors
        config, shape, P, L, K, R = ctx.meta
        dx = torch.zeros(shape, dtype=torch.float32, device=g.device)
        gc = g.float().contiguous()
        if P * K * R:
            def run(meta):
                dx.zero_()
                _@NAME@_gather_bwd[(P, triton.cdiv(K, meta["BLOCK_K"]))](gc, ic, dx, L, K, R, **meta)
            run(_@NAME@_config("@NAME@_gather_bwd", (P, K, R), config, run))
        return dx, None, None, None


def @GATHER_NAME@(x, idx, config=None):
    """x gathered along axis @AXIS@ by per-row indices (@UNIQUE_DOC@)."""
    return _@NAME@_Gather.apply(x, idx, @AXIS@, config)
'''

_SCATTER = '''

@triton.jit
def _@NAME@_scatter_fwd(out_ptr, sel_ptr, idx_ptr, xs_ptr, y_ptr, w_ptr, among_ptr, T, K, R,
                        BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    mask_j = j < K
    row = tl.load(idx_ptr + b * K + j, mask=mask_j, other=0)
@LOAD_GATES@
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[None, :]
        m = mask_j & (r < R)
@LOADS@
@NEW@
        tl.store(out_ptr + (b * T + row) * R + r, new, mask=m)
    tl.store(sel_ptr + b * T + row, @SEL@, mask=mask_j)


@triton.jit
def _@NAME@_scatter_bwd(g_ptr, idx_ptr, xs_ptr, y_ptr, w_ptr, among_ptr, dx_ptr, dxs_ptr, dy_ptr, dw_ptr,
                        T, K, R, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    mask_j = j < K
    row = tl.load(idx_ptr + b * K + j, mask=mask_j, other=0)
@LOAD_GATES@
@DW_INIT@
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)[None, :]
        m = mask_j & (r < R)
        g = tl.load(g_ptr + (b * T + row) * R + r, mask=m, other=0.0)
        tl.store(dx_ptr + (b * T + row) * R + r, tl.zeros_like(g), mask=m)
@GRADS@
@DW_STORE@


class _@NAME@_Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, x_sel, y, weight, among, config):
        B, T = x.shape[0], x.shape[1]
        K = idx.shape[1]
        R = torch.Size(x.shape[2:]).numel()
        out = x.float().contiguous().clone()
        sel = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        ic = idx.contiguous()
        xs = x_sel.float().contiguous()
        yc = y.float().contiguous()
        wc = @W_ARG@
        ac = @AMONG_ARG@
        if B * K:
            def run(meta):
                _@NAME@_scatter_fwd[(B, triton.cdiv(K, meta["BLOCK_K"]))](out, sel, ic, xs, yc, wc, ac, T, K, R, **meta)
            run(_@NAME@_config("@NAME@_scatter_fwd", (B, K, R), config, run))
        ctx.save_for_backward(ic, xs, yc, wc, ac)
        ctx.meta = (config, B, T, K, R)
        ctx.mark_non_differentiable(sel)
        return out, sel

    @staticmethod
    def backward(ctx, g, _gsel):
        ic, xs, yc, wc, ac = ctx.saved_tensors
        config, B, T, K, R = ctx.meta
        gc = g.float().contiguous()
        dx = gc.clone()
        dxs = torch.empty_like(xs)
        dy = torch.empty_like(yc)
        dw = @DW_ALLOC@
        if B * K:
            def run(meta):
                _@NAME@_scatter_bwd[(B, triton.cdiv(K, meta["BLOCK_K"]))](
                    gc, ic, xs, yc, wc, ac, dx, dxs, dy, dw, T, K, R, **meta)
            run(_@NAME@_config("@NAME@_scatter_bwd", (B, K, R), config, run))
        return dx, None, dxs, dy, @DW_RET@, None, None


def @NAME@(x, idx, x_sel, y, weight=None, among=None, config=None):
    """route_topk write-back (@GATE_DOC@): returns (x with the routed rows replaced, sel)."""
    return _@NAME@_Scatter.apply(x, idx, x_sel, y, weight, among, config)
'''


def generate(node: Node, graph: Graph) -> KernelSource:
    sp = spec(node, graph)
    name = kernel_name(FAMILY, sp)
    if sp[0] == "gather":
        _, axis, dtype = sp
        src = _gather_source(name, name, axis, unique=False)
        return KernelSource(name=name, family=FAMILY, source=src, configs=CONFIGS, default=DEFAULT,
                            key=("x", "idx"), needs_grad=dtype == "f32",
                            doc=f"gather along axis {axis} by per-row indices ({dtype})")
    _, weight, among, _dtype = sp
    src = _gather_source(name, f"{name}_gather", 1, unique=True) + _scatter_source(name, weight, among)
    gates = ", ".join(g for g, on in (("weight", weight), ("among", among)) if on) or "ungated"
    return KernelSource(name=name, family=FAMILY, source=src, configs=CONFIGS, default=DEFAULT,
                        key=("x", "idx"), needs_grad=True, doc=f"route_topk gather and write-back ({gates})",
                        meta={"gather": f"{name}_gather"})


def _gather_source(name: str, launcher: str, axis: int, unique: bool) -> str:
    if unique:      # top-k rows are distinct: each dx row is written by one program
        acc = "        tl.store(dx_ptr + (p * L + row) * R + r, g, mask=m)"
    else:
        acc = "        tl.atomic_add(dx_ptr + (p * L + row) * R + r, g, mask=m)"
    return render(_GATHER, NAME=name, GATHER_NAME=launcher, ACCUMULATE=acc, AXIS=str(axis),
                  TUNING=tuning_source(name, CONFIGS, DEFAULT),
                  UNIQUE_DOC="distinct indices" if unique else "indices may repeat")


def _scatter_source(name: str, weight: bool, among: bool) -> str:
    gates = []
    if weight:
        gates.append("    w = tl.load(w_ptr + b * T + row, mask=mask_j, other=0.0)")
    if among:
        gates.append("    valid = tl.load(among_ptr + b * T + row, mask=mask_j, other=0) != 0")
    loads = ["        y = tl.load(y_ptr + (b * K + j) * R + r, mask=m, other=0.0)"]
    if weight or among:
        loads.insert(0, "        xs = tl.load(xs_ptr + (b * K + j) * R + r, mask=m, other=0.0)")
    new = ["        new = xs + w * (y - xs)" if weight else "        new = y"]
    if among:
        new.append("        new = tl.where(valid, new, xs)")
    # gradients of new w.r.t. y, x_sel and w, per routed row
    keep = "valid" if among else None
    gy = "g * w" if weight else "g"
    gxs = "g * (1.0 - w)" if weight else "tl.zeros_like(g)"
    if keep:
        gy, gxs = f"tl.where({keep}, {gy}, 0.0)", f"tl.where({keep}, {gxs}, g)"
    grads = [f"        tl.store(dy_ptr + (b * K + j) * R + r, {gy}, mask=m)",
             f"        tl.store(dxs_ptr + (b * K + j) * R + r, {gxs}, mask=m)"]
    dw_init = dw_store = ""
    if weight:
        dw_init = "    dw = tl.zeros((BLOCK_K, 1), tl.float32)"
        grads += ["        xs = tl.load(xs_ptr + (b * K + j) * R + r, mask=m, other=0.0)",
                  "        y = tl.load(y_ptr + (b * K + j) * R + r, mask=m, other=0.0)",
                  "        dw += tl.sum(g * (y - xs), axis=1)[:, None]"]
        dw_store = ("    dw = tl.where(valid, dw, 0.0)\n" if among else "") + \
            "    tl.store(dw_ptr + b * T + row, dw, mask=mask_j)"
    return render(_SCATTER, NAME=name, LOAD_GATES="\n".join(gates), LOADS="\n".join(loads), NEW="\n".join(new),
                  SEL="valid" if among else "tl.full((BLOCK_K, 1), 1, tl.int1)",
                  W_ARG="weight.float().contiguous()" if weight else "xs",
                  AMONG_ARG="among.contiguous()" if among else "ic",
                  GRADS="\n".join(grads), DW_INIT=dw_init, DW_STORE=dw_store,
                  DW_ALLOC="torch.zeros_like(wc)" if weight else "xs",
                  DW_RET="dw" if weight else "None",
                  GATE_DOC=", ".join(g for g, on in (("weight", weight), ("among", among)) if on) or "ungated")


def call(node: Node, ks: KernelSource, args: list[str]) -> str:
    """`gather`: args = (x, idx). `route_topk` write-back: args = (x, idx, x_sel, y[, weight][, among])
    (the gates the node has, in that order); the result is (x_out, sel) like the node's."""
    if node.op is Op.GATHER:
        return f"{ks.name}({args[0]}, {args[1]})"
    x, idx, x_sel, y, *rest = args
    kw = []
    if node.attr("has_weight"):
        kw.append(f"weight={rest.pop(0)}")
    if node.attr("has_among"):
        kw.append(f"among={rest.pop(0)}")
    return f"{ks.name}({', '.join([x, idx, x_sel, y] + kw)})"


def gather_call(node: Node, ks: KernelSource, args: list[str]) -> str:
    """`route_topk`: the routed tokens x_sel from args = (x, idx)."""
    return f"{ks.meta['gather']}({args[0]}, {args[1]})"
