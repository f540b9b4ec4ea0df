"""Graph algorithms over the IR (networkx): dependencies, order, weight reuse."""
from __future__ import annotations

import networkx as nx
import sympy

from archc.ir.core import Graph, Node, Region
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
