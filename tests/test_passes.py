"""Passes: golden before/after IR per pass, -O1 over every stdlib model, the driver, the CLI flags."""
import types

import pytest
import torch
from click.testing import CliRunner

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import state_key
from archc.cli import main
from archc.errors import ArchError
from archc.ir.core import Graph, Region
from archc.ir.interpret import init_params, resolve_bindings, run
from archc.ir.ops import Op
from archc.ir.parser import parse_ir
from archc.ir.printer import print_graph, print_module
from archc.ir.verify import verify
from archc.passes import PASSES, PRESETS, run_pipeline, summary
from archc.passes.rewrite import Alias, Rule, on, rewrite
from archc.testing import example_inputs

O1 = PRESETS["O1"]


def _parse(text: str) -> Graph:
    (g,) = parse_ir(text)
    verify(g, resolve_bindings(g))
    assert print_graph(g) == text, "test input is not in canonical printed form"
    return g


def _assert_same_outputs(before: Graph, after: Graph, seed: int = 0) -> None:
    params = init_params(before, seed=seed)
    inputs = example_inputs(before, seed=seed)
    ref, got = run(before, params, inputs), run(after, params, inputs)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)


def _check_golden(pass_name: str, before: str, expected: str) -> None:
    g = _parse(before)
    out = PASSES[pass_name](g)
    assert print_graph(g) == before, "a pass must not change its input"
    verify(out, resolve_bindings(out))
    assert print_graph(out) == expected
    assert print_module(parse_ir(expected)) == expected            # the result round-trips
    _assert_same_outputs(g, out)
    assert print_graph(PASSES[pass_name](out)) == expected          # and is a fixpoint


def _count(g: Graph, op: Op) -> int:
    return sum(1 for n in g.walk() if n.op is op)


# -- golden before/after, one per pass -------------------------------------------------------------

DCE_BEFORE = """\
graph Dead(d: int = 4) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %q : f32[B, T, 2, 2]
  %w = param() {ref="w"} : f32[d, d]
  %unused = linear(%x, %w) : f32[B, T, d]
  %unused.1 = relu(%unused) : f32[B, T, d]
  %site = attend(%q, %q, %q) {causal=true, prefix=0, site="s", window=0} : f32[B, T, 2, 2]
  %plain = attend(%q, %q, %q) {causal=true, prefix=0, window=0} : f32[B, T, 2, 2]
  %y, %n = loop(%x, %x) {trips=3, var="i"} : f32[B, T, d], f32[B, T, d] {
    ^(%a : f32[B, T, d], %b : f32[B, T, d]):
    %t = tanh(%a) : f32[B, T, d]
    %e = exp(%b) : f32[B, T, d]
    %s = sigmoid(%e) : f32[B, T, d]
    yield %t, %b
  }
  %z = loop(%y) {trips=2, var="j"} : f32[B, T, d] {
    ^(%c : f32[B, T, d]):
    %u = relu(%c) : f32[B, T, d]
    yield %u
  }
  %k = loop(%q) {trips=2, var="m"} : f32[B, T, 2, 2] {
    ^(%p : f32[B, T, 2, 2]):
    %o = attend(%p, %p, %p) {causal=true, prefix=0, site="inner", window=0} : f32[B, T, 2, 2]
    %neg = neg(%p) : f32[B, T, 2, 2]
    yield %o
  }
  output %y
}
"""

DCE_AFTER = """\
graph Dead(d: int = 4) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %q : f32[B, T, 2, 2]
  %site = attend(%q, %q, %q) {causal=true, prefix=0, site="s", window=0} : f32[B, T, 2, 2]
  %y, %n = loop(%x, %x) {trips=3, var="i"} : f32[B, T, d], f32[B, T, d] {
    ^(%a : f32[B, T, d], %b : f32[B, T, d]):
    %t = tanh(%a) : f32[B, T, d]
    yield %t, %b
  }
  %k = loop(%q) {trips=2, var="m"} : f32[B, T, 2, 2] {
    ^(%p : f32[B, T, 2, 2]):
    %o = attend(%p, %p, %p) {causal=true, prefix=0, site="inner", window=0} : f32[B, T, 2, 2]
    yield %o
  }
  output %y
}
"""


