"""Gated linear scan `linear_scan(a, b, h0) {axis}`: h_t = a_t * h_{t-1} + b_t, forward and backward.

Chunked parallel form: the output is viewed as [P, T, N] (P = the dims before the scan axis,
N = the dims after it). One program owns one row p and BLOCK_N channels; it walks the sequence in
chunks of BLOCK_T steps, scans each chunk in parallel with `tl.associative_scan` over the pairs
(a, b) with (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2), and carries h across chunks.

The backward is the same scan run in reverse: g_t = dh_t + a_{t+1} g_{t+1}; then db_t = g_t,
da_t = g_t h_{t-1} (h_{-1} = h0) and dh0 = a_0 g_0.

Specialisation (what changes the kernel text): the *gate form* of `a` and of `b` -- which of the
three groups (dims before the axis, the axis, dims after it) each operand really has, read from
the IR types; a time-invariant gate is loaded once per program, a per-row gate once per step --
and whether h0 is a zero fill (then it is neither loaded nor differentiated). An operand that
broadcasts within a group (e.g. [1, T, d] against [B, H, T, d] with only H present) is
materialised to the full shape by the launcher (form "PTN").
"""
from __future__ import annotations

import sympy

from archc.backends.triton.families._util import config_space, is_zero_fill, kernel_name, render, tuning_source
from archc.backends.triton.kernel import KernelSource
from archc.ir.core import Graph, Node, value_types
from archc.ir.ops import Op, norm_axis

FAMILY = "gated_scan"

CONFIGS = config_space(BLOCK_T=(16, 32, 64), BLOCK_N=(32, 64, 128), num_warps=(2, 4), num_stages=(1, 2))
DEFAULT = {"BLOCK_T": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}


def matches(node: Node, graph: Graph) -> bool:
    if node.op is not Op.LINEAR_SCAN:
        return False
    types = value_types(graph)
    return all(types[i].dtype.value == "f32" for i in node.inputs)


def _form(shape, out, ax: int) -> str:
    """Which of the groups P (before the axis), T (the axis), N (after it) the operand has."""
    rank = len(out)
    padded = (sympy.Integer(1),) * (rank - len(shape)) + tuple(shape)
    groups = {"P": range(0, ax), "T": range(ax, ax + 1), "N": range(ax + 1, rank)}
    form = ""
    for letter, dims in groups.items():
        kinds = set()
        for i in dims:
            if out[i] == 1:
                continue                                  # a unit output dim fits either kind
            kinds.add("full" if padded[i] == out[i] else "bcast" if padded[i] == 1 else "other")
        if kinds <= {"full"}:
            form += letter
        elif kinds != {"bcast"}:
            return "PTN"                                  # mixed: the launcher materialises it
    return form


def spec(node: Node, graph: Graph) -> tuple:
    types = value_types(graph)
    a, b, _h0 = (types[i] for i in node.inputs)
    out = node.out.type.shape
    ax = norm_axis(int(node.attr("axis")), len(out))
    return (len(out), ax, _form(a.shape, out, ax), _form(b.shape, out, ax), is_zero_fill(graph, node.inputs[2]))


def _offset(form: str, time: str) -> str:
    terms = {"PTN": f"p * T * N + ({time}) * N + n", "PT": f"p * T + ({time})", "PN": "p * N + n",
             "TN": f"({time}) * N + n", "P": "p", "T": f"({time})", "N": "n", "": "0"}
    return terms[form]


def _load(ptr: str, form: str, time: str, tmask: str, other: str) -> str:
    masks = ([tmask] if "T" in form and tmask else []) + (["mask_n"] if "N" in form else [])
    mask = f", mask={' & '.join(masks)}, other={other}" if masks else ""
    return f"tl.load({ptr} + {_offset(form, time)}{mask})"


