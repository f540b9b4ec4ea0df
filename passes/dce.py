"""dce: drop nodes whose results nothing reads, in every region.

Liveness is a backward sweep, not a local rewrite: a region's yields are live; a node is kept
when one of its results is live or it has effects (`has_effects`), and then its operands and the
outer values its regions read become live. A kept region op is swept inside first, so an outer
value read only by dead nested nodes dies too. Region arguments, yields and results are never
dropped (that would change the op's contract); only whole pure region ops whose results are all
unused go. Parameters stay in `Graph.params` even when no node reads them: they are model state.
(The shape of xDSL's `dead_code_elimination.py` liveness walk.)
"""
from __future__ import annotations

from archc.ir.core import Graph, Node, Region, free_values
from archc.passes.rewrite import has_effects


def dce(g: Graph) -> Graph:
    """Remove nodes whose results are unused (recursively inside regions), keeping effects and every region's contract."""
    body = _sweep(g.body)
    return g if body == g.body else g.replace(body=body)


def _sweep(r: Region) -> Region:
    live = set(r.results)
    kept: list[Node] = []
    for n in reversed(r.nodes):
        if not (any(o.name in live for o in n.outputs) or has_effects(n)):
            continue
        if n.regions:
            n = n.replace(regions=tuple(_sweep(sub) for sub in n.regions))
            for sub in n.regions:
                live.update(free_values(sub))
        live.update(n.inputs)
        kept.append(n)
    return Region(r.args, tuple(reversed(kept)), r.results)