CSE_BEFORE = """\
graph Common(d: int = 4, n: int = 2) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %mask : bool[B, T]
  %w = param() {ref="w"} : f32[d, d]
  %a = linear(%x, %w) : f32[B, T, d]
  %w.1 = param() {ref="w"} : f32[d, d]
  %a.1 = linear(%x, %w.1) : f32[B, T, d]
  %s = add(%a, %a.1) : f32[B, T, d]
  %s.1 = add(%a.1, %a) : f32[B, T, d]
  %m = sub(%s, %s.1) : f32[B, T, d]
  %m.1 = sub(%s.1, %s) : f32[B, T, d]
  %y = loop(%m) {trips=<n>, var="i"} : f32[B, T, d] {
    ^(%h : f32[B, T, d]):
    %w.2 = param() {ref="w"} : f32[d, d]
    %g = linear(%h, %w.2) : f32[B, T, d]
    %a.2 = linear(%x, %w.2) : f32[B, T, d]
    %r = relu(%x) : f32[B, T, d]
    %c = const() {dtype="i64", value=<i>} : i64[]
    %k = add(%g, %a.2) : f32[B, T, d]
    %y.1 = loop(%k) {trips=2, var="i"} : f32[B, T, d] {
      ^(%h.1 : f32[B, T, d]):
      %c.1 = const() {dtype="i64", value=<i>} : i64[]
      %r.1 = relu(%x) : f32[B, T, d]
      %l = add(%h.1, %r.1) : f32[B, T, d]
      yield %l
    }
    yield %y.1
  }
  %r.2 = relu(%x) : f32[B, T, d]
  %f = full() {dtype="f32", shape=[<B>, <T>], value=1.0} : f32[B, T]
  %z = route_mask(%y, %mask) {dims=["B", "T"]} : f32[B, T, d] {
    ^(%xs : f32[B, T, d], %pos : i64[B, T]):
    %f.1 = full() {dtype="f32", shape=[<B>, <T>], value=1.0} : f32[B, T]
    %w.3 = param() {ref="w"} : f32[d, d]
    %o = linear(%xs, %w.3) : f32[B, T, d]
    yield %o
  }
  %out = relu(%x) : f32[B, T, d]
  %t = add(%z, %m.1) : f32[B, T, d]
  %t.1 = add(%t, %r.2) : f32[B, T, d]
  output %t.1, %out
}
"""

CSE_AFTER = """\
graph Common(d: int = 4, n: int = 2) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %mask : bool[B, T]
  %w = param() {ref="w"} : f32[d, d]
  %a = linear(%x, %w) : f32[B, T, d]
  %s = add(%a, %a) : f32[B, T, d]
  %m = sub(%s, %s) : f32[B, T, d]
  %y = loop(%m) {trips=<n>, var="i"} : f32[B, T, d] {
    ^(%h : f32[B, T, d]):
    %g = linear(%h, %w) : f32[B, T, d]
    %r = relu(%x) : f32[B, T, d]
    %c = const() {dtype="i64", value=<i>} : i64[]
    %k = add(%g, %a) : f32[B, T, d]
    %y.1 = loop(%k) {trips=2, var="i"} : f32[B, T, d] {
      ^(%h.1 : f32[B, T, d]):
      %c.1 = const() {dtype="i64", value=<i>} : i64[]
      %l = add(%h.1, %r) : f32[B, T, d]
      yield %l
    }
    yield %y.1
  }
  %r.2 = relu(%x) : f32[B, T, d]
  %f = full() {dtype="f32", shape=[<B>, <T>], value=1.0} : f32[B, T]
  %z = route_mask(%y, %mask) {dims=["B", "T"]} : f32[B, T, d] {
    ^(%xs : f32[B, T, d], %pos : i64[B, T]):
    %f.1 = full() {dtype="f32", shape=[<B>, <T>], value=1.0} : f32[B, T]
    %o = linear(%xs, %w) : f32[B, T, d]
    yield %o
  }
  %out = relu(%x) : f32[B, T, d]
  %t = add(%z, %m) : f32[B, T, d]
  %t.1 = add(%t, %r.2) : f32[B, T, d]
  output %t.1, %out
}
"""


