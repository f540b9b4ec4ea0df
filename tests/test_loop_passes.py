"""Loop passes (SPEC.md §18): golden .arch -> IR cases, -O2 over every stdlib model (interpreter,
gradients, decode), the unroll/fold cost rule, hoisting's limits, recur-blocks. (The generated
module at -O2 is checked against the interpreter for every stdlib model in test_triton_fusion.py.)"""
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import sympy
import torch
from click.testing import CliRunner

import archc
import archc.api as api
import archc.stdlib as stdlib
from archc.cli import main
from archc.errors import ArchError
from archc.ir.core import Graph
from archc.ir.cost import cost
from archc.ir.interpret import init_params, resolve_bindings, run
from archc.ir.ops import Op
from archc.ir.parser import parse_ir
from archc.ir.printer import print_graph, print_module
from archc.ir.verify import verify
from archc.passes import PASSES, PRESETS, get_pass, run_pipeline, split_entries
from archc.passes.recur_blocks import recur_blocks
from archc.passes.unroll_loops import unroll_pays
from archc.testing import example_inputs

O2 = PRESETS["O2"]
LOOP_O2 = tuple(p for p in O2 if p != "fuse-elementwise")     # -O2 up to the loop passes' clean-ups
ATOL, RTOL = 1e-5, 1e-4          # fp32: the passes move work, they do not reorder arithmetic
GOLDEN = Path(__file__).parent / "golden" / "loops"
CASES = sorted(GOLDEN.glob("*.arch"))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _same_outputs(before: Graph, after: Graph, seed: int = 0) -> None:
    params = init_params(before, seed=seed)
    inputs = example_inputs(before, seed=seed)
    ref, got = run(before, params, inputs), run(after, params, inputs)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL)


def _count(g: Graph, op: Op) -> int:
    return sum(1 for n in g.walk() if n.op is op)


# -- golden cases: tests/golden/loops/<case>.arch, first line `# RUN: archc ir ARGS`, expected <case>.ir --------


