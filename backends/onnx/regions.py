"""Region ops as ONNX control flow: `loop` and `scan` become `Loop` (the body is one copy of the
region; trip counts may be graph inputs; a scan's short last segment is one more copy in an `If`,
with the size symbol bound to the remainder), `halt_loop` a `Loop` whose condition output stops it once
every sample has halted, `route_topk` TopK/GatherElements/ScatterElements around the inlined
region, `route_mask` a `Loop` over the batch with an `If` for samples that select nothing.

Values that flow between attention sites outside the dataflow of the IR (shared K/V: `kv_share`)
are *threaded*: every Loop or If whose region touches them carries them as extra loop-carried
values or branch outputs, so the shared K/V reach the sites that read them.
"""
from __future__ import annotations

import math

from archc.backends.onnx.builder import BOOL, ELEM, F32, F64, I64, INT64_MAX, Scope
from archc.backends.onnx.lower import (
    Lowerer,
    expand_index,
    gather_along,
    rule,
    scatter_true,
    topk,
)
from archc.ir.core import Node, Region
from archc.ir.ops import Op
from archc.ir.shapes import as_expr, dims_equal

from archc.errors import ArchError

# -- threaded state (shared K/V) ------------------------------------------------------------------------

#: per state kind, its values as (element type, rank, is a sequence)
STATE_TYPES = {
    "recursion": [(F32, 4, True), (F32, 4, True), (I64, 2, True), (BOOL, 1, False)],   # K, V, kpos per copy; present
    "from": [(F32, 4, False), (F32, 4, False), (I64, 2, False)],                        # the source's K, V, kpos
    "store": [(F32, 4, True), (F32, 4, True), (I64, 2, True)],    # what a site last recorded, per copy (kv_read)
}


def state_keys(lw: Lowerer, r: Region) -> list[tuple]:
    """The threaded values a region reads or writes (in first-use order)."""
    keys: list[tuple] = []
    for n in r.walk():
        if n.op is Op.KV_READ:
            keys += [k for k in [("store", n.attr("site"))] if k not in keys]
        if n.op is not Op.ATTEND:
            continue
        share = n.attr("kv_share") or ""
        found = []
        if n.attr("site") in lw.stores:
            found.append(("store", n.attr("site")))
        if share.startswith("recursion:"):
            found.append(("recursion", share.split(":", 1)[1], n.attr("site")))
        elif share:
            found.append(("from", share.split(":")[-1]))
        if n.attr("site") and ("from", n.attr("site")) in lw.sources:
            found.append(("from", n.attr("site")))
        keys += [k for k in found if k not in keys]
    return keys


def _placeholder(sc: Scope, elem: int, rank: int) -> str:
    """An empty tensor standing in for a value not produced yet (its rank and type are what matter)."""
    return sc.op("ConstantOfShape", sc.ex.i64([0] * rank), name="empty",
                 value=_scalar_tensor(elem, 0))


def _scalar_tensor(elem: int, v):
    from onnx import helper
    return helper.make_tensor("value", elem, [1], [v])


def _owned_state(lw: Lowerer, sc: Scope, n: Node) -> list[tuple]:
    """Start the K/V stores of sites shared across this loop's iterations (empty at every run of the loop)."""
    var = n.attr("var")
    owned = [k for k in state_keys(lw, n.regions[0]) if k[0] == "recursion" and k[1] == var]
    for key in owned:
        copies = _copies(lw, key[2], n)
        seqs = []
        for elem, rank in ((F32, 4), (F32, 4), (I64, 2)):
            ph = _placeholder(sc, elem, rank)
            seqs.append(sc.op("SequenceConstruct", *([ph] * copies), name="kv_store"))
        present = sc.op("ConstantOfShape", sc.ex.i64([copies]), name="kv_present", value=_scalar_tensor(BOOL, False))
        lw.state[key] = seqs + [present]
    return owned


