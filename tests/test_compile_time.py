"""Compile-time fast paths (ir/shapes.py) give exactly what the slow sympy calls gave, and the
process-wide memos never leak one compile into another (generated code is byte-identical whether
the caches are cold or warm). The timings themselves are a benchmark: bench/compile_time.py.
"""
import inspect
import json
import subprocess
import sys

import pytest
import sympy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archc.ir.shapes import as_expr, dims_equal, replaced, substitute, sym

NAMES = ("a", "b", "d", "n_r")
SLOW = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- random compile-time expressions: the shapes archc builds, and some it never does -------------------

_leaf = st.one_of(st.sampled_from([sym(n) for n in NAMES]),
                  st.integers(-3, 4).map(sympy.Integer),
                  st.sampled_from([sympy.Float(0.5), sympy.Float(2.0), sympy.Rational(1, 3)]))


def _mod(p):
    """Mod(a, b), or a where sympy rejects b as zero (found on a fresh CI clone: generation itself raised)."""
    try:
        return sympy.Mod(p[0], p[1])
    except ZeroDivisionError:
        return p[0]


def _extend(inner):
    two = st.tuples(inner, inner)
    return st.one_of(
        two.map(lambda p: p[0] + p[1]), two.map(lambda p: p[0] - p[1]), two.map(lambda p: p[0] * p[1]),
        two.map(lambda p: p[0] / p[1]), two.map(lambda p: sympy.floor(p[0] / p[1])),
        two.map(lambda p: sympy.Max(p[0], p[1])), two.map(lambda p: sympy.Min(p[0], p[1])),
        two.map(_mod), inner.map(sympy.ceiling), inner.map(sympy.sqrt),
        inner.map(lambda x: x ** 2), inner.map(lambda x: 1 / x),
        st.tuples(inner, inner, inner).map(lambda t: sympy.Piecewise((t[0], t[1] > t[2]), (t[1], True))),
    )


exprs = st.recursive(_leaf, _extend, max_leaves=6)
values = st.one_of(st.integers(-2, 70), st.sampled_from([0, 1, 0.5, 2.0, True]))
bindings = st.dictionaries(st.sampled_from(NAMES), values, min_size=1, max_size=4)


def _outcome(f):
    """srepr of the result (exact structure: 2 and 2.0 differ), or the exception type."""
    try:
        return sympy.srepr(f())
    except Exception as err:        # sympy raises TypeError on e.g. a comparison with zoo
        return type(err).__name__


@pytest.mark.filterwarnings("ignore::sympy.utilities.exceptions.SymPyDeprecationWarning")   # True in a sum
@SLOW
@given(exprs, bindings, st.booleans())
def test_substitute_is_subs(e, values, by_name):
    mapping = values if by_name else {sym(k): v for k, v in values.items()}
    assert _outcome(lambda: substitute(e, mapping)) == _outcome(lambda: e.subs(mapping))


def test_substitute_keeps_subs_order_where_it_matters():
    a, b = sym("a"), sym("b")
    e = (a - 64) / (b - 4)                  # subs puts a = 64 first: 0 / (b - 4) = 0, never 0 * zoo = nan
    assert substitute(e, {a: 64, b: 4}) == e.subs({a: 64, b: 4}) == 0
    w = sympy.Piecewise((1 / (b - 4), b > 4), (0, True))
    assert substitute(w, {"b": 4}) == w.subs({"b": 4}) == 0
    assume = sympy.Symbol("b", integer=True)           # a name key matches only the plain symbol
    assert substitute(assume + 1, {"b": 3}) == assume + 1


@SLOW
@given(exprs, bindings)
def test_replaced_is_xreplace(e, values):
    mapping = {sym(k): sympy.sympify(v) for k, v in values.items()}
    assert _outcome(lambda: replaced(e, mapping)) == _outcome(lambda: e.xreplace(mapping))


