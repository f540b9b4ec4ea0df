"""The `state_decode` step graph (SPEC §21.4): language models with recurrent state (segment scans,
per-step recurrences, beside K/V caches) decode in onnxruntime from explicit caches whose size does
not grow with the context, token by token equal to the interpreter's forward over the same prefix;
K/V that two attention sites share are cached once."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from archc.backends.onnx import decode_kind, export_decode, seeded_weights, session
from archc.backends.onnx.export import step_blocker
from archc.ir.analysis import decode_blocker, kv_decode_blocker, lm_token_input
from archc.ir.interpret import run
from archc.ir.ops import Op

from archc import api, stdlib
from archc.errors import ArchError
from bench.decode_cache import SHARED as _BENCH_SHARED

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-4          # |onnxruntime - interpreter| <= RTOL * max |interpreter|, per output (as tests/test_onnx.py)

#: every stdlib model on the state path (decode_blocker None, kv_decode_blocker not), at small sizes
SMALL = {
    "TitansMAC": ("titans", {"d": 16, "heads": 2, "seg": 4, "persist": 2}),
    "HMT": ("hmt", {"d": 16, "heads": 2, "seg": 4, "n_mem": 3, "sensory": 2}),
    "MemoryCachingGRM": ("memory_caching", {"d": 16, "seg": 5, "max_segments": 6}),
    "MemoryCachingSSC": ("memory_caching", {"d": 16, "seg": 5, "max_segments": 6}),
    "MirasMoneta": ("miras", {"d": 16, "n_layers": 2, "seg": 3}),       # scans inside a `repeat`
    "MirasYaad": ("miras", {"d": 16, "n_layers": 2, "seg": 3}),
    "MirasMemora": ("miras", {"d": 16, "n_layers": 2, "seg": 3}),
    "Hope": ("hope_nested", {"d": 16, "seg": 4}),
    "GRUAgent": ("memory_rewriting_bench", {"d": 16, "hidden": 16}),     # size-1 scans
    "LSTMAgent": ("memory_rewriting_bench", {"d": 16, "hidden": 16}),
    "SelectivBench": ("selectivbench", {"d": 16, "heads": 2}),          # ... inside a `repeat`
    "ForgetMemoryAgent": ("memory_rewriting_bench", {"d": 16, "dk": 8, "dv": 8}),    # linear_scan
    "AdditiveMemoryAgent": ("memory_rewriting_bench", {"d": 16, "dk": 8, "dv": 8}),  # linear_attn
}

#: attention (rope, K/V stacked over a `repeat`) and a scan in the same loop body, then a linear_scan
#: and one more attention outside it: every kind of cache in one graph
MIXED = """
block Mix(d: int, heads: int, seg: int) {
  input x: f32[B, T, d]
  layer norm = RMSNorm(d)
  layer attn = Attention(d, heads, causal = true)
  layer mix = Linear(d, d)
  h = x + attn(norm(x))
  c = zeros([B, d])
  y = scan s in segments(h, seg) {
    out = s + unsqueeze(c, 1)
    c = tanh(c + mean(mix(s), axis = 1))
    yield out
  }
  return y
}

