"""insert-kv-sharing and schedule-depth (SPEC §22): goldens, every stdlib model before/after, masking
equals compaction, and the decode cache's measured bytes against the cost model."""
import io
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import generate, state_key
from archc.cli import main
from archc.errors import ArchError
from archc.ir.analysis import kv_decode_blocker
from archc.ir.core import Graph
from archc.ir.cost import cost
from archc.ir.interpret import init_params, resolve_bindings, run
from archc.ir.ops import Op
from archc.ir.parser import parse_ir
from archc.ir.printer import print_graph, print_module
from archc.ir.verify import verify
from archc.passes import PRESETS, get_pass, run_pipeline, split_entries
from archc.testing import decode_stepwise, example_inputs

GOLDEN = Path(__file__).parent / "golden" / "passes"
O2 = PRESETS["O2"]


def _inputs(g: Graph, seed: int = 1) -> dict:
    """Sequences long enough for routes to select strict subsets (scans keep their own length)."""
    seq = None if any(n.op is Op.SCAN for n in g.walk()) else 16
    return example_inputs(g, seed=seed, seq=seq)


def _same_outputs(ref: dict, got: dict, atol=1e-5, rtol=1e-4) -> None:
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=rtol)


def _module(graphs: list[Graph]) -> types.ModuleType:
    mod = types.ModuleType("archc_kv_depth")
    exec(compile(generate(graphs).source, "<archc-kv-depth>", "exec"), mod.__dict__)
    return mod


def _instance(mod, g: Graph, params: dict, **kw):
    """The generated module of `g` loaded with `params` (those its IR still has), in eval mode as the
    interpreter runs by default (training-mode routing and stochastic K/V sharing draw coins)."""
    m = getattr(mod, g.name)(**kw).eval()
    kept = {p.name for p in g.params}
    m.load_state_dict({state_key(k): v for k, v in params.items() if k in kept}, strict=True)
    return m


def _as_dict(g: Graph, out) -> dict:
    return out if isinstance(out, dict) else {g.output_names[0]: out}


# -- golden before/after IR, one file per case ------------------------------------------------------

_CASES = sorted(p.stem for p in GOLDEN.glob("*.arch"))


@pytest.mark.parametrize("case", _CASES)
def test_pass_golden(case, update_golden):
    src = GOLDEN / f"{case}.arch"
    spec = re.search(r"# RUN: archc ir %s --passes (\S+)", src.read_text()).group(1)
    (g,) = api.check(src)
    before = print_graph(g)
    h = run_pipeline(g, split_entries(spec), verify=True)
    assert print_graph(g) == before, "a pass must not change its input"
    expected = GOLDEN / f"{case}.ir"
    if update_golden:
        expected.write_text(print_graph(h))
    assert print_graph(h) == expected.read_text()
    assert print_module(parse_ir(expected.read_text())) == expected.read_text()     # round-trips
    assert print_graph(run_pipeline(h, split_entries(spec))) == print_graph(h)         # a fixpoint
    params, inputs = init_params(g, seed=0), _inputs(g, seed=0)
    _same_outputs(run(g, params, inputs), run(h, params, inputs))


def test_kv_sharing_removes_the_consumers_projections_and_weights():
    (g,) = api.check(GOLDEN / "kv_cross.arch")
    h = get_pass("insert-kv-sharing")(g)
    assert {p.name for p in g.params} - {p.name for p in h.params} == {"b.k.weight", "b.v.weight"}
    assert sum(n.op is Op.LINEAR for n in h.walk()) == sum(n.op is Op.LINEAR for n in g.walk()) - 2
    assert not any(n.attr("kv_share") for n in h.walk() if n.op is Op.ATTEND)
    c0, c1 = cost(g).evaluate({"B": 1, "T": 64}), cost(h).evaluate({"B": 1, "T": 64})
    assert c1["kv_cache_bytes"] == c0["kv_cache_bytes"]            # the policy already promised this
    assert c1["params"] == c0["params"] - 2 * 8 * 8 and c1["flops"] < c0["flops"]


BLOCKED = """
arch Blocked(vocab: int = 16, d: int = 8, heads: int = 2, n_r: int = 3) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer attn = Attention(d, heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  repeat r in n_r grad last 1 {
    x = x + attn(x)
  }
  output logits = head(x)
  cache share_kv(attn, across = "recursion")
}
"""


def test_sharing_the_pass_cannot_prove_stays_with_the_run_time_store():
    (g,) = api.check(BLOCKED)
    assert get_pass("insert-kv-sharing")(g) is g
    out = io.StringIO()
    run_pipeline(g, ["insert-kv-sharing"], remarks=True, out=out)
    assert "attn: sharing across `r` stays with the run-time store: `grad last`" in out.getvalue()


STOCHASTIC = """
arch Stochastic(vocab: int = 16, d: int = 8, heads: int = 2) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer a = Attention(d, heads)
  layer b = Attention(d, heads)
  layer c = Attention(d, heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  x = x + a(x)
  x = x + b(x)
  x = x + c(x)
  output logits = head(x)
  cache stochastic_share(b, c, source = a, p = 0.5)
}
"""