def _dims_equal_reference(a, b, bindings=None):
    """dims_equal as it was written before the fast paths: simplify and subs on every call."""
    a, b = as_expr(a), as_expr(b)
    if a == b:
        return True
    diff = sympy.simplify(a - b)
    if diff == 0:
        return True
    if diff.is_number:
        return False
    if bindings:
        da, db = a.subs(bindings), b.subs(bindings)
        if da.is_number and db.is_number:
            return bool(sympy.simplify(da - db) == 0)
    return None


@pytest.mark.filterwarnings("ignore::sympy.utilities.exceptions.SymPyDeprecationWarning")
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(exprs, exprs, st.one_of(st.none(), bindings))
def test_dims_equal_is_the_simplify_answer(a, b, values):
    mapping = None if values is None else {sym(k): v for k, v in values.items()}
    assert _outcome(lambda: repr(dims_equal(a, b, mapping))) == _outcome(lambda: repr(_dims_equal_reference(a, b, mapping)))


@pytest.mark.parametrize("a, b", [
    ("(d + 1)**2", "d**2 + 2*d + 1"),          # a polynomial that is identically equal
    ("(d + 1)**2 - d**2", "2*d + 1"),
    ("64", "d"), ("d / heads", "d * heads"), ("2 * d", "d + d"), ("d", "d + 1"),
    ("floor(T / 2) * 2", "T"), ("Max(1, T)", "T"),
])
def test_dims_equal_known_cases(a, b):
    x, y = sympy.sympify(a), sympy.sympify(b)
    for at in (None, {sym("d"): 64, sym("heads"): 4, sym("T"): 8}):
        assert dims_equal(x, y, at) == _dims_equal_reference(x, y, at)


# -- the memos do not leak between compiles ----------------------------------------------------------------

MODELS = ("depth_recurrent", "hrm", "mor", "titans", "think", "cola")


def _digests(models) -> dict[str, str]:
    import hashlib

    import archc.api as api
    import archc.stdlib as stdlib
    from archc.passes import PRESETS, run_pipeline
    out = {}
    for name in models:
        for level in ("O1", "O2"):
            src = api.compile(stdlib.path(name), optimize=lambda g, lv=level: run_pipeline(g, PRESETS[lv])).source
            out[name + ":" + level] = hashlib.sha256(src.encode()).hexdigest()
    return out


def test_generated_code_is_the_same_with_cold_and_warm_caches(tmp_path):
    """A fresh process compiling the models in reverse order (cold memos) writes the same bytes as
    this process compiling them in order, then again (every memo warm, filled by other models)."""
    script = tmp_path / "digests.py"
    script.write_text("import json\n\n" + inspect.getsource(_digests)
                      + f"\nprint(json.dumps(_digests({list(MODELS[::-1])!r})))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       check=False)
    assert r.returncode == 0, r.stderr
    cold = json.loads(r.stdout.strip().splitlines()[-1])
    first = _digests(MODELS)
    again = _digests(MODELS)
    assert len(cold) == 2 * len(MODELS)
    assert first == cold
    assert again == cold


def test_compile_time_bench_measures_and_renders():
    """bench/compile_time.py's worker and table (the timings themselves are not asserted on)."""
    from bench.compile_time import markdown, measure
    rows = measure(["think"], reps=1)
    assert set(rows) == {"think"} and rows["think"]["first_ms"] > 0 and rows["think"]["warm_ms"] > 0
    sides = ("after", "before")
    data = {"models": ["think"], "rounds": 1, "reps": 1, "cold_models": ["think"], "load_start": (1.0, 1.0, 1.0),
            "load_end": (1.0, 1.0, 1.0), "sides": {s: s for s in sides},
            "first": {s: {"think": [20.0]} for s in sides}, "warm": {"after": {"think": [5.0]}, "before": {"think": [10.0]}},
            "cold": {s: {"think": [300.0]} for s in sides}}
    md = markdown(data)
    assert "| think | 300 | 300 | 20 | 20 | 10.0 | 5.0 | 0.50 | yes |" in md
    assert "| **all 1** | 20 | 20 | 1.00 | 10 | 5 | 0.50 |" in md
