"""The decode step's recurrent state (`state_decode`, SPEC §21.4): segment scans and per-step
recurrences read their state from `past.*` inputs and return it as `present.*` outputs.

A scan instance's cache is (its carries at the last complete segment boundary, the open segment's
inputs `rest` [B, R, ...] with R < size). The step concatenates `rest` with the new positions' scan
input and runs the scan exactly as the forward does (`regions.scan_segments`: a Loop over the whole
segments, an If for a short last one with the size symbol bound to its length); the carries after
the whole segments are committed (`present.<scan>.carry<i>`), a short segment's are not (they are
the scan's results for this step only), the positions after the last whole segment are the new
`rest`, and the per-position outputs are sliced to the new positions. `linear_scan` / `linear_attn`
start from the cached state and keep their last state. Before the first step (`past.length` = 0)
every such state is the forward's own initial value, computed by the graph (an If on `started`).
These mirror the PyTorch module's cached step (backends/torch.py: `_scan`, `_cached_recurrence`).
"""
from __future__ import annotations

from archc.backends.onnx.builder import ELEM, INT64_MAX, Scope
from archc.backends.onnx.kernels import _linear_attn, _linear_scan
from archc.backends.onnx.lower import DECODE, Lowerer, rule
from archc.backends.onnx.regions import scan_segments
from archc.ir.core import Node
from archc.ir.ops import Op


def cache_slice(lw: Lowerer, sc: Scope, value: str) -> str:
    """A cache input's slice for the enclosing `repeat` steps (outermost loop first)."""
    for it in lw.loop_iters:
        value = sc.op("Gather", value, it, axis=0)
    return value


def cached_or_initial(lw: Lowerer, sc: Scope, cached: list[str], initial: list[str], types: list[tuple[int, int]],
                      hint: str) -> list[str]:
    """The cached values once the cache has started (past.length > 0), else the forward's initial ones."""
    if not cached:
        return []
    then, other = sc.child(), sc.child()
    for c, v, (elem, rank) in zip(cached, initial, types):
        then.add_output(c, elem, rank)
        other.add_output(v, elem, rank)
    return sc.ops("If", lw.started, outputs=len(cached), name=hint,
                  then_branch=then.graph(f"{hint}_cached"), else_branch=other.graph(f"{hint}_initial"))


def _elem(lw: Lowerer, ir_value: str) -> int:
    return ELEM[lw.dtype(ir_value)]


def scan_key(n: Node) -> str:
    """The cache entry of a scan or recurrence node (its IR results are unique)."""
    return n.outputs[-1].name if n.op is Op.SCAN else n.outputs[0].name


@rule(Op.SCAN, table=DECODE)
def _scan_decode(lw, sc, n, ins):
    e = sc.ex
    key = scan_key(n)
    base = lw.cache_names[key]
    *past_carries, past_rest = lw.state_inputs[key]
    x, init = ins[0], ins[1:]
    nc = len(init)
    types = [(_elem(lw, o.name), o.type.rank) for o in n.outputs[:nc]]
    carries = cached_or_initial(lw, sc, [cache_slice(lw, sc, p) for p in past_carries], init, types,
                                f"{base}.carries")
    rest = cache_slice(lw, sc, past_rest)
    xs = sc.op("Concat", rest, x, axis=1, name=f"{base}.inputs")        # the open segment, then the new positions
    mode, lw.mode = lw.mode, "forward"                                  # the body runs as in the forward
    try:
        results, committed, done = scan_segments(lw, sc, n, xs, carries)
    finally:
        lw.mode = mode
    e.hint = n.outputs[0].name
    for i, (v, (elem, rank)) in enumerate(zip(committed, types)):
        lw.exports.append((f"present.{base}.carry{i}", v, elem, rank))
    new_rest = sc.op("Slice", xs, sc.op("Unsqueeze", done, e.i64([0])), e.i64([INT64_MAX]), e.i64([1]),
                     name=f"{base}.rest")
    lw.exports.append((f"present.{base}.rest", new_rest, _elem(lw, n.inputs[0]), lw.rank(n.inputs[0])))
    start = sc.op("Unsqueeze", sc.dim(rest, 1), e.i64([0]), name="open_length")
    outs = [sc.op("Slice", y, start, e.i64([INT64_MAX]), e.i64([1]), name=o.name)   # the new positions only
            for y, o in zip(results[nc:], n.outputs[nc:])]
    return results[:nc] + outs


@rule(Op.LINEAR_SCAN, table=DECODE)
def _linear_scan_decode(lw, sc, n, ins):
    """h_t = a_t h_{t-1} + b_t from the cached h (axis 1, as decode_blocker requires); keeps the last h."""
    e = sc.ex
    a, b, h0 = ins
    key = scan_key(n)
    (past,) = lw.state_inputs[key]
    base = lw.cache_names[key]
    elem, rank = ELEM[n.out.type.dtype], n.out.type.rank - 1
    both = sc.op("Shape", sc.op("Add", a, b))                            # [B, T, ...]: a step is [B, ...]
    step = sc.op("Concat", sc.op("Slice", both, e.i64([0]), e.i64([1])),
                 sc.op("Slice", both, e.i64([2]), e.i64([INT64_MAX])), axis=0)
    (h,) = cached_or_initial(lw, sc, [cache_slice(lw, sc, past)], [sc.op("Expand", h0, step)], [(elem, rank)],
                             f"{base}.state")
    (hs,) = _linear_scan(lw, sc, n, [a, b, h])
    last = sc.op("Gather", hs, e.i64(-1), axis=1, name=f"{base}.state")
    lw.exports.append((f"present.{base}.state", last, elem, rank))
    return [hs]


@rule(Op.LINEAR_ATTN, table=DECODE)
def _linear_attn_decode(lw, sc, n, ins):
    """Causal linear attention from the cached state; keeps the state after the new positions."""
    q, k, v, s0 = ins
    key = scan_key(n)
    (past,) = lw.state_inputs[key]
    t = n.outputs[1].type
    (s,) = cached_or_initial(lw, sc, [cache_slice(lw, sc, past)], [s0], [(ELEM[t.dtype], t.rank)],
                             f"{lw.cache_names[key]}.state")
    y, s_new = _linear_attn(lw, sc, n, [q, k, v, s])
    lw.exports.append((f"present.{lw.cache_names[key]}.state", s_new, ELEM[t.dtype], t.rank))
    return [y, s_new]