FOLD_BEFORE = """\
graph Fold(d: int = 4, alpha: float = 0.5) dims(B) {
  input %x : f32[B, d]
  input %n : i64[B]
  %two = const() {dtype="f32", value=2} : f32[]
  %three = const() {dtype="f32", value=3} : f32[]
  %alpha = const() {dtype="f32", value=<alpha>} : f32[]
  %one = const() {dtype="f32", value=1} : f32[]
  %zero = const() {dtype="f32", value=0.0} : f32[]
  %six = mul(%two, %three) : f32[]
  %scale = mul(%six, %alpha) : f32[]
  %dim = const() {dtype="i64", value=<d>} : i64[]
  %dim.1 = add(%dim, %dim) : i64[]
  %dimf = cast(%dim.1) {dtype="f32"} : f32[]
  %root = rsqrt(%dimf) : f32[]
  %third = div(%three, %dimf) : f32[]
  %e = exp(%three) : f32[]
  %big = gt(%dim, %three) : bool[]
  %pos = gt(%dim, %zero) : bool[]
  %half = div(%dim, %dim.1) : i64[]
  %x.1 = mul(%x, %one) : f32[B, d]
  %x.2 = add(%zero, %x.1) : f32[B, d]
  %x.3 = mul(%x.2, %scale) : f32[B, d]
  %x.4 = mul(%x.3, %root) : f32[B, d]
  %nf = mul(%n, %one) : f32[B]
  %out = div(%x.4, %one) : f32[B, d]
  output %out, %nf
}
"""

FOLD_AFTER = """\
graph Fold(d: int = 4, alpha: float = 0.5) dims(B) {
  input %x : f32[B, d]
  input %n : i64[B]
  %two = const() {dtype="f32", value=2} : f32[]
  %three = const() {dtype="f32", value=3} : f32[]
  %alpha = const() {dtype="f32", value=<alpha>} : f32[]
  %one = const() {dtype="f32", value=1} : f32[]
  %zero = const() {dtype="f32", value=0.0} : f32[]
  %six = const() {dtype="f32", value=6} : f32[]
  %scale = const() {dtype="f32", value=<6*alpha>} : f32[]
  %dim = const() {dtype="i64", value=<d>} : i64[]
  %dim.1 = const() {dtype="i64", value=<2*d>} : i64[]
  %dimf = const() {dtype="f32", value=<2*d>} : f32[]
  %root = const() {dtype="f32", value=<sqrt(2)/(2*sqrt(d))>} : f32[]
  %third = const() {dtype="f32", value=<3/(2*d)>} : f32[]
  %e = const() {dtype="f32", value=20.085536923187668} : f32[]
  %big = gt(%dim, %three) : bool[]
  %pos = const() {dtype="bool", value=true} : bool[]
  %half = div(%dim, %dim.1) : i64[]
  %x.3 = mul(%x, %scale) : f32[B, d]
  %x.4 = mul(%x.3, %root) : f32[B, d]
  %nf = mul(%n, %one) : f32[B]
  %out = div(%x.4, %one) : f32[B, d]
  output %out, %nf
}
"""


SIMP_BEFORE = """\
graph Simple(d: int = 4, k: int = 0, n: int = 3) dims(B, T) {
  input %x : f32[B, T, d]
  %x.1 = slice(%x) {axis=1, start=0, stop=<Max(1, floor(T))>} : f32[B, Max(1, floor(T)), d]
  %y = relu(%x.1) : f32[B, Max(1, floor(T)), d]
  %z = reshape(%y) {shape=[<B>, <d*Max(1, floor(T))>]} : f32[B, d*Max(1, floor(T))]
  %s = slice(%x.1) {axis=2, start=<Max(0, k)>, stop=<Max(0, d)>} : f32[B, Max(1, floor(T)), Max(0, d) - Max(0, k)]
  %l = loop(%s) {trips=<Max(1, n)>, var="i"} : f32[B, Max(1, floor(T)), Max(0, d) - Max(0, k)] {
    ^(%h : f32[B, Max(1, floor(T)), Max(0, d) - Max(0, k)]):
    %c = const() {dtype="i64", value=<floor(n) + Max(0, i)>} : i64[]
    %h.1 = add(%h, %c) : f32[B, Max(1, floor(T)), Max(0, d) - Max(0, k)]
    yield %h.1
  }
  output %z, %l
}
"""

