"""Torch text for the ops generated kernels compile: the launchers' eager path.

A launcher sometimes runs its region as torch ops instead of its Triton kernels (SPEC §19.2, §20):

* a fused region below its size gate (launch overhead would dominate: the inline torch expression);
* a backward asked for a differentiable gradient (`create_graph=True`, e.g. a PINN's second
  derivatives): the Triton backward kernels compute numbers, not graphs, so the launcher
  differentiates the torch form of the same region with autograd instead (`torch_backward`, in
  `runtime.py`), which is differentiable to any order;
* the recursion-body family's torch form of one trip (SPEC §20 `recursion_body`).

The text comes from the PyTorch backend's own op table (`backends.torch.EMIT`), so both backends
render an op the same way; the few rules that call into the backend's runtime are written out here
(`rms_norm`, the body of `torch_runtime.rms_norm`), and `F.` is spelled `torch.nn.functional.` so a
kernel source needs nothing but `import torch`.
"""
from __future__ import annotations

import re

import sympy

from archc.backends.pyexpr import py_expr
from archc.backends.torch import _SCALAR_OK, EMIT
from archc.ir.core import Node
from archc.ir.ops import Op

# ops a generated kernel may hold, whose torch form these functions write
SUPPORTED = frozenset(EMIT) - {Op.PARAM, Op.FULL, Op.ARANGE}


class _Text:
    """The part of the torch emitter `EMIT`'s rules read: symbolic attributes and runtime names."""

    def __init__(self, exprs: dict, types: dict):
        self.exprs = exprs          # sympy expression -> Python name of a launcher argument
        self.types = types
        self.uses_math = False

    def e(self, expr, integer: bool = False) -> str:
        expr = sympy.sympify(expr)
        if expr in self.exprs:
            return self.exprs[expr]
        if expr.free_symbols:
            raise KeyError(f"no launcher argument carries {expr}")
        return py_expr(expr, {}, integer)

    def rt(self, fn: str) -> str:             # pragma: no cover - every rule that calls it is written out here
        raise KeyError(f"torch text cannot call the runtime function {fn}")


def _rms_norm(ins, eps) -> str:
    x, w = ins
    return f"{x} * torch.rsqrt({x}.pow(2).mean(-1, keepdim=True) + {eps!r}) * {w}"


def statements(nodes: list[Node], var: dict[str, str], scalars: set[str], types: dict,
               exprs: dict | None = None, prefix: str = "t") -> list[str]:
    """One `name = <torch expression>` line per node. `var` maps the values the nodes read to Python
    names (it is extended with each node's result, `<prefix><k>`); `scalars` holds the names bound to
    Python numbers (a node whose every operand is one and that accepts numbers gives one too)."""
    text = _Text(exprs or {}, types)
    lines = []
    for k, n in enumerate(nodes):
        out = f"{prefix}{k}"
        ins = [var[i] for i in n.inputs]
        if n.op is Op.CONST:
            v = n.attr("value")
            lines.append(f"{out} = {text.e(v) if isinstance(v, sympy.Basic) else repr(float(v))}")
            scalars.add(out)
        else:
            if n.op not in _SCALAR_OK:
                ins = [f"torch.as_tensor({a})" if a in scalars else a for a in ins]
            elif all(a in scalars for a in ins):
                scalars.add(out)
            if n.op is Op.RMS_NORM:
                expr = _rms_norm(ins, float(n.attr("eps")))
            else:
                expr = re.sub(r"\bF\.", "torch.nn.functional.", EMIT[n.op](text, n, ins))
            lines.append(f"{out} = {expr}")
        var[n.out.name] = out
    return lines
