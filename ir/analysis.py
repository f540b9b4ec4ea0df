"""Graph algorithms over the IR (networkx): dependencies, order, weight reuse."""
from __future__ import annotations

import networkx as nx
import sympy

from archc.ir.core import Graph, Node, Region, free_values, reads_of, value_types
from archc.ir.ops import OPS, Group, Op
from archc.ir.shapes import as_expr, dims_equal


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
_NEVER = {Op.LINEAR_SCAN, Op.LINEAR_ATTN, Op.CONV1D, Op.MEM_READ, Op.MEM_WRITE, Op.BANK_PUSH,
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


def decode_blocker(g: Graph, state: bool = True, torch_step: bool = False) -> str | None:
    """Why `g` has no exact incremental step (None when it has one), SPEC §17.

    The step runs the new tokens only: every op must act position by position along the sequence
    axis, except causal self-attention (its past K/V are cached) and, with `state`, segment scans
    whose body reads the sequence only through its segment (the cache keeps the carries at the last
    complete segment and the open segment's inputs; the body runs on whole segments as in the
    forward, so anything may happen inside it). With `torch_step`, what the PyTorch step also
    handles (the ONNX step graph does not yet): a sequence-free prefix concatenated before the
    sequence (`concat([persistent, h], axis = 1)`: axis 1 is T + P), attended with `prefix = P`
    and sliced off again (the step adds the prefix on its first call only), and `cumsum` along the
    sequence (the step keeps the running sum).
    """
    prefix = torch_step
    tok = lm_token_input(g)
    if tok is None:
        return "it is not a language model (one i64 [B, T] token input)"
    T = tok.type.shape[1]

    seq_dims = [T]      # and, inside a top-k route's inference rule, its compacted length (the step runs every token)

    def seq_axis(t) -> int | None:
        if prefix and seq_offset(t, T) is not None:
            return 1
        hits = [i for i, d in enumerate(t.shape) if any(d == s for s in seq_dims)]
        return hits[0] if hits else (-1 if any(d.has(T) for d in t.shape) else None)

    types = value_types(g)

    def offset(name: str):
        return seq_offset(types[name], T)

    lines = delay_lines(g)
    delays = {cut for _, cut, _ in lines.values()}            # the cut values only a delay reads

    def prefixed(n: Node) -> str | None:
        """None when `n` is an allowed piece of the prefix pattern; else why not (only for the ops
        the pattern involves)."""
        out = offset(n.out.name)
        if n.op is Op.CONCAT and n.out.name in lines:
            return None                      # a delay line: the step keeps the last P positions
        if n.op is Op.SLICE and n.out.name in delays:
            return None
        if n.op is Op.CONCAT:
            if n.attr("axis") != 1 or len(n.inputs) != 2 or out in (None, 0):
                return "reduces or indexes along the sequence"
            a, b = (types[i] for i in n.inputs)
            if a.rank < 2 or as_expr(a.shape[1]).has(T) or offset(n.inputs[1]) != 0 or not dims_equal(a.shape[1], out):
                return "concatenates along the sequence other than a prefix before it"
            return None
        if n.op is Op.SLICE:
            src = offset(n.inputs[0])
            if n.attr("axis") != 1 or src in (None, 0) or out != 0 or not dims_equal(n.attr("start"), src):
                return "reduces or indexes along the sequence"
            return None
        return "is not plain causal self-attention"      # ATTEND

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
        elif n.op is Op.ROUTE_MASK and state:
            pass                             # token choice: each token's mask is its own (the body is checked)
        elif n.op is Op.ROUTE_TOPK and state and n.attr("has_infer"):
            pass                             # generation routes each token by its `infer` mask (SPEC §9.1)
        elif n.op in _NEVER or (n.op is Op.ROUTE_TOPK and not selects_every_token(n)):
            return f"{what} mixes information along the sequence"
        for o in n.outputs:
            ax = seq_axis(o.type)
            if ax is not None and ax != 1:
                return f"{what} moves the sequence axis"
            if sum(1 for d in o.type.shape if d in seq_dims) > 1:      # einsum("btd,bsd->bts"): position pairs
                return f"{what} pairs positions along the sequence"
        if (n.op in (Op.EINSUM, Op.MATMUL) and any(seq_axis(types[i]) is not None for i in n.inputs if i in types)
                and all(seq_axis(o.type) is None for o in n.outputs)):
            return f"{what} contracts along the sequence"
        if prefix and n.op in (Op.CONCAT, Op.SLICE) and n.attr("axis") == 1 and (
                offset(n.out.name) not in (None, 0) or any(offset(i) not in (None, 0) for i in n.inputs)):
            why = prefixed(n)
            return None if why is None else f"{what} {why}"
        if n.op is Op.CUMSUM and torch_step and n.attr("axis") == 1 and seq_axis(types[n.inputs[0]]) == 1:
            return None                      # causal: the step keeps the running sum
        if n.op in _SEQ_MIXING_REDUCE and n.attr("axis") == 1:
            return f"{what} reduces or indexes along the sequence"
        if n.op is Op.ATTEND:
            p = n.attr("prefix")
            plain = n.attr("causal") and not n.attr("has_mask")
            if p and prefix and plain and all(dims_equal(offset(i) or 0, p) for i in n.inputs[:3]):
                return None                  # the prefix keys are cached once, visible to every query
            if not plain or p:
                return f"{what} is not plain causal self-attention"
        return None

    def check(r: Region) -> str | None:
        for n in r.nodes:
            why = check_node(n)
            if why is not None:
                return why
            if n.op is Op.SCAN and state:
                continue                     # its body runs whole segments, as in the forward
            routed = n.op is Op.ROUTE_TOPK and state and n.attr("has_infer")
            if routed:
                seq_dims.append(n.regions[0].args[0].type.shape[1])
            for sub in n.regions:
                why = check(sub)
                if why is not None:
                    return why
            if routed:
                seq_dims.pop()
        return None

    if state:
        why = stale_cache_blocker(g)
        if why is not None:
            return why
    return check(g.body)


def delay_lines(g: Graph) -> dict[str, tuple[str, str, str]]:
    """`concat([A, x[:, :T-P]], axis = 1)`: x delayed by P positions behind a sequence-free A of P
    positions (the previous token's value: `concat([zeros([B, 1, d]), x[:, :-1]], axis = 1)`).
    By the concat's result: (A, the cut x[:, :T-P], x). The cut may have no other reader."""
    tok = lm_token_input(g)
    if tok is None:
        return {}
    T = tok.type.shape[1]
    types = value_types(g)
    defs = {o.name: m for m in g.walk() for o in m.outputs}
    readers: dict[str, int] = {}
    for m in g.walk():
        for i in reads_of([m]):
            readers[i] = readers.get(i, 0) + 1
    out = {}
    for n in g.walk():
        if n.op is not Op.CONCAT or n.attr("axis") != 1 or len(n.inputs) != 2:
            continue
        if seq_offset(n.out.type, T) != 0:
            continue
        a, cut = types[n.inputs[0]], defs.get(n.inputs[1])
        if a.rank is None or a.rank < 2 or as_expr(a.shape[1]).has(T) or cut is None or cut.op is not Op.SLICE:
            continue
        p = as_expr(a.shape[1])
        if (cut.attr("axis") == 1 and as_expr(cut.attr("start")) == 0 and seq_offset(types[cut.inputs[0]], T) == 0
                and dims_equal(cut.attr("stop"), T - p) is True and readers.get(cut.out.name) == 1
                and cut.out.name not in g.body.results):
            out[n.out.name] = (n.inputs[0], cut.out.name, cut.inputs[0])
    return out


def seq_offset(t, T) -> sympy.Expr | None:
    """P when axis 1 of `t` is the sequence behind a sequence-free prefix of P positions (T + P;
    0 for the plain sequence); None otherwise."""
    if t.rank is None or t.rank < 2:
        return None
    d = as_expr(t.shape[1])
    if not d.has(T):
        return None
    p = sympy.simplify(d - T)
    return None if p.has(T) else p


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
    why = decode_blocker(g, torch_step=True)
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


# -- which values a decode step may cache -------------------------------------------------------------

_FREE, _POS, _MIXED = 0, 1, 2          # sequence-free; position by position (or causal); mixing positions
_POSITIONWISE_MOVES = {Op.SPLIT_HEADS, Op.MERGE_HEADS}


def segment_causal_blocker(n: Node) -> str | None:
    """Why a scan's concatenated yields at segment position i may depend on positions after i or on
    the segment's length (None when they provably do not: each yield position is a position-wise
    or causal function of the segment).

    Then the yields of an open (short) segment change as its later tokens arrive (TitansLMM's last
    position reads the memory after the segment's write: a causal model, whose value at a position
    still changes when the segment grows past it): the forward over
    a longer prefix gives its earlier positions other values, so nothing a decode step caches (K/V,
    another scan's open segment, a recurrence's state) may be computed from them. Conservative: an
    op not known to act position by position along the segment mixes positions.
    """
    r = n.regions[0]
    seg = r.args[0].type.shape[1]
    tag = {r.args[0].name: _POS} | {a.name: _FREE for a in r.args[1:]}

    def aligned(name: str) -> bool:
        t = value_types_cache.get(name)
        return t is not None and t.rank is not None and t.rank >= 2 and dims_equal(t.shape[1], seg) is True

    value_types_cache = {a.name: a.type for a in r.args}
    for m in r.walk():
        value_types_cache.update((o.name, o.type) for o in m.outputs)
        for sub in m.regions:
            value_types_cache.update((a.name, a.type) for a in sub.args)
    first: Node | None = None                    # the first op that mixes positions
    for m in r.nodes:
        reads = list(m.inputs) + [x for sub in m.regions for x in free_values(sub)]
        level = max((tag.get(x, _FREE) for x in reads), default=_FREE)
        out = _MIXED if level else _FREE
        group = OPS[m.op].group if m.op in OPS else None
        if level == _FREE or m.op in (Op.PARAM, Op.CONST):
            out = _FREE
        elif m.regions:
            out = _MIXED
        elif group in (Group.UNARY, Group.BINARY, Group.COMPARE, Group.NORM) or m.op in (Op.LINEAR, Op.ROPE,
                                                                                      Op.EMBEDDING):
            out = level
        elif m.op in _POSITIONWISE_MOVES:
            out = level
        elif group is Group.REDUCE and m.attr("axis") not in (None, 0, 1) and all(aligned(o.name) for o in m.outputs):
            out = level
        elif m.op in (Op.UNSQUEEZE, Op.SELECT, Op.SLICE, Op.CONCAT) and m.attr("axis") not in (0, 1) \
                and all(aligned(o.name) for o in m.outputs):
            out = level
        elif m.op is Op.ATTEND and m.attr("causal") and not m.attr("has_mask") and not m.attr("prefix"):
            out = level
        elif m.op is Op.LINEAR_SCAN and as_expr(m.attr("axis")) == 1 and tag.get(m.inputs[2], _FREE) != _MIXED:
            out = max(level, _POS)                   # h_t reads steps <= t
        elif m.op is Op.LINEAR_ATTN and tag.get(m.inputs[3], _FREE) != _MIXED:
            tag[m.outputs[0].name] = max(level, _POS)   # y_t = (S + sum_{s<=t} v_s k_s^T) q_t; S' sums them all
            tag[m.outputs[1].name] = _MIXED
            continue
        elif m.op is Op.MEM_READ:
            out = max(tag.get(m.inputs[0], _FREE), max((_MIXED if tag.get(w, _FREE) else _FREE)
                                                       for w in m.inputs[1:]))
        for o in m.outputs:
            tag[o.name] = out
        if first is None and out == _MIXED and m.outputs and all(tag.get(x, _FREE) != _MIXED for x in reads):
            first = m
    nc = len(n.inputs) - 1
    for y, st in zip(r.results[nc:], n.attr("stacked", ())):
        if not st and tag.get(y, _FREE) == _MIXED:
            where = (f"`{first.op.value}`" + (f" at line {first.span.line}" if first.span else "")
                     if first is not None else "its body")
            return f"its yields mix positions of their segment ({where})"
    return None


def stale_cache_blocker(g: Graph) -> str | None:
    """Why a decode step would cache a value that changes with later tokens (None: it never does).

    The values computed from a scan whose yields mix positions of their segment
    (`segment_causal_blocker`) are final only once their segment is complete; a step caches K/V,
    open-segment inputs and recurrence states as soon as a position arrives. So such values may
    reach outputs, but no attention's K/V, no other scan's input and no per-step recurrence.
    """
    tainted: set[str] = set()
    blame: dict[str, Node] = {}

    def run(r: Region) -> str | None:
        for n in r.nodes:
            reads = list(n.inputs) + [x for sub in n.regions for x in free_values(sub)]
            hit = next((x for x in reads if x in tainted), None)
            what = f"`{n.op.value}`" + (f" at line {n.span.line}" if n.span else "")
            if n.op is Op.SCAN:
                if n.inputs[0] in tainted:
                    return _stale(what, "reads as its segments", blame[n.inputs[0]])
                if hit is not None or segment_causal_blocker(n) is not None:
                    for o in n.outputs:
                        tainted.add(o.name)
                        blame[o.name] = blame.get(hit, n) if hit else n
                continue
            if n.op is Op.ATTEND and any(x in tainted for x in n.inputs[1:3]):
                return _stale(what, "caches as K/V", blame[next(x for x in n.inputs[1:3] if x in tainted)])
            if n.op in (Op.LINEAR_SCAN, Op.LINEAR_ATTN) and hit is not None:
                return _stale(what, "folds into its state", blame[hit])
            if n.op in (Op.LOOP, Op.HALT_LOOP, Op.ROUTE_TOPK, Op.ROUTE_MASK, Op.FUSED):
                body = n.regions[0]
                for _ in range(len(body.args) + 2):                  # loop carries: to a fixed point
                    before = len(tainted)
                    for a, x in zip(body.args, n.inputs):
                        if x in tainted:
                            tainted.add(a.name)
                            blame[a.name] = blame[x]
                    why = run(body)
                    if why is not None:
                        return why
                    for a, y in zip(body.args, body.results):
                        if y in tainted and n.op in (Op.LOOP, Op.HALT_LOOP):
                            tainted.add(a.name)
                            blame[a.name] = blame[y]
                    if len(tainted) == before:
                        break
                for o, y in zip(n.outputs, body.results):
                    if y in tainted or hit is not None:
                        tainted.add(o.name)
                        blame[o.name] = blame.get(y) or blame[hit]
                continue
            if hit is not None:
                for o in n.outputs:
                    tainted.add(o.name)
                    blame[o.name] = blame[hit]
        return None

    return run(g.body)


def _stale(what: str, how: str, scan: Node) -> str:
    at = f" at line {scan.span.line}" if scan.span else ""
    return (f"{what} {how} values computed from the `scan`{at}, whose outputs change as later tokens of "
            f"their segment arrive")
