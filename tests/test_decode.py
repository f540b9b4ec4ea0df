"""Incremental decoding: prefill + decode steps agree with the full forward where lossless."""
import pytest
import torch

import archc.api as api
import archc.stdlib as stdlib
from archc.ir.analysis import kv_decode_blocker
from archc.testing import decode_stepwise


@pytest.mark.parametrize("name", ["think", "move", "bottlenecked_tf"])
def test_kv_cached_decode_matches_forward(name):
    torch.manual_seed(0)
    overrides = {"d": 32, "heads": 2}
    if name == "think":
        overrides["ratio"] = 0.0         # ThinK with nothing pruned is lossless
    m = stdlib.load(name, **overrides)
    tokens = torch.randint(0, 256, (2, 12))
    tokens[0, 3] = tokens[1, 7] = 10      # rewrite_kv's delimiter: its zero-initialised processor is the identity
    full = m(tokens)
    steps, cache = decode_stepwise(m, tokens, 5)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    assert cache.length == 12 and cache.nbytes() > 0


@pytest.mark.parametrize("name,arch", [("mor", "MoRKVShare"), ("hrm", "HRM")])
def test_recompute_decode_is_exact(name, arch):
    torch.manual_seed(0)
    m = api.load(stdlib.path(name), arch=arch)(d=32, heads=2)
    tokens = torch.randint(0, 12, (2, 10))
    out, cache = m.prefill(tokens[:, :6])
    o, cache = m.decode(tokens[:, 6:7], cache)
    ref = m(tokens[:, :7])
    ref = ref["logits"] if isinstance(ref, dict) else ref
    got = o["logits"] if isinstance(o, dict) else o
    torch.testing.assert_close(got, ref[:, 6:7], atol=1e-5, rtol=1e-4)
    assert cache.nbytes() == tokens[:, :cache.length].numel() * 8


def test_kv_decode_analysis():
    blockers = {g.name: kv_decode_blocker(g) for n in stdlib.names() for g in stdlib.graphs(n)}
    assert blockers["ThinK"] is None and blockers["MoVE"] is None
    assert "scan" in blockers["TitansMAC"] and "route_topk" in blockers["MoR"]
    assert "not a language model" in blockers["DepthRecurrent"]


SHARED = """
arch Shared(vocab: int = 32, d: int = 16, heads: int = 2, n_r: int = 3) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer norm = RMSNorm(d)
  layer attn = Attention(d, heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  repeat r in n_r {
    x = x + attn(norm(x))
  }
  output logits = head(x)
  cache share_kv(attn, across = "recursion")
}
"""


def test_recursion_kv_sharing_is_lossless_and_holds_one_recursion(tmp_path):
    torch.manual_seed(0)
    shared = api.load(SHARED)()
    unshared = api.load(SHARED.replace('cache share_kv(attn, across = "recursion")', ""))()
    unshared.load_state_dict(shared.state_dict())
    tokens = torch.randint(0, 32, (2, 9))
    for m in (shared, unshared):
        steps, cache = decode_stepwise(m, tokens, 4)
        torch.testing.assert_close(steps, m(tokens), atol=1e-5, rtol=1e-4)
    _, c_shared = decode_stepwise(shared, tokens, 4)
    _, c_unshared = decode_stepwise(unshared, tokens, 4)
    assert c_shared.nbytes() * 3 == c_unshared.nbytes()          # 1/N_r of the bytes


def test_think_pruning_shrinks_the_key_cache():
    torch.manual_seed(0)
    lossless = stdlib.load("think", d=32, heads=2, ratio=0.0)
    pruned = stdlib.load("think", d=32, heads=2, ratio=0.5)
    pruned.load_state_dict(lossless.state_dict())
    tokens = torch.randint(0, 256, (1, 80))
    _, full_cache = lossless.prefill(tokens)
    out, cache = pruned.prefill(tokens)
    # keys: 48 old tokens keep 8 of 16 channels, 32 recent stay full; values are untouched
    per_layer_full = 80 * 2 * 16 * 4 * 2
    per_layer_pruned = (48 * 2 * 8 + 32 * 2 * 16) * 4 + 80 * 2 * 16 * 4 + 2 * 8 * 8
    assert full_cache.nbytes() == 4 * per_layer_full
    assert cache.nbytes() == 4 * per_layer_pruned
    step_pruned, _ = pruned.decode(tokens[:, :1], cache)
    step_full, _ = lossless.decode(tokens[:, :1], full_cache)
    assert step_pruned.shape == step_full.shape
    assert not torch.allclose(step_pruned, step_full)       # lossy, but close in distribution
    assert torch.nn.functional.cosine_similarity(step_pruned.flatten(), step_full.flatten(), dim=0) > 0.9


TWICE = """
arch Twice(vocab: int = 32, d: int = 16, heads: int = 2) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer attn = Attention(d, heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  x = x + attn(x)
  output logits = head(x + attn(x))
  cache prune_key_channels(attn, ratio = 0.5, recent = 2, observe = 2)
}
"""


def test_think_prunes_every_application_of_a_layer():
    _, cache = api.load(TWICE)().prefill(torch.randint(0, 32, (1, 8)))
    assert sorted(cache.entries) == ["attn", "attn#1"]
    assert all("kept" in e for e in cache.entries.values())      # the second application's entry too


TOPK = """
arch Top(vocab: int = 32, d: int = 16, heads: int = 4, keep: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer attn = Attention(d, heads)
  layer head = Linear(d, vocab)
  x = embed(tokens)
  output logits = head(x + attn(x))
  cache topk_decode(attn, k = keep, dense_heads = 1)
}
"""


def test_topk_decode_is_lossless_when_k_covers_the_context():
    torch.manual_seed(0)
    wide = api.load(TOPK)(keep=64)
    narrow = api.load(TOPK)(keep=2)
    narrow.load_state_dict(wide.state_dict())
    tokens = torch.randint(0, 32, (2, 10))
    steps, _ = decode_stepwise(wide, tokens, 6)
    torch.testing.assert_close(steps, wide(tokens), atol=1e-5, rtol=1e-4)
    steps_n, _ = decode_stepwise(narrow, tokens, 6)
    assert not torch.allclose(steps_n[:, 6:], wide(tokens)[:, 6:])   # sparse heads see 2 keys


def test_per_step_scan_outputs_are_per_position_and_decode_one_position_at_a_time():
    """A `scan` over segments of 1 stacks its yields to [B, T, ...] (not ceiling(T)), so recompute
    decoding returns only the new positions (it returned the whole history before)."""
    graphs = {g.name: g for g in stdlib.graphs("memory_rewriting_bench")}
    g = graphs["GRUAgent"]
    logits = next(o.type for n in g.walk() for o in n.outputs if o.name == g.body.results[0])
    assert logits.shape[1] == g.inputs[0].type.shape[1]                  # T itself
    torch.manual_seed(0)
    m = stdlib.load("memory_rewriting_bench", arch="GRUAgent")().eval()
    tokens = torch.randint(0, 6, (2, 9))
    steps, cache = decode_stepwise(m, tokens, 4)
    torch.testing.assert_close(steps, m(tokens), atol=1e-5, rtol=1e-4)
    assert cache.length == 9
