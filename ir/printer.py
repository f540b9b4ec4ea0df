"""The stable textual form of the IR (the golden-test format; `archc.ir.parser` reads it back).

    graph Name(d: int = 64, ...) dims(B, T) {
      noncausal "a puzzle solver"            (only when declared)
      param @embed.weight : f32[vocab, d] init=normal(std=1.0)
      policy share_kv(targets=["core.attn"], across="recursion")
      schedule curriculum(progress: float) {n_r=<Piecewise((2, progress < 0.5), (3, True))>}
      input %tokens : i64[B, T]
      %x = embedding(%tokens, %w) : f32[B, T, d]
      %y = loop(%x) {trips=<n_r>, var="r"} : f32[B, T, d] {
        ^(%x.1 : f32[B, T, d]):
        ...
        yield %x.2
      }
      output %logits
    }

Attribute values: integers, floats, true/false, none, "json strings", [lists], and <expr> for
symbolic expressions. Attributes print sorted by key; shapes print with sympy's canonical order.
"""
from __future__ import annotations

import json
import math
from typing import Any

import sympy

from archc.ir.core import Graph, Node, Param, Policy, Region, Schedule, Symbol
from archc.ir.shapes import expr_str


def attr_str(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if ("." in r or "e" in r or "n" in r) else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, sympy.Basic):
        if v.is_Integer:
            return str(int(v))
        if v.is_Float:
            return attr_str(float(v))
        return f"<{expr_str(v)}>"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(attr_str(x) for x in v) + "]"
    raise TypeError(f"cannot print attribute value {v!r}")


def attrs_str(items) -> str:
    if not items:
        return ""
    return " {" + ", ".join(f"{k}={attr_str(v)}" for k, v in items) + "}"


def symbol_str(s: Symbol) -> str:
    if s.default is None:
        return f"{s.name}: {s.kind}"
    return f"{s.name}: {s.kind} = {attr_str(s.default)}"


def param_str(p: Param) -> str:
    args = ", ".join(f"{k}={attr_str(v)}" for k, v in p.init_args)
    out = f"param @{p.name} : {p.type} init={p.init}({args})"
    if p.copies != 1:
        out += f" copies={attr_str(p.copies)}"
    return out


def policy_str(p: Policy) -> str:
    items = [("targets", list(p.targets))] + list(p.args)
    return f"policy {p.kind}(" + ", ".join(f"{k}={attr_str(v)}" for k, v in items) + ")"


def policy_lines(p: Policy, indent: str) -> list[str]:
    """A policy line; one with a region (rewrite_kv's processor) opens it like a region op."""
    if p.region is None:
        return [indent + policy_str(p)]
    return [indent + policy_str(p) + " {"] + region_lines(p.region, indent + "  ") + [indent + "}"]


def schedule_str(s: Schedule) -> str:
    return f"schedule {s.name}({s.var}: {s.kind})" + attrs_str(s.values)


def node_lines(n: Node, indent: str) -> list[str]:
    outs = ", ".join(f"%{o.name}" for o in n.outputs)
    ins = ", ".join(f"%{i}" for i in n.inputs)
    types = ", ".join(str(o.type) for o in n.outputs)
    head = f"{indent}{outs} = {n.op.value}({ins}){attrs_str(n.attrs)} : {types}"
    if not n.regions:
        return [head]
    lines = [head + " {"]
    for i, r in enumerate(n.regions):
        if i:
            lines.append(f"{indent}}} {{")
        lines.extend(region_lines(r, indent + "  "))
    lines.append(f"{indent}}}")
    return lines


def region_lines(r: Region, indent: str) -> list[str]:
    args = ", ".join(f"%{a.name} : {a.type}" for a in r.args)
    lines = [f"{indent}^({args}):"]
    for n in r.nodes:
        lines.extend(node_lines(n, indent))
    lines.append(f"{indent}yield " + ", ".join(f"%{x}" for x in r.results))
    return lines


def print_graph(g: Graph) -> str:
    syms = [s for s in g.symbols if s.kind != "dim"]
    dims = [s.name for s in g.symbols if s.kind == "dim"]
    head = f"graph {g.name}(" + ", ".join(symbol_str(s) for s in syms) + ")"
    if dims:
        head += " dims(" + ", ".join(dims) + ")"
    lines = [head + " {"]
    if g.noncausal is not None:
        lines.append("  noncausal" + (f" {json.dumps(g.noncausal)}" if g.noncausal else ""))
    for p in g.params:
        lines.append("  " + param_str(p))
    for p in g.policies:
        lines.extend(policy_lines(p, "  "))
    for s in g.schedules:
        lines.append("  " + schedule_str(s))
    for a in g.body.args:
        lines.append(f"  input %{a.name} : {a.type}")
    for n in g.body.nodes:
        lines.extend(node_lines(n, "  "))
    lines.append("  output " + ", ".join(f"%{x}" for x in g.body.results))
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_module(graphs: list[Graph]) -> str:
    return "\n".join(print_graph(g) for g in graphs)
