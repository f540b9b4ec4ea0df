"""IR -> ONNX lowering: the `Lowerer` walks regions and applies one rule per op (the `LOWER` table).

A rule takes the lowerer, the scope to emit into, the IR node and its operands' ONNX names, and
returns the ONNX names of the node's results. Elementwise, reduction and movement rules live here;
composite kernels (attention, rope, memories, banks) in `kernels.py`; region ops in `regions.py`.
Semantics follow the interpreter (`archc.ir.interpret`, `archc.backends.torch_runtime`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from archc.backends.onnx.builder import BOOL, ELEM, F32, INT64_MAX, Exporter, Scope
from archc.ir.core import Graph, Node, Region
from archc.ir.ops import Op
from archc.ir.shapes import DType, TensorType, dims_equal
from onnx import helper

from archc.errors import ArchError


class Lowerer:
    """Lowers one graph's regions into scopes; `env` maps IR value names to ONNX value names."""

    def __init__(self, g: Graph, ex: Exporter, mode: str = "forward"):
        self.g = g
        self.ex = ex
        self.mode = mode                    # "forward" or "kv_decode" (cache-reading rules: the DECODE table)
        self.env: dict[str, str] = {}
        self.types: dict[str, TensorType] = {a.name: a.type for a in g.inputs}
        self.producer: dict[str, Node] = {}
        for n in g.walk():
            for o in n.outputs:
                self.types[o.name] = o.type
                self.producer[o.name] = n
            for r in n.regions:
                for a in r.args:
                    self.types[a.name] = a.type
        self.state: dict[tuple, list[str]] = {}   # threaded values: shared K/V (see regions.py)
        self.sources = {("from", (n.attr("kv_share") or "").split(":")[-1]) for n in g.walk()
                        if n.op is Op.ATTEND and n.attr("kv_share") and not n.attr("kv_share").startswith("recursion:")}
        self.stores = {n.attr("site") for n in g.walk() if n.op is Op.KV_READ}   # sites a kv_read reads
        self._check_share_order()
        self.cache_inputs: dict[str, tuple[str, str]] = {}   # decode: attend result -> (past K, past V) inputs
        self.cache_names: dict[str, str] = {}      # decode: attend / scan / recurrence -> its cache's name
        self.kv_owner: dict[str, str] = {}         # decode: attend result -> the attend whose K/V cache it reads
        self.kv_values: dict[str, tuple[str, str]] = {}   # decode: attend result -> its K/V over every position
        self.state_inputs: dict[str, list[str]] = {}      # decode: scan / recurrence -> its past state inputs
        self.started: str | None = None     # decode: bool scalar, past.length > 0 (else initial states)
        self.loop_iters: list[str] = []     # iteration counters of the enclosing Loops (decode caches)
        self.exports: list[tuple[str, str, int, int]] = []    # (output name, value, elem, rank) to bubble up
        self.positions: str | None = None   # decode: absolute positions of the new tokens [1, T]
        self.past_length: str | None = None
        self.notes: list[str] = []          # what a user should know about the graph (Exported.notes)

    def _check_share_order(self) -> None:
        """A site reading another's K/V must come after it in program order (else the interpreter fails)."""
        seen: set[str] = set()
        for n in self.g.walk():
            if n.op is not Op.ATTEND:
                continue
            share = n.attr("kv_share") or ""
            if share and not share.startswith("recursion:") and share.split(":")[-1] not in seen:
                raise ArchError(f"attention `{n.attr('site')}` reads the K/V of `{share.split(':')[-1]}`, which does "
                                "not run before it", n.span)
            if n.attr("site"):
                seen.add(n.attr("site"))

    def region(self, sc: Scope, r: Region, args: list[str]) -> list[str]:
        for a, v in zip(r.args, args):
            self.env[a.name] = v
        for n in r.nodes:
            self.node(sc, n)
        return [self.env[x] for x in r.results]

    def node(self, sc: Scope, n: Node) -> None:
        fn = (DECODE.get(n.op) if self.mode == "kv_decode" else None) or LOWER.get(n.op)
        if fn is None:
            raise ArchError(f"op `{n.op.value}` is not supported by backend `onnx`", n.span)
        self.ex.hint = n.outputs[0].name if n.outputs else n.op.value
        outs = fn(self, sc, n, [self.env[i] for i in n.inputs])
        for o, v in zip(n.outputs, outs):
            self.env[o.name] = v

    # helpers -------------------------------------------------------------------------------------
    def dtype(self, ir_value: str) -> DType:
        return self.types[ir_value].dtype

    def rank(self, ir_value: str) -> int:
        return self.types[ir_value].rank

    def cast(self, sc: Scope, value: str, frm: DType, to: DType) -> str:
        return value if frm is to else sc.op("Cast", value, to=ELEM[to])

    def operands_as(self, sc: Scope, n: Node, ins: list[str], to: DType) -> list[str]:
        return [self.cast(sc, v, self.dtype(i), to) for v, i in zip(ins, n.inputs)]

    def static_dim(self, ir_value: str, axis: int, what: str) -> int:
        return self.ex.static_int(self.types[ir_value].shape[axis], what)

    def axis(self, n: Node, rank: int) -> int:
        a = int(n.attr("axis"))
        return a + rank if a < 0 else a