SIMP_AFTER = """\
graph Simple(d: int = 4, k: int = 0, n: int = 3) dims(B, T) {
  input %x : f32[B, T, d]
  %x.1 = slice(%x) {axis=1, start=0, stop=<T>} : f32[B, T, d]
  %y = relu(%x.1) : f32[B, T, d]
  %z = reshape(%y) {shape=[<B>, <T*d>]} : f32[B, T*d]
  %s = slice(%x.1) {axis=2, start=<Max(0, k)>, stop=<d>} : f32[B, T, d - Max(0, k)]
  %l = loop(%s) {trips=<n>, var="i"} : f32[B, T, d - Max(0, k)] {
    ^(%h : f32[B, T, d - Max(0, k)]):
    %c = const() {dtype="i64", value=<i + n>} : i64[]
    %h.1 = add(%h, %c) : f32[B, T, d - Max(0, k)]
    yield %h.1
  }
  output %z, %l
}
"""


def test_dce_golden():
    """Unused nodes go, in every region; effects (attention sites), region arguments and yields stay."""
    _check_golden("dce", DCE_BEFORE, DCE_AFTER)


def test_cse_golden():
    """Repeated reads merge into the first visible one; nothing crosses a rebinding or leaves a region."""
    _check_golden("cse", CSE_BEFORE, CSE_AFTER)


def test_const_fold_golden():
    """Exact, symbolic folding; x*1 and 0+x vanish unless that changes a type or an output name."""
    _check_golden("const-fold", FOLD_BEFORE, FOLD_AFTER)


def test_simplify_shapes_golden():
    """Max(1, floor(T)) -> T for dims; int parameters are assumed positive only when their default is."""
    _check_golden("simplify-shapes", SIMP_BEFORE, SIMP_AFTER)


# -- the rewrite driver ---------------------------------------------------------------------------

NEG_BEFORE = """\
graph Negs() dims(B) {
  input %x : f32[B]
  %a = neg(%x) : f32[B]
  %b = neg(%a) : f32[B]
  %y = loop(%b) {trips=2, var="i"} : f32[B] {
    ^(%h : f32[B]):
    %c = neg(%h) : f32[B]
    %e = neg(%c) : f32[B]
    yield %e
  }
  %y.1 = neg(%y) : f32[B]
  %out = neg(%y.1) : f32[B]
  output %out
}
"""

NEG_AFTER = """\
graph Negs() dims(B) {
  input %x : f32[B]
  %a = neg(%x) : f32[B]
  %y = loop(%x) {trips=2, var="i"} : f32[B] {
    ^(%h : f32[B]):
    %c = neg(%h) : f32[B]
    yield %h
  }
  %y.1 = neg(%y) : f32[B]
  %out = neg(%y.1) : f32[B]
  output %out
}
"""


def _neg_neg(n, ctx):
    # neg(neg(x)) -> x
    inner = ctx.producer(n.inputs[0])
    if inner is not None and inner.op is Op.NEG:
        return Alias((inner.inputs[0],))
    return None


NEG_NEG = (Rule("neg-neg", on(Op.NEG), _neg_neg),)


def test_rewrite_driver_renames_reads_and_keeps_output_names():
    """One identity as a rule table: operands and yields are renamed; a graph result is never aliased away."""
    g = _parse(NEG_BEFORE)
    out = rewrite(g, NEG_NEG)
    assert print_graph(out) == NEG_AFTER
    verify(out)
    _assert_same_outputs(g, out)
    assert rewrite(out, NEG_NEG) is out          # nothing left to do: the same graph comes back


# -- registry and pipeline ------------------------------------------------------------------------


def test_registry_names_docstrings_and_presets():
    for name, fn in PASSES.items():
        assert name == name.lower() and " " not in name and "_" not in name
        doc = (fn.__doc__ or "").strip()
        assert doc and "\n" not in doc and summary(name) == doc
    assert PRESETS["O0"] == ()
    assert set(PRESETS["O1"]) == {"simplify-shapes", "const-fold", "cse", "dce"}
    assert all(p in PASSES for level in PRESETS.values() for p in level)


