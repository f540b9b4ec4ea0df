"""bench/gpu.py stays runnable: its --smoke mode (CPU, TRITON_INTERPRET=1, tiny sizes) end to end."""
import json
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--per-model", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert not data["errors"]
    rows = data["rows"]
    assert {r["mode"] for r in rows if r["family"] == "fused"} == {"fwd", "fwd+bwd"}
    benched = {r["family"] for r in rows}
    for family in ("gated_scan", "decode_attention"):          # kernel families present are benchmarked
        if family in data["meta"]["families"]:
            assert family in benched
    for r in rows:
        assert r["archc_us"] > 0 and r["eager_us"] > 0
        assert r["max_err"] < 1e-4                  # the kernel agrees with eager on the captured operands
    md = (tmp_path / "gpu_smoke.md").read_text()
    assert "| fused | DepthRecurrent |" in md and "mean nothing" in md


def test_gpu_bench_without_a_gpu_says_so():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "needs a CUDA GPU" in proc.stderr
