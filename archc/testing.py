"""Helpers for differential tests: valid random inputs for any graph; token-by-token decoding."""
from __future__ import annotations

import math
from typing import Any

import torch

from archc.ir.core import Graph
from archc.ir.interpret import Env, resolve_bindings
from archc.ir.ops import Op


def _scan_sizes(g: Graph, env: Env) -> list[int]:
    return [env.eval_int(n.attr("size")) for n in g.walk() if n.op is Op.SCAN]


def _vocab_bound(g: Graph, env: Env, input_name: str) -> int | None:
    """The smallest table an i64 input indexes (embedding rows), if any."""
    params = {p.name: p for p in g.params}
    defs = {o.name: n for n in g.walk() for o in n.outputs}
    bounds = []
    for n in g.walk():
        if n.op is Op.EMBEDDING and n.inputs[0] == input_name:
            src = defs.get(n.inputs[1])
            if src is not None and src.op is Op.PARAM:
                bounds.append(env.eval_int(params[src.attr("ref")].type.shape[0]))
    return min(bounds) if bounds else None


def example_inputs(g: Graph, bindings: dict[str, Any] | None = None, batch: int = 2, seq: int | None = None,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right dtypes and shapes; sequence length fits every scan."""
    values = resolve_bindings(g, bindings)
    env = Env(values)
    sizes = _scan_sizes(g, env)
    step = math.lcm(*sizes) if sizes else 1
    T = seq if seq is not None else max(step, 2 * step if step < 12 else step)
    if T % step:
        T = ((T + step - 1) // step) * step
    dims = {"B": batch, "T": T}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for a in g.inputs:
        shape = []
        for d in a.type.shape:
            name = getattr(d, "name", None)
            if name in dims:
                shape.append(dims[name])
            else:
                shape.append(Env({**values, **dims}).eval_int(d))
        if a.type.dtype.value == "i64":
            hi = _vocab_bound(g, env, a.name) or 16
            out[a.name] = torch.randint(0, hi, shape, generator=gen)
        elif a.type.dtype.value == "bool":
            out[a.name] = torch.rand(shape, generator=gen) < 0.5
        else:
            out[a.name] = torch.randn(shape, generator=gen)
    return out


def decode_stepwise(model, tokens: torch.Tensor, prompt: int):
    """A generated module's `prefill` on the first `prompt` tokens, then one `decode` per token:
    (the outputs joined along the sequence, the cache)."""
    out, cache = model.prefill(tokens[:, :prompt])
    steps = [out]
    for t in range(prompt, tokens.shape[1]):
        step, cache = model.decode(tokens[:, t:t + 1], cache)
        steps.append(step)
    if isinstance(steps[0], dict):
        return {k: torch.cat([s[k] for s in steps], 1) for k in steps[0]}, cache
    return torch.cat(steps, 1), cache
