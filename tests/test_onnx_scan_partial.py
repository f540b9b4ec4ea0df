"""A scan over segments of C at a length q*C + r (0 < r < C) runs q whole segments and one short
segment with the size symbol bound to r (SPEC §8.5): onnxruntime agrees with the interpreter at
every length, in the forward graph and in the recompute decode graph (SPEC §21.2, §21.4)."""
import numpy as np
import onnx
import pytest
import torch
from archc.backends.onnx import (
    decode_kind,
    export_decode,
    export_forward,
    seeded_weights,
    session,
)
from archc.ir.analysis import partial_segment_blocker
from archc.ir.interpret import run
from archc.ir.ops import Op

from archc import api, stdlib

pytest.importorskip("onnxruntime")

RTOL = 1e-4          # |onnxruntime - interpreter| <= RTOL * max |interpreter|, per output (as tests/test_onnx.py)

#: every stdlib architecture with a scan of size > 1, at small sizes (its file, the bindings)
SMALL = {
    "TitansMAC": ("titans", {"d": 16, "heads": 2, "seg": 4, "persist": 2}),
    "TitansLMM": ("titans", {"d": 8, "seg": 4}),
    "TitansMAG": ("titans", {"d": 16, "n_layers": 1, "seg": 3, "window": 3}),
    "TitansMAL": ("titans", {"d": 16, "n_layers": 1, "seg": 3, "window": 3}),
    "HMT": ("hmt", {"d": 16, "heads": 2, "seg": 4, "n_mem": 3, "sensory": 2}),
    "MemoryCachingGRM": ("memory_caching", {"d": 16, "seg": 5, "max_segments": 6}),
    "MemoryCachingSSC": ("memory_caching", {"d": 16, "seg": 5, "max_segments": 6}),
    "MirasMoneta": ("miras", {"d": 16, "n_layers": 1, "seg": 3}),
    "MirasYaad": ("miras", {"d": 16, "n_layers": 1, "seg": 3}),
    "MirasMemora": ("miras", {"d": 16, "n_layers": 1, "seg": 3}),
    "Hope": ("hope_nested", {"d": 16, "seg": 4}),
}


def _graph(name):
    file, bindings = SMALL[name]
    return next(g for g in stdlib.graphs(file) if g.name == name), bindings


def _inputs(g, bindings, T: int, seed: int) -> dict:
    """Random inputs at length T: tokens below the vocabulary, floats normal."""
    gen = torch.Generator().manual_seed(seed)
    (a,) = g.inputs
    if a.type.dtype.value == "i64":
        return {a.name: torch.randint(0, 64, (2, T), generator=gen)}
    return {a.name: torch.randn(2, T, bindings["d"], generator=gen)}


def _run(sess, feeds: dict) -> dict:
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _check(outs: dict, ref: dict, what: str) -> None:
    for k, r in ref.items():
        r = r.detach().double().numpy()
        o = outs[k]
        assert o.shape == r.shape, f"{what}: {k} has shape {o.shape}, the interpreter's {r.shape}"
        scale = max(np.abs(r).max(), 1e-6)
        err = np.abs(o.astype(np.float64) - r).max()
        assert err <= RTOL * scale, f"{what}: {k}: max error {err:.3g} vs scale {scale:.3g}"


def test_every_stdlib_scan_over_segments_is_covered():
    """SMALL lists exactly the stdlib architectures whose scans have size > 1, and each may run a short segment."""
    found = set()
    for file in stdlib.names():
        for g in stdlib.graphs(file):
            scans = [n for n in g.walk() if n.op is Op.SCAN and str(n.attr("size")) != "1"]
            if scans:
                found.add(g.name)
                assert all(partial_segment_blocker(g, n) is None for n in scans), g.name
    assert found == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_agrees_at_every_length(name):
    """Lengths 1, seg - 1 (no whole segment), seg + 1 and 3 seg + 2 (whole segments and a short one)."""
    g, bindings = _graph(name)
    seg = bindings["seg"]
    w = seeded_weights(g, bindings, seed=3)
    tw = {k: torch.from_numpy(v) for k, v in w.items()}
    fwd = export_forward(g, w, bindings)
    assert not fwd.notes
    sess = session(fwd.model, threads=1)
    for T in (1, seg - 1, seg + 1, 3 * seg + 2):
        inputs = _inputs(g, bindings, T, seed=T)
        ref = run(g, tw, inputs, bindings=bindings)
        _check(_run(sess, {k: v.numpy() for k, v in inputs.items()}), ref, f"{name} at T = {T}")


@pytest.mark.parametrize("name", sorted(n for n in SMALL if n != "TitansLMM"))
def test_recompute_decode_agrees_after_a_prompt_that_is_not_a_multiple(name):
    """Prefill seg + 1 tokens (past_tokens empty), then three tokens one at a time: each step's outputs
    equal the interpreter's forward over the same tokens at the new positions (the recompute graph,
    which these models get with state=False; tests/test_onnx_state_decode.py checks their state graph)."""
    g, bindings = _graph(name)
    assert decode_kind(g, state=False) == "recompute_decode"
    seg = bindings["seg"]
    w = seeded_weights(g, bindings, seed=1)
    tw = {k: torch.from_numpy(v) for k, v in w.items()}
    dec = export_decode(g, w, bindings, kind="recompute_decode")
    onnx.checker.check_model(dec.model, full_check=True)
    sess = session(dec.model, threads=1)
    tokens = _inputs(g, bindings, seg + 4, seed=7)["tokens"]
    past = np.zeros((2, 0), np.int64)
    pos = 0
    for n in (seg + 1, 1, 1, 1):
        out = _run(sess, {"tokens": tokens[:, pos:pos + n].numpy(), "past_tokens": past})
        length = pos + n
        ref = run(g, tw, {"tokens": tokens[:, :length]}, bindings=bindings)
        ref = {k: v[:, -n:] if v.ndim >= 2 and v.shape[1] == length else v for k, v in ref.items()}
        _check(out, ref, f"{name} decoding {n} token(s) after {pos}")
        past = out["present_tokens"]
        assert np.array_equal(past, tokens[:, :length].numpy())
        pos = length