def _run_args(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# RUN: archc ir"), f"{path.name} must start with a RUN line"
    return shlex.split(first[len("# RUN: archc ir"):])


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_golden(path, update_golden):
    args = _run_args(path)
    r = cli("ir", path, *args)
    assert r.exit_code == 0, r.output
    expected = path.with_suffix(".ir")
    if update_golden or not expected.exists():
        expected.write_text(r.output)
    assert r.output == expected.read_text(), f"IR of {path.name} changed; run pytest --update-golden if intended"
    after = parse_ir(r.output)
    assert print_module(after) == r.output                                   # the result round-trips
    before = api.check(path)
    for g, h in zip(before, after):
        verify(h, resolve_bindings(h))
        if "--recur-blocks" not in args:                                       # the other passes keep semantics
            _same_outputs(g, h)
            _same_outputs(g, h, seed=7)
            assert print_graph(run_pipeline(h, LOOP_O2)) == print_graph(run_pipeline(g, LOOP_O2))


def test_generated_modules_pass_ruff(tmp_path):
    """Folded, unrolled and hoisted modules (and small ones with no runtime functions) are ruff-clean."""
    pytest.importorskip("ruff")
    for path in CASES:
        recur = 2 if "recur" in path.stem else None
        (tmp_path / f"{path.stem}.py").write_text(
            api.compile(path, optimize=lambda g: run_pipeline(g, O2), recur_blocks=recur).source)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_fold_three_is_one_loop_of_three_trips():
    (g,) = api.check(GOLDEN / "fold_three.arch")
    h = run_pipeline(g, LOOP_O2)
    loops = [n for n in h.body.nodes if n.op is Op.LOOP]
    assert len(loops) == 1 and loops[0].attr("trips") == 3
    assert _count(h, Op.LINEAR) == _count(g, Op.LINEAR) // 3
    assert _count(h, Op.PARAM) == 3 and all(n.op is not Op.PARAM for n in loops[0].regions[0].nodes)
    flops = {lvl: cost(x).evaluate({"B": 2, "T": 8})["flops"] for lvl, x in (("O0", g), ("O2", h))}
    assert flops["O0"] == flops["O2"]                 # folding moves no arithmetic: the same FLOPs


def test_fold_rejects_a_chain_of_distinct_layers_without_planning_each_candidate(monkeypatch):
    """A stack of n different layers has the same op signature everywhere; each candidate run's
    second copy reads other weights, so it is rejected after one node instead of a full `_plan`
    (which made a 400-layer chain from the fuzzer take minutes: O(n^3) node matches)."""
    import importlib
    fold = importlib.import_module("archc.passes.fold_loops")     # the package exports the pass function by this name
    calls = []
    plan = fold._plan
    monkeypatch.setattr(fold, "_plan", lambda *a: calls.append(a[3:5]) or plan(*a))
    layers = "".join(f"  layer l{i} = Linear(d, d)\n  x = l{i}(x)\n" for i in range(40))
    (g,) = api.check("arch Chain(d: int = 4) {\n  input x: f32[B, T, d]\n" + layers + "  output y = x\n}\n")
    assert get_pass("fold-loops")(g) == g and calls == []
    (g,) = api.check(GOLDEN / "fold_three.arch")
    assert any(n.op is Op.LOOP for n in get_pass("fold-loops")(g).body.nodes) and calls   # still folds


# -- -O2 over every stdlib model ---------------------------------------------------------------------------

_CASES = [(n, g) for n in stdlib.names() for g in stdlib.graphs(n)]
_O2: dict[str, Graph] = {}


def _o2(g: Graph) -> Graph:
    """-O2 without elementwise fusion (test_triton_fusion.py runs the whole of -O2 on every model)."""
    if g.name not in _O2:
        _O2[g.name] = run_pipeline(g, LOOP_O2, verify=True)
    return _O2[g.name]


@pytest.mark.parametrize("name,g", _CASES, ids=lambda x: x if isinstance(x, str) else x.name)
def test_o2_keeps_semantics_and_is_a_fixpoint(name, g):
    h = _o2(g)
    assert h.output_names == g.output_names and h.params == g.params
    assert [a.name for a in h.inputs] == [a.name for a in g.inputs]
    _same_outputs(g, h, seed=1)
    text = print_graph(h)
    assert print_graph(run_pipeline(h, LOOP_O2)) == text
    assert print_module(parse_ir(text)) == text
    fused = run_pipeline(h, ["fuse-elementwise"])          # the loop passes leave fused regions alone
    assert print_graph(run_pipeline(fused, LOOP_O2)) == print_graph(fused)


def test_o2_keeps_gradients():
    """Hoisting out of HRM's `grad last` loops: the gradient reaches the same parameters, equally."""
    for g in stdlib.graphs("hrm"):
        h = _o2(g)
        inputs = example_inputs(g, seed=2)
        grads = []
        for graph in (g, h):
            params = {k: v.requires_grad_(True) for k, v in init_params(g, seed=4).items()}
            out = run(graph, params, inputs)
            sum(v.float().pow(2).mean() for v in out.values() if v.is_floating_point()).backward()
            grads.append({k: p.grad for k, p in params.items()})
        for k, ref in grads[0].items():
            if ref is None:
                assert grads[1][k] is None, k
            else:
                torch.testing.assert_close(grads[1][k], ref, atol=1e-5, rtol=1e-4, msg=lambda s: f"{k}: {s}")


def test_hoisting_takes_hrm_input_injection_out_of_the_l_loop():
    (g,) = stdlib.graphs("hrm")
    h = _o2(g)
    inner = [n for n in h.walk() if n.op is Op.LOOP and n.attr("var") == "j"][0]
    assert not any(n.op is Op.PARAM for n in inner.regions[0].nodes)
    assert [n.op for n in inner.regions[0].nodes].count(Op.ADD) == [
        n.op for n in next(n for n in g.walk() if n.attr("var") == "j").regions[0].nodes].count(Op.ADD) - 1
    at = {"B": 1, "T": 81}
    before, after = cost(run_pipeline(g, PRESETS["O1"])).evaluate(at), cost(h).evaluate(at)
    # one [B, T, d] add per L step is now one per H step: segments * h_cycles * (l_cycles - 1) fewer
    assert before["flops"] - after["flops"] == 4 * 2 * (2 - 1) * 81 * 64


# -- folding a shared attention block: forward and K/V-cached decoding agree at -O0 and -O2 -------------------

SHARED_ATTENTION = """
block Blk(d: int, heads: int) {
  input x: f32[B, T, d]
  layer norm = RMSNorm(d)
  layer attn = Attention(d, heads, causal = true)
  layer mlp = MLP(d, 2 * d)
  h = x + attn(norm(x))
  return h + mlp(h)
}

arch SharedLM(vocab: int = 16, d: int = 8, heads: int = 2) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer blk = Blk(d, heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  x = blk(x)
  x = blk(x)
  x = blk(x)
  output logits = head(x)
}
"""


@pytest.mark.parametrize("level", ["O0", "O2"])
def test_shared_block_decodes_exactly(level):
    """Three applications of one attention site are three cache entries (folded or not)."""
    compiled = api.compile(SHARED_ATTENTION, optimize=lambda g: run_pipeline(g, PRESETS[level]))
    (g,) = compiled.graphs
    assert _count(g, Op.LOOP) == (1 if level == "O2" else 0)
    mod = types.ModuleType("shared_lm")
    exec(compile(compiled.source, "<shared_lm>", "exec"), mod.__dict__)
    torch.manual_seed(0)
    m = mod.SharedLM().eval()
    tokens = torch.randint(0, 16, (2, 7))
    with torch.no_grad():
        full = m(tokens)
        out, cache = m.prefill(tokens[:, :5])
        steps = [out]
        for t in (5, 6):
            step, cache = m.decode(tokens[:, t:t + 1], cache)
            steps.append(step)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=RTOL)


