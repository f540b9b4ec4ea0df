"""The fuzzers' CI tier, the fuzzing machinery itself, and the replay of every fuzz regression file.

CI tier (SPEC.md §23): a bounded, deterministic number of front-end inputs (a seeded campaign in
a sandboxed child process, plus a derandomized hypothesis property in this process) and of
random programs run differentially. Longer runs use `archc fuzz` (counts in tests/fuzz_results.md).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archc.cli import main
from archc.fuzz import differential
from archc.fuzz.campaign import fuzz_frontend, fuzz_programs, replay, write_regression
from archc.fuzz.differential import run_program
from archc.fuzz.frontend import check_source
from archc.fuzz.mutate import MUTATORS, deep_input, generate_input, raw_bytes, seed_sources, subtrees
from archc.fuzz.programs import random_program
from archc.fuzz.shrink import Budget, ddmin, shrink_text
from archc.fuzz.worker import Sandbox, call_with_time_limit

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = sorted((ROOT / "tests" / "regressions").glob("*.arch"))
LIMIT = 120.0          # seconds per input: only a real hang gets near it, even on a loaded machine


def _failures(report) -> str:
    out = []
    for f in report.failures.values():
        src = f.source if isinstance(f.source, str) else repr(f.source[:2000])
        out.append(f"{f.signature}\n{f.detail[:1500]}\n--- input ---\n{src[:4000]}")
    return "\n\n".join(out)


# -- CI tier ------------------------------------------------------------------------------------------

def test_frontend_campaign_ci_tier():
    report = fuzz_frontend(100, seed=20260101, time_limit=LIMIT, shrink=False)
    assert report.count == 100
    assert not report.failures, _failures(report)
    assert report.statuses["diagnosed"] > 0 and report.statuses["ok"] > 0     # both outcomes were reached


SEEDS = seed_sources()


@settings(max_examples=60, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.randoms(use_true_random=False))
def test_frontend_property(rng):
    source = generate_input(rng, SEEDS)
    o = call_with_time_limit(lambda s: check_source(s, "prop.arch", ("O1",)), source, LIMIT)
    assert not o.failed, f"{o.signature}\n{o.detail[:2000]}"


def test_random_programs_ci_tier():
    report = fuzz_programs(20, seed=7000, time_limit=4 * LIMIT, shrink=False, max_stmts=3)
    assert report.count == 20
    assert not report.failures, _failures(report)
    assert report.statuses["ok"] == 20


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_fuzz_regression(path):
    v = replay(path)
    assert not v.failed, f"{v.signature}\n{v.detail[:3000]}"


def test_regressions_folder_is_not_empty():
    assert len(REGRESSIONS) >= 4


# -- the machinery ----------------------------------------------------------------------------------

def test_frontend_oracle_classifies():
    ok = check_source("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x + 1\n}\n")
    assert ok.status == "ok" and ok.detail == "A"
    bad = check_source("arch A(d: int = 4) {\n  input x: f32[B, T, q]\n  output y = x\n}\n", "bad.arch")
    assert bad.status == "diagnosed" and bad.stage == "lower"
    assert re.match(r"bad\.arch:2:\d+: error: ", bad.detail)


def test_frontend_oracle_reports_an_escaped_exception(monkeypatch):
    import archc.dsl.lower as lower

    def boom(module):
        raise KeyError("internal")
    monkeypatch.setattr(lower, "lower_module", boom)
    o = check_source("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x\n}\n")
    assert o.failed and o.kind == "crash" and o.stage == "lower"
    assert o.signature.startswith("crash:lower:KeyError")


def test_frontend_oracle_reports_an_unlocated_diagnostic(monkeypatch):
    import archc.dsl.lower as lower
    from archc.errors import ArchError

    def nowhere(module):
        raise ArchError("something is wrong")
    monkeypatch.setattr(lower, "lower_module", nowhere)
    o = check_source("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x\n}\n")
    assert o.failed and o.kind == "unlocated"


def _spin(arg):
    return sum(range(10 ** 13))     # one C call: a signal cannot interrupt it, only a kill can


def _die(arg):
    os._exit(3)


def test_sandbox_kills_a_hang_and_survives_a_dead_child():
    with Sandbox(_spin, time_limit=1.0) as sb:
        o = sb(0)                   # (None is the stop message)
        assert o.failed and o.kind == "timeout"
    with Sandbox(_die, time_limit=30.0) as sb:
        o = sb(0)
        assert o.failed and o.kind == "died" and "exit code 3" in o.detail
    with Sandbox(lambda s: check_source(s), time_limit=60.0) as sb:
        assert sb("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x\n}\n").status == "ok"


def test_ddmin_and_shrink_text_find_minimal_inputs():
    items = list(range(40))
    assert ddmin(items, lambda xs: 7 in xs and 23 in xs) == [7, 23]
    text = "\n".join(f"line {i}" for i in range(30)) + "\nrepeat r in 2 {\n  BUG 12345\n}\n"
    small = shrink_text(text, lambda t: "BUG" in t, Budget(max_tests=500))
    assert small.strip() == "BUG"


def test_differential_catches_a_wrong_backend(monkeypatch):
    def off_by_a_little(g, params, inputs):
        outs, named = differential._torch_backend(g, params, inputs)
        return {k: v + 1e-2 if v.is_floating_point() else v for k, v in outs.items()}, named
    monkeypatch.setattr(differential, "BACKENDS", {"torch": off_by_a_little})
    v = run_program(random_program(3, max_stmts=2), 3, decode=False)
    assert v.failed and v.kind == "mismatch" and v.stage == "torch:O0", v


def test_differential_catches_wrong_gradients(monkeypatch):
    def no_grad(g, params, inputs):
        outs, named = differential._torch_backend(g, params, inputs)
        return {k: v.detach() for k, v in outs.items()}, named
    monkeypatch.setattr(differential, "BACKENDS", {"torch": no_grad})
    v = run_program(random_program(3, max_stmts=2), 3, decode=False)
    assert v.failed and v.kind == "grad-mismatch", v


ILL_CONDITIONED = (ROOT / "tests" / "data" / "ill_conditioned_program.arch").read_text()


def _one_ulp_off(g, params, inputs):
    """Another correct fp32 implementation: the generated module with every weight 1 ulp away."""
    gen = torch.Generator().manual_seed(99)

    def nudge(v):
        return v * (1 + (torch.randint(0, 2, v.shape, generator=gen) * 2 - 1) * 2.0 ** -24)
    outs, named = differential._torch_backend(g, {k: nudge(v) for k, v in params.items()}, inputs)
    return outs, named


def test_an_ill_conditioned_mismatch_is_counted_apart_not_failed(monkeypatch):
    """The fp32 interpreter is itself ~1 away from its fp64 run on this program: a backend within a
    few times that noise floor of the fp64 answer is ill-conditioned, not failed (seed 300004 of the
    long run); the same backend on a well-conditioned program still has to match."""
    monkeypatch.setattr(differential, "BACKENDS", {"torch": _one_ulp_off})
    v = run_program(ILL_CONDITIONED, 3, only={"torch:O0"}, decode=False)
    assert v.status == differential.ILL_CONDITIONED and not v.failed, v
    assert run_program(random_program(3, max_stmts=2), 3, only={"torch:O0"}, decode=False).status == "ok"


def test_a_wrong_backend_on_an_ill_conditioned_program_still_fails(monkeypatch):
    def halved(g, params, inputs):
        outs, named = differential._torch_backend(g, params, inputs)
        return {k: v * 0.5 if v.is_floating_point() else v for k, v in outs.items()}, named
    monkeypatch.setattr(differential, "BACKENDS", {"torch": halved})
    v = run_program(ILL_CONDITIONED, 3, only={"torch:O0"}, decode=False)
    assert v.failed and v.kind == "mismatch", v


def test_a_rejected_program_is_a_failure():
    v = run_program("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x + z\n}\n")
    assert v.failed and v.stage == "check" and v.kind == "rejected"


def test_mutators_produce_varied_inputs():
    rng = random.Random(5)
    seeds = SEEDS
    for mutate in MUTATORS:
        out = mutate(seeds[0], rng, seeds)
        assert isinstance(out, str)
    assert isinstance(raw_bytes(seeds[0], rng, seeds), bytes)
    assert subtrees(seeds[0]) and any(cat == "expr" for cat, _, _ in subtrees(seeds[0]))
    inputs = [generate_input(rng, seeds) for _ in range(60)]
    assert len({x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in inputs}) == 60
    assert all(isinstance(deep_input(rng), str) for _ in range(10))


def test_random_programs_are_deterministic_and_varied():
    assert random_program(11) == random_program(11)
    texts = [random_program(s) for s in range(30)]
    joined = "\n".join(texts)
    for construct in ("repeat", "share", "grad last", "halt when", "topk(", "where(", "scan", "NeuralMemory",
                      "LinearMemory", "Bank(", "block ", "cache "):
        assert construct in joined, construct


def test_cli_fuzz_counts_and_exit_status(tmp_path):
    r = CliRunner().invoke(main, ["fuzz", "--frontend", "--count", "4", "--seed", "3", "--corpus", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "frontend: 4 inputs (seed 3)" in r.output and "0 distinct failure(s)" in r.output


def test_cli_fuzz_fails_on_a_failing_program(tmp_path, monkeypatch):
    def broken(g, params, inputs):
        outs, named = differential._torch_backend(g, params, inputs)
        return {k: torch.zeros_like(v) for k, v in outs.items()}, named
    monkeypatch.setattr(differential, "BACKENDS", {"torch": broken})
    r = CliRunner().invoke(main, ["fuzz", "--programs", "--count", "1", "--seed", "3", "--no-shrink",
                                  "--corpus", str(tmp_path / "c"), "--save-regressions", str(tmp_path / "r")])
    assert r.exit_code == 1, r.output
    assert "FAIL mismatch:torch:O0" in r.output
    saved = list((tmp_path / "r").glob("*.arch"))
    assert len(saved) == 1 and saved[0].read_text().startswith("# fuzz: program seed=3\n")
    assert list((tmp_path / "c").glob("program-*.txt"))


def test_write_regression_round_trips(tmp_path):
    p = write_regression(tmp_path, "arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  output y = x * 2\n}\n",
                         "program", 5, "what it caught")
    assert p.read_text().startswith("# fuzz: program seed=5\n# what it caught\n")
    assert replay(p).status == "ok"


def test_a_lone_surrogate_in_a_require_message_is_a_diagnostic():
    o = check_source('arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  require d > 1, "\\ud800"\n  output y = x\n}\n')
    assert o.status == "diagnosed" and "invalid string literal" in o.detail, o.detail


def test_block_inlining_blow_up_is_a_diagnostic(monkeypatch):
    """A block applying a block twice, nested: the expansion limit stops it with a position."""
    import archc.ir.builder as builder
    monkeypatch.setattr(builder, "MAX_NODES", 200)
    levels = 12
    defs = "".join(f"block K{i}(d: int) {{\n  input x: f32[B, T, d]\n  layer a = K{i + 1}(d)\n  layer b = K{i + 1}(d)\n"
                   f"  return a(x) + b(x)\n}}\n" for i in range(levels))
    defs += f"block K{levels}(d: int) {{\n  input x: f32[B, T, d]\n  return x * 2\n}}\n"
    src = defs + "arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  layer top = K0(d)\n  output y = top(x)\n}\n"
    o = check_source(src, "blowup.arch")
    assert o.status == "diagnosed" and "expands to more than 200 IR operations" in o.detail, o.detail
