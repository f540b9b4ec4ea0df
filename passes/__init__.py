"""Graph-to-graph passes: a registry keyed by kebab-case name, presets, and the pipeline driver.

A pass is a function `Graph -> Graph` with a one-line docstring saying why it exists. It never
mutates its input (nodes are frozen: it builds new regions and graphs) and returns its input
unchanged when it has nothing to do. Valid IR in, valid IR out. A pass may take keyword-only
options, written `name{key=value,...}` in a pipeline (`recur-blocks{k=2}`). See SPEC.md §16, §18.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import sys
import time
from typing import Any, Callable, Iterable, TextIO

from archc.errors import ArchError
from archc.ir.core import Graph
from archc.passes.const_fold import const_fold
from archc.passes.cse import cse
from archc.passes.dce import dce
from archc.passes.fold_loops import fold_loops
from archc.passes.fuse_elementwise import fuse_elementwise
from archc.passes.hoist_invariants import hoist_invariants
from archc.passes.insert_kv_sharing import insert_kv_sharing, remarks as kv_sharing_remarks
from archc.passes.recur_blocks import recur_blocks
from archc.passes.schedule_depth import remarks as schedule_remarks, schedule_depth
from archc.passes.simplify_shapes import simplify_shapes
from archc.passes.unroll_loops import unroll_small_loops

Pass = Callable[..., Graph]          # g, then the pass's options as keyword arguments

PASSES: dict[str, Pass] = {
    "simplify-shapes": simplify_shapes,
    "const-fold": const_fold,
    "cse": cse,
    "dce": dce,
    "fuse-elementwise": fuse_elementwise,
    "fold-loops": fold_loops,
    "unroll-small-loops": unroll_small_loops,
    "hoist-invariants": hoist_invariants,
    "recur-blocks": recur_blocks,          # changes the model; never in a preset (SPEC.md §18)
    "insert-kv-sharing": insert_kv_sharing,
    "schedule-depth": schedule_depth,
}

# name -> fn(before, after, **options) -> lines explaining what the pass decided (`--remarks`)
REMARKS: dict[str, Callable[..., list[str]]] = {
    "insert-kv-sharing": kv_sharing_remarks,
    "schedule-depth": schedule_remarks,
}

CLEANUP = ("simplify-shapes", "const-fold", "cse", "dce")
LOOPS = ("fold-loops", "unroll-small-loops", "hoist-invariants")
PRESETS: dict[str, tuple[str, ...]] = {
    "O0": (),
    "O1": CLEANUP,
    "O2": ("insert-kv-sharing", "schedule-depth") + CLEANUP + LOOPS + ("const-fold", "cse", "dce", "fuse-elementwise"),
}


def summary(name: str) -> str:
    """The first line of a pass's docstring."""
    doc = (get_pass(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def get_pass(name: str) -> Pass:
    """The pass a pipeline entry names: `cse`, or with options `recur-blocks{k=2,order=cycle}`."""
    base, options = parse_entry(name)
    if base not in PASSES:
        raise ArchError(f"unknown pass `{base}`", hint=_did_you_mean(base, PASSES))
    fn = PASSES[base]
    if not options:
        return fn
    allowed = {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}
    for key, value in options.items():
        if key not in allowed:
            raise ArchError(f"pass `{base}` has no option `{key}`",
                            hint=f"options: {', '.join(allowed)}" if allowed else f"`{base}` takes no options")
        if _is_number(allowed[key]) and not _is_number(value):
            raise ArchError(f"pass `{base}`: option `{key}` must be a number, got `{value}`")
    bound = functools.partial(fn, **options)
    bound.__doc__ = fn.__doc__
    return bound


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_entry(entry: str) -> tuple[str, dict[str, Any]]:
    """`name{key=value,...}` -> (name, options); values are ints, floats, true/false or words."""
    entry = entry.strip()
    if "{" not in entry:
        return entry, {}
    if not entry.endswith("}"):
        raise ArchError(f"bad pass entry `{entry}`", hint="write options as name{key=value,key=value}")
    name, _, body = entry[:-1].partition("{")
    options: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in body.split(","))):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key or not value:
            raise ArchError(f"bad option `{item}` in pass entry `{entry}`", hint="write options as key=value")
        options[key] = _option_value(value)
    return name.strip(), options


def _option_value(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def split_entries(text: str) -> list[str]:
    """Split `a,b{k=1,x=2},c` at the commas outside braces."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [e.strip() for e in out if e.strip()]


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
                 print_after_all: bool = False, time_passes: bool = False, remarks: bool = False,
                 out: TextIO | None = None) -> Graph:
    """Run the named passes in order; between passes verify, print the IR and the passes' remarks, and
    time them as asked."""
    names = tuple(names)
    passes = [(name, get_pass(name)) for name in names]
    print_after = {parse_entry(name)[0] for name in print_after}
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
        prev, g = g, fn(g)
        elapsed = time.perf_counter() - start
        if verify:
            _verify_after(g, name, bindings)
        base, options = parse_entry(name)
        if remarks and base in REMARKS:
            lines = REMARKS[base](prev, g, **options)
            out.write(f"// ----- remarks from {base} ({g.name}) ----- //\n"
                      + "".join(f"// {line}\n" for line in lines or ["nothing to do"]))
        if print_after_all or parse_entry(name)[0] in print_after:
            from archc.ir.printer import print_graph
            out.write(f"// ----- IR after {name} ({g.name}) ----- //\n{print_graph(g)}")
        if time_passes:
            rows.append((name, elapsed, before, _nodes(g)))
    if remarks:
        from archc.ir.analysis import decode_remarks
        from archc.ir.causality import causality
        lines = decode_remarks(g)
        if lines:
            out.write(f"// ----- remarks on decoding ({g.name}) ----- //\n" + "".join(f"// {line}\n" for line in lines))
        out.write(f"// ----- remarks on causality ({g.name}) ----- //\n// {causality(g).line()}\n")
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