arch Mixed(vocab: int = 16, d: int = 8, heads: int = 2, seg: int = 3, n_layers: int = 2) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer layers[n_layers] = Mix(d, heads, seg)
  layer gate = Linear(d, d)
  layer top = Attention(d, heads, causal = true)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  repeat l in n_layers {
    x = layers[l](x)
  }
  x = x + linear_scan(sigmoid(gate(x)), x, zeros([B, d]))
  output logits = head(x + top(x))
}
"""


@pytest.fixture(scope="module")
def example():
    """examples/onnx_generate.py as a module (its `empty_caches` builds every test's first caches)."""
    spec = importlib.util.spec_from_file_location("onnx_generate_example", ROOT / "examples" / "onnx_generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _graph(name):
    if name == "Mixed":
        return api.check(MIXED)[0], {}
    file, bindings = SMALL[name]
    return next(g for g in stdlib.graphs(file) if g.name == name), bindings


def _vocab(g, w) -> int:
    emb = next(n for n in g.walk() if n.op is Op.EMBEDDING)
    ref = next(m for m in g.walk() if m.op is Op.PARAM and m.out.name == emb.inputs[1]).attr("ref")
    return w[ref].shape[0]


def _run(sess, feeds: dict) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _check(outs: dict, ref: dict, n: int, length: int, what: str) -> None:
    """The step's outputs equal the forward over the prefix at its last n (new) positions."""
    for k, r in ref.items():
        r = r.detach().double().numpy()
        if r.ndim >= 2 and r.shape[1] == length:
            r = r[:, -n:]
        o = outs[k]
        assert o.shape == r.shape, f"{what}: {k} has shape {o.shape}, the interpreter's {r.shape}"
        scale = max(np.abs(r).max(), 1e-6)
        err = np.abs(o.astype(np.float64) - r).max()
        assert err <= RTOL * scale, f"{what}: {k}: max error {err:.3g} vs scale {scale:.3g}"


def _feed_back(feeds: dict, outs: dict) -> None:
    feeds.update({"past" + k[len("present"):]: v for k, v in outs.items() if k.startswith("present")})


def test_every_state_path_model_gets_the_state_graph():
    """decode_kind is state_decode where the PyTorch module decodes from compiled state but has no
    K/V-only step, unless `step_blocker` says why the graph cannot express that step (a cache inside a
    `route_mask`); `state=False` (and kind="recompute_decode") keep the recompute graph."""
    found = set()
    for file in stdlib.names():
        for g in stdlib.graphs(file):
            if lm_token_input(g) is None:
                continue
            state = decode_blocker(g) is None and kv_decode_blocker(g) is not None
            kind = decode_kind(g)
            assert (kind == "state_decode") == (state and step_blocker(g) is None), g.name
            if kind == "state_decode":
                found.add(g.name)
                assert decode_kind(g, state=False) == "recompute_decode"
    assert found == set(SMALL)
    g, bindings = _graph("TitansMAC")
    w = seeded_weights(g, bindings)
    assert export_decode(g, w, bindings, kind="recompute_decode").kind == "recompute_decode"
    with pytest.raises(ArchError, match="no `kv_decode` graph"):
        export_decode(g, w, bindings, kind="kv_decode")


@pytest.mark.parametrize("name", sorted(SMALL) + ["Mixed"])
def test_state_decode_matches_the_interpreter_at_every_prefix(name, example):
    """Prompts of 1, seg - 1, seg + 1 and 2 seg + 2 tokens (1 and 5 for size-1 scans and recurrences),
    then 4 tokens one at a time, from the caches `empty_caches` builds: every step equals the forward."""
    g, bindings = _graph(name)
    w = seeded_weights(g, bindings, seed=1)
    tw = {k: torch.from_numpy(v) for k, v in w.items()}
    dec = export_decode(g, w, bindings)
    assert dec.kind == "state_decode" and not dec.notes
    onnx.checker.check_model(dec.model, full_check=True)
    sess = session(dec.model, threads=1)
    seg = 3 if name == "Mixed" else bindings.get("seg", 1)          # the segment size (1: per-step state)
    prompts = (1, seg - 1, seg + 1, 2 * seg + 2) if seg > 1 else (1, 5)
    tokens = torch.randint(0, _vocab(g, w), (2, max(prompts) + 4), generator=torch.Generator().manual_seed(5))
    refs: dict[int, dict] = {}
    for prompt in prompts:
        feeds = example.empty_caches(sess, 2)
        pos = 0
        for n in (prompt, 1, 1, 1, 1):
            length = pos + n
            feeds["tokens"] = tokens[:, pos:length].numpy()
            outs = _run(sess, feeds)
            if length not in refs:
                refs[length] = run(g, tw, {"tokens": tokens[:, :length]}, bindings=bindings)
            _check(outs, refs[length], n, length, f"{name}: prompt {prompt}, step to {length}")
            assert int(outs["present.length"]) == length
            _feed_back(feeds, outs)
            pos = length


def test_the_state_does_not_grow_with_the_context():
    """MemoryCachingGRM: the caches after 2 and after 6 segments have the same shapes; they hold what the
    PyTorch module's cache holds (its carries and open segment), byte for byte in size."""
    g, bindings = _graph("MemoryCachingGRM")
    seg = bindings["seg"]
    w = seeded_weights(g, bindings, seed=2)
    sess = session(export_decode(g, w, bindings).model, threads=1)
    tokens = torch.randint(0, _vocab(g, w), (1, 6 * seg + 2), generator=torch.Generator().manual_seed(3))
    feeds = {i.name: np.zeros([1 if d == "B" else 0 if isinstance(d, str) else d for d in i.shape],
                              np.int64 if i.type == "tensor(int64)" else np.float32)
             for i in sess.get_inputs() if i.name.startswith("past")}
    shapes = {}
    pos = 0
    for n in [2 * seg] + [1] * (4 * seg + 2):
        feeds["tokens"] = tokens[:, pos:pos + n].numpy()
        outs = _run(sess, feeds)
        _feed_back(feeds, outs)
        pos += n
        if pos % seg == 0 or pos % seg == 2:
            shapes[pos] = {k: v.shape for k, v in outs.items() if k.startswith("present")}
    assert shapes[2 * seg] == shapes[6 * seg] and shapes[2 * seg + 2] == shapes[6 * seg + 2]
    assert shapes[6 * seg + 2]["present.y.rest"] == (1, 2, bindings["d"])
    model = api.load(stdlib.path("memory_caching"), arch="MemoryCachingGRM")(**bindings).eval()
    with torch.no_grad():
        _, cache = model.prefill(tokens[:, :pos])
    nbytes = sum(v.nbytes for k, v in outs.items() if k.startswith("present.y."))
    assert nbytes == cache.nbytes()


def test_onnx_generate_example_on_titans_mac_equals_the_torch_module(tmp_path):
    """The example script, on TitansMAC's decode graph written by api.export_onnx with the module's
    weights, generates the module's greedy tokens (the prompt ends inside a segment; the new tokens
    cross two segment boundaries)."""
    _, bindings = _graph("TitansMAC")
    torch.manual_seed(0)
    model = api.load(stdlib.path("titans"), arch="TitansMAC")(**bindings).eval()
    (e,) = api.export_onnx(stdlib.path("titans"), arch="TitansMAC", weights=model.state_dict(), bindings=bindings)
    assert e.decode.kind == "state_decode"
    file = tmp_path / "titans.decode.onnx"
    file.write_bytes(e.decode.model.SerializeToString())
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "onnx_generate.py"), str(file),
                           "--prompt", "3,1,4,1,5,9", "--tokens", "7"], check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("generated:"))
    ids = [int(t) for t in line.split(":")[1].split()]
    want = model.generate(torch.tensor([[3, 1, 4, 1, 5, 9]]), 7, temperature=0)[0, 6:].tolist()
    assert ids == want


