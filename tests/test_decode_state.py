"""Recurrent state as compiled state (SPEC §8.5, §17): segment scans run any sequence length, and
every stdlib language model decodes token by token, equal to the forward over the same prefix.

The reference for a decoded position p is the generated module's own forward over tokens[:, :p+1]
(not over the whole sequence): a model whose segment body looks at its whole segment (Memory
Caching's pooled summary, TitansMAC's memory tokens) changes earlier outputs when later tokens of
the segment arrive, and decoding must equal what the forward says at that prefix.
"""
import pytest
import torch

import archc.api as api
import archc.stdlib as stdlib
from archc.errors import ArchError
from archc.ir.analysis import decode_blocker, kv_decode_blocker, lm_token_input, partial_segment_blocker
from archc.ir.interpret import init_params, run
from archc.ir.ops import Op
from archc.testing import decode_stepwise

# decode-time policies that are lossy by design (SPEC §17): ThinK prunes key channels after the
# prompt, LycheeDecode's sparse heads read only the top-k keys
LOSSY = {"ThinK": {"ratio": 0.0}, "LycheeDecode": {"k": 4096}}
# the running phase theta_t = cumsum(...) reaches ~20 rad in these tests: fp32 sums of the same
# terms in another order (torch.cumsum over the prompt vs the step's running sum) differ by a few
# ulp of theta, ~1e-5 after cos/sin; the forward's own fp32 error is of that size
ATOL = {"PhoneticTrajectoryMemory": 1e-4}
# architectures whose step keeps scan state (no recompute): the state path must be taken
STATEFUL = {"TitansMAC", "MemoryCachingGRM", "MemoryCachingSSC", "HMT", "Hope", "MirasMoneta", "MirasYaad", "ForgetMemoryAgent",
            "MirasMemora", "GRUAgent", "LSTMAgent", "SelectivBench", "AdditiveMemoryAgent"}


def _language_models():
    out = []
    for name in stdlib.names():
        for g in stdlib.graphs(name):
            if lm_token_input(g) is not None:
                out.append((name, g.name))
    return out


def _segment(g) -> int:
    sizes = [n.attr("size") for n in g.walk() if n.op is Op.SCAN]
    sizes = [int(s.subs(g.symbol_defaults())) if hasattr(s, "subs") else int(s) for s in sizes]
    sizes = [s for s in sizes if s > 1]
    return max(sizes) if sizes else 0


def _logits(y):
    return y["logits"] if isinstance(y, dict) else y


def _decodes_like_forward(m, tokens, prompts, atol=1e-5):
    """prefill each prompt length, then decode token by token: equal to the forward; the caches."""
    caches = []
    with torch.no_grad():
        for L in prompts:
            steps, cache = decode_stepwise(m, tokens, L)
            torch.testing.assert_close(steps, m(tokens), atol=atol, rtol=atol * 10)
            caches.append(cache)
    return caches


def _vocab(m) -> int:
    return next((p.shape[0] for k, p in m.state_dict().items() if "embed" in k), 16)


@pytest.mark.parametrize("name,arch", _language_models())
def test_decoding_equals_the_forward_over_the_same_prefix(name, arch):
    """Prompt lengths {1, seg-1, seg, seg+1, 3*seg+2} (or {1, 7, 33} without segments), then 8
    tokens one at a time: every output equals the forward over the tokens up to it (fp32, 1e-5)."""
    g = next(x for x in stdlib.graphs(name) if x.name == arch)
    m = api.load(stdlib.path(name), arch=arch)(**LOSSY.get(arch, {})).eval()
    seg = _segment(g)
    lengths = sorted({1, seg - 1, seg, seg + 1, 3 * seg + 2} - {0}) if seg else [1, 7, 33]
    T = lm_token_input(g).type.shape[1]
    types = {o.name: o.type for n in g.walk() for o in n.outputs}
    per_position = {k for k, r in zip(g.output_names, g.body.results)
                    if r in types and types[r].rank >= 2 and types[r].shape[1] == T}
    gen = torch.Generator().manual_seed(hash(arch) % 1000)
    for L in lengths:
        tokens = torch.randint(0, _vocab(m), (2, L + 8), generator=gen)
        with torch.no_grad():
            out, cache = m.prefill(tokens[:, :L])
            torch.testing.assert_close(_logits(out), _logits(m(tokens[:, :L])), atol=1e-5, rtol=1e-4)
            for i in range(L, L + 8):
                step, cache = m.decode(tokens[:, i:i + 1], cache)
                full = m(tokens[:, :i + 1])
                # every output with a sequence axis, at the new position (logits, probes, reads)
                pairs = ({k: (step[k], v[:, -1:]) for k, v in full.items() if k in per_position}
                         if isinstance(full, dict) else {"out": (step, full[:, -1:])})
                for k, (got, ref) in pairs.items():
                    torch.testing.assert_close(got, ref, atol=ATOL.get(arch, 1e-5), rtol=1e-4,
                                               msg=lambda s: f"{arch}: `{k}`, prompt {L}, position {i}: {s}")
        assert cache.length == L + 8
    if arch in STATEFUL:
        assert decode_blocker(g) is None and type(cache).__name__ == "KVCache" and cache.states
    if arch in ("MoR", "MoRTokenChoice"):                   # routed recursions decode from a K/V cache
        assert decode_blocker(g) is None and type(cache).__name__ == "KVCache"