# -- the cost rule shared by unroll-small-loops and fold-loops ----------------------------------------------

TINY_LOOPS = """\
graph Tiny(d: int = 4, n: int = 2) dims(B) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, d]
  %w = param() {ref="w"} : f32[d, d]
  %a = loop(%x) {trips=2, var="i"} : f32[B, d] {
    ^(%h : f32[B, d]):
    %c = const() {dtype="f32", value=<i>} : f32[]
    %h.1 = add(%h, %c) : f32[B, d]
    %h.2 = tanh(%h.1) : f32[B, d]
    yield %h.2
  }
  %b = loop(%a) {trips=2, var="j"} : f32[B, d] {
    ^(%k : f32[B, d]):
    %k.1 = linear(%k, %w) : f32[B, d]
    yield %k.1
  }
  %e = loop(%b) {grad_last=1, trips=2, var="m"} : f32[B, d] {
    ^(%p : f32[B, d]):
    %p.1 = tanh(%p) : f32[B, d]
    yield %p.1
  }
  %f = loop(%e) {trips=<n>, var="q"} : f32[B, d] {
    ^(%s : f32[B, d]):
    %s.1 = tanh(%s) : f32[B, d]
    yield %s.1
  }
  %y, %z = loop(%f, %x) {trips=1, var="r"} : f32[B, d], f32[B, d] {
    ^(%u : f32[B, d], %v : f32[B, d]):
    %u.1 = linear(%u, %w) : f32[B, d]
    yield %u.1, %v
  }
  output %y
}
"""

TINY_UNROLLED = """\
graph Tiny(d: int = 4, n: int = 2) dims(B) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, d]
  %w = param() {ref="w"} : f32[d, d]
  %c = const() {dtype="f32", value=0} : f32[]
  %h.1 = add(%x, %c) : f32[B, d]
  %h.2 = tanh(%h.1) : f32[B, d]
  %c.1 = const() {dtype="f32", value=1} : f32[]
  %h.3 = add(%h.2, %c.1) : f32[B, d]
  %a = tanh(%h.3) : f32[B, d]
  %b = loop(%a) {trips=2, var="j"} : f32[B, d] {
    ^(%k : f32[B, d]):
    %k.1 = linear(%k, %w) : f32[B, d]
    yield %k.1
  }
  %e = loop(%b) {grad_last=1, trips=2, var="m"} : f32[B, d] {
    ^(%p : f32[B, d]):
    %p.1 = tanh(%p) : f32[B, d]
    yield %p.1
  }
  %f = loop(%e) {trips=<n>, var="q"} : f32[B, d] {
    ^(%s : f32[B, d]):
    %s.1 = tanh(%s) : f32[B, d]
    yield %s.1
  }
  %y = linear(%f, %w) : f32[B, d]
  %z = cast(%x) {dtype="f32"} : f32[B, d]
  output %y
}
"""


