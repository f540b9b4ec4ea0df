"""Every IR op, declared once: its group, arity, attributes, shape rule and a one-line summary.

The verifier, the interpreter's coverage test, the printer and SPEC.md's op list all read OPS.
Region ops (loop, halt_loop, route_topk, route_mask, scan, fused) get their result types from their
region's yields; their rule checks the carried types agree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import sympy

from archc.ir.shapes import BOOL, F32, I64, DType, TensorType, as_expr, dims_equal


class ShapeError(Exception):
    """Raised by a shape rule; the caller attaches the span of the offending source."""


class Op(Enum):
    # -- sources ---------------------------------------------------------------------------
    CONST = "const"            # scalar from an expression of symbols
    FULL = "full"              # tensor filled with a value, shape from attrs
    ARANGE = "arange"
    PARAM = "param"            # a parameter by reference; an `index` attr selects one stacked copy
    # -- elementwise unary -----------------------------------------------------------------
    NEG = "neg"; EXP = "exp"; LOG = "log"; SQRT = "sqrt"; RSQRT = "rsqrt"; ABS = "abs"
    TANH = "tanh"; SIGMOID = "sigmoid"; RELU = "relu"; GELU = "gelu"; SILU = "silu"
    SOFTPLUS = "softplus"; SIN = "sin"; COS = "cos"; NOT = "not"; DETACH = "detach"; CAST = "cast"
    # -- elementwise binary / ternary --------------------------------------------------------
    ADD = "add"; SUB = "sub"; MUL = "mul"; DIV = "div"; POW = "pow"
    MAXIMUM = "maximum"; MINIMUM = "minimum"
    GT = "gt"; LT = "lt"; GE = "ge"; LE = "le"; EQ = "eq"; NE = "ne"; AND = "and"; OR = "or"
    WHERE = "where"
    # -- reductions and normalisation -------------------------------------------------------
    SUM = "sum"; MEAN = "mean"; AMAX = "amax"; ARGMAX = "argmax"; SOFTMAX = "softmax"
    LOGSUMEXP = "logsumexp"; CUMSUM = "cumsum"; TOPK_MASK = "topk_mask"
    RMS_NORM = "rms_norm"; LAYER_NORM = "layer_norm"; L2_NORMALIZE = "l2_normalize"
    # -- contraction -------------------------------------------------------------------------
    LINEAR = "linear"; MATMUL = "matmul"; EINSUM = "einsum"; EMBEDDING = "embedding"
    CONV1D = "conv1d"
    # -- movement ----------------------------------------------------------------------------
    RESHAPE = "reshape"; PERMUTE = "permute"; CONCAT = "concat"; SLICE = "slice"
    SELECT = "select"; UNSQUEEZE = "unsqueeze"; BROADCAST = "broadcast"
    SPLIT_HEADS = "split_heads"; MERGE_HEADS = "merge_heads"; GATHER = "gather"
    # -- sequence mixing ---------------------------------------------------------------------
    ROPE = "rope"; ATTEND = "attend"; LINEAR_SCAN = "linear_scan"; LINEAR_ATTN = "linear_attn"
    KV_READ = "kv_read"        # the K/V (and key positions) an attention site last recorded
    # -- memories ----------------------------------------------------------------------------
    MEM_READ = "mem_read"; MEM_WRITE = "mem_write"
    BANK_PUSH = "bank_push"; BANK_VALID = "bank_valid"
    # -- regions -----------------------------------------------------------------------------
    LOOP = "loop"; HALT_LOOP = "halt_loop"; ROUTE_TOPK = "route_topk"; ROUTE_MASK = "route_mask"
    SCAN = "scan"; FUSED = "fused"


class Group(Enum):
    SOURCE = "source"
    UNARY = "unary"
    BINARY = "binary"
    COMPARE = "compare"
    REDUCE = "reduce"
    NORM = "norm"
    CONTRACT = "contract"
    MOVEMENT = "movement"
    MIX = "mix"
    MEMORY = "memory"
    REGION = "region"


Rule = Callable[[list[TensorType], dict], list[TensorType]]


@dataclass(frozen=True)
class OpDef:
    op: Op
    group: Group
    arity: tuple[int, int]          # (min, max) operands; max -1 = variadic
    attrs: tuple[str, ...]          # allowed attribute names
    rule: Rule | None
    summary: str
    regions: int = 0
    example: str = ""
    required: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------------------------------------
# shape helpers


def broadcast_shapes(*shapes) -> tuple:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        cur = sympy.Integer(1)
        for d in dims:
            if d == 1:
                continue
            if cur == 1:
                cur = d
                continue
            if dims_equal(cur, d) is False:
                raise ShapeError(f"cannot broadcast {_shp(shapes)}: dimension {i} is {cur} vs {d}")
        out.append(cur)
    return tuple(out)


def _shp(shapes) -> str:
    return " and ".join("[" + ", ".join(str(d) for d in s) + "]" for s in shapes)


def norm_axis(axis: int, rank: int) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise ShapeError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return a


def _same(ins, attrs):
    return [ins[0]]


def _float_like(ins, attrs):
    if ins[0].dtype is not F32:
        raise ShapeError(f"expected a float tensor, got {ins[0]}")
    return [ins[0]]


def _cast(ins, attrs):
    return [ins[0].with_dtype(DType(attrs["dtype"]))]


def _promoted(*dtypes) -> DType:
    """f32 beats i64 beats bool (as the interpreter promotes)."""
    return F32 if F32 in dtypes else I64 if I64 in dtypes else BOOL


def _binary(ins, attrs):
    a, b = ins
    dtype = _promoted(a.dtype, b.dtype)
    return [TensorType(dtype, broadcast_shapes(a.shape, b.shape))]


def _compare(ins, attrs):
    return [TensorType(BOOL, broadcast_shapes(ins[0].shape, ins[1].shape))]


def _logic(ins, attrs):
    for t in ins:
        if t.dtype is not BOOL:
            raise ShapeError(f"logical operator needs bool tensors, got {t}")
    return [TensorType(BOOL, broadcast_shapes(*(t.shape for t in ins)))]


def _not(ins, attrs):
    return _logic(ins, attrs)


def _where(ins, attrs):
    c, a, b = ins
    if c.dtype is not BOOL:
        raise ShapeError(f"where() needs a bool condition, got {c}")
    dtype = _promoted(a.dtype, b.dtype)
    return [TensorType(dtype, broadcast_shapes(c.shape, a.shape, b.shape))]


def _const(ins, attrs):
    return [TensorType(DType(attrs["dtype"]), ())]


def _full(ins, attrs):
    return [TensorType(DType(attrs["dtype"]), tuple(as_expr(s) for s in attrs["shape"]))]


def _arange(ins, attrs):
    return [TensorType(I64, (as_expr(attrs["n"]),))]


def _reduce(ins, attrs, dtype=None):
    t = ins[0]
    ax = norm_axis(attrs["axis"], t.rank)
    keep = attrs.get("keepdim", False)
    shape = list(t.shape)
    if keep:
        shape[ax] = sympy.Integer(1)
    else:
        del shape[ax]
    return [TensorType(dtype or t.dtype, tuple(shape))]


def _reduce_float(ins, attrs):
    return _reduce(ins, attrs, F32)


def _argmax(ins, attrs):
    return _reduce(ins, attrs, I64)


def _axis_same(ins, attrs):
    norm_axis(attrs["axis"], ins[0].rank)
    return [ins[0]]


def _topk_mask(ins, attrs):
    norm_axis(attrs["axis"], ins[0].rank)
    return [ins[0].with_dtype(BOOL)]


def _last_dim_param(ins, attrs, name):
    x, w = ins[0], ins[1]
    if w.rank != 1 or dims_equal(w.shape[0], x.shape[-1]) is False:
        raise ShapeError(f"{name} weight {w} does not match the last dimension of {x}")
    return [x]


def _rms_norm(ins, attrs):
    return _last_dim_param(ins, attrs, "rms_norm")


def _layer_norm(ins, attrs):
    return _last_dim_param(ins, attrs, "layer_norm")


def _linear(ins, attrs):
    x, w = ins[0], ins[1]
    if w.rank != 2:
        raise ShapeError(f"linear weight must be [out, in], got {w}")
    if dims_equal(w.shape[1], x.shape[-1]) is False:
        raise ShapeError(f"linear expects input features {w.shape[1]}, got {x} (last dimension {x.shape[-1]})")
    if len(ins) == 3 and dims_equal(ins[2].shape[0], w.shape[0]) is False:
        raise ShapeError(f"linear bias {ins[2]} does not match weight {w}")
    return [TensorType(F32, x.shape[:-1] + (w.shape[0],))]


def _matmul(ins, attrs):
    a, b = ins
    if a.rank < 2 or b.rank < 2:
        raise ShapeError(f"matmul needs rank >= 2 operands, got {a} and {b}")
    if dims_equal(a.shape[-1], b.shape[-2]) is False:
        raise ShapeError(f"matmul inner dimensions differ: {a} @ {b}")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return [TensorType(F32, batch + (a.shape[-2], b.shape[-1]))]


def _einsum(ins, attrs):
    eq = attrs["equation"]
    lhs, rhs = eq.split("->")
    specs = lhs.split(",")
    if len(specs) != len(ins):
        raise ShapeError(f"einsum {eq!r} names {len(specs)} operands, got {len(ins)}")
    sizes: dict[str, sympy.Expr] = {}
    for spec, t in zip(specs, ins):
        if len(spec) != t.rank:
            raise ShapeError(f"einsum operand {spec!r} has rank {len(spec)} but the tensor is {t}")
        for ch, d in zip(spec, t.shape):
            if ch in sizes and sizes[ch] != 1 and d != 1 and dims_equal(sizes[ch], d) is False:
                raise ShapeError(f"einsum index {ch!r} is {sizes[ch]} in one operand and {d} in another")
            if ch not in sizes or sizes[ch] == 1:
                sizes[ch] = d
    for ch in rhs:
        if ch not in sizes:
            raise ShapeError(f"einsum output index {ch!r} does not appear in the inputs")
    return [TensorType(F32, tuple(sizes[c] for c in rhs))]


def _embedding(ins, attrs):
    ids, table = ins
    if ids.dtype is not I64:
        raise ShapeError(f"embedding ids must be i64, got {ids}")
    return [TensorType(table.dtype, ids.shape + table.shape[1:])]     # rows keep the table's dtype


def _gather(ins, attrs):
    x, idx = ins
    ax = norm_axis(attrs["axis"], x.rank)
    if idx.dtype is not I64:
        raise ShapeError(f"gather indices must be i64, got {idx}")
    if idx.rank != ax + 1:
        raise ShapeError(f"gather along axis {ax} needs indices of rank {ax + 1}, got {idx}")
    return [TensorType(x.dtype, idx.shape + x.shape[ax + 1:])]


def _conv1d(ins, attrs):
    x, w = ins[0], ins[1]
    if dims_equal(w.shape[1], x.shape[-1]) is False:
        raise ShapeError(f"conv1d weight {w} expects {w.shape[1]} input channels, got {x}")
    return [TensorType(F32, x.shape[:-1] + (w.shape[0],))]


def _reshape(ins, attrs):
    x = ins[0]
    shape = tuple(as_expr(s) for s in attrs["shape"])
    a = sympy.prod(x.shape) if x.shape else sympy.Integer(1)
    b = sympy.prod(shape) if shape else sympy.Integer(1)
    if dims_equal(a, b) is False:
        raise ShapeError(f"cannot reshape {x} to [{', '.join(map(str, shape))}]: sizes differ")
    return [TensorType(x.dtype, shape)]


def _permute(ins, attrs):
    x = ins[0]
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"permutation {list(perm)} does not fit a tensor of rank {x.rank}")
    return [TensorType(x.dtype, tuple(x.shape[p] for p in perm))]


def _concat(ins, attrs):
    ax = norm_axis(attrs["axis"], ins[0].rank)
    total = sympy.Integer(0)
    for t in ins:
        if t.rank != ins[0].rank:
            raise ShapeError(f"concat operands have different ranks: {ins[0]} and {t}")
        for i, (a, b) in enumerate(zip(ins[0].shape, t.shape)):
            if i != ax and dims_equal(a, b) is False:
                raise ShapeError(f"concat along axis {ax}: {ins[0]} and {t} differ in dimension {i}")
        total = total + t.shape[ax]
    shape = list(ins[0].shape)
    shape[ax] = total
    return [TensorType(ins[0].dtype, tuple(shape))]


def _slice(ins, attrs):
    x = ins[0]
    ax = norm_axis(attrs["axis"], x.rank)
    start, stop = as_expr(attrs["start"]), as_expr(attrs["stop"])
    shape = list(x.shape)
    n = stop - start          # symbolic lengths are checked non-negative when evaluated
    shape[ax] = as_expr(max(n, 0) if n.is_number else n)
    return [TensorType(x.dtype, tuple(shape))]


def _select(ins, attrs):
    x = ins[0]
    ax = norm_axis(attrs["axis"], x.rank)
    return [TensorType(x.dtype, x.shape[:ax] + x.shape[ax + 1:])]


def _unsqueeze(ins, attrs):
    x = ins[0]
    ax = norm_axis(attrs["axis"], x.rank + 1)
    return [TensorType(x.dtype, x.shape[:ax] + (sympy.Integer(1),) + x.shape[ax:])]


def _broadcast(ins, attrs):
    x = ins[0]
    shape = tuple(as_expr(s) for s in attrs["shape"])
    broadcast_shapes(x.shape, shape)
    return [TensorType(x.dtype, shape)]


def _split_heads(ins, attrs):
    x = ins[0]
    h = as_expr(attrs["heads"])
    return [TensorType(x.dtype, x.shape[:-1] + (h, x.shape[-1] / h))]


def _merge_heads(ins, attrs):
    x = ins[0]
    return [TensorType(x.dtype, x.shape[:-2] + (x.shape[-2] * x.shape[-1],))]


def _rope(ins, attrs):
    x = ins[0]
    if x.rank != 4:
        raise ShapeError(f"rope expects [B, T, H, Dh], got {x}")
    return [x]


def _attend(ins, attrs):
    q, k, v = ins[:3]
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if t.rank != 4:
            raise ShapeError(f"attend expects {n} as [B, T, H, Dh], got {t}")
    if dims_equal(q.shape[-1], k.shape[-1]) is False:
        raise ShapeError(f"query head size {q.shape[-1]} differs from key head size {k.shape[-1]}: q {q}, k {k}")
    if dims_equal(k.shape[1], v.shape[1]) is False:
        raise ShapeError(f"keys and values have different lengths: k {k}, v {v}")
    return [TensorType(F32, q.shape[:3] + (v.shape[-1],))]


def _linear_scan(ins, attrs):
    a, b, h0 = ins
    shape = broadcast_shapes(a.shape, b.shape)
    return [TensorType(F32, shape)]


def _linear_attn(ins, attrs):
    q, k, v, s = ins
    # q, k: [B, C, Dk]; v: [B, C, Dv]; state s: [B, Dv, Dk]
    return [TensorType(F32, q.shape[:-1] + (v.shape[-1],)), s]


def _mem_read(ins, attrs):
    q = ins[0]
    return [TensorType(F32, q.shape[:-1] + (ins[-1].shape[-2],))]


def _mem_write(ins, attrs):
    n = attrs["layers"]
    # inputs: k, v, lr, momentum, forget, weights..., moments...
    return list(ins[5:5 + 2 * n])


def _bank_push(ins, attrs):
    buf, count, v = ins
    return [buf, count]


def _bank_valid(ins, attrs):
    buf, count = ins
    return [TensorType(BOOL, buf.shape[:2])]


D = OpDef
OPS: dict[Op, OpDef] = {d.op: d for d in [
    D(Op.CONST, Group.SOURCE, (0, 0), ("value", "dtype"), _const, "a scalar: a number or an expression of symbols",
      example="%c = const() {dtype=\"f32\", value=<1/d>} : f32[]", required=("value", "dtype")),
    D(Op.FULL, Group.SOURCE, (0, 0), ("value", "dtype", "shape"), _full, "a tensor of one value",
      required=("value", "dtype", "shape")),
    D(Op.ARANGE, Group.SOURCE, (0, 0), ("n",), _arange, "0, 1, ..., n-1 as i64", required=("n",)),
    D(Op.PARAM, Group.SOURCE, (0, 0), ("ref", "index"), None,
      "a parameter by name; `index` (an expression, e.g. <Mod(r, 2)>) picks one copy of a stacked bank",
      example="%w = param() {index=<Mod(r, 2)>, ref=\"core.attn.q.weight\"} : f32[d, d]", required=("ref",)),
    *[D(o, Group.UNARY, (1, 1), (), _float_like, f"elementwise {o.value}") for o in
      (Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.RELU, Op.GELU, Op.SILU, Op.SOFTPLUS,
       Op.SIN, Op.COS)],
    D(Op.NEG, Group.UNARY, (1, 1), (), _same, "elementwise negation"),
    D(Op.ABS, Group.UNARY, (1, 1), (), _same, "elementwise absolute value"),
    D(Op.NOT, Group.UNARY, (1, 1), (), _not, "logical not"),
    D(Op.DETACH, Group.UNARY, (1, 1), (), _same, "identity that stops gradients"),
    D(Op.CAST, Group.UNARY, (1, 1), ("dtype",), _cast, "convert dtype", required=("dtype",)),
    *[D(o, Group.BINARY, (2, 2), (), _binary, f"broadcasting {o.value}") for o in
      (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.MAXIMUM, Op.MINIMUM)],
    *[D(o, Group.COMPARE, (2, 2), (), _compare, f"broadcasting comparison {o.value}") for o in
      (Op.GT, Op.LT, Op.GE, Op.LE, Op.EQ, Op.NE)],
    D(Op.AND, Group.COMPARE, (2, 2), (), _logic, "logical and"),
    D(Op.OR, Group.COMPARE, (2, 2), (), _logic, "logical or"),
    D(Op.WHERE, Group.BINARY, (3, 3), (), _where, "select a where cond else b"),
    *[D(o, Group.REDUCE, (1, 1), ("axis", "keepdim"), _reduce_float, f"{o.value} over one axis (as f32)",
        required=("axis",)) for o in (Op.SUM, Op.MEAN)],
    *[D(o, Group.REDUCE, (1, 1), ("axis", "keepdim"), _reduce, f"{o.value} over one axis", required=("axis",)) for o in
      (Op.AMAX, Op.LOGSUMEXP)],
    D(Op.ARGMAX, Group.REDUCE, (1, 1), ("axis", "keepdim"), _argmax, "index of the maximum", required=("axis",)),
    D(Op.SOFTMAX, Group.REDUCE, (1, 1), ("axis",), _axis_same, "softmax over one axis", required=("axis",)),
    D(Op.CUMSUM, Group.REDUCE, (1, 1), ("axis",), _axis_same, "running sum over one axis", required=("axis",)),
    D(Op.TOPK_MASK, Group.REDUCE, (1, 1), ("axis", "k"), _topk_mask, "true at the k largest entries along an axis",
      required=("axis", "k")),
    D(Op.RMS_NORM, Group.NORM, (2, 2), ("eps",), _rms_norm, "x / rms(x) * w over the last axis", required=("eps",)),
    D(Op.LAYER_NORM, Group.NORM, (3, 3), ("eps",), _layer_norm, "layer norm over the last axis", required=("eps",)),
    D(Op.L2_NORMALIZE, Group.NORM, (1, 1), ("eps",), _float_like, "x / ||x|| over the last axis", required=("eps",)),
    D(Op.LINEAR, Group.CONTRACT, (2, 3), (), _linear, "x @ w.T (+ b); w is [out, in]"),
    D(Op.MATMUL, Group.CONTRACT, (2, 2), (), _matmul, "batched matrix product"),
    D(Op.EINSUM, Group.CONTRACT, (1, -1), ("equation",), _einsum, "Einstein summation", required=("equation",)),
    D(Op.EMBEDDING, Group.CONTRACT, (2, 2), (), _embedding, "rows of a table by i64 ids"),
    D(Op.CONV1D, Group.CONTRACT, (2, 3), ("causal",), _conv1d, "1-D convolution over the sequence axis; w is [out, in, k]",
      required=("causal",)),
    D(Op.RESHAPE, Group.MOVEMENT, (1, 1), ("shape",), _reshape, "reshape", required=("shape",)),
    D(Op.PERMUTE, Group.MOVEMENT, (1, 1), ("perm",), _permute, "permute axes", required=("perm",)),
    D(Op.CONCAT, Group.MOVEMENT, (1, -1), ("axis",), _concat, "concatenate along an axis", required=("axis",)),
    D(Op.SLICE, Group.MOVEMENT, (1, 1), ("axis", "start", "stop"), _slice, "x[start:stop] along an axis",
      required=("axis", "start", "stop")),
    D(Op.SELECT, Group.MOVEMENT, (1, 2), ("axis", "index"), _select, "x[i] along an axis (index attr or i64 operand)",
      required=("axis",)),
    D(Op.UNSQUEEZE, Group.MOVEMENT, (1, 1), ("axis",), _unsqueeze, "insert a unit axis", required=("axis",)),
    D(Op.BROADCAST, Group.MOVEMENT, (1, 1), ("shape",), _broadcast, "broadcast to a shape", required=("shape",)),
    D(Op.SPLIT_HEADS, Group.MOVEMENT, (1, 1), ("heads",), _split_heads, "[..., H*Dh] -> [..., H, Dh]", required=("heads",)),
    D(Op.MERGE_HEADS, Group.MOVEMENT, (1, 1), (), _merge_heads, "[..., H, Dh] -> [..., H*Dh]"),
    D(Op.GATHER, Group.MOVEMENT, (2, 2), ("axis",), _gather, "rows along an axis by per-batch i64 indices", required=("axis",)),
    D(Op.ROPE, Group.MIX, (1, 2), ("base",), _rope, "rotary position embedding on [B, T, H, Dh] (positions operand optional)",
      required=("base",)),
    D(Op.ATTEND, Group.MIX, (3, 6), ("causal", "window", "prefix", "site", "copy", "kv_share", "has_mask", "has_pos"), _attend,
      "scaled dot-product attention on [B, T, H, Dh]; grouped KV heads repeat; optional mask/positions",
      required=("causal", "window", "prefix")),
    D(Op.KV_READ, Group.SOURCE, (0, 0), ("site", "copy", "var"), None,
      "the K, V (and key positions) attention site `site` (copy `copy`) last recorded; `var`: the recursion "
      "whose first trip recorded them", example="%k, %v, %kpos = kv_read() {copy=<j>, site=\"core.attn\", var=\"r\"} "
      ": f32[B, T, 4, 16], f32[B, T, 4, 16], i64[B, T]", required=("site",)),
    D(Op.LINEAR_SCAN, Group.MIX, (3, 3), ("axis",), _linear_scan, "h_t = a_t * h_{t-1} + b_t along an axis",
      required=("axis",)),
    D(Op.LINEAR_ATTN, Group.MIX, (4, 4), (), _linear_attn,
      "causal linear attention from state S: y_t = (S + sum_{s<=t} v_s k_s^T) q_t; returns (y, S')"),
    D(Op.MEM_READ, Group.MEMORY, (2, -1), ("layers", "act", "residual", "retention", "q"), _mem_read,
      "apply a per-sample neural memory (MLP weights as operands) to queries", required=("layers", "act")),
    D(Op.MEM_WRITE, Group.MEMORY, (7, -1), ("layers", "act", "residual", "loss", "p", "retention", "q", "has_delta"),
      _mem_write,
      "one inner gradient step on sum_t lr_t*loss(M(k_t), v_t) with momentum and a retention rule (forget gate, "
      "l_q normalisation or KL/softmax); operands k, v, lr, momentum, forget, W.., S.., [delta]",
      required=("layers", "act", "loss")),
    D(Op.BANK_PUSH, Group.MEMORY, (3, 3), (), _bank_push, "FIFO push of one entry per sample into a slot buffer"),
    D(Op.BANK_VALID, Group.MEMORY, (2, 2), (), _bank_valid, "which slots of a bank hold entries"),
    D(Op.LOOP, Group.REGION, (0, -1), ("trips", "var", "grad_last"), None,
      "repeat the region `trips` times with symbol `var` = 0..trips-1; operands are the initial carries", regions=1, required=("trips",)),
    D(Op.HALT_LOOP, Group.REGION, (0, -1), ("trips", "var"), None,
      "repeat up to `trips` times; each sample stops once the region's first yield is true", regions=1,
      required=("trips",)),
    D(Op.ROUTE_TOPK, Group.REGION, (2, 5), ("capacity", "has_among", "has_weight", "has_infer", "schedule"), None,
      "run the region on the top-k tokens by score (schedule \"compact\": gathered; \"mask\": every token, "
      "blended by the selection), scatter back (gated); with has_infer, outside training each sample's tokens "
      "where infer (and among) hold", regions=1, required=("capacity",)),
    D(Op.ROUTE_MASK, Group.REGION, (2, 3), ("has_weight", "dims"), None,
      "run the region on each sample's masked tokens, scatter back (gated)", regions=1),
    D(Op.SCAN, Group.REGION, (1, -1), ("size", "stacked"), None,
      "run the region over consecutive segments of the first operand, carrying state", regions=1, required=("size",)),
    D(Op.FUSED, Group.REGION, (0, 0), (), None,
      "a fusion region: elementwise, normalisation and residual ops run as one kernel; results are the yields",
      regions=1),
]}

def attend_operands(node, ins: list):
    """The operand layout of `attend`, in one place: (q, k, v, mask | None, qpos | None, kpos | None)."""
    q, k, v, *rest = ins
    mask = rest.pop(0) if node.attr("has_mask") else None
    qpos, kpos = (rest[0], rest[1]) if node.attr("has_pos") else (None, None)
    return q, k, v, mask, qpos, kpos


UNARY_OPS = frozenset(o for o, d in OPS.items() if d.group is Group.UNARY)
BINARY_OPS = frozenset(o for o, d in OPS.items() if d.group in (Group.BINARY, Group.COMPARE))
REGION_OPS = frozenset(o for o, d in OPS.items() if d.group is Group.REGION)
ELEMENTWISE_OPS = UNARY_OPS | BINARY_OPS
NORM_OPS = frozenset(o for o, d in OPS.items() if d.group is Group.NORM)   # over the last axis
FUSIBLE_OPS = ELEMENTWISE_OPS | NORM_OPS      # what a `fused` region may hold (SPEC §19)
