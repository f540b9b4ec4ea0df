"""The front-end oracle: one input through every stage, classified as accepted, diagnosed or failed.

An input is *accepted* when it checks and every later stage works on it (each -O preset with the
verifier between passes, the IR printer/parser round trip, the cost model, the DOT writer, the
PyTorch backend, and `compile()` of the generated source: it must be valid Python). It is
*diagnosed* when a checking stage (parse, lower, verify) raises an `ArchError` that points into
the file (`file:line:col: error: ...`). Anything else is a failure: another exception anywhere, an
`ArchError` without a position, an `ArchError` from a pass (passes take valid IR to valid IR), a
generated module that is not valid Python, or (decided by the caller, see `worker.py`) a hang or a
dead process. A model built from the input is never executed here.
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass

from archc.errors import ArchError

OK, DIAGNOSED, FAILED = "ok", "diagnosed", "failed"
_LOCATED = re.compile(r"^[^\n]*:\d+:\d+: error: ")


@dataclass(frozen=True)
class Outcome:
    """What one input did: `status` is ok / diagnosed / failed; `kind` names the failure class."""

    status: str
    stage: str = ""          # parse, lower, verify, pass:O1, ir-roundtrip, cost, dot, codegen, py-compile
    kind: str = ""           # crash, unlocated, bad-python, roundtrip, timeout, died (failures only)
    detail: str = ""         # the message, or the exception and where it was raised

    @property
    def failed(self) -> bool:
        return self.status == FAILED

    @property
    def signature(self) -> str:
        """Stable across inputs that hit the same bug: used to deduplicate and to keep a shrink on target."""
        if not self.failed:
            return self.status
        head = self.detail.splitlines()[0] if self.detail else ""
        if self.kind == "crash":
            # exception type and the innermost archc frame, not the (input-dependent) message
            where = re.findall(r"\[at ([^\]]+)\]", self.detail)
            head = head.split(":")[0] + (f" at {where[-1]}" if where else "")
        elif self.kind in ("unlocated", "roundtrip", "pass-error"):
            head = re.sub(r"`[^`]*`|'[^']*'|\d+", "_", head)[:80]
        else:
            head = ""
        return f"{self.kind}:{self.stage}:{head}"


def _crash(stage: str, err: BaseException) -> Outcome:
    # the innermost frame of archc's own code (not lark's, sympy's or torch's)
    ours = [(fr, line) for fr, line in traceback.walk_tb(err.__traceback__)
            if str(fr.f_globals.get("__name__", "")).startswith("archc.")]
    loc = ""
    if ours:
        fr, _ = ours[-1]
        loc = f" [at {fr.f_globals['__name__']}:{fr.f_code.co_name}]"
    text = f"{type(err).__name__}: {err}"[:500]
    return Outcome(FAILED, stage, "crash", text + loc + "\n" + "".join(traceback.format_exception(err))[-4000:])


def _diagnosis(stage: str, err: ArchError, source: str | None) -> Outcome:
    if source is not None:
        err.with_source(source)
    try:
        rendered = err.render()
    except Exception as inner:  # noqa: BLE001 - rendering a diagnostic must never fail
        return _crash(stage + ":render", inner)
    if err.span is None or not _LOCATED.match(rendered) or err.span.line < 1 or err.span.column < 1:
        return Outcome(FAILED, stage, "unlocated", rendered)
    return Outcome(DIAGNOSED, stage, "", rendered)


def check_source(source: str | bytes, file: str = "fuzz.arch", levels: tuple[str, ...] | None = None,
                 cost: bool = False) -> Outcome:
    """Run `source` through the whole front end (see the module docstring); never raises.

    `cost` adds the cost model, whose symbolic sums take seconds on recursive models (off by default)."""
    try:
        return _check(source, file, levels, cost)
    except Exception as err:  # noqa: BLE001 - an escaped exception is exactly what we look for
        return _crash("unknown", err)


def _check(source, file, levels, cost) -> Outcome:
    from archc.dsl.lower import lower_module
    from archc.dsl.parse import parse
    from archc.ir.interpret import resolve_bindings
    from archc.ir.verify import verify

    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    stage = "parse"
    try:
        module = parse(source, file)
        stage = "lower"
        graphs = lower_module(module)
        stage = "verify"
        for g in graphs:
            verify(g, resolve_bindings(g))
    except ArchError as err:
        return _diagnosis(stage, err, text)
    except Exception as err:  # noqa: BLE001 - an escaped exception is exactly what we look for
        return _crash(stage, err)
    return after_check(graphs, file, levels, cost)


def after_check(graphs, file: str = "fuzz.arch", levels: tuple[str, ...] | None = None,
                cost: bool = False) -> Outcome:
    """Every stage that must work on a checked program: presets, round trip, (cost), DOT, codegen, compile()."""
    from archc.backends.torch import generate
    from archc.ir.cost import cost as cost_model
    from archc.ir.dot import to_dot
    from archc.ir.interpret import resolve_bindings
    from archc.ir.parser import parse_ir
    from archc.ir.printer import print_module
    from archc.passes import PRESETS, run_pipeline

    stage = "ir-roundtrip"
    try:
        text = print_module(graphs)
        again = print_module(parse_ir(text, "<roundtrip>"))
        if again != text:
            return Outcome(FAILED, stage, "roundtrip", "printing the parsed IR changes it:\n" + _first_diff(text, again))
        if cost:
            stage = "cost"
            for g in graphs:
                cost_model(g).table(resolve_bindings(g))
        stage = "dot"
        to_dot(graphs)
        variants = {"O0": graphs}
        for level in (levels if levels is not None else tuple(PRESETS)):
            if level == "O0":
                continue
            stage = f"pass:{level}"
            variants[level] = [run_pipeline(g, PRESETS[level], verify=True) for g in graphs]
        for level, gs in variants.items():
            stage = f"codegen:{level}"
            src = generate(gs, source_file=file).source
            stage = f"py-compile:{level}"
            try:
                compile(src, f"<archc:{file}>", "exec")
            except SyntaxError as err:
                line = src.splitlines()[err.lineno - 1] if err.lineno and err.lineno <= src.count("\n") + 1 else ""
                return Outcome(FAILED, stage, "bad-python", f"SyntaxError: {err.msg} (line {err.lineno}: {line.strip()})")
    except ArchError as err:
        if stage.startswith("codegen"):
            return _diagnosis(stage, err, None)      # a backend may refuse a construct, with a position
        return Outcome(FAILED, stage, "pass-error" if stage.startswith("pass") else "unlocated", err.render())
    except Exception as err:  # noqa: BLE001 - an escaped exception is exactly what we look for
        return _crash(stage, err)
    return Outcome(OK, "", "", ", ".join(g.name for g in graphs))


def _first_diff(a: str, b: str) -> str:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines())):
        if x != y:
            return f"line {i + 1}:\n  printed: {x}\n  reparsed: {y}"
    return "(lengths differ)"