def test_unroll_golden_and_its_limits():
    """Elementwise 2-trip body: unrolled, i folded in; matmul body, `grad last` < trips, symbolic trips: kept;
    1 trip: always unrolled (a passed-through carry becomes a same-dtype cast)."""
    (g,) = parse_ir(TINY_LOOPS)
    verify(g, resolve_bindings(g))
    h = PASSES["unroll-small-loops"](g)
    verify(h, resolve_bindings(h))
    assert print_graph(h) == TINY_UNROLLED
    _same_outputs(g, h)
    assert PASSES["unroll-small-loops"](h) is h


def test_unroll_pays_is_the_documented_rule():
    (g,) = parse_ir(TINY_LOOPS)
    from archc.ir.core import value_types
    loops = {n.attr("var"): n for n in g.walk() if n.op is Op.LOOP}
    types_ = value_types(g)
    assert unroll_pays(loops["i"].regions[0], 2, types_)            # 3 FLOPs per carried element
    assert not unroll_pays(loops["j"].regions[0], 2, types_)        # 2*d per element: symbolic, a matmul
    assert unroll_pays(loops["j"].regions[0], 1, types_)            # one trip: always
    assert not unroll_pays(loops["i"].regions[0], 40, types_)       # 40 * 3 nodes > 64


def test_fold_and_unroll_never_undo_each_other():
    (g,) = api.check(GOLDEN / "unroll_small.arch")
    h = run_pipeline(g, LOOP_O2)
    assert print_graph(PASSES["fold-loops"](h)) == print_graph(h)
    assert print_graph(PASSES["unroll-small-loops"](h)) == print_graph(h)


# -- what hoisting leaves alone --------------------------------------------------------------------------------

STAY = """\
graph Stay(d: int = 4, k: int = 0) dims(B, T) {
  param @w : f32[d, d] init=normal(std=1.0)
  input %x : f32[B, T, 2, 2]
  input %y : f32[B, T, d]
  %a = loop(%x) {trips=2, var="i"} : f32[B, T, 2, 2] {
    ^(%h : f32[B, T, 2, 2]):
    %s = attend(%x, %x, %x) {causal=true, prefix=0, site="s", window=0} : f32[B, T, 2, 2]
    %c = const() {dtype="f32", value=<i>} : f32[]
    %t = add(%h, %c) : f32[B, T, 2, 2]
    %u = add(%t, %s) : f32[B, T, 2, 2]
    yield %u
  }
  %b = loop(%y) {trips=<k>, var="j"} : f32[B, T, d] {
    ^(%g : f32[B, T, d]):
    %w = param() {ref="w"} : f32[d, d]
    %l = linear(%g, %w) : f32[B, T, d]
    yield %l
  }
  output %a, %b
}
"""


def test_hoisting_leaves_effects_the_loop_variable_and_maybe_empty_loops_alone():
    (g,) = parse_ir(STAY)
    assert PASSES["hoist-invariants"](g) is g


# -- recur-blocks --------------------------------------------------------------------------------------------


AT = {"B": 1, "T": 16}


def _block_params(g: Graph, prefix: str) -> float:
    b = resolve_bindings(g)
    total = 0
    for p in g.params:
        if p.name.startswith(prefix):
            total += int(sympy.prod(p.type.shape).subs({sympy.Symbol(k): v for k, v in b.items() if v is not None}))
    return total


@pytest.mark.parametrize("k", [1, 2])
def test_recur_blocks_keeps_k_over_l_of_the_stack(k):
    (g,) = stdlib.graphs("think")                               # layers[n_layers = 4]
    h = recur_blocks(g, k=k)
    verify(h, resolve_bindings(h))
    assert _block_params(h, "layers.") * 4 == _block_params(g, "layers.") * k
    others = cost(g).evaluate(AT)["params"] - _block_params(g, "layers.")
    assert cost(h).evaluate(AT)["params"] == others + _block_params(g, "layers.") * k / 4
    indexes = {n.attr("index") for n in h.walk() if n.op is Op.PARAM and n.attr("ref").startswith("layers.")}
    assert indexes == ({None} if k == 1 else {sympy.floor(sympy.Symbol("l") * k / sympy.Symbol("n_layers"))})
    assert recur_blocks(g, k=4) is g                             # k = L: the identity
    cyc = recur_blocks(g, k=2, order="cycle")
    assert {n.attr("index") for n in cyc.walk() if n.op is Op.PARAM and n.attr("index") is not None} == {
        sympy.Mod(sympy.Symbol("l"), 2)}