@pytest.mark.parametrize("name,arch", [("memory_caching", "MemoryCachingGRM"), ("miras", "MirasMoneta"),
                                       ("hope_nested", "Hope"), ("memory_rewriting_bench", "GRUAgent")])
def test_state_cache_does_not_grow_with_the_context(name, arch):
    """Without attention outside its scans a model's decode cache is its state: the carries and at
    most one open segment, whatever the context length."""
    g = next(x for x in stdlib.graphs(name) if x.name == arch)
    m = api.load(stdlib.path(name), arch=arch)().eval()
    seg = max(_segment(g), 1)
    sizes = []
    for segments in (2, 9):
        tokens = torch.randint(0, _vocab(m), (1, segments * seg + 1))
        with torch.no_grad():
            _, cache = m.prefill(tokens[:, :-1])
            _, cache = m.decode(tokens[:, -1:], cache)
        sizes.append(cache.nbytes())
        for carries, rest in cache.states.values():
            assert rest.shape[1] == (segments * seg + 1) % seg          # only the open segment's inputs
    assert sizes[0] == sizes[1] > 0


def test_the_state_path_is_what_a_titans_decode_runs():
    """A decode step inside a segment runs one partial segment (<= seg inputs), not the history: the
    open segment's inputs are what the cache holds, and a completed segment folds into the carries."""
    m = api.load(stdlib.path("titans"), arch="TitansMAC")().eval()
    tokens = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        _, cache = m.prefill(tokens[:, :17])
        (carries, rest), = cache.states.values()
        assert rest.shape[1] == 1
        for i in range(17, 32):
            _, cache = m.decode(tokens[:, i:i + 1], cache)
        (carries2, rest2), = cache.states.values()
        assert rest2.shape[1] == 0 and not torch.equal(carries[0], carries2[0])


def test_kv_decode_blocker_still_names_scans_for_onnx():
    """The ONNX K/V decode graph has no scan state: `kv_decode_blocker` still names the scan."""
    g = next(x for x in stdlib.graphs("titans") if x.name == "TitansMAC")
    assert decode_blocker(g) is None and "scan" in kv_decode_blocker(g)


# -- the short last segment (SPEC §8.5) --------------------------------------------------------------

POOL = """
arch Pool(d: int = 3, seg: int = 4) {
  input x: f32[B, T, d]
  y = scan s in segments(x, seg) {
    yield s * 0.0 + mean(s, axis = 1, keepdim = true) + full([B, seg, d], seg)
  }
  output y = y
}
"""


def _one(src: str, tmp_path):
    p = tmp_path / "m.arch"
    p.write_text(src)
    (g,) = api.check(str(p))
    return g, p


def test_a_short_last_segment_binds_the_segment_length(tmp_path):
    """Written from the definition: T = 6, seg = 4 gives one segment of 4 and one of 2; inside the
    second the body's `seg` is 2 (the mean is over 2 positions and `full(seg)` fills 2)."""
    g, p = _one(POOL, tmp_path)
    x = torch.randn(2, 6, 3)
    want = torch.cat([x[:, :4].mean(1, keepdim=True).expand(2, 4, 3) + 4.0,
                      x[:, 4:].mean(1, keepdim=True).expand(2, 2, 3) + 2.0], 1)
    got = run(g, init_params(g), {"x": x})["y"]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(api.load(str(p))()(x), want)            # the generated module agrees


