"""Graph algorithms over the IR (networkx): dependencies, order, weight reuse."""
from __future__ import annotations

import networkx as nx
import sympy

from archc.ir.core import Graph, Node, Region, reads_of, value_types
from archc.ir.ops import Op
from archc.ir.shapes import as_expr


def dependency_graph(r: Region) -> nx.MultiDiGraph:
    """Def-use edges between the top-level nodes of a region (nested regions' reads included)."""
    return r.to_networkx()


def topological_order(r: Region) -> list[Node]:
    """A dependency-respecting order of the region's nodes; ties keep program order (deterministic)."""
    g = dependency_graph(r)
    return [g.nodes[i]["node"] for i in nx.lexicographical_topological_sort(g, key=lambda i: i)]


def is_acyclic(r: Region) -> bool:
    return nx.is_directed_acyclic_graph(dependency_graph(r)) and all(
        is_acyclic(sub) for n in r.nodes for sub in n.regions)


def weight_applications(g: Graph) -> dict[str, sympy.Expr]:
    """How many times each parameter is read per forward pass: its sites times their loop trips.

    A parameter read inside `repeat r in n_r` counts n_r times: that is weight sharing. Routes and
    scans count once per execution of their region (scans: once per segment).
    """
    out: dict[str, sympy.Expr] = {}

    def walk(r: Region, mult: sympy.Expr, seq: sympy.Expr | None):
        for n in r.nodes:
            if n.op is Op.PARAM:
                out[n.attr("ref")] = out.get(n.attr("ref"), sympy.Integer(0)) + mult
            for sub in n.regions:
                k = sympy.Integer(1)
                if n.op in (Op.LOOP, Op.HALT_LOOP):
                    k = as_expr(n.attr("trips"))
                walk(sub, mult * k, seq)
    walk(g.body, sympy.Integer(1), None)
    return {k: sympy.simplify(v) for k, v in out.items()}


# -- incremental decoding -------------------------------------------------------------------------

_SEQ_MIXING_REDUCE = {Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP, Op.ARGMAX, Op.SOFTMAX, Op.CUMSUM, Op.TOPK_MASK,
                      Op.CONCAT, Op.SLICE, Op.SELECT, Op.GATHER}
_NEVER = {Op.ARANGE, Op.LINEAR_SCAN, Op.LINEAR_ATTN, Op.CONV1D, Op.MEM_READ, Op.MEM_WRITE, Op.BANK_PUSH,
          Op.BANK_VALID, Op.HALT_LOOP, Op.ROUTE_MASK, Op.SCAN}


def selects_every_token(n: Node) -> bool:
    """A route_topk scheduled as a mask whose capacity is 1: it runs every token, position by position."""
    return n.op is Op.ROUTE_TOPK and n.attr("schedule") == "mask" and as_expr(n.attr("capacity")) == 1


def lm_token_input(g: Graph):
    """The token input of a language-model-shaped graph (one i64 [B, T] input), else None."""
    if len(g.inputs) != 1:
        return None
    a = g.inputs[0]
    if a.type.dtype.value != "i64" or a.type.rank != 2 or not isinstance(a.type.shape[1], sympy.Symbol):
        return None
    return a


def kv_decode_blocker(g: Graph) -> str | None:
    """Why `g` has no exact per-token K/V decode path (None when it has one).

    Exact when every op acts position by position along the sequence axis except causal
    self-attention (whose past K/V are cached), possibly inside `repeat` loops.
    """
    return decode_blocker(g, state=False)


def decode_blocker(g: Graph, state: bool = True) -> str | None:
    """Why `g` has no exact incremental step (None when it has one), SPEC §17.

    The step runs the new tokens only: every op must act position by position along the sequence
    axis, except causal self-attention (its past K/V are cached) and, with `state`, segment scans
    whose body reads the sequence only through its segment (the cache keeps the carries at the last
    complete segment and the open segment's inputs; the body runs on whole segments as in the
    forward, so anything may happen inside it).
    """
    tok = lm_token_input(g)
    if tok is None:
        return "it is not a language model (one i64 [B, T] token input)"
    T = tok.type.shape[1]

    def seq_axis(t) -> int | None:
        hits = [i for i, d in enumerate(t.shape) if d == T]
        return hits[0] if hits else (-1 if any(d.has(T) for d in t.shape) else None)

    types = value_types(g)

    def check_node(n: Node) -> str | None:
        what = f"`{n.op.value}`" + (f" at line {n.span.line}" if n.span else "")
        if n.op is Op.SCAN and state:
            why = _scan_state_blocker(g, n, T, types)
            if why is not None:
                return f"{what} {why}"
        elif n.op in (Op.LINEAR_SCAN, Op.LINEAR_ATTN) and state:
            why = _recurrence_state_blocker(n, T, types, seq_axis)
            if why is not None:
                return f"{what} {why}"
        elif n.op in _NEVER or (n.op is Op.ROUTE_TOPK and not selects_every_token(n)):
            return f"{what} mixes information along the sequence"
        for o in n.outputs:
            ax = seq_axis(o.type)
            if ax is not None and ax != 1:
                return f"{what} moves the sequence axis"
            if sum(1 for d in o.type.shape if d == T) > 1:      # einsum("btd,bsd->bts"): position pairs
                return f"{what} pairs positions along the sequence"
        if (n.op in (Op.EINSUM, Op.MATMUL) and any(seq_axis(types[i]) is not None for i in n.inputs if i in types)
                and all(seq_axis(o.type) is None for o in n.outputs)):
            return f"{what} contracts along the sequence"
        if n.op in _SEQ_MIXING_REDUCE and n.attr("axis") == 1:
            return f"{what} reduces or indexes along the sequence"
        if n.op is Op.ATTEND and (not n.attr("causal") or n.attr("has_mask") or n.attr("prefix")):
            return f"{what} is not plain causal self-attention"
        return None

    def check(r: Region) -> str | None:
        for n in r.nodes:
            why = check_node(n)
            if why is not None:
                return why
            if n.op is Op.SCAN and state:
                continue                     # its body runs whole segments, as in the forward
            for sub in n.regions:
                why = check(sub)
                if why is not None:
                    return why
        return None

    return check(g.body)