Rule = Callable[[Lowerer, Scope, Node, list], list]
LOWER: dict[Op, Rule] = {}
DECODE: dict[Op, Rule] = {}          # rules that differ in the decode-step graph (cache-reading)


def rule(*ops: Op, table: dict | None = None):
    def deco(fn):
        for o in ops:
            (LOWER if table is None else table)[o] = fn
        return fn
    return deco


def promoted(*dtypes: DType) -> DType:
    """f32 beats i64 beats bool (the interpreter's `_promote`)."""
    return DType.F32 if DType.F32 in dtypes else DType.I64 if DType.I64 in dtypes else DType.BOOL


# -- sources ----------------------------------------------------------------------------------------


@rule(Op.CONST)
def _const(lw, sc, n, ins):
    return [sc.scalar(n.attr("value"), ELEM[DType(n.attr("dtype"))])]


@rule(Op.FULL)
def _full(lw, sc, n, ins):
    dtype = DType(n.attr("dtype"))
    shape = sc.vec(list(n.attr("shape")))
    value = lw.ex.number(n.attr("value"))
    if value is None:
        fill = sc.op("Reshape", sc.scalar(n.attr("value"), ELEM[dtype]), lw.ex.i64([1]))
        return [sc.op("Expand", fill, shape)]
    np_value = np.array([value], dtype={DType.F32: np.float32, DType.I64: np.int64, DType.BOOL: np.bool_}[dtype])
    return [sc.op("ConstantOfShape", shape, value=helper.make_tensor("value", ELEM[dtype], [1], np_value.tolist()))]


@rule(Op.ARANGE)
def _arange(lw, sc, n, ins):
    return [sc.op("Range", lw.ex.i64(0), sc.int_expr(n.attr("n")), lw.ex.i64(1))]


@rule(Op.PARAM)
def _param(lw, sc, n, ins):
    return [param_value(lw, sc, n, transposed=False)]


def param_value(lw: Lowerer, sc: Scope, n: Node, transposed: bool) -> str:
    """A parameter (one copy of a stacked bank when indexed), optionally with its last two axes swapped.

    The transpose is applied to the whole initializer in the main graph, where onnxruntime folds it
    at load time; an index then gathers one copy inside the loop that binds it.
    """
    ref = n.attr("ref")
    key = ("param", ref, transposed)
    top = lw.ex.top
    if key not in top.cache:
        value = ref
        if transposed:
            rank = lw.g.param(ref).type.rank
            perm = list(range(rank - 2)) + [rank - 1, rank - 2]
            value = top.op("Transpose", ref, name=ref + ".T", perm=perm)
        top.cache[key] = value
    value = top.cache[key]
    if n.attr("index") is None:
        return value
    idx = sc.int_expr(n.attr("index"))
    home = _scope_of(sc, idx)
    gkey = ("gather", value, idx)
    if gkey not in home.cache:
        home.cache[gkey] = home.op("Gather", value, idx, name=ref + "[i]" if not transposed else ref + ".T[i]", axis=0)
    return home.cache[gkey]