@pytest.mark.parametrize("src,why", [
    (POOL.replace("segments(x, seg)", "segments(x, 4)").replace("full([B, seg, d], seg)", "full([B, 4, d], 4)"),
     "not an architecture parameter"),
    (POOL.replace("  y = scan", "  layer lin = Linear(seg, d)\n  y = scan")
         .replace("yield s * 0.0", "yield lin(full([B, seg, seg], 1.0)) * 0.0 + s * 0.0"),
     "shaped by `seg`"),
])
def test_a_scan_that_cannot_run_a_short_segment_says_why(tmp_path, src, why):
    g, p = _one(src, tmp_path)
    scan = next(n for n in g.walk() if n.op is Op.SCAN)
    assert why in partial_segment_blocker(g, scan)
    x = torch.randn(1, 6, 3)
    with pytest.raises(ArchError, match="not a multiple"):
        run(g, init_params(g), {"x": x})
    with pytest.raises(ValueError, match=why.replace("`", ".")):
        api.load(str(p))()(x)
    run(g, init_params(g), {"x": torch.randn(1, 8, 3)})                   # whole segments still run


@pytest.mark.parametrize("name,arch", [("titans", "TitansMAC"), ("titans", "TitansMAL"), ("hmt", "HMT"),
                                       ("memory_caching", "MemoryCachingSSC"), ("miras", "MirasYaad")])
def test_generated_module_equals_the_interpreter_on_a_short_last_segment(name, arch):
    g = next(x for x in stdlib.graphs(name) if x.name == arch)
    seg = _segment(g)
    m = api.load(stdlib.path(name), arch=arch)().eval()
    params = {k: v for k, v in m.state_dict().items()}
    tokens = torch.randint(0, _vocab(m), (2, 2 * seg + 3))
    with torch.no_grad():
        want = _logits(run(g, params, {"tokens": tokens}))
        torch.testing.assert_close(_logits(m(tokens)), want, atol=1e-5, rtol=1e-4)


# ThinK's formula is the pruned steady state (the prompt's keys pruned, not the newest `recent`);
# BottleneckedTF's cache also holds the open step's queries for rewrite_kv
NBYTES_APPROX = {"ThinK", "BottleneckedTF"}