def new_store(lw: Lowerer, sc: Scope, site: str) -> list[str]:
    """An empty per-copy K/V store of `site` (one placeholder per copy), for `kv_read`."""
    copies = _copies(lw, site, None)
    return [sc.op("SequenceConstruct", *([_placeholder(sc, elem, rank)] * copies), name="kv_store")
            for elem, rank in ((F32, 4), (F32, 4), (I64, 2))]


def _copies(lw: Lowerer, site: str, n: Node) -> int:
    """How many weight copies an attention site has (its layer array's length; 1 if not arrayed)."""
    for p in lw.g.params:
        if p.name.startswith(site + ".") and p.copies != 1:
            return lw.ex.static_int(p.copies, f"the number of copies of `{site}`", n.span if n else None)
    return 1


def _ensure_state(lw: Lowerer, sc: Scope, keys: list[tuple]) -> None:
    for key in keys:
        if key not in lw.state:
            if key[0] == "recursion":
                raise ArchError(f"K/V shared across `{key[1]}` outside that loop")
            if key[0] == "store":
                lw.state[key] = new_store(lw, sc, key[1])
                continue
            lw.state[key] = [_placeholder(sc, elem, rank) for elem, rank, _ in STATE_TYPES[key[0]]]


def thread_in(lw: Lowerer, body: Scope, keys: list[tuple]) -> list[str]:
    """Make the current state of `keys` inputs of `body`; returns the outer values to feed them."""
    outer = []
    for key in keys:
        outer += lw.state[key]
        lw.state[key] = [body.add_input("kv_state", elem, rank, seq) for elem, rank, seq in STATE_TYPES[key[0]]]
    return outer


def thread_out(lw: Lowerer, body: Scope, keys: list[tuple]) -> None:
    for key in keys:
        for value, (elem, rank, seq) in zip(lw.state[key], STATE_TYPES[key[0]]):
            body.add_output(value, elem, rank, seq)


def thread_after(lw: Lowerer, keys: list[tuple], outs: list[str]) -> None:
    """Bind the state of `keys` to a control-flow node's outputs."""
    i = 0
    for key in keys:
        width = len(STATE_TYPES[key[0]])
        lw.state[key] = outs[i:i + width]
        i += width


# -- Loop construction shared by loop, halt_loop, scan, route_mask ------------------------------------------


class LoopBody:
    """Builds a Loop body: iteration counter, carried values, threaded state, scan outputs."""

    def __init__(self, lw: Lowerer, sc: Scope, region: Region, var: str | None):
        self.lw, self.sc, self.region = lw, sc, region
        self.keys = state_keys(lw, region)
        _ensure_state(lw, sc, self.keys)
        self.body = sc.child()
        self.it = self.body.add_input(var or "i", I64, 0)
        self.cond = self.body.add_input("cond", BOOL, 0)
        if var:
            self.body.syms[var] = self.it
        self.carried: list[tuple[str, int, int | None]] = []     # outer initial value, elem, rank
        self.carried_out: list[str] = []
        self.scans: list[tuple[str, int, int]] = []              # body value, elem, rank (per iteration)

    def carry(self, initial: str, elem: int, rank: int | None, hint: str) -> str:
        self.carried.append((initial, elem, rank))
        return self.body.add_input(hint, elem, rank)

    def enter(self) -> None:
        """After the carries: thread the state in and collect what the body exports."""
        self.state_init = thread_in(self.lw, self.body, self.keys)
        self.outer_exports, self.lw.exports = self.lw.exports, []

    def run(self, args: list[str]) -> list[str]:
        lw = self.lw
        self.enter()
        lw.loop_iters.append(self.it)
        results = lw.region(self.body, self.region, args)
        lw.loop_iters.pop()
        return results

    def finish(self, trips: str, carried_out: list[str], scans: list[tuple[str, int, int]], cond_out: str | None = None,
               cond_in: str = "") -> tuple[list[str], list[str]]:
        """Emit the Loop; returns (final carried values, stacked scan outputs)."""
        lw, body = self.lw, self.body
        body.add_output(cond_out if cond_out is not None else self.cond, BOOL, 0)
        for value, (_, elem, rank) in zip(carried_out, self.carried):
            body.add_output(value, elem, rank)
        thread_out(lw, body, self.keys)
        exports, lw.exports = lw.exports, self.outer_exports
        all_scans = scans + [(v, elem, rank) for _, v, elem, rank in exports]
        for value, elem, rank in all_scans:
            body.add_output(value, elem, rank)
        n_out = len(carried_out) + len(self.state_init) + len(all_scans)
        if n_out == 0:
            return [], []
        outs = self.sc.ops("Loop", trips, cond_in, *(c for c, _, _ in self.carried), *self.state_init, outputs=n_out,
                           body=body.graph(f"{lw.ex.hint}_body"))
        carried = outs[:len(carried_out)]
        thread_after(lw, self.keys, outs[len(carried_out):len(carried_out) + len(self.state_init)])
        stacked = outs[len(carried_out) + len(self.state_init):]
        for (name, _, elem, rank), value in zip(exports, stacked[len(scans):]):
            lw.exports.append((name, value, elem, rank + 1))
        return carried, stacked[:len(scans)]