def _scope_of(sc: Scope, value: str) -> Scope:
    """The innermost scope (from `sc` outwards) that produced `value` (the main graph for constants)."""
    s = sc
    while s is not None:
        if value in s.produced:
            return s
        s = s.parent
    return sc.ex.top


# -- elementwise --------------------------------------------------------------------------------------

_UNARY = {Op.NEG: "Neg", Op.EXP: "Exp", Op.LOG: "Log", Op.SQRT: "Sqrt", Op.ABS: "Abs", Op.TANH: "Tanh",
          Op.SIN: "Sin", Op.COS: "Cos", Op.SIGMOID: "Sigmoid", Op.RELU: "Relu", Op.NOT: "Not", Op.DETACH: "Identity"}


@rule(*_UNARY)
def _unary(lw, sc, n, ins):
    return [sc.op(_UNARY[n.op], ins[0])]


@rule(Op.RSQRT)
def _rsqrt(lw, sc, n, ins):
    return [sc.op("Reciprocal", sc.op("Sqrt", ins[0]))]


def gelu(sc: Scope, x: str) -> str:
    """Exact (erf) GELU, as torch's default: x * Phi(x)."""
    ex = sc.ex
    phi = sc.op("Mul", sc.op("Add", sc.op("Erf", sc.op("Div", x, ex.f32(np.sqrt(2.0)))), ex.f32(1.0)), ex.f32(0.5))
    return sc.op("Mul", x, phi)


def silu(sc: Scope, x: str) -> str:
    return sc.op("Mul", x, sc.op("Sigmoid", x))


ACTIVATIONS = {"gelu": gelu, "silu": silu, "relu": lambda sc, x: sc.op("Relu", x),
               "tanh": lambda sc, x: sc.op("Tanh", x)}

LOWER[Op.GELU] = lambda lw, sc, n, ins: [gelu(sc, ins[0])]
LOWER[Op.SILU] = lambda lw, sc, n, ins: [silu(sc, ins[0])]


@rule(Op.SOFTPLUS)
def _softplus(lw, sc, n, ins):
    # torch: x above the threshold 20 passes through, else log1p(exp(x))
    x = ins[0]
    soft = sc.op("Log", sc.op("Add", sc.op("Exp", x), lw.ex.f32(1.0)))
    return [sc.op("Where", sc.op("Greater", x, lw.ex.f32(20.0)), x, soft)]


@rule(Op.CAST)
def _cast(lw, sc, n, ins):
    return [lw.cast(sc, ins[0], lw.dtype(n.inputs[0]), DType(n.attr("dtype")))]


_ARITH = {Op.ADD: "Add", Op.SUB: "Sub", Op.MUL: "Mul", Op.DIV: "Div", Op.POW: "Pow", Op.MAXIMUM: "Max",
          Op.MINIMUM: "Min"}


@rule(*_ARITH)
def _arith(lw, sc, n, ins):
    dtype = promoted(*(lw.dtype(i) for i in n.inputs))
    if n.op is Op.DIV and dtype is not DType.F32:
        # torch.div is true division: integers divide as floats
        a, b = lw.operands_as(sc, n, ins, DType.F32)
        out = sc.op("Div", a, b)
        return [lw.cast(sc, out, DType.F32, n.out.type.dtype)]
    if dtype is DType.BOOL:          # bool arithmetic (add = or, mul = and) as torch promotes it
        a, b = lw.operands_as(sc, n, ins, DType.I64)
        return [lw.cast(sc, sc.op(_ARITH[n.op], a, b), DType.I64, DType.BOOL)]
    a, b = lw.operands_as(sc, n, ins, dtype)
    return [sc.op(_ARITH[n.op], a, b)]


_COMPARE = {Op.GT: "Greater", Op.LT: "Less", Op.GE: "GreaterOrEqual", Op.LE: "LessOrEqual", Op.EQ: "Equal"}


