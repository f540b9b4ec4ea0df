"""Fuzzing campaigns: many inputs, failures deduplicated, shrunk and saved; regression files replayed.

`fuzz_frontend(count, seed)` checks mutated and hostile inputs in a sandboxed child process
(`worker.Sandbox`: wall-clock limit, memory cap); `fuzz_programs(count, seed)` runs random
programs differentially (`differential.run_program`) under a SIGALRM limit. Each distinct failure
signature is shrunk (`shrink.shrink_text`) and written to the corpus folder as
`<mode>-<hash>.arch` with a `.txt` beside it that says what failed; `regressions=` also writes
the shrunk program, with a header, where `replay` (and tests/test_fuzz.py) run it on every test run.

A regression file starts with comment lines; `# fuzz: frontend` or `# fuzz: program seed=N` says
how to replay it: the front end must accept or diagnose it; a program must check and agree on
every stage with weights and inputs drawn from seed N.
"""
from __future__ import annotations

import hashlib
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from archc.fuzz.differential import FAILED as P_FAILED
from archc.fuzz.differential import Verdict, run_program
from archc.fuzz.frontend import Outcome, check_source
from archc.fuzz.mutate import generate_input, seed_sources
from archc.fuzz.programs import random_program
from archc.fuzz.shrink import Budget, shrink_bytes, shrink_text
from archc.fuzz.worker import InProcess, Sandbox, call_with_time_limit, fork_available


@dataclass
class Failure:
    signature: str
    stage: str
    detail: str
    source: str | bytes
    shrunk: str | bytes
    hits: int = 1
    path: Path | None = None


@dataclass
class Report:
    mode: str
    seed: int
    count: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: dict[str, Failure] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(f.hits for f in self.failures.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        lines = [f"{self.mode}: {self.count} inputs (seed {self.seed}) in {self.seconds:.0f} s: {parts}; "
                 f"{len(self.failures)} distinct failure(s)"]
        for f in self.failures.values():
            where = f" -> {f.path}" if f.path else ""
            lines.append(f"  FAIL {f.signature} (x{f.hits}){where}\n    {f.detail.splitlines()[0][:300]}")
        return "\n".join(lines)


def _save(corpus: Path | None, mode: str, f: Failure) -> None:
    if corpus is None:
        return
    corpus.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f.signature.encode()).hexdigest()[:12]
    path = corpus / f"{mode}-{key}.arch"
    data = f.shrunk if isinstance(f.shrunk, bytes) else f.shrunk.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    orig = f.source if isinstance(f.source, bytes) else f.source.encode("utf-8", "surrogatepass")
    (corpus / f"{mode}-{key}.orig.arch").write_bytes(orig)
    (corpus / f"{mode}-{key}.txt").write_text(f"{f.signature}\nstage: {f.stage}\n\n{f.detail}\n")
    f.path = path


def _log(out: TextIO | None, text: str) -> None:
    if out is not None:
        out.write(text + "\n")
        out.flush()


# -- the front end -------------------------------------------------------------------------------------

def _frontend_check(arg) -> Outcome:
    source, levels = arg
    return check_source(source, "fuzz.arch", levels)


def fuzz_frontend(count: int, seed: int = 0, time_limit: float = 30.0, corpus: Path | None = None,
                  shrink: bool = True, isolate: bool = True, levels: tuple[str, ...] | None = None,
                  shrink_seconds: float = 300.0, out: TextIO | None = None, max_seconds: float | None = None) -> Report:
    """Check `count` generated inputs; every one must be accepted or diagnosed (see frontend.py)."""
    rng = random.Random(seed)
    seeds = seed_sources() + [random_program(seed * 1000 + i) for i in range(8)]
    report = Report("frontend", seed)
    runner = (Sandbox if isolate and fork_available() else InProcess)(_frontend_check, time_limit)
    start = time.monotonic()
    with runner:
        for i in range(count):
            if max_seconds is not None and time.monotonic() - start > max_seconds:
                break
            source = generate_input(rng, seeds)
            o = runner((source, levels))
            report.count += 1
            report.statuses[o.status] += 1
            if (i + 1) % 100 == 0:
                _log(out, f"[frontend] {i + 1}/{count} {dict(report.statuses)}")
            if not o.failed:
                continue
            sig = o.signature
            if sig in report.failures:
                report.failures[sig].hits += 1
                continue
            _log(out, f"[frontend #{i}] {sig}: {o.detail.splitlines()[0][:200]}")
            small = source
            if shrink and o.kind != "timeout":          # each test of a hang costs the whole time limit
                def keeps(candidate) -> bool:
                    return runner((candidate, levels)).signature == sig
                budget = Budget(seconds=shrink_seconds)
                small = shrink_bytes(source, keeps, budget) if isinstance(source, bytes) else \
                    shrink_text(source, keeps, budget)
            f = Failure(sig, o.stage, o.detail, source, small)
            _save(corpus, "frontend", f)
            report.failures[sig] = f
    report.seconds = time.monotonic() - start
    return report