def _recurrence_state_blocker(n: Node, T, types, seq_axis) -> str | None:
    """Why a `linear_scan` / `linear_attn` cannot keep its state in the decode cache (None: it can)."""
    if n.op is Op.LINEAR_SCAN and as_expr(n.attr("axis")) != 1:
        return "runs along an axis other than the sequence"
    *xs, init = n.inputs
    if seq_axis(types[init]) is not None:
        return "starts from a state shaped by the sequence length"
    if any(seq_axis(types[x]) not in (1, None) for x in xs):
        return "mixes information along the sequence"
    return None


def _scan_state_blocker(g: Graph, n: Node, T, types) -> str | None:
    """Why scan `n` cannot keep its state in the decode cache (None when it can)."""
    r = n.regions[0]
    why = partial_segment_blocker(g, n)
    if why is not None:
        return f"cannot run a short segment: {why}"
    nc = len(n.inputs) - 1
    for o in n.outputs[:nc]:
        if any(as_expr(d).has(T) for d in o.type.shape):
            return "carries a value shaped by the sequence length"
    inner = _defined_in(r)
    for name in sorted(reads_of(r.nodes, r.results) - inner):
        t = types.get(name)
        if t is not None and any(as_expr(d).has(T) for d in t.shape):
            return f"reads the whole sequence (`%{name}`) inside its body"
    for m in r.walk():
        shapes = [d for o in m.outputs for d in o.type.shape]
        if any(as_expr(d).has(T) for d in shapes) or any(_mentions(v, T) for _, v in m.attrs):
            return "uses the sequence length inside its body"
    return None


def _mentions(v, s: sympy.Symbol) -> bool:
    if isinstance(v, sympy.Basic):
        return v.has(s)
    return isinstance(v, tuple) and any(_mentions(x, s) for x in v)


def _defined_in(r: Region) -> set[str]:
    inner = {a.name for a in r.args} | {o.name for m in r.walk() for o in m.outputs}
    for m in r.walk():
        for sub in m.regions:
            inner |= {a.name for a in sub.args}
    return inner


# -- segment scans over any length ------------------------------------------------------------------


def partial_segment_blocker(g: Graph, n: Node) -> str | None:
    """Why scan `n` cannot run a short last segment (None when it can), SPEC §8.5.

    A sequence of length q*C + r runs q segments of C and one of r: the body is evaluated with
    the segment-length parameter bound to r. That has a meaning when the size is one architecture
    parameter that, inside the body, only measures the segment: no parameter tensor and no value
    from outside the body is shaped by it.
    """
    size = as_expr(n.attr("size"))
    if size == 1:
        return None
    dims = {s.name for s in g.symbols if s.kind == "dim"}
    if not isinstance(size, sympy.Symbol) or size.name in dims:
        return (f"its segment length {size} is not an architecture parameter, so a short last segment "
                f"has no length to bind (write `segments(x, seg)` with `seg` a parameter)")
    types = value_types(g)
    r = n.regions[0]
    for m in r.walk():
        if m.op is Op.PARAM and any(as_expr(d).has(size) for d in m.out.type.shape):
            return f"the parameter `{m.attr('ref')}` read in its body is shaped by `{size}`"
    for name in sorted(reads_of(r.nodes, r.results) - _defined_in(r)):
        t = types.get(name)
        if t is not None and any(as_expr(d).has(size) for d in t.shape):
            return f"the outer value `%{name}` read in its body is shaped by `{size}`"
    return None


def decode_remarks(g: Graph) -> list[str]:
    """What the incremental step of `g` keeps, or which construct forces the recompute fallback."""
    if lm_token_input(g) is None:
        return []
    why = decode_blocker(g)
    if why is not None:
        return [f"decode recomputes the token history (O(T) per token): {why}"]
    scans = sum(1 for n in _outside_scans(g.body) if n.op is Op.SCAN)
    recur = sum(1 for n in _outside_scans(g.body) if n.op in (Op.LINEAR_SCAN, Op.LINEAR_ATTN))
    attends = sum(1 for n in _outside_scans(g.body) if n.op is Op.ATTEND)
    kept = [f"{k} {what}" for k, what in ((attends, "attention site(s)' K/V"),
                                          (scans, "segment scan(s)' carries and open segment"),
                                          (recur, "per-step recurrence state(s)")) if k]
    return ["decode keeps compiled state: " + (", ".join(kept) if kept else "nothing (every op is per position)")]


def _outside_scans(r: Region):
    for n in r.nodes:
        yield n
        if n.op is not Op.SCAN:
            for sub in n.regions:
                yield from _outside_scans(sub)