def _elem(lw: Lowerer, ir_value: str) -> int:
    return ELEM[lw.dtype(ir_value)]


# -- loop ----------------------------------------------------------------------------------------------


@rule(Op.LOOP)
def _loop(lw, sc, n, ins):
    r = n.regions[0]
    owned = _owned_state(lw, sc, n)
    lb = LoopBody(lw, sc, r, n.attr("var"))
    args = [lb.carry(v, _elem(lw, a.name), a.type.rank, a.name) for v, a in zip(ins, r.args)]
    results = lb.run(args)
    carried, _ = lb.finish(sc.int_expr(n.attr("trips")), results, [])
    for key in owned:
        del lw.state[key]
    return carried


# -- halt_loop ---------------------------------------------------------------------------------------


@rule(Op.HALT_LOOP)
def _halt_loop(lw, sc, n, ins):
    """Run until every sample has halted (the Loop's condition output) or `trips` iterations."""
    r = n.regions[0]
    e = sc.ex
    owned = _owned_state(lw, sc, n)
    batch = sc.op("Unsqueeze", sc.dim(ins[0], 0) if ins else e.i64(1), e.i64([0]))
    halted0 = sc.op("ConstantOfShape", batch, name="halted", value=_scalar_tensor(BOOL, False))
    steps0 = sc.op("ConstantOfShape", batch, name="steps", value=_scalar_tensor(I64, 0))
    lb = LoopBody(lw, sc, r, n.attr("var"))
    args = [lb.carry(v, _elem(lw, a.name), a.type.rank, a.name) for v, a in zip(ins, r.args)]
    halted = lb.carry(halted0, BOOL, 1, "halted")
    steps = lb.carry(steps0, I64, 1, "steps")
    halt, *new = lb.run(args)
    body = lb.body
    first = r.args[0].type.shape[0] if r.args and r.args[0].type.rank else None
    kept = []
    for a, old, nv in zip(r.args, args, new):
        if a.type.rank and first is not None and dims_equal(a.type.shape[0], first) is True:
            flag = halted if a.type.rank == 1 else body.op("Unsqueeze", halted, e.i64(list(range(1, a.type.rank))))
            kept.append(body.op("Where", flag, old, nv, name="frozen"))    # halted samples keep their state
        else:
            kept.append(nv)
    steps_new = body.op("Where", halted, steps, body.op("Add", lb.it, e.i64(1)))
    halted_new = body.op("Or", halted, halt)
    everyone = body.op("Cast", body.op("ReduceMin", body.op("Cast", halted_new, to=I64), keepdims=0), to=BOOL)
    cond = body.op("Not", everyone, name="running")
    carried, _ = lb.finish(sc.int_expr(n.attr("trips")), kept + [halted_new, steps_new], [], cond_out=cond)
    for key in owned:
        del lw.state[key]
    return carried[:len(ins)] + [carried[-1]]


# -- route_topk -----------------------------------------------------------------------------------------


