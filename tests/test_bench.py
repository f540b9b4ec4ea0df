"""The benchmark suite: its hand-written baselines compute the same models, and its smoke mode runs.

The eager comparison is only meaningful if bench/reference/ implements exactly the function the
generated module computes: same weights in, same outputs and gradients out.
"""
from __future__ import annotations

import json

import pytest
import torch

import archc.stdlib as stdlib
from bench.reference import REFERENCES
from bench.suite import SMOKE, _loss, markdown, pair, run


@pytest.mark.parametrize("case", SMOKE, ids=lambda c: c.name)
def test_reference_computes_the_generated_model(case):
    gen, ref, ins = pair(case)            # pair() already checks the forward outputs agree
    gen.train(), ref.train()
    _loss(gen(**ins)).backward()
    _loss(ref(**ins)).backward()
    grads = dict(ref.named_parameters())
    checked = 0
    for name, p in gen.named_parameters():
        if name in grads and p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=2e-3, atol=2e-4, msg=name)
            checked += 1
    assert checked >= 5


def test_reference_disagreement_is_caught(monkeypatch):
    case = SMOKE[0]
    Ref = REFERENCES[case.name]
    monkeypatch.setattr(Ref, "forward", lambda self, tokens, adj: torch.zeros(tokens.shape + (2,)) + 1.0)
    with pytest.raises(AssertionError, match="disagrees"):
        pair(case)


def test_smoke_run_writes_results(tmp_path):
    res = run(smoke=True, out=tmp_path, sections=("compile", "eager", "compiled", "decode_cache"))
    data = json.loads((tmp_path / "suite_smoke.json").read_text())
    s = data["sections"]
    assert [r["model"] for r in s["compile"]] == stdlib.names()[:2]
    assert all(r["compile_ms"] > 0 for r in s["compile"])
    assert {r["model"] for r in s["eager"]} == {c.name for c in SMOKE}
    assert all(r["forward_ratio"] > 0 and r["train_step_ratio"] > 0 for r in s["eager"])
    assert "ratio" in s["compiled"][0], s["compiled"][0]
    shared = [r for r in s["decode_cache"] if "share_kv" in r["policy"]]
    assert shared and shared[0]["ratio"] == pytest.approx(0.25)
    md = (tmp_path / "suite_smoke.md").read_text()
    assert md == markdown(data) + "\n" and "| mor |" in md
    assert res["plot"] == (tmp_path / "suite_smoke.png").exists()
    if res["plot"]:
        assert (tmp_path / "suite_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnx_section_measures_the_same_model():
    pytest.importorskip("onnxruntime")
    from bench.onnx_latency import measure_case
    row = measure_case("depth_recurrent", {"steps": 2}, batch=2, seq=8, repeat=1)
    assert row["rel_err"] < 1e-4
    assert row["eager_ms"] > 0 and row["onnxruntime_ms"] > 0 and row["ratio"] > 0


def test_decode_state_smoke_writes_the_table(tmp_path):
    """bench/decode_state.py --smoke: one row per smoke model with its path, times, bytes and goal."""
    from bench.decode_state import SMOKE_CONTEXTS, SMOKE_MODELS, main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "decode_state_smoke.json").read_text())
    assert data["contexts"] == list(SMOKE_CONTEXTS) and data["steps"] == 2
    rows = {r["model"]: r for r in data["rows"]}
    assert set(rows) == set(SMOKE_MODELS)
    assert rows["ThinK"]["path"] == "kv" and rows["TitansMAC"]["path"] == "state"
    assert rows["LocasGLU"]["path"] == "recompute" and rows["LocasGLU"]["blocker"]
    for r in rows.values():
        for c in SMOKE_CONTEXTS:
            m = r["contexts"][str(c)]
            assert m["decode_ms"] > 0 and m["recompute_ms"] > 0 and m["recompute_bytes"] == 8 * c
        assert r["ratio"] > 0 and r["speedup"] > 0
    lo, hi = (str(c) for c in SMOKE_CONTEXTS)
    for arch in ("TitansMAC", "GRUAgent", "ForgetMemoryAgent"):       # state only: bytes do not grow
        assert rows[arch]["contexts"][lo]["bytes"] == rows[arch]["contexts"][hi]["bytes"] > 0
    assert rows["ThinK"]["contexts"][hi]["bytes"] > rows["ThinK"]["contexts"][lo]["bytes"]
    assert rows["LocasGLU"]["goal"] is False
    md = (tmp_path / "decode_state_smoke.md").read_text()
    head = [line for line in md.splitlines() if line.startswith("| model | path | decode @")][0]
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols == (["model", "path"] + [f"decode @{c}" for c in SMOKE_CONTEXTS] + [f"t{hi}/t{lo}"]
                    + [f"recompute @{c}" for c in SMOKE_CONTEXTS] + [f"speedup @{hi}", "goal"])
    for arch in SMOKE_MODELS:
        assert sum(line.startswith(f"| {arch} | {rows[arch]['path']} |") for line in md.splitlines()) == 2


def test_onnx_decode_state_smoke_times_both_graphs():
    """`python -m bench.onnx_decode_state --smoke`: one model, both decode graphs, a row per context."""
    from bench.onnx_decode_state import measure, table
    rows = measure("memory_caching", "MemoryCachingGRM", [9, 17], steps=2)
    assert [r["context"] for r in rows] == [9, 17]
    assert all(r["state_ms"] > 0 and r["recompute_ms"] > 0 for r in rows)
    assert rows[0]["state_bytes"] == rows[1]["state_bytes"] > 0          # the state does not grow
    assert table(rows).count("| MemoryCachingGRM |") == 2
