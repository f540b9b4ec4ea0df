"""Region ops as ONNX control flow: `loop` and `scan` become `Loop` (the body is one copy of the
region; trip counts may be graph inputs), `halt_loop` a `Loop` whose condition output stops it once
every sample has halted, `route_topk` TopK/GatherElements/ScatterElements around the inlined
region, `route_mask` a `Loop` over the batch with an `If` for samples that select nothing.

Values that flow between attention sites outside the dataflow of the IR (shared K/V: `kv_share`)
are *threaded*: every Loop or If whose region touches them carries them as extra loop-carried
values or branch outputs, so the shared K/V reach the sites that read them.
"""
from __future__ import annotations

import math

from archc.backends.onnx.builder import BOOL, ELEM, F32, F64, I64, Scope
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
from archc.ir.shapes import dims_equal

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
    e = sc.ex
    r = n.regions[0]
    x, mask = ins[0], ins[1]
    weight = ins[2] if n.attr("has_weight") else None
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
    return [rows]


# -- fused ---------------------------------------------------------------------------------------------


@rule(Op.FUSED)
def _fused(lw, sc, n, ins):
    """A fusion region (a Triton kernel boundary) means exactly its body: inlined."""
    return lw.region(sc, n.regions[0], [])


# -- scan --------------------------------------------------------------------------------------------------


@rule(Op.SCAN)
def _scan(lw, sc, n, ins):
    """Segments of `size` along axis 1: a Loop over x viewed as [B, T/size, size, ...]."""
    e = sc.ex
    r = n.regions[0]
    x, init = ins[0], ins[1:]
    size = sc.int_expr(n.attr("size"))
    # a length that is not a multiple of `size` fails in this Reshape (onnxruntime reports it)
    shape = sc.op("Concat", e.i64([0, -1]), sc.op("Unsqueeze", size, e.i64([0])), sc.shape_of(x, 2), axis=0)
    segs = sc.op("Reshape", x, shape, name="segments")
    lb = LoopBody(lw, sc, r, None)
    seg = lb.body.op("Gather", segs, lb.it, axis=1, name=r.args[0].name)
    carries = [lb.carry(v, _elem(lw, a.name), a.type.rank, a.name) for v, a in zip(init, r.args[1:])]
    results = lb.run([seg] + carries)
    nc = len(carries)
    stacked = list(n.attr("stacked", ()))
    ys = [(v, _elem(lw, name), lw.rank(name)) for v, name in zip(results[nc:], r.results[nc:])]
    carried, per_seg = lb.finish(sc.dim(segs, 1), results[:nc], ys)
    outs = []
    for v, (_, _, rank), st in zip(per_seg, ys, stacked):
        moved = sc.op("Transpose", v, perm=[1, 0] + list(range(2, rank + 1)))      # [B, n_segments, ...]
        if not st:                                                                  # [B, n_segments * size, ...]
            moved = sc.op("Reshape", moved, sc.op("Concat", e.i64([0, -1]), sc.shape_of(moved, 3), axis=0))
        outs.append(moved)
    return carried + outs