_FWD = '''
@triton.jit
def _@NAME@_combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _@NAME@_fwd(a_ptr, b_ptr, h0_ptr, h_ptr, T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask_n = n < N
    rows = tl.arange(0, BLOCK_T)[:, None]
    zero = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
@CARRY0@
@HOIST_FWD@
    for t0 in range(0, T, BLOCK_T):
        t = t0 + rows
        mask_t = t < T
        a = tl.where(mask_t & mask_n, @LOAD_A@ + zero, 1.0)
        b = tl.where(mask_t & mask_n, @LOAD_B@ + zero, 0.0)
        ca, cb = tl.associative_scan((a, b), 0, _@NAME@_combine)
        h = ca * carry + cb
        tl.store(h_ptr + p * T * N + t * N + n, h, mask=mask_t & mask_n)
        carry = tl.sum(tl.where(rows == BLOCK_T - 1, h, 0.0), axis=0)[None, :]


@triton.jit
def _@NAME@_bwd(a_ptr, h0_ptr, h_ptr, dh_ptr, ga_ptr, gb_ptr, gh0_ptr, T, N,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    mask_n = n < N
    rows = tl.arange(0, BLOCK_T)[:, None]
    zero = tl.zeros((BLOCK_T, BLOCK_N), tl.float32)
    carry = tl.zeros((1, BLOCK_N), tl.float32)
@HOIST_BWD@
@H0ROW@
    for t0 in range(0, T, BLOCK_T):
        t = T - 1 - (t0 + rows)                       # this chunk, newest step first
        mask_t = t >= 0
        nxt = (t + 1 < T) & mask_t
        an = tl.where(nxt & mask_n, @LOAD_A_NEXT@ + zero, 0.0)
        an = tl.where(mask_t, an, 1.0)
        dh = tl.load(dh_ptr + p * T * N + t * N + n, mask=mask_t & mask_n, other=0.0)
        ca, cb = tl.associative_scan((an, dh), 0, _@NAME@_combine)
        g = ca * carry + cb
        carry = tl.sum(tl.where(rows == BLOCK_T - 1, g, 0.0), axis=0)[None, :]
        tl.store(gb_ptr + p * T * N + t * N + n, g, mask=mask_t & mask_n)
        hp = tl.load(h_ptr + p * T * N + (t - 1) * N + n, mask=(t >= 1) & mask_n, other=0.0)
@HP0@
        tl.store(ga_ptr + p * T * N + t * N + n, g * hp, mask=mask_t & mask_n)
@GH0@


@TUNING@


def _@NAME@_view(x, shape, ax, form):
    """x broadcast to `shape`, keeping only the groups in `form`, contiguous: [P?, T?, N?]."""
    x = x.expand(shape)
    idx = tuple(slice(None) if (("P" if i < ax else "T" if i == ax else "N") in form) else 0
                for i in range(len(shape)))
    return x[idx].contiguous()


class _@NAME@_Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, config):
        shape = torch.broadcast_shapes(a.shape, b.shape)
        ax = @AXIS@
        T = shape[ax]
        P = torch.Size(shape[:ax]).numel()
        N = torch.Size(shape[ax + 1:]).numel()
        rest = shape[:ax] + shape[ax + 1:]
        av = _@NAME@_view(a.float(), shape, ax, "@FORM_A@")
        bv = _@NAME@_view(b.float(), shape, ax, "@FORM_B@")
        hv = h0.float().expand(rest).contiguous()
        h = torch.empty(shape, dtype=torch.float32, device=av.device)
        if P * T * N:
            def run(meta):
                _@NAME@_fwd[(P, triton.cdiv(N, meta["BLOCK_N"]))](av, bv, hv, h, T, N, **meta)
            run(_@NAME@_config("@NAME@_fwd", (P, T, N), config, run))
        ctx.save_for_backward(av, hv, h)
        ctx.meta = (config, shape, a.shape, b.shape, h0.shape)
        return h

    @staticmethod
    def backward(ctx, dh):
        av, hv, h = ctx.saved_tensors
        config, shape, a_shape, b_shape, @H0_SHAPE@ = ctx.meta
        ax = @AXIS@
        T = shape[ax]
        P = torch.Size(shape[:ax]).numel()
        N = torch.Size(shape[ax + 1:]).numel()
        dh = dh.float().contiguous()
        ga = torch.zeros(shape, dtype=torch.float32, device=h.device)
        gb = torch.zeros(shape, dtype=torch.float32, device=h.device)
        gh0 = torch.zeros(hv.shape, dtype=torch.float32, device=h.device)
        if P * T * N:
            def run(meta):
                _@NAME@_bwd[(P, triton.cdiv(N, meta["BLOCK_N"]))](av, hv, h, dh, ga, gb, gh0, T, N, **meta)
            run(_@NAME@_config("@NAME@_bwd", (P, T, N), config, run))
        gh0 = @RET_GH0@
        return ga.sum_to_size(a_shape), gb.sum_to_size(b_shape), gh0, None


def @NAME@(a, b, h0, config=None):
    """linear_scan along axis @AXIS@ (gate form a=@FORM_A@, b=@FORM_B@@ZERO_DOC@)."""
    return _@NAME@_Fn.apply(a, b, h0, config)
'''