@pytest.mark.parametrize("name,arch", [x for x in _language_models() if x[1] not in NBYTES_APPROX])
def test_cost_decode_state_bytes_is_what_the_cache_holds(name, arch):
    """`archc cost`'s decode_state_bytes formula equals the generated cache's nbytes() at lengths on
    and off segment boundaries."""
    import sympy

    from archc.ir.cost import decode_state_bytes
    from archc.ir.interpret import resolve_bindings
    g = next(x for x in stdlib.graphs(name) if x.name == arch)
    m = api.load(stdlib.path(name), arch=arch)().eval()
    e = decode_state_bytes(g)
    seg = max(_segment(g), 1)
    for T in (seg + 1, 2 * seg + max(seg // 2, 1)):
        tokens = torch.randint(0, _vocab(m), (2, T))
        with torch.no_grad():
            _, cache = m.prefill(tokens[:, :-1])
            _, cache = m.decode(tokens[:, -1:], cache)
        subs = {sympy.Symbol(k): v for k, v in resolve_bindings(g).items()} | {sympy.Symbol("B"): 2, sympy.Symbol("T"): T}
        assert cache.nbytes() == int(e.subs(subs)), (arch, T, e)


PERSISTENT = """
arch Persistent(vocab: int = 32, d: int = 16, heads: int = 2, persist: int = 3, window: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer attn = Attention(d, heads, causal = true, window = window, prefix = persist)
  layer head = Linear(d, vocab)
  param persistent: f32[persist, d] = normal(std = 0.5)
  x = embed(tokens)
  x = x + attn(concat([broadcast(persistent, [B, persist, d]), x], axis = 1))[:, persist:]
  output logits = head(x)
}
"""


def test_a_persistent_prefix_is_cached_once(tmp_path):
    """Persistent tokens concatenated before the sequence (Titans' MAG/MAL layers): the step adds
    them on its first call only, their K/V stay in the cache, positions continue behind them."""
    g, p = _one(PERSISTENT, tmp_path)
    assert kv_decode_blocker(g) is not None and decode_blocker(g, torch_step=True) is None
    m = api.load(str(p))().eval()
    for cache in _decodes_like_forward(m, torch.randint(0, 32, (2, 14)), (1, 5)):
        assert type(cache).__name__ == "KVCache"
        (entry,) = cache.entries.values()
        assert entry["k"].shape[1] == 3 + 14                        # the prefix once, then every token


CHAINED = """
arch Chained(vocab: int = 16, d: int = 8, seg: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  y = scan s in segments(x, seg) {
    yield s + mean(s, axis = 1, keepdim = true)
  }
  z = scan s in segments(y, seg) {
    yield s * 2.0
  }
  output logits = head(z)
}
"""


def test_values_that_change_with_later_tokens_are_never_cached(tmp_path):
    """The first scan's yields look at their whole segment, so they change while it fills; the
    second scan would buffer stale inputs. The analysis says so and decoding recomputes (exact)."""
    g, p = _one(CHAINED, tmp_path)
    why = decode_blocker(g)
    assert why == ("`scan` at line 10 reads as its segments values computed from the `scan` at line 7, whose "
                   "outputs change as later tokens of their segment arrive")
    m = api.load(str(p))().eval()
    tokens = torch.randint(0, 16, (1, 11))
    with torch.no_grad():
        out, cache = m.prefill(tokens[:, :5])
        for i in range(5, 11):
            s, cache = m.decode(tokens[:, i:i + 1], cache)
            torch.testing.assert_close(s, m(tokens[:, :i + 1])[:, -1:], atol=1e-5, rtol=1e-4)
    assert type(cache).__name__ == "TokenCache"
    causal = CHAINED.replace("yield s + mean(s, axis = 1, keepdim = true)", "yield s + 1.0")
    g2, _ = _one(causal, tmp_path)
    assert decode_blocker(g2) is None                                   # position by position: state path


INFER = """
arch Routed(d: int = 3) {
  input x: f32[B, T, d]
  s = x[:, :, 0]
  route x by topk(s, capacity = 0.5, infer = s > 0.0) weight sigmoid(s) as sel {
    x = x * 2.0
  }
  output y = x
  output sel = sel
}
"""


def test_a_topk_route_s_inference_rule(tmp_path):
    """`infer =` (MoR's causal remedy, SPEC §9.1): training selects the top-k over the sequence;
    outside training each token is routed by its own mask, in the interpreter, the generated module
    (eval) and ONNX. Written from the definition."""
    g, p = _one(INFER, tmp_path)
    x = torch.randn(2, 6, 3)
    s = x[:, :, 0]
    w = torch.sigmoid(s)[..., None]
    rule = s > 0
    want = torch.where(rule[..., None], x + w * (2 * x - x), x)
    top = torch.zeros_like(rule).scatter(1, s.topk(3, dim=1).indices, True)
    want_train = torch.where(top[..., None], x + w * (2 * x - x), x)
    for training, y_want, sel_want in ((False, want, rule), (True, want_train, top)):
        out = run(g, init_params(g), {"x": x}, training=training)
        torch.testing.assert_close(out["y"], y_want)
        assert torch.equal(out["sel"], sel_want)
        m = api.load(str(p))().train(training)
        got = m(x)
        torch.testing.assert_close(got["y"], y_want)
        assert torch.equal(got["sel"], sel_want)
    from archc.backends.onnx import export_forward, session
    sess = session(export_forward(g, {}).model, threads=1)        # an exported graph is for inference
    y, sel = sess.run(["y", "sel"], {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), want, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.from_numpy(sel), rule)


RUNNING = """
arch Running(vocab: int = 16, d: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer head = Linear(d, vocab)
  total = cumsum(embed(tokens), axis = 1)
  output logits = head(sin(total))
}
"""


DELAY = """
arch Bigram(vocab: int = 16, d: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer head = Linear(2 * d, vocab)
  x = embed(tokens)
  prev = concat([ones([B, 2, d]), x[:, :-2]], axis = 1)          # the token two back (ones before)
  output logits = head(concat([x, prev], axis = -1))
}
"""


@pytest.mark.parametrize("src,nbytes", [(RUNNING, 2 * 4 * 4), (DELAY, 2 * 2 * 4 * 4)], ids=["cumsum", "delay"])
def test_a_running_sum_or_a_delay_line_keeps_constant_state(tmp_path, src, nbytes):
    """`cumsum` along the sequence keeps its running sum; `concat([A, x[:, :T-P]], axis = 1)` (x
    delayed by P) keeps x's last P positions: O(1) per token, `decode_state_bytes` = nbytes()."""
    import sympy

    from archc.ir.cost import decode_state_bytes
    g, p = _one(src, tmp_path)
    assert decode_blocker(g, torch_step=True) is None and decode_blocker(g) is not None   # ONNX: recompute
    m = api.load(str(p))().eval()
    *_, cache = _decodes_like_forward(m, torch.randint(0, 16, (2, 12)), (2, 5))
    assert cache.nbytes() == nbytes == int(decode_state_bytes(g).subs({sympy.Symbol("B"): 2, sympy.Symbol("d"): 4}))


def test_a_delay_whose_cut_is_read_elsewhere_is_not_a_delay_line(tmp_path):
    g, _ = _one(DELAY.replace("output logits", "output cut = x[:, :-2]\n  output logits"), tmp_path)
    assert decode_blocker(g, torch_step=True) is not None