@rule(*_COMPARE, Op.NE)
def _compare(lw, sc, n, ins):
    dtype = promoted(*(lw.dtype(i) for i in n.inputs))
    if dtype is DType.BOOL and n.op not in (Op.EQ, Op.NE):
        dtype = DType.I64             # onnxruntime orders numbers, not booleans
    a, b = lw.operands_as(sc, n, ins, dtype)
    if n.op is Op.NE:
        return [sc.op("Not", sc.op("Equal", a, b))]
    return [sc.op(_COMPARE[n.op], a, b)]


LOWER[Op.AND] = lambda lw, sc, n, ins: [sc.op("And", *ins)]
LOWER[Op.OR] = lambda lw, sc, n, ins: [sc.op("Or", *ins)]


@rule(Op.WHERE)
def _where(lw, sc, n, ins):
    dtype = promoted(lw.dtype(n.inputs[1]), lw.dtype(n.inputs[2]))
    a = lw.cast(sc, ins[1], lw.dtype(n.inputs[1]), dtype)
    b = lw.cast(sc, ins[2], lw.dtype(n.inputs[2]), dtype)
    return [sc.op("Where", ins[0], a, b)]


# -- reductions and normalisation ------------------------------------------------------------------------

_REDUCE = {Op.SUM: "ReduceSum", Op.MEAN: "ReduceMean", Op.AMAX: "ReduceMax", Op.LOGSUMEXP: "ReduceLogSumExp"}


@rule(*_REDUCE)
def _reduce(lw, sc, n, ins):
    src = lw.dtype(n.inputs[0])
    if n.op in (Op.SUM, Op.MEAN, Op.LOGSUMEXP):
        work = DType.F32                  # the interpreter sums integers as floats
    else:
        work = DType.I64 if src is DType.BOOL else src
    x = lw.cast(sc, ins[0], src, work)
    axis = lw.axis(n, lw.rank(n.inputs[0]))
    out = sc.op(_REDUCE[n.op], x, lw.ex.i64([axis]), keepdims=int(bool(n.attr("keepdim", False))))
    return [lw.cast(sc, out, work, n.out.type.dtype)]


@rule(Op.ARGMAX)
def _argmax(lw, sc, n, ins):
    src = lw.dtype(n.inputs[0])
    x = lw.cast(sc, ins[0], src, DType.F32 if src is DType.BOOL else src)
    return [sc.op("ArgMax", x, axis=lw.axis(n, lw.rank(n.inputs[0])), keepdims=int(bool(n.attr("keepdim", False))),
                  select_last_index=0)]


LOWER[Op.SOFTMAX] = lambda lw, sc, n, ins: [sc.op("Softmax", ins[0], axis=lw.axis(n, lw.rank(n.inputs[0])))]


@rule(Op.CUMSUM)
def _cumsum(lw, sc, n, ins):
    src = lw.dtype(n.inputs[0])
    x = lw.cast(sc, ins[0], src, DType.I64 if src is DType.BOOL else src)
    out = sc.op("CumSum", x, lw.ex.i64(lw.axis(n, lw.rank(n.inputs[0]))))
    return [lw.cast(sc, out, DType.I64 if src is DType.BOOL else src, n.out.type.dtype)]


@rule(Op.TOPK_MASK)
def _topk_mask(lw, sc, n, ins):
    x = ins[0]
    axis = lw.axis(n, lw.rank(n.inputs[0]))
    k = sc.op("Min", sc.int_expr(n.attr("k")), sc.dim(x, axis))
    idx = topk(sc, x, k, axis, largest=True)
    return [scatter_true(sc, sc.op("Shape", x), idx, axis)]


def topk(sc: Scope, x: str, k: str, axis: int, largest: bool) -> str:
    """Indices of the k largest (smallest) entries along an axis; k is an int64 scalar."""
    _, idx = sc.op("TopK", x, sc.op("Unsqueeze", k, sc.ex.i64([0])), outputs=2, axis=axis,
                   largest=int(largest), sorted=1)
    return idx