def generate(node: Node, graph: Graph) -> KernelSource:
    rank, ax, form_a, form_b, zero_h0 = sp = spec(node, graph)
    name = kernel_name(FAMILY, sp)
    if zero_h0:
        carry0 = "    carry = tl.zeros((1, BLOCK_N), tl.float32)"
        h0row = hp0 = gh0 = ""
        ret_gh0 = "None"
    else:
        carry0 = "    carry = tl.load(h0_ptr + p * N + n, mask=mask_n, other=0.0)"
        h0row = "    h0row = tl.load(h0_ptr + p * N + n, mask=mask_n, other=0.0)"
        hp0 = "        hp = tl.where(t == 0, h0row, hp)"
        a0 = _load("a_ptr", form_a, "0", "", "0.0") if "T" in form_a else "a_row"
        gh0 = f"    a0 = {a0} + tl.zeros((1, BLOCK_N), tl.float32)\n" \
              "    tl.store(gh0_ptr + p * N + n, carry * a0, mask=mask_n)"
        ret_gh0 = "gh0.sum_to_size(h0_shape)"
    hoist = []
    if "T" not in form_a:
        hoist.append(f"    a_row = {_load('a_ptr', form_a, '0', '', '1.0')}")
    hoist_fwd = list(hoist)
    if "T" not in form_b:
        hoist_fwd.append(f"    b_row = {_load('b_ptr', form_b, '0', '', '0.0')}")
    load_a = _load("a_ptr", form_a, "t", "mask_t", "1.0") if "T" in form_a else "a_row"
    load_b = _load("b_ptr", form_b, "t", "mask_t", "0.0") if "T" in form_b else "b_row"
    load_an = _load("a_ptr", form_a, "t + 1", "nxt", "0.0") if "T" in form_a else "a_row"
    src = render(_FWD, NAME=name, CARRY0=carry0, HOIST_FWD="\n".join(hoist_fwd), HOIST_BWD="\n".join(hoist),
                 LOAD_A=load_a, LOAD_B=load_b, LOAD_A_NEXT=load_an, H0ROW=h0row, HP0=hp0, GH0=gh0,
                 AXIS=str(ax), H0_SHAPE="_" if zero_h0 else "h0_shape", FORM_A=form_a, FORM_B=form_b,
                 ZERO_DOC=", h0 = 0" if zero_h0 else "", RET_GH0=ret_gh0,
                 TUNING=tuning_source(name, CONFIGS, DEFAULT))
    return KernelSource(name=name, family=FAMILY, source=src, configs=CONFIGS, default=DEFAULT,
                        key=("a", "b"), needs_grad=True,
                        doc=f"gated scan over axis {ax} of a rank-{rank} tensor, gate form {form_a}/{form_b}")


def call(node: Node, ks: KernelSource, args: list[str]) -> str:
    return f"{ks.name}({args[0]}, {args[1]}, {args[2]})"