def test_recur_blocks_straight_line_layers_share_the_first_of_each_block():
    (g,) = api.check(GOLDEN / "recur_straight.arch")
    for order, kept in (("sequence", {"l0", "l2"}), ("cycle", {"l0", "l1"})):
        h = recur_blocks(g, k=2, order=order)
        verify(h, resolve_bindings(h))
        assert {p.name.split(".")[0] for p in h.params} == kept
        refs = [n.attr("ref").split(".")[0] for n in h.walk() if n.op is Op.PARAM and n.attr("ref").endswith("fc1.weight")]
        assert refs == (["l0", "l0", "l2", "l2"] if order == "sequence" else ["l0", "l1", "l0", "l1"])
    assert recur_blocks(g, k=4) is g
    (hrm,) = stdlib.graphs("hrm")                                  # Reasoner = layer1(layer0(z + injection))
    one = recur_blocks(hrm, k=1)
    assert not any(p.name.startswith(("low.layer1.", "high.layer1.")) for p in one.params)
    assert len(one.params) == len(hrm.params) - 18
    run(one, init_params(one, seed=0), example_inputs(one, seed=0))


def test_recur_blocks_compiles_and_trains():
    compiled = archc.compile(stdlib.path("think"), recur_blocks=2)
    mod = types.ModuleType("think_recur")
    exec(compile(compiled.source, "<think_recur>", "exec"), mod.__dict__)
    torch.manual_seed(0)
    m = mod.ThinK(vocab=32, d=32, heads=2)
    assert m.state_dict()["layers.attn.q.weight"].shape == (2, 32, 32)
    tokens = torch.randint(0, 32, (4, 12))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = m(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_recur_blocks_diagnostics():
    (g,) = stdlib.graphs("think")
    with pytest.raises(ArchError) as err:
        recur_blocks(g, k=3)
    assert "L = 4 layers, which 3 blocks cannot share evenly" in err.value.message
    assert err.value.span is not None and "k must divide 4: 1, 2, 4" in err.value.hint
    with pytest.raises(ArchError) as err:
        recur_blocks(stdlib.graphs("depth_recurrent")[0], k=2)
    assert "has no stack of distinct layers" in err.value.message and err.value.hint
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ArchError):
            recur_blocks(g, k=bad)
    with pytest.raises(ArchError):
        recur_blocks(g, k=2, order="zigzag")
    with pytest.raises(ArchError) as err:
        recur_blocks(g)
    assert "needs a block count" in err.value.message


def test_recur_blocks_command_line():
    path = stdlib.path("think")
    r = cli("compile", path, "--recur-blocks", "2")
    assert r.exit_code == 0, r.output
    assert r.stdout == api.compile(path, recur_blocks=2, optimize=lambda g: run_pipeline(g, PRESETS["O1"])).source
    ir = cli("ir", path, "--recur-blocks", "2", "--recur-order", "cycle")
    assert ir.exit_code == 0 and "index=<Mod(l, 2)>" in ir.output and "copies=2" in ir.output
    same = cli("ir", path, "--passes", "recur-blocks{k=2,order=cycle}")
    assert same.output == ir.output
    bad = cli("ir", path, "--recur-blocks", "3")
    assert bad.exit_code == 1 and "cannot share evenly" in bad.output and "repeat l in n_layers" in bad.output
    none = cli("compile", stdlib.path("depth_recurrent"), "--recur-blocks", "2")
    assert none.exit_code == 1 and "no stack of distinct layers" in none.output
    opt = cli("ir", path, "--passes", "recur-blocks{k=2,depth=1}")
    assert opt.exit_code == 1 and "has no option `depth`" in opt.output


def test_pass_entries_with_options():
    assert split_entries("cse, recur-blocks{k=2,order=cycle},dce") == ["cse", "recur-blocks{k=2,order=cycle}", "dce"]
    assert get_pass("recur-blocks{k=2}").__doc__ == recur_blocks.__doc__
    for bad in ("recur-blocks{k=2", "recur-blocks{k}", "cse{x=1}"):
        with pytest.raises(ArchError):
            get_pass(bad)