@rule(Op.ROUTE_TOPK)
def _route_topk(lw, sc, n, ins):
    """Top-k tokens per sample (among candidates), in sequence order, through the inlined region."""
    e = sc.ex
    x, score, *rest = ins
    among = rest.pop(0) if n.attr("has_among") else None
    weight = rest.pop(0) if n.attr("has_weight") else None
    if n.attr("has_infer"):
        # an exported graph is for inference: each token by its own `infer` mask (SPEC §9.1)
        sel = rest.pop(0) if among is None else sc.op("And", rest[0], among)
        return [_per_sample(lw, sc, n, x, sel, weight), sel]
    x_rank = lw.rank(n.inputs[0])
    T = sc.dim(x, 1)
    # k = max(1, floor(capacity * T + 1e-9)), in double precision as the interpreter computes it
    cap = sc.float_expr(n.attr("capacity"))
    prod = sc.op("Add", sc.op("Mul", cap, sc.op("Cast", T, to=F64)), e.const(1e-9, F64, "f64"))
    k = sc.op("Max", sc.op("Cast", sc.op("Floor", prod), to=I64), e.i64(1), name="k")
    s = score if among is None else sc.op("Where", among, score, e.f32(-math.inf))
    idx = _sorted_values(sc, topk(sc, s, k, 1, largest=True), k)    # chosen positions, ascending
    x_sel = gather_along(sc, x, x_rank, idx, 2, 1)
    (y,) = lw.region(sc, n.regions[0], [x_sel, idx])
    tail = e.i64(list(range(2, x_rank))) if x_rank > 2 else None
    new = y
    if weight is not None:
        w = sc.op("GatherElements", weight, idx, axis=1)
        if tail is not None:
            w = sc.op("Unsqueeze", w, tail)
        new = sc.op("Add", x_sel, sc.op("Mul", w, sc.op("Sub", y, x_sel)))
    sel = scatter_true(sc, sc.op("Shape", score), idx, 1)
    if among is not None:
        valid = sc.op("GatherElements", among, idx, axis=1)
        if tail is not None:
            valid = sc.op("Unsqueeze", valid, tail)
        new = sc.op("Where", valid, new, x_sel)
        sel = sc.op("And", sel, among)
    out = sc.op("ScatterElements", x, expand_index(sc, x, x_rank, idx, 2, 1), new, axis=1)
    return [out, sel]


def _sorted_values(sc: Scope, idx: str, k: str) -> str:
    """Sort int64 indices ascending along axis 1 (TopK's values output, smallest first)."""
    values, _ = sc.ops("TopK", idx, sc.op("Unsqueeze", k, sc.ex.i64([0])), outputs=2, axis=1, largest=0, sorted=1)
    return values


# -- route_mask ----------------------------------------------------------------------------------------


@rule(Op.ROUTE_MASK)
def _route_mask(lw, sc, n, ins):
    """Per sample: run the region on that sample's masked tokens (batch 1), gate, write back."""
    return [_per_sample(lw, sc, n, ins[0], ins[1], ins[2] if n.attr("has_weight") else None)]