SCANS = """
arch Stack(d: int = 4, seg: int = 3) {
  input x: f32[B, T, d]
  h0 = zeros([B, d])
  summary, y, h = scan s in segments(x, seg) {
    h0 = tanh(h0 + mean(s, axis = 1))
    ramp = float(arange(seg)) / float(seg)
    yield h0, s * unsqueeze(unsqueeze(ramp, 0), -1) + zeros([B, seg, d]) + float(seg), h0 * float(seg)
  }
  output summary = summary
  output y = y
  output h = h
  output last = h0
}

arch Fixed(d: int = 4, seg: int = 3) {
  input x: f32[B, T, d]
  param scale: f32[seg, d] = normal(std = 1.0)
  y = scan s in segments(x, seg) {
    yield s * broadcast(scale, [B, seg, d])
  }
  output y = y
}

block Att(d: int) {
  input x: f32[B, T, d]
  layer attn = Attention(d, 2)
  return attn(x)
}

arch Shared(d: int = 8, seg: int = 3) {
  input x: f32[B, T, d]
  layer a = Att(d)
  layer b = Att(d)
  layer c = Att(d)
  y = scan s in segments(x, seg) {
    h = s + a(s)
    yield h + b(h)
  }
  output y = c(y)
  cache share_kv(b.attn, source = a.attn)
  cache share_kv(c.attn, source = b.attn)
}

arch Heads(d: int = 4, seg: int = 2) {
  input x: f32[B, T, d]
  y = scan s in segments(x, seg) {
    q = split_heads(s, seg)
    yield merge_heads(attend(q, q, q, causal = true))
  }
  output y = y
}
"""


def test_stacked_and_concatenated_yields_and_size_expressions():
    """A stacked yield gets ceiling(T/seg) entries; `arange(seg)`, `zeros([B, seg, d])` and `float(seg)`
    use the remainder in the short segment; the carry after the scan is the short segment's."""
    (g,) = [g for g in api.check(SCANS) if g.name == "Stack"]
    w = seeded_weights(g)
    sess = session(export_forward(g, w).model, threads=1)
    for T in (1, 2, 3, 4, 8, 9):
        inputs = {"x": torch.randn(2, T, 4, generator=torch.Generator().manual_seed(T))}
        ref = run(g, {}, inputs)
        assert ref["summary"].shape[1] == -(-T // 3)
        _check(_run(sess, {"x": inputs["x"].numpy()}), ref, f"Stack at T = {T}")


def test_shared_kv_is_threaded_through_the_short_segment():
    """`c` after the scan reads the K/V `b` last stored: the short segment's when there is one."""
    (g,) = [g for g in api.check(SCANS) if g.name == "Shared"]
    w = seeded_weights(g)
    tw = {k: torch.from_numpy(v) for k, v in w.items()}
    sess = session(export_forward(g, w).model, threads=1)
    for T in (2, 3, 7):
        inputs = {"x": torch.randn(2, T, 8, generator=torch.Generator().manual_seed(T))}
        _check(_run(sess, {"x": inputs["x"].numpy()}), run(g, tw, inputs), f"Shared at T = {T}")


def test_a_scan_that_cannot_run_a_short_segment_exports_and_fails_at_run_time_only():
    """A parameter shaped by the size: export works (with a note), multiples agree, other lengths fail
    in onnxruntime in a node named after the requirement."""
    (g,) = [g for g in api.check(SCANS) if g.name == "Fixed"]
    (scan,) = [n for n in g.walk() if n.op is Op.SCAN]
    assert partial_segment_blocker(g, scan) is not None
    w = seeded_weights(g)
    fwd = export_forward(g, w)
    assert any("multiple" in note for note in fwd.notes), fwd.notes
    sess = session(fwd.model, threads=1)
    inputs = {"x": torch.randn(2, 6, 4)}
    _check(_run(sess, {"x": inputs["x"].numpy()}), run(g, {k: torch.from_numpy(v) for k, v in w.items()}, inputs), "Fixed")
    with pytest.raises(Exception, match="scan_length_must_be_a_multiple_of_3"):
        sess.run(None, {"x": np.zeros((2, 5, 4), np.float32)})


def test_a_body_that_needs_the_size_at_export_time_runs_whole_segments_only():
    """Heads = seg: the interpreter runs a short segment with fewer heads, but the ONNX attention needs
    its head count at export time, so the export keeps whole segments (a note) and fails at run time."""
    (g,) = [g for g in api.check(SCANS) if g.name == "Heads"]
    (scan,) = [n for n in g.walk() if n.op is Op.SCAN]
    assert partial_segment_blocker(g, scan) is None
    fwd = export_forward(g, {})
    onnx.checker.check_model(fwd.model, full_check=True)
    assert any("needs the segment length at export time" in note for note in fwd.notes), fwd.notes
    sess = session(fwd.model, threads=1)
    inputs = {"x": torch.randn(2, 4, 4)}
    _check(_run(sess, {"x": inputs["x"].numpy()}), run(g, {}, inputs), "Heads")
    assert run(g, {}, {"x": torch.randn(2, 5, 4)})["y"].shape == (2, 5, 4)
    with pytest.raises(Exception, match="scan_length_must_be_a_multiple_of_2"):
        sess.run(None, {"x": np.zeros((2, 5, 4), np.float32)})
