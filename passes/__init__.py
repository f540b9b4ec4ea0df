"""Graph-to-graph passes: a registry keyed by kebab-case name, presets, and the pipeline driver.

A pass is a function `Graph -> Graph` with a one-line docstring saying why it exists. It never
mutates its input (nodes are frozen: it builds new regions and graphs) and returns its input
unchanged when it has nothing to do. Valid IR in, valid IR out. See SPEC.md §16.
"""
from __future__ import annotations

import difflib
import sys
import time
from typing import Callable, Iterable, TextIO

from archc.errors import ArchError
from archc.ir.core import Graph
from archc.passes.const_fold import const_fold
from archc.passes.cse import cse
from archc.passes.dce import dce
from archc.passes.fuse_elementwise import fuse_elementwise
from archc.passes.simplify_shapes import simplify_shapes

Pass = Callable[[Graph], Graph]

PASSES: dict[str, Pass] = {
    "simplify-shapes": simplify_shapes,
    "const-fold": const_fold,
    "cse": cse,
    "dce": dce,
    "fuse-elementwise": fuse_elementwise,
}

CLEANUP = ("simplify-shapes", "const-fold", "cse", "dce")
PRESETS: dict[str, tuple[str, ...]] = {
    "O0": (),
    "O1": CLEANUP,
    "O2": CLEANUP + ("fuse-elementwise",),
}


def summary(name: str) -> str:
    """The first line of a pass's docstring."""
    doc = (get_pass(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def get_pass(name: str) -> Pass:
    if name not in PASSES:
        raise ArchError(f"unknown pass `{name}`", hint=_did_you_mean(name, PASSES))
    return PASSES[name]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return f"did you mean `{close[0]}`? (passes: {', '.join(known)})"
    return f"passes: {', '.join(known)}"


def preset(level: str) -> tuple[str, ...]:
    if level not in PRESETS:
        raise ArchError(f"unknown optimization level `{level}`", hint=f"levels: {', '.join(PRESETS)}")
    return PRESETS[level]


def _nodes(g: Graph) -> int:
    return sum(1 for _ in g.walk())


def run_pipeline(g: Graph, names: Iterable[str], *, verify: bool = False, print_after: Iterable[str] = (),
                 print_after_all: bool = False, time_passes: bool = False, out: TextIO | None = None) -> Graph:
    """Run the named passes in order; between passes verify, print the IR, and time them as asked."""
    names = tuple(names)
    passes = [(name, get_pass(name)) for name in names]
    print_after = set(print_after)
    for name in print_after:
        get_pass(name)
    out = out if out is not None else sys.stderr
    bindings = None
    if verify:
        from archc.ir.interpret import resolve_bindings
        bindings = resolve_bindings(g)
    rows = []
    for name, fn in passes:
        before = _nodes(g) if time_passes else 0
        start = time.perf_counter()
        g = fn(g)
        elapsed = time.perf_counter() - start
        if verify:
            _verify_after(g, name, bindings)
        if print_after_all or name in print_after:
            from archc.ir.printer import print_graph
            out.write(f"// ----- IR after {name} ({g.name}) ----- //\n{print_graph(g)}")
        if time_passes:
            rows.append((name, elapsed, before, _nodes(g)))
    if time_passes:
        out.write(_timing_table(g.name, rows))
    return g


def _verify_after(g: Graph, name: str, bindings: dict) -> None:
    from archc.ir.verify import verify
    try:
        verify(g, bindings)
    except ArchError as err:
        raise ArchError(f"IR is invalid after pass `{name}`: {err.message}", err.span, err.hint, err.source) from None


def _timing_table(graph: str, rows: list[tuple[str, float, int, int]]) -> str:
    width = max([len("pass")] + [len(r[0]) for r in rows])
    lines = [f"// ----- pass timing ({graph}) ----- //",
             f"{'pass':<{width}}  {'ms':>9}  nodes"]
    for name, secs, before, after in rows:
        lines.append(f"{name:<{width}}  {secs * 1e3:9.2f}  {before} -> {after}")
    lines.append(f"{'total':<{width}}  {sum(r[1] for r in rows) * 1e3:9.2f}")
    return "\n".join(lines) + "\n"