def _per_sample(lw, sc, n, x: str, mask: str, weight: str | None) -> str:
    """Each sample runs the region on its own masked tokens (batch 1), gated, written back."""
    e = sc.ex
    r = n.regions[0]
    x_rank = lw.rank(n.inputs[0])
    elem = _elem(lw, n.inputs[0])
    lb = LoopBody(lw, sc, r, None)
    body = lb.body
    b = lb.it
    idx = body.op("Reshape", body.op("NonZero", body.op("Gather", mask, b, axis=0)), e.i64([-1]), name="pos")
    count = body.dim(idx, 0)
    batch_dim, length_dim = n.attr("dims", ("B", "T"))
    if batch_dim:
        body.syms[batch_dim] = e.i64(1)
    if length_dim:
        body.syms[length_dim] = count
    row = body.op("Gather", x, b, axis=0, name="row")
    lb.enter()
    keys = lb.keys
    empty = body.child()                              # no token selected: the row is unchanged
    empty.add_output(row, elem, x_rank - 1)
    thread_out(lw, empty, keys)
    some = body.child()
    xs0 = some.op("Gather", row, idx, axis=0, name="x_sel")
    xs = some.op("Unsqueeze", xs0, e.i64([0]))
    pos = some.op("Unsqueeze", idx, e.i64([0]))
    (y,) = lw.region(some, r, [xs, pos])
    new = some.op("Squeeze", y, e.i64([0]))
    if weight is not None:
        w = some.op("Gather", some.op("Gather", weight, b, axis=0), idx, axis=0)
        if x_rank > 2:
            w = some.op("Unsqueeze", w, e.i64(list(range(1, x_rank - 1))))
        new = some.op("Add", xs0, some.op("Mul", w, some.op("Sub", new, xs0)))
    written = some.op("ScatterND", row, some.op("Unsqueeze", idx, e.i64([-1])), new)
    some.add_output(written, elem, x_rank - 1)
    thread_out(lw, some, keys)
    if lw.exports:
        raise ArchError("the decode graph cannot cache attention inside a mask route", n.span)
    n_state = sum(len(STATE_TYPES[k[0]]) for k in keys)
    outs = body.ops("If", body.op("Equal", count, e.i64(0)), outputs=1 + n_state,
                    then_branch=empty.graph("route_mask_empty"), else_branch=some.graph("route_mask_some"))
    thread_after(lw, keys, outs[1:])
    _, (rows,) = lb.finish(sc.dim(x, 0), [], [(outs[0], elem, x_rank - 1)])
    return rows


# -- fused ---------------------------------------------------------------------------------------------


@rule(Op.FUSED)
def _fused(lw, sc, n, ins):
    """A fusion region (a Triton kernel boundary) means exactly its body: inlined."""
    return lw.region(sc, n.regions[0], [])


# -- scan --------------------------------------------------------------------------------------------------


@rule(Op.SCAN)
def _scan(lw, sc, n, ins):
    results, _, _ = scan_segments(lw, sc, n, ins[0], ins[1:])
    return results


def scan_segments(lw: Lowerer, sc: Scope, n: Node, x: str, init: list[str]) -> tuple[list[str], list[str], str]:
    """Segments of `size` along axis 1 (SPEC §8.5): a Loop over the q = floor(T/size) whole segments
    (x[:, :q*size] viewed as [B, q, size, ...]), then, when T leaves a remainder r, an If that runs
    the body once more on x[:, q*size:] with the size symbol bound to r inside it (as the
    interpreter's `_short_segment`); its yields are appended to the whole segments' ones.

    A scan that cannot run a short segment (`partial_segment_blocker`) views the whole input as
    [B, T/size, size, ...]: a length that is not a multiple fails in that Reshape, whose name says so.

    Returns (the scan's results, the carries after the whole segments, the whole segments' length
    q*size as an int64 scalar): the decode step (`state.py`) commits those carries and keeps
    x[:, q*size:] as the open segment.
    """
    from archc.ir.analysis import partial_segment_blocker
    e = sc.ex
    hint = e.hint
    r = n.regions[0]
    size_e = as_expr(n.attr("size"))
    size = sc.int_expr(size_e)
    blocked = "its segment length is 1" if e.number(size_e) == 1 else partial_segment_blocker(lw.g, n)
    if blocked is None:
        q = sc.op("Div", sc.dim(x, 1), size, name="whole_segments")
        stop = sc.op("Unsqueeze", sc.op("Mul", q, size), e.i64([0]), name="whole_length")
        x_whole = sc.op("Slice", x, e.i64([0]), stop, e.i64([1]), name="whole")
        shape = sc.op("Concat", e.i64([0]), sc.op("Unsqueeze", q, e.i64([0])), sc.op("Unsqueeze", size, e.i64([0])),
                      sc.shape_of(x, 2), axis=0)
        segs = sc.op("Reshape", x_whole, shape, name="segments")
    else:
        if e.number(size_e) != 1:
            lw.notes.append(_multiple_note(e, size_e, blocked))
        # a length that is not a multiple of `size` fails in this Reshape (onnxruntime names the node)
        shape = sc.op("Concat", e.i64([0, -1]), sc.op("Unsqueeze", size, e.i64([0])), sc.shape_of(x, 2), axis=0)
        segs = sc.op("Reshape", x, shape, name=_multiple_name(e, size_e))
        q = sc.dim(segs, 1)
    lb = LoopBody(lw, sc, r, None)
    seg = lb.body.op("Gather", segs, lb.it, axis=1, name=r.args[0].name)
    carries = [lb.carry(v, _elem(lw, a.name), a.type.rank, a.name) for v, a in zip(init, r.args[1:])]
    results = lb.run([seg] + carries)
    e.hint = hint                                   # name the Loop and what follows after the scan
    nc = len(carries)
    stacked = [bool(st) for st in n.attr("stacked", ())]
    ys = [(_elem(lw, name), lw.rank(name)) for name in r.results[nc:]]
    carried, per_seg = lb.finish(q, results[:nc], [(v, elem, rank) for v, (elem, rank) in zip(results[nc:], ys)])
    if blocked is not None:
        joined = [_joined(sc, v, rank, st) for v, (_, rank), st in zip(per_seg, ys, stacked)]
        return carried + joined, carried, sc.dim(x, 1)
    start = sc.op("Mul", q, size, name="whole_length")
    return _short_segment(lw, sc, n, x, q, start, size, size_e, carried, per_seg, ys, stacked), carried, start


