"""`archc check` never shows a traceback: hostile files give one `error:` diagnostic and exit code 1.

The property test mutates the stdlib models (tokens and lines deleted, duplicated or swapped,
characters inserted, the text truncated) and requires every result to check cleanly or raise an
ArchError rendered as `file:line:col: error: ...`, never any other exception.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from archc.dsl.lower import lower_module
from archc.dsl.parse import parse
from archc.ir.verify import verify
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archc.cli import main
from archc.errors import ArchError

ROOT = Path(__file__).resolve().parent.parent
STDLIB = sorted((ROOT / "stdlib").glob("*.arch"))
SOURCES = [p.read_text() for p in STDLIB]


def _nested_repeats(levels: int) -> str:
    body = "x = x + 1\n"
    for i in range(levels):
        body = f"repeat i{i} in 2 {{\n{body}}}\n"
    return "arch A(d: int = 4) {\n  input x: f32[B, T, d]\n" + body + "  output y = x\n}\n"


def _junk() -> bytes:
    rng = random.Random(1234)
    data = bytes(rng.randrange(256) for _ in range(4096))
    return b"arch A(d: int = 4) {\n" + data + b"\x00\xff\xfe\xc3\x28"


HOSTILE = {
    "empty": b"",
    "binary-junk": _junk(),
    "nul-in-valid-utf8": b"arch A(d: int = 4) {\n  input x: f32[B, T, d]\x00\n}\n",
    "five-megabytes": b"# a comment line that pads the file\n" * (5 * 1024 * 1024 // 36 + 1),
    "10k-nested-parens": ("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  y = " + "(" * 10_000 + "x"
                          + ")" * 10_000 + "\n  output z = y\n}\n").encode(),
    "100k-unary-minus": ("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  k = " + "-" * 100_000
                         + "1\n  output y = x\n}\n").encode(),
    "200-nested-repeats": _nested_repeats(200).encode(),
    "long-sum-chain": ("arch A(d: int = 4) {\n  input x: f32[B, T, d]\n  y = x" + " + x" * 5000
                       + "\n  output z = y\n}\n").encode(),
}


def _assert_clean_failure(result, expect: str | None = None):
    out = result.output
    assert result.exit_code == 1, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)   # not an escaped exception
    assert "error:" in out, out
    assert "Traceback" not in out and "internal error" not in out, out
    if expect is not None:
        assert expect in out, out


@pytest.mark.parametrize("name", list(HOSTILE))
def test_check_rejects_hostile_file(tmp_path, name):
    path = tmp_path / f"{name}.arch"
    path.write_bytes(HOSTILE[name])
    result = CliRunner().invoke(main, ["check", str(path)])
    _assert_clean_failure(result)
    # every diagnostic about the file names a position in it
    assert re.search(re.escape(str(path)) + r":\d+:\d+: error: ", result.output), result.output


def test_check_positions_point_at_the_problem(tmp_path):
    cases = {
        "binary-junk": (2, "not valid UTF-8"),
        "nul-in-valid-utf8": (2, "NUL byte"),
        "10k-nested-parens": (3, "nested more than 64 deep"),
        "100k-unary-minus": (3, "more than 64 `-` or `not` in a row"),
        "200-nested-repeats": (67, "nested more than 64 deep"),
        "long-sum-chain": (3, "nested too deeply"),
    }
    for name, (line, msg) in cases.items():
        path = tmp_path / f"{name}.arch"
        path.write_bytes(HOSTILE[name])
        result = CliRunner().invoke(main, ["check", str(path)])
        _assert_clean_failure(result, msg)
        assert f"{path}:{line}:" in result.output, (name, result.output)


def test_check_missing_file(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path / "nope.arch")])
    _assert_clean_failure(result, "no such file")


def test_check_directory(tmp_path):
    result = CliRunner().invoke(main, ["check", str(tmp_path)])
    _assert_clean_failure(result, "is a directory")


def test_check_subprocess_on_unary_minus_flood(tmp_path):
    """The real entry point, in a fresh interpreter (default recursion limit, real stderr)."""
    path = tmp_path / "minus.arch"
    path.write_bytes(HOSTILE["100k-unary-minus"])
    proc = subprocess.run([sys.executable, "-m", "archc.cli", "check", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stderr.startswith(f"{path}:3:71: error: more than 64 `-` or `not` in a row"), proc.stderr


# -- property: mutated stdlib sources --------------------------------------------------------------

_TOKEN = re.compile(r'"[^"\n]*"|[A-Za-z_][A-Za-z_0-9]*|\d+\.\d*|\d+|\*\*|//|==|!=|<=|>=|\S')
_CHARS = list("(){}[]=,.:+-*/\"'#0129xdTB@%!;\\\t\n ") + ["é", "\x00", "\u200b"]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["del-token", "dup-token", "swap-tokens", "del-line", "dup-line", "swap-lines",
                                   "insert-char", "truncate"]))
        toks = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
        lines = text.split("\n")
        if op == "del-token" and toks:
            a, b = toks[draw(st.integers(0, len(toks) - 1))]
            text = text[:a] + text[b:]
        elif op == "dup-token" and toks:
            a, b = toks[draw(st.integers(0, len(toks) - 1))]
            text = text[:b] + " " + text[a:b] + text[b:]
        elif op == "swap-tokens" and len(toks) > 1:
            i, j = sorted(draw(st.lists(st.integers(0, len(toks) - 1), min_size=2, max_size=2, unique=True)))
            (a, b), (c, d) = toks[i], toks[j]
            text = text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
        elif op == "del-line":
            del lines[draw(st.integers(0, len(lines) - 1))]
            text = "\n".join(lines)
        elif op == "dup-line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
            text = "\n".join(lines)
        elif op == "swap-lines" and len(lines) > 1:
            i, j = draw(st.lists(st.integers(0, len(lines) - 1), min_size=2, max_size=2, unique=True))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == "insert-char":
            i = draw(st.integers(0, len(text)))
            text = text[:i] + draw(st.sampled_from(_CHARS)) + text[i:]
        elif op == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated())
def test_mutated_stdlib_checks_or_gives_a_diagnostic(text):
    start = time.process_time()        # CPU time: a hang guard, not a speed claim (the machine is shared)
    try:
        for g in lower_module(parse(text, "m.arch")):
            verify(g)
    except ArchError as err:
        rendered = err.render()
        assert re.match(r"m\.arch:\d+:\d+: error: ", rendered), rendered
        assert err.span is not None and err.span.line >= 1 and err.span.column >= 1
    assert time.process_time() - start < 60.0, "one mutated source ran for more than a CPU minute (a blow-up)"