def test_unknown_pass_suggests_a_name():
    g = _parse(DCE_BEFORE)
    with pytest.raises(ArchError) as err:
        run_pipeline(g, ["cse", "dcee"])
    assert "unknown pass `dcee`" in err.value.message and "did you mean `dce`" in err.value.hint
    with pytest.raises(ArchError):
        run_pipeline(g, ["dce"], print_after=["nope"])


def test_pipeline_hooks_print_time_and_verify():
    import io
    g = _parse(CSE_BEFORE)
    out = io.StringIO()
    h = run_pipeline(g, O1, verify=True, print_after=["cse"], time_passes=True, out=out)
    text = out.getvalue()
    assert text.count("// ----- IR after") == 1 and "// ----- IR after cse (Common) ----- //" in text
    assert "pass timing (Common)" in text and all(f"\n{p} " in text for p in O1)
    dump = text.split("// ----- IR after cse (Common) ----- //\n", 1)[1].split("// ----- pass timing", 1)[0]
    assert dump == print_graph(PASSES["cse"](PASSES["const-fold"](PASSES["simplify-shapes"](g))))
    out = io.StringIO()
    assert print_graph(run_pipeline(g, O1, print_after_all=True, out=out)) == print_graph(h)
    assert out.getvalue().count("// ----- IR after") == len(O1)
    assert run_pipeline(g, PRESETS["O0"]) is g


def test_verify_hook_names_the_pass_that_broke_the_ir(monkeypatch):
    def drop_everything(g):
        """Drop every node (a broken pass, for this test)."""
        return g.replace(body=Region(g.body.args, (), g.body.results))
    monkeypatch.setitem(PASSES, "drop-everything", drop_everything)
    with pytest.raises(ArchError) as err:
        run_pipeline(_parse(DCE_BEFORE), ["dce", "drop-everything"], verify=True)
    assert "after pass `drop-everything`" in err.value.message


# -- every stdlib model under -O1 -----------------------------------------------------------------

_CASES = [(n, g) for n in stdlib.names() for g in stdlib.graphs(n)]
_O1: dict[str, Graph] = {}


def _o1(g: Graph) -> Graph:
    if g.name not in _O1:
        _O1[g.name] = run_pipeline(g, O1, verify=True)       # the verifier runs after every pass
    return _O1[g.name]


@pytest.mark.parametrize("name,g", _CASES, ids=lambda x: x if isinstance(x, str) else x.name)
def test_o1_keeps_semantics_and_output_names(name, g):
    before = print_graph(g)
    h = _o1(g)
    assert print_graph(g) == before
    assert h.output_names == g.output_names and h.body.results == g.body.results
    assert [a.name for a in h.inputs] == [a.name for a in g.inputs] and h.params == g.params
    _assert_same_outputs(g, h)
    assert sum(1 for _ in h.walk()) <= sum(1 for _ in g.walk())


@pytest.mark.parametrize("name,g", _CASES, ids=lambda x: x if isinstance(x, str) else x.name)
def test_o1_is_idempotent_and_round_trips(name, g):
    h = _o1(g)
    text = print_graph(h)
    assert print_graph(run_pipeline(h, O1)) == text
    assert print_module(parse_ir(text)) == text


def _mor_with_duplicated_router() -> Graph:
    src = stdlib.source("mor")
    old = "weight alpha * sigmoid(s) as active"
    assert old in src
    src = src.replace(old, "weight alpha * sigmoid(router(x)[:, :, 0]) as active", 1)
    return next(g for g in api.check(src) if g.name == "MoR")


def test_cse_merges_repeated_param_reads_in_mor():
    """Writing the router twice (once for the score, once for the gate) costs nothing after CSE."""
    g = _mor_with_duplicated_router()
    h = PASSES["cse"](g)
    verify(h, resolve_bindings(h))
    assert _count(h, Op.PARAM) == _count(g, Op.PARAM) - 1
    assert _count(h, Op.LINEAR) == _count(g, Op.LINEAR) - 1
    assert _count(h, Op.SIGMOID) == _count(g, Op.SIGMOID)
    _assert_same_outputs(g, h)
    stock = next(g for g in stdlib.graphs("mor") if g.name == "MoR")
    assert print_graph(run_pipeline(g, O1)) == print_graph(run_pipeline(stock, O1))     # exactly stock MoR again


