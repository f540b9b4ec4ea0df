"""Helpers shared by the kernel families (not a family: it exports no FAMILY).

A family renders its kernels from a *spec*: a tuple of the node facts that change the kernel
text (gate form, loss kind, layout...). `kernel_name` hashes the spec, so two nodes with the same
spec share one kernel; `render` fills a template whose placeholders are `@KEY@` tokens (Triton
code is full of braces, so `str.format` does not fit).
"""
from __future__ import annotations

import hashlib
import re
import itertools
from typing import Any

import sympy

from archc.ir.core import Graph, Node


def producer(graph: Graph, name: str) -> Node | None:
    """The node defining value `name`, or None for a region argument."""
    for n in graph.walk():
        if any(o.name == name for o in n.outputs):
            return n
    return None


def is_zero_fill(graph: Graph, name: str) -> bool:
    """True when `name` is produced by `full` or `const` with the value 0 (a zero state or rate)."""
    n = producer(graph, name)
    if n is None or n.attr("value") is None or n.op.value not in ("full", "const"):
        return False
    v = sympy.sympify(n.attr("value"))
    return bool(v.is_number and float(v) == 0.0)


def kernel_name(family: str, spec: tuple) -> str:
    """`family_<8 hex digits>` from the spec's repr (deterministic across runs)."""
    digest = hashlib.sha1(repr((family,) + tuple(spec)).encode()).hexdigest()[:8]
    return f"{family}_{digest}"


def render(template: str, **subs: str) -> str:
    """Replace every `@KEY@` in `template`. A line holding only a placeholder whose value is empty
    is dropped; a placeholder left unfilled is a generator bug."""
    lines = []
    for line in template.strip("\n").splitlines():
        key = line.strip()
        if key.startswith("@") and key.endswith("@") and key[1:-1] in subs and not subs[key[1:-1]]:
            continue
        for k, v in subs.items():
            line = line.replace(f"@{k}@", v)
        lines.append(line.rstrip())
    out = "\n".join(lines) + "\n"
    left = sorted(set(re.findall(r"@[A-Z][A-Z0-9_]*@", out)))
    if left:
        raise ValueError(f"unfilled placeholders in a kernel template: {left}")
    return out


def indent(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line if line.strip() else "" for line in text.splitlines())


def config_space(**axes) -> tuple[dict[str, Any], ...]:
    """The cartesian product of meta-parameter choices, in a fixed order."""
    keys = list(axes)
    return tuple(dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys)))


def static_int(e) -> int | None:
    """An IR dimension as an int when it is a number, else None (a symbol sized at run time)."""
    e = sympy.sympify(e)
    return int(e) if e.is_Integer else None


def tuning_source(name: str, configs, default) -> str:
    """The configuration space as module constants, and `_<name>_config(kernel, sizes, config, run)`:
    an explicit `config` wins; otherwise the per-GPU autotune cache (`_tune`, imported by the
    generated module) picks one for the sizes' bucket, timing `run(cfg)` inside `archc autotune`."""
    rows = "\n".join(f"    {c!r}," for c in configs)
    return (f"_{name}_CONFIGS = (\n{rows}\n)\n_{name}_DEFAULT = {default!r}\n\n\n"
            f"def _{name}_config(kernel, sizes, config, run):\n"
            f"    if config is not None:\n"
            f"        return dict(config)\n"
            f"    return _tune.config(kernel, sizes, _{name}_DEFAULT, _{name}_CONFIGS, run)\n")