def _joined(sc: Scope, per_seg: str, rank: int, stacked: bool) -> str:
    """A Loop's per-segment yields [n, B, ...] as the scan's result: [B, n, ...] stacked, or
    [B, n * size, ...] concatenated (n >= 1: a Loop that ran no iteration has no shape to go by)."""
    moved = sc.op("Transpose", per_seg, perm=[1, 0] + list(range(2, rank + 1)))      # [B, n_segments, ...]
    if not stacked:                                                                 # [B, n_segments * size, ...]
        moved = sc.op("Reshape", moved, sc.op("Concat", sc.ex.i64([0, -1]), sc.shape_of(moved, 3), axis=0))
    return moved


def _short_segment(lw: Lowerer, sc: Scope, n: Node, x: str, q: str, start: str, size: str, size_e,
                   carried: list[str], per_seg: list[str], ys: list[tuple[int, int]], stacked: list[bool]) -> list[str]:
    """If T mod size > 0: the body on x[:, q*size:] (`start` = q*size) with the size symbol bound to
    the remainder, its carries the scan's, its yields appended (after the whole segments' when q > 0);
    else the Loop's."""
    e = sc.ex
    hint = e.hint
    r = n.regions[0]
    rest = sc.op("Sub", sc.dim(x, 1), start, name="short_length")
    keys = state_keys(lw, r)
    _ensure_state(lw, sc, keys)
    state0 = {k: list(lw.state[k]) for k in keys}
    exports0 = list(lw.exports)
    carry_types = [(_elem(lw, a.name), a.type.rank) for a in r.args[1:]]
    out_ranks = [rank + 1 if st else rank for (_, rank), st in zip(ys, stacked)]

    whole = sc.child()                                # no remainder: the whole segments' results
    for v, (elem, rank) in zip(carried, carry_types):
        whole.add_output(v, elem, rank)
    thread_out(lw, whole, keys)
    for v, (elem, rank), st, out_rank in zip(per_seg, ys, stacked, out_ranks):
        whole.add_output(_joined(whole, v, rank, st), elem, out_rank)

    last = sc.child()
    try:
        with e.rebound(last, as_expr(size_e).name, rest):
            tail = last.op("Slice", x, last.op("Unsqueeze", start, e.i64([0])), e.i64([INT64_MAX]), e.i64([1]),
                           name=r.args[0].name)
            results = lw.region(last, r, [tail] + carried)
        if len(lw.exports) != len(exports0):
            raise ArchError("the decode graph cannot cache attention inside a scan's short last segment", n.span)
    except ArchError as err:
        e.hint = hint
        # the body needs the segment length at export time: a length that is not a multiple fails at run time
        lw.state.update(state0)
        lw.exports[:] = exports0
        lw.notes.append(_multiple_note(e, size_e, f"its body needs the segment length at export time: {err.message}"))
        state = [(v, elem, rank, seq) for k in keys for v, (elem, rank, seq) in zip(lw.state[k], STATE_TYPES[k[0]])]
        last = _failing_branch(sc, x, size, size_e,
                               [(v, elem, rank, False) for v, (elem, rank) in zip(carried, carry_types)] + state
                               + [(None, elem, out_rank, False) for (elem, _), out_rank in zip(ys, out_ranks)])
    else:
        e.hint = hint
        nc = len(carried)
        for v, (elem, rank) in zip(results[:nc], carry_types):
            last.add_output(v, elem, rank)
        thread_out(lw, last, keys)
        if ys:
            pieces = [y if not st else last.op("Unsqueeze", y, e.i64([1]))
                      for y, st in zip(results[nc:], stacked)]
            before = last.child()                     # q > 0: the whole segments' yields come first
            alone = last.child()
            for piece, v, (elem, rank), st, out_rank in zip(pieces, per_seg, ys, stacked, out_ranks):
                before.add_output(before.op("Concat", _joined(before, v, rank, st), piece, axis=1), elem, out_rank)
                alone.add_output(piece, elem, out_rank)
            joined = last.ops("If", last.op("Greater", q, e.i64(0)), outputs=len(pieces),
                              then_branch=before.graph("scan_whole_and_short"),
                              else_branch=alone.graph("scan_short_only"))
            for v, elem, out_rank in zip(joined, (elem for elem, _ in ys), out_ranks):
                last.add_output(v, elem, out_rank)
    n_state = sum(len(STATE_TYPES[k[0]]) for k in keys)
    outs = sc.ops("If", sc.op("Greater", rest, e.i64(0)), outputs=len(carried) + n_state + len(ys),
                  then_branch=last.graph("scan_short_segment"), else_branch=whole.graph("scan_whole_segments"))
    thread_after(lw, keys, outs[len(carried):len(carried) + n_state])
    return outs[:len(carried)] + outs[len(carried) + n_state:]