def test_cse_merges_re_read_weights_in_hmt_and_titans():
    # the architectures that read the same weights twice (TitansLMM/MAG/MAL read each once)
    graphs = [g for name in ("hmt", "titans") for g in stdlib.graphs(name) if g.name in ("HMT", "TitansMAC")]
    assert len(graphs) == 2
    for g in graphs:
        assert _count(_o1(g), Op.PARAM) < _count(g, Op.PARAM), g.name


@pytest.mark.parametrize("name", stdlib.names())
def test_o1_generated_module_matches_interpreter(name):
    compiled = api.compile(stdlib.path(name), optimize=lambda g: run_pipeline(g, O1))
    mod = types.ModuleType(f"archc_o1_{name}")
    exec(compile(compiled.source, f"<archc-o1:{name}>", "exec"), mod.__dict__)
    for g in stdlib.graphs(name):
        m = getattr(mod, g.name)().eval()      # as the interpreter runs by default
        params = init_params(g, seed=3)
        m.load_state_dict({state_key(k): v for k, v in params.items()}, strict=True)
        inputs = example_inputs(g, seed=1)
        ref = run(g, params, inputs)
        out = m(**inputs)
        out = out if isinstance(out, dict) else {g.output_names[0]: out}
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-4)


# -- command line ---------------------------------------------------------------------------------


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_ir_levels_and_pass_lists():
    path, arch = stdlib.path("titans"), ("--arch", "TitansMAC")      # titans.arch defines four architectures
    g = next(g for g in stdlib.graphs("titans") if g.name == "TitansMAC")
    o0 = cli("ir", path, *arch)
    assert o0.exit_code == 0 and o0.output == print_module([g])
    o1 = cli("ir", path, *arch, "-O1")
    assert o1.exit_code == 0 and o1.output == print_module([run_pipeline(g, O1)])
    assert cli("ir", path, *arch, "-O2").output == print_module([run_pipeline(g, PRESETS["O2"])])
    listed = cli("ir", path, *arch, "--passes", "cse,dce")
    assert listed.output == print_module([run_pipeline(g, ["cse", "dce"])])
    off = cli("ir", path, *arch, "-O1", "--disable-pass", "cse")
    assert off.output == print_module([run_pipeline(g, ["simplify-shapes", "const-fold", "dce"])])
    assert off.output != o1.output


def test_cli_unknown_pass_is_a_diagnostic():
    r = cli("ir", stdlib.path("titans"), "--passes", "cse,dcee")
    assert r.exit_code == 1 and "unknown pass `dcee`" in r.output and "did you mean `dce`" in r.output
    r = cli("ir", stdlib.path("titans"), "--disable-pass", "cs")
    assert r.exit_code == 1 and "did you mean `cse`" in r.output


def test_cli_ir_prints_after_passes_on_stdout():
    path = stdlib.path("titans")                    # four architectures: each prints its own
    r = cli("ir", path, "-O1", "--print-after", "cse", "--time-passes", "--verify")
    assert r.exit_code == 0, r.output
    assert r.stdout.count("// ----- IR after cse (TitansMAC) ----- //") == 1
    assert "pass timing (TitansMAC)" in r.stdout and r.stderr == ""
    r = cli("ir", path, "--arch", "TitansMAC", "-O1", "--print-after-all")
    assert r.stdout.count("// ----- IR after") == len(O1)


def test_cli_compile_defaults_to_o1_and_reports_on_stderr():
    path = stdlib.path("memory_caching")           # -O1 drops a dead `full` here, so the code differs
    r = cli("compile", path, "--print-after-all", "--time-passes", "--verify")
    assert r.exit_code == 0, r.output
    assert r.stdout == api.compile(path, optimize=lambda g: run_pipeline(g, O1)).source
    assert "IR after" not in r.stdout and r.stderr.count("// ----- IR after") == 2 * len(O1)   # two archs
    assert "pass timing" in r.stderr
    r0 = cli("compile", path, "-O0")
    assert r0.exit_code == 0 and r0.stdout == api.compile(path).source and r0.stdout != r.stdout


def test_cli_lists_passes():
    r = cli("passes")
    assert r.exit_code == 0
    for name in PASSES:
        assert f"{name} " in r.output and summary(name) in r.output
    assert "-O1: simplify-shapes, const-fold, cse, dce" in r.output