def scatter_true(sc: Scope, shape: str, idx: str, axis: int) -> str:
    """A bool tensor of `shape`, true at `idx` along `axis` (torch `zeros.scatter(axis, idx, True)`)."""
    zeros = sc.op("ConstantOfShape", shape, value=_bool_value(False))
    ones = sc.op("ConstantOfShape", sc.op("Shape", idx), value=_bool_value(True))
    return sc.op("ScatterElements", zeros, idx, ones, axis=axis)


def _bool_value(v: bool):
    return helper.make_tensor("value", BOOL, [1], [v])


@rule(Op.RMS_NORM)
def _rms_norm(lw, sc, n, ins):
    x, w = ins
    ms = sc.op("ReduceMean", sc.op("Mul", x, x), lw.ex.i64([-1]), keepdims=1)
    r = sc.op("Reciprocal", sc.op("Sqrt", sc.op("Add", ms, sc.scalar(n.attr("eps"), F32))))
    return [sc.op("Mul", sc.op("Mul", x, r), w)]


@rule(Op.LAYER_NORM)
def _layer_norm(lw, sc, n, ins):
    return [sc.op("LayerNormalization", *ins, axis=-1, epsilon=float(lw.ex.number(n.attr("eps"))))]


@rule(Op.L2_NORMALIZE)
def _l2_normalize(lw, sc, n, ins):
    x = ins[0]
    norm = sc.op("Sqrt", sc.op("ReduceSum", sc.op("Mul", x, x), lw.ex.i64([-1]), keepdims=1))
    return [sc.op("Div", x, sc.op("Max", norm, sc.scalar(n.attr("eps"), F32)))]


# -- contraction -----------------------------------------------------------------------------------------


@rule(Op.LINEAR)
def _linear(lw, sc, n, ins):
    src = lw.producer.get(n.inputs[1])
    if src is not None and src.op is Op.PARAM:
        wt = param_value(lw, sc, src, transposed=True)
    else:
        rank = lw.rank(n.inputs[1])
        wt = sc.op("Transpose", ins[1], perm=list(range(rank - 2)) + [rank - 1, rank - 2])
    y = sc.op("MatMul", ins[0], wt)
    return [sc.op("Add", y, ins[2]) if len(ins) > 2 else y]


LOWER[Op.MATMUL] = lambda lw, sc, n, ins: [sc.op("MatMul", *ins)]
LOWER[Op.EINSUM] = lambda lw, sc, n, ins: [sc.op("Einsum", *ins, equation=n.attr("equation"))]
LOWER[Op.EMBEDDING] = lambda lw, sc, n, ins: [sc.op("Gather", ins[1], ins[0], axis=0)]