def _multiple_name(ex, size_e) -> str:
    v = ex.number(size_e)
    return f"scan_length_must_be_a_multiple_of_{v if v is not None else size_e}"


def _multiple_note(ex, size_e, why: str) -> str:
    v = ex.number(size_e)
    what = f"{size_e} = {v}" if v is not None and str(size_e) != str(v) else str(size_e)
    return (f"the scan over segments of {what} runs whole segments only ({why}): feed a length that is a multiple "
            f"of it; other lengths fail in onnxruntime, in the Reshape `{_multiple_name(ex, size_e)}`")


def _failing_branch(sc: Scope, x: str, size: str, size_e, outputs: list[tuple[str | None, int, int, bool]]) -> Scope:
    """An If branch that fails in a Reshape named after the scan's requirement; its outputs (value or
    None, element type, rank, is a sequence) only give the branch its types."""
    e = sc.ex
    br = sc.child()
    shape = br.op("Concat", e.i64([0, -1]), br.op("Unsqueeze", size, e.i64([0])), br.shape_of(x, 2), axis=0)
    bad = br.op("Reshape", x, shape, name=_multiple_name(e, size_e))
    never = br.op("Less", br.op("Size", bad), e.i64(0))          # every output depends on the failing Reshape
    for value, elem, rank, seq in outputs:
        if seq:
            br.add_output(value, elem, rank, seq=True)
            continue
        if value is None:
            value = br.op("ConstantOfShape", e.i64([0] * rank), value=_scalar_tensor(elem, 0))
        br.add_output(br.op("Where", never, value, value), elem, rank)
    return br