def test_stochastic_sharing_is_shared_only_for_deployment():
    (g,) = api.check(STOCHASTIC)
    assert get_pass("insert-kv-sharing")(g) is g                    # training draws a coin per execution
    h = get_pass("insert-kv-sharing{deploy=1}")(g)
    assert {p.name for p in g.params} - {p.name for p in h.params} == {
        "b.k.weight", "b.v.weight", "c.k.weight", "c.v.weight"}
    params, inputs = init_params(g, seed=2), _inputs(g)
    _same_outputs(run(g, params, inputs), run(h, params, inputs))   # eval mode always reads the source


# -- every stdlib model: the interpreter before vs after, and the PyTorch module after -------------------

_STDLIB = [(n, g) for n in stdlib.names() for g in stdlib.graphs(n)]


@pytest.mark.parametrize("name", stdlib.names())
def test_o2_keeps_every_stdlib_model(name):
    graphs = stdlib.graphs(name)
    after = [run_pipeline(g, O2, verify=True) for g in graphs]
    mod = _module(after)
    for g, h in zip(graphs, after):
        assert h.output_names == g.output_names and [a.name for a in h.inputs] == [a.name for a in g.inputs]
        params, inputs = init_params(g, seed=3), _inputs(g)
        ref = run(g, params, inputs)
        _same_outputs(ref, run(h, params, inputs))
        _same_outputs(ref, _as_dict(g, _instance(mod, h, params)(**inputs)))


def test_o2_modules_pass_ruff(tmp_path):
    pytest.importorskip("ruff")
    sources = [stdlib.path("mor")] + sorted(GOLDEN.glob("*.arch"))
    for i, path in enumerate(sources):
        (tmp_path / f"m{i}.py").write_text(api.compile(path, optimize=lambda g: run_pipeline(g, O2)).source)
    mask = api.compile(GOLDEN / "depth_mask.arch", optimize=lambda g: run_pipeline(g, ["schedule-depth{strategy=mask}"]))
    (tmp_path / "masked.py").write_text(mask.source)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# the expert-choice routes without their inference rule (`infer`, which always runs token by token)
_TOPK_ONLY = stdlib.source("mor").replace(", infer = s > 0.0", "")