# the recursion-shared model of bench/decode_cache.py, at test sizes
SHARED = _BENCH_SHARED.replace("arch Recursive(vocab: int = 256, d: int = 64, heads: int = 4, n_r: int = 4)",
                               "arch Shared(vocab: int = 32, d: int = 16, heads: int = 2, n_r: int = 3)")


def _stoch_kv(policy: str):
    src = stdlib.source("stoch_kv_routing")
    if policy == "share_kv":
        src = (src.replace("stochastic_share(layer1.attn, source = layer0.attn, p = 0.5)",
                           "share_kv(layer1.attn, source = layer0.attn)")
                  .replace("stochastic_share(layer3.attn, source = layer2.attn, p = 0.5)",
                           "share_kv(layer3.attn, source = layer2.attn)"))
    return api.lower(src)[0]


@pytest.mark.parametrize("case", ["stochastic_share", "share_kv", "share_kv -O2", "recursion -O2"])
def test_shared_kv_is_cached_once(case):
    """Sites that read another's K/V (the policy's attribute, or data flow after -O2's insert-kv-sharing)
    have no cache of their own: StochKVRouting caches layers 0 and 2 only, recursion-wise sharing the
    peeled first trip's K/V only (not stacked over n_r); every step equals the forward."""
    from archc.passes import preset, run_pipeline
    g0 = api.lower(SHARED)[0] if case.startswith("recursion") else _stoch_kv(case.split()[0])
    g = run_pipeline(g0, list(preset("O2"))) if case.endswith("-O2") else g0
    if case == "share_kv -O2":
        assert not any(n.attr("kv_share") for n in g.walk() if n.op is Op.ATTEND)   # data flow now
    assert decode_kind(g) == "kv_decode"
    w = seeded_weights(g0, seed=2)
    tw = {k: torch.from_numpy(v) for k, v in w.items()}
    dec = export_decode(g, w)
    onnx.checker.check_model(dec.model, full_check=True)
    sess = session(dec.model, threads=1)
    caches = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in dec.model.graph.input if i.name.startswith("past.")}
    if case.startswith("recursion"):
        assert caches == {"past.attn.key": ["B", "P", 2, 8], "past.attn.value": ["B", "P", 2, 8]}
    else:
        assert set(caches) == {f"past.layer{i}.attn.{kv}" for i in (0, 2) for kv in ("key", "value")}
    assert {o.name for o in dec.model.graph.output} == {"logits"} | {"present" + k[4:] for k in caches}
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(4))
    feeds = {k: np.zeros([2 if d == "B" else 0 if d == "P" else d for d in dims], np.float32)
             for k, dims in caches.items()}
    pos = 0
    for n in (5, 1, 1, 1, 1):
        feeds["tokens"] = tokens[:, pos:pos + n].numpy()
        outs = _run(sess, feeds)
        _check(outs, run(g0, tw, {"tokens": tokens[:, :pos + n]}), n, pos + n, f"{case} at {pos + n}")
        _feed_back(feeds, outs)
        pos += n
