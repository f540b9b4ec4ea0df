"""Graphviz DOT for IR graphs: one node per op, region ops as clusters, deterministic output."""
from __future__ import annotations

import json

from archc.ir.core import Graph, Region


def _q(s: str) -> str:
    return json.dumps(s)


def to_dot(graphs: list[Graph]) -> str:
    lines = ["digraph archc {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    for gi, g in enumerate(graphs):
        lines.append(f"  subgraph cluster_g{gi} {{")
        lines.append(f"    label={_q(g.name)};")
        producers: dict[str, str] = {}
        counter = [0]
        for a in g.inputs:
            nid = f"g{gi}_in_{len(producers)}"
            producers[a.name] = nid
            lines.append(f"    {nid} [label={_q('input ' + a.name + ' : ' + str(a.type))}, shape=ellipse];")
        edges: list[str] = []
        _region(g.body, gi, producers, lines, edges, counter, "    ")
        for r in g.body.results:
            nid = f"g{gi}_out_{r.replace('.', '_')}"
            lines.append(f"    {nid} [label={_q('output ' + r)}, shape=ellipse];")
            if r in producers:
                edges.append(f"    {producers[r]} -> {nid};")
        lines.extend(edges)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _region(r: Region, gi, producers, lines, edges, counter, indent):
    for n in r.nodes:
        counter[0] += 1
        nid = f"g{gi}_n{counter[0]}"
        label = f"{', '.join(o.name for o in n.outputs)} = {n.op.value}"
        if n.regions:
            lines.append(f"{indent}subgraph cluster_{nid} {{")
            lines.append(f"{indent}  label={_q(label)}; style=rounded;")
            for reg in n.regions:
                for a in reg.args:
                    counter[0] += 1
                    aid = f"g{gi}_n{counter[0]}"
                    producers[a.name] = aid
                    lines.append(f"{indent}  {aid} [label={_q('arg ' + a.name)}, shape=ellipse];")
                _region(reg, gi, producers, lines, edges, counter, indent + "  ")
            lines.append(f"{indent}  {nid} [label={_q(label)}, shape=octagon];")
            lines.append(f"{indent}}}")
            for reg in n.regions:
                for y in reg.results:
                    if y in producers:
                        edges.append(f"{indent}{producers[y]} -> {nid} [style=dashed];")
        else:
            lines.append(f"{indent}{nid} [label={_q(label + ' : ' + ', '.join(str(o.type) for o in n.outputs))}];")
        for i in n.inputs:
            if i in producers:
                edges.append(f"{indent}{producers[i]} -> {nid};")
        for o in n.outputs:
            producers[o.name] = nid