# -- random programs ----------------------------------------------------------------------------------

def _timed_program(source: str, seed: int, time_limit: float, only=None) -> Verdict:
    return call_with_time_limit(lambda s: run_program(s, seed, only=only), source, time_limit,
                                on_timeout=lambda err: Verdict(P_FAILED, "unknown", "timeout", str(err)))


def fuzz_programs(count: int, seed: int = 0, time_limit: float = 120.0, corpus: Path | None = None,
                  shrink: bool = True, regressions: Path | None = None, max_stmts: int = 6, max_depth: int = 2,
                  shrink_seconds: float = 600.0, out: TextIO | None = None, max_seconds: float | None = None) -> Report:
    """Run random programs `seed .. seed + count - 1` differentially; every stage must agree."""
    report = Report("programs", seed)
    start = time.monotonic()
    for i in range(count):
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
        pseed = seed + i
        source = random_program(pseed, max_stmts, max_depth)
        v = _timed_program(source, pseed, time_limit)
        report.count += 1
        report.statuses[v.status] += 1
        if (i + 1) % 10 == 0:
            _log(out, f"[programs] {i + 1}/{count} {dict(report.statuses)}")
        if not v.failed:
            continue
        sig = v.signature
        if sig in report.failures:
            report.failures[sig].hits += 1
            continue
        _log(out, f"[programs seed {pseed}] {sig}: {v.detail.splitlines()[0][:200]}")
        small = source
        if shrink and v.kind != "timeout":
            stage = ":".join(v.stage.split(":")[:2])          # torch:O1:backward -> torch:O1
            only = None if stage in ("check", "unknown") or stage.startswith("pass") else {stage}

            def keeps(candidate: str) -> bool:
                return _timed_program(candidate, pseed, time_limit, only).signature == sig
            small = shrink_text(source, keeps, Budget(seconds=shrink_seconds))
        f = Failure(sig, v.stage, v.detail, source, small)
        _save(corpus, "program", f)
        if regressions is not None:
            write_regression(regressions, small, "program", pseed, f"{sig}: {v.detail.splitlines()[0][:150]}")
        report.failures[sig] = f
    report.seconds = time.monotonic() - start
    return report


# -- regression files -------------------------------------------------------------------------------------

_HEADER = re.compile(r"^# fuzz: (frontend|program)(?: seed=(\d+))?\s*$", re.M)


def write_regression(folder: Path, source: str, mode: str, seed: int | None, what: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    path = folder / f"{mode}-{key}.arch"
    header = f"# fuzz: {mode}" + (f" seed={seed}" if seed is not None else "") + "\n"
    header += "".join(f"# {line}\n" for line in what.splitlines())
    path.write_text(header + source, encoding="utf-8")
    return path


def replay(path: Path) -> Outcome | Verdict:
    """Run one regression file the way its header says; the result must not be a failure."""
    data = Path(path).read_bytes()
    head = data[:400].decode("utf-8", "replace")
    m = _HEADER.search(head)
    if m is None:
        raise ValueError(f"{path}: no `# fuzz: frontend` or `# fuzz: program seed=N` line")
    if m.group(1) == "frontend":
        return check_source(data, Path(path).name)
    return run_program(data.decode("utf-8"), int(m.group(2) or 0))


def main_summary(reports: list[Report], out: TextIO | None = None) -> int:
    out = out or sys.stdout         # looked up now: click's test runner swaps sys.stdout after import
    for r in reports:
        out.write(r.summary() + "\n")
    return 1 if any(r.failures for r in reports) else 0