@rule(Op.CONV1D)
def _conv1d(lw, sc, n, ins):
    x, w = ins[0], ins[1]
    if lw.rank(n.inputs[0]) != 3:
        raise ArchError("the ONNX backend lowers conv1d on [B, T, C] inputs only", n.span)
    k = lw.static_dim(n.inputs[1], -1, "the conv1d kernel size")
    pads = [k - 1, 0] if n.attr("causal") else [(k - 1) // 2, k - 1 - (k - 1) // 2]
    xt = sc.op("Transpose", x, perm=[0, 2, 1])
    y = sc.op("Conv", xt, w, *ins[2:], pads=pads, kernel_shape=[k])
    return [sc.op("Transpose", y, perm=[0, 2, 1])]


# -- movement -------------------------------------------------------------------------------------------


@rule(Op.RESHAPE)
def _reshape(lw, sc, n, ins):
    src = lw.types[n.inputs[0]].shape
    target = list(n.attr("shape"))
    dims: list = []
    for i, d in enumerate(target):
        if lw.ex.number(d) is not None:
            dims.append(d)
        elif i < len(src) and dims_equal(src[i], d) is True:
            dims.append(0)                            # 0 copies the input's size on this axis
        else:
            dims.append(None)
    unknown = [i for i, d in enumerate(dims) if d is None]
    if len(unknown) == 1:
        dims[unknown[0]] = -1
    else:
        for i in unknown:
            dims[i] = target[i]
    return [sc.op("Reshape", ins[0], sc.vec(dims))]


LOWER[Op.PERMUTE] = lambda lw, sc, n, ins: [sc.op("Transpose", ins[0], perm=list(n.attr("perm")))]


@rule(Op.CONCAT)
def _concat(lw, sc, n, ins):
    dtype = n.out.type.dtype
    parts = [lw.cast(sc, v, lw.dtype(i), dtype) for v, i in zip(ins, n.inputs)]
    return [sc.op("Concat", *parts, axis=lw.axis(n, lw.rank(n.inputs[0])))]


@rule(Op.SLICE)
def _slice(lw, sc, n, ins):
    axis = lw.axis(n, lw.rank(n.inputs[0]))
    start, stop = sc.vec([n.attr("start")]), sc.vec([n.attr("stop")])
    return [sc.op("Slice", ins[0], start, stop, lw.ex.i64([axis]))]


@rule(Op.SELECT)
def _select(lw, sc, n, ins):
    axis = lw.axis(n, lw.rank(n.inputs[0]))
    if len(ins) > 1:
        idx = sc.op("Reshape", ins[1], lw.ex.i64(np.zeros(0, np.int64)))
    else:
        idx = sc.int_expr(n.attr("index"))
    return [sc.op("Gather", ins[0], idx, axis=axis)]


LOWER[Op.UNSQUEEZE] = lambda lw, sc, n, ins: [sc.op("Unsqueeze", ins[0], lw.ex.i64([lw.axis(n, lw.rank(n.inputs[0]) + 1)]))]


@rule(Op.BROADCAST)
def _broadcast(lw, sc, n, ins):
    src = lw.types[n.inputs[0]].shape
    target = list(n.attr("shape"))
    off = len(target) - len(src)
    dims = []
    for i, d in enumerate(target):
        j = i - off
        keep = 0 <= j < len(src) and lw.ex.number(d) is None and dims_equal(src[j], d) is True
        dims.append(1 if keep else d)                  # Expand keeps the input's size where the target is 1
    return [sc.op("Expand", ins[0], sc.vec(dims))]


@rule(Op.SPLIT_HEADS)
def _split_heads(lw, sc, n, ins):
    rank = lw.rank(n.inputs[0])
    return [sc.op("Reshape", ins[0], sc.vec([0] * (rank - 1) + [n.attr("heads"), -1]))]


@rule(Op.MERGE_HEADS)
def _merge_heads(lw, sc, n, ins):
    rank = lw.rank(n.inputs[0])
    return [sc.op("Reshape", ins[0], lw.ex.i64([0] * (rank - 2) + [-1]))]


@rule(Op.GATHER)
def _gather(lw, sc, n, ins):
    return [gather_along(sc, ins[0], lw.rank(n.inputs[0]), ins[1], lw.rank(n.inputs[1]), lw.axis(n, lw.rank(n.inputs[0])))]


def gather_along(sc: Scope, x: str, x_rank: int, idx: str, idx_rank: int, axis: int) -> str:
    """x[b, idx[b, j], ...] along `axis` for indices of rank axis + 1 (torch_runtime.gather_along)."""
    return sc.op("GatherElements", x, expand_index(sc, x, x_rank, idx, idx_rank, axis), axis=axis)


def expand_index(sc: Scope, x: str, x_rank: int, idx: str, idx_rank: int, axis: int) -> str:
    """Per-row indices broadcast over the trailing axes of x (the index tensor of gather/scatter)."""
    if x_rank == idx_rank:
        return idx
    view = sc.op("Unsqueeze", idx, sc.ex.i64(list(range(idx_rank, x_rank))))
    shape = sc.op("Concat", sc.op("Shape", idx), sc.shape_of(x, axis + 1), axis=0)
    return sc.op("Expand", view, shape)


def slice_from(sc: Scope, x: str, start: str, axis: int) -> str:
    """x[start:] along an axis, `start` an int64 scalar."""
    s = sc.op("Unsqueeze", start, sc.ex.i64([0]))
    return sc.op("Slice", x, s, sc.ex.i64([INT64_MAX]), sc.ex.i64([axis]))


from archc.backends.onnx import kernels, regions, state  # noqa: F401  (they register their rules)