# -- masking and compaction are the same function -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["MoR", "MoRKVShare"])
def test_masked_and_compacted_routes_agree_on_outputs_and_gradients(arch):
    g = next(g for g in api.check(_TOPK_ONLY) if g.name == arch)
    masked = run_pipeline(g, ["insert-kv-sharing", "schedule-depth{strategy=mask}"], verify=True)
    compact = run_pipeline(g, ["insert-kv-sharing", "schedule-depth{strategy=compact}"], verify=True)
    assert {n.attr("schedule") for n in masked.walk() if n.op is Op.ROUTE_TOPK} == {"mask"}
    assert {n.attr("schedule") for n in compact.walk() if n.op is Op.ROUTE_TOPK} == {"compact"}
    params = {k: v.requires_grad_(True) for k, v in init_params(g, seed=5).items()}
    inputs = _inputs(g, seed=2)
    results = []
    for h in (compact, masked):
        out = run(h, params, inputs)
        loss = out["logits"].pow(2).mean()
        used = [p for k, p in params.items() if k in {q.name for q in h.params}]
        results.append((out, torch.autograd.grad(loss, used)))
    _same_outputs(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    mod = _module([masked])
    with torch.no_grad():
        got = _as_dict(g, _instance(mod, masked, params)(**inputs))
    _same_outputs(run(g, params, inputs), {k: v for k, v in got.items()})


def test_schedule_depth_picks_by_cost_and_keeps_what_masking_would_change():
    (g,) = api.check(GOLDEN / "depth_dense.arch")
    h = get_pass("schedule-depth")(g)
    dense, mixing = [n for n in h.walk() if n.op is Op.ROUTE_TOPK]
    assert dense.attr("schedule") == "mask" and len(dense.regions[0].args) == 3
    assert mixing.attr("schedule") == "compact"              # a mean over the tokens: masking would differ
    assert get_pass("schedule-depth{strategy=mask}")(g) == h
    mor = next(g for g in api.check(_TOPK_ONLY) if g.name == "MoR")
    at = {seq: get_pass(f"schedule-depth{{seq={seq}}}")(mor) for seq in (4, 4096)}
    schedule = {seq: next(n.attr("schedule") for n in h.walk() if n.op is Op.ROUTE_TOPK) for seq, h in at.items()}
    assert schedule == {4: "mask", 4096: "compact"}          # short sequences: the gather costs more than it saves


# -- decoding: the cache of a KV-shared model, measured vs the cost model -------------------------------------

_CAP1 = _TOPK_ONLY.replace("capacity = (n_r - r) / n_r", "capacity = 1.0")


def test_mor_recursive_kv_sharing_decode_cache_is_one_recursion_and_matches_the_cost_model():
    graphs = [run_pipeline(g, O2) for g in api.check(_CAP1) if g.name in ("MoR", "MoRKVShare")]
    assert [kv_decode_blocker(g) for g in graphs] == [None, None]
    mod = _module(graphs)
    torch.manual_seed(0)
    unshared, shared = mod.MoR(d=32, heads=2), mod.MoRKVShare(d=32, heads=2)
    shared.load_state_dict(unshared.state_dict())
    tokens = torch.randint(0, 256, (2, 12))
    caches = {}
    with torch.no_grad():
        for m, g in ((unshared, graphs[0]), (shared, graphs[1])):
            full = _as_dict(g, m(tokens))
            steps, cache = decode_stepwise(m, tokens, 5)
            got = _as_dict(g, steps)
            _same_outputs(full, got)
            predicted = cost(g).evaluate({"B": 2, "T": 12, "d": 32, "heads": 2})["kv_cache_bytes"]
            assert abs(cache.nbytes() - predicted) <= 0.01 * predicted
            caches[g.name] = cache
    core = {name: sum(t.numel() * t.element_size() for key, e in c.entries.items() if key.startswith("core.")
                      for t in e.values()) for name, c in caches.items()}
    assert core["MoRKVShare"] * 3 == core["MoR"]                 # n_r = 3: one recursion's K/V instead of three


def test_cross_layer_sharing_decodes_from_the_producers_entry():
    (g,) = api.check(GOLDEN / "kv_cross.arch")
    h = run_pipeline(g, O2)
    m = _instance(_module([h]), h, init_params(g, seed=1))
    tokens = torch.randint(0, 16, (2, 9))
    with torch.no_grad():
        steps, cache = decode_stepwise(m, tokens, 4)
        torch.testing.assert_close(steps, m(tokens), atol=1e-5, rtol=1e-4)
    assert sorted(cache.entries) == ["a"]
    assert cache.nbytes() == cost(h).evaluate({"B": 2, "T": 9})["kv_cache_bytes"]


# -- IR contracts, options, command line ------------------------------------------------------------------------


def test_verifier_checks_the_masked_route_and_kv_read_contracts():
    (g,) = api.check(GOLDEN / "depth_mask.arch")
    text = print_graph(get_pass("schedule-depth{strategy=mask}")(g))
    bad_args = text.replace(", %keep.1 : bool[B, T]):", ", %keep.1 : f32[B, T]):")
    bad_schedule = text.replace('schedule="mask"', 'schedule="gather"')
    for bad, message in ((bad_args, "the selection) #2: type f32[B, T]"), (bad_schedule, 'must be "compact" or "mask"')):
        with pytest.raises(ArchError, match=re.escape(message)):
            (h,) = parse_ir(bad)
            verify(h, resolve_bindings(h))
    (g,) = api.check(GOLDEN / "kv_routed.arch")
    text = print_graph(get_pass("insert-kv-sharing")(g))
    bad_read = re.sub(r"(kv_read\(\) \{[^}]*\} : )f32", r"\1i64", text)
    with pytest.raises(ArchError, match="kv_read returns"):
        (h,) = parse_ir(bad_read)
        verify(h, resolve_bindings(h))


def test_pass_options_are_checked():
    assert split_entries("insert-kv-sharing,schedule-depth{seq=64,strategy=mask},dce") == [
        "insert-kv-sharing", "schedule-depth{seq=64,strategy=mask}", "dce"]
    with pytest.raises(ArchError, match="has no option `sequence`"):
        get_pass("schedule-depth{sequence=64}")
    with pytest.raises(ArchError, match="must be a number"):
        get_pass("schedule-depth{seq=long}")
    with pytest.raises(ArchError, match="takes no options"):
        get_pass("dce{x=1}")
    (g,) = api.check(GOLDEN / "depth_mask.arch")
    with pytest.raises(ArchError, match="strategy must be one of"):
        get_pass("schedule-depth{strategy=fast}")(g)


def test_cli_remarks_and_cost_after_passes():
    r = CliRunner().invoke(main, ["ir", str(GOLDEN / "kv_routed.arch"), "--passes",
                                  "insert-kv-sharing,schedule-depth{strategy=mask}", "--remarks"])
    assert r.exit_code == 0, r.output
    assert "// core: first trip of `r` peeled; the other trips read its K/V" in r.stdout
    assert "// saved:" in r.stdout and "route %x.6 (line 13): mask; forced by strategy" in r.stdout
    r = CliRunner().invoke(main, ["cost", str(GOLDEN / "kv_cross.arch"), "-O2", "--set", "T=64", "--set", "B=1"])
    assert r.exit_code == 0, r.output
    assert re.search(r"kv_cache_bytes +4\.000 KiB  = 8\*B\*T\*d\n", r.stdout)
    assert re.search(r"decode_state_bytes +4\.000 KiB  = 8\*B\*T\*d\n", r.stdout)   # the K/V, nothing else
