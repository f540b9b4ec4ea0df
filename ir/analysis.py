"""Graph algorithms over the IR (networkx): dependencies, order, weight reuse."""
from __future__ import annotations

import networkx as nx
import sympy

from archc.ir.core import Graph, Node, Region, value_types
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
    tok = lm_token_input(g)
    if tok is None:
        return "it is not a language model (one i64 [B, T] token input)"
    T = tok.type.shape[1]

    def seq_axis(t) -> int | None:
        hits = [i for i, d in enumerate(t.shape) if d == T]
        return hits[0] if hits else (-1 if any(d.has(T) for d in t.shape) else None)

    types = value_types(g)

    def check(r: Region) -> str | None:
        for n in r.walk():
            what = f"`{n.op.value}`" + (f" at line {n.span.line}" if n.span else "")
            if n.op in _NEVER or (n.op is Op.ROUTE_TOPK and not selects_every_token(n)):
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

    return check(g.body)
