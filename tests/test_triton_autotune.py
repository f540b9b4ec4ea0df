"""The per-GPU autotuning cache (SPEC §19.4): keys, atomic writes, corruption and staleness, sessions, CLI."""
import json
import warnings

import pytest
from click.testing import CliRunner

import archc.stdlib as stdlib
from archc.backends.triton import autotune as tune
from archc.cli import main

KEY = {"name": "NVIDIA H200", "capability": "9.0", "triton": "3.6.0"}
CONFIGS = ({"BLOCK": 256, "num_warps": 2, "num_stages": 1}, {"BLOCK": 1024, "num_warps": 4, "num_stages": 1},
           {"BLOCK": 2048, "num_warps": 8, "num_stages": 1})
DEFAULT = CONFIGS[1]


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHC_CACHE_DIR", str(tmp_path / "autotune"))
    yield tmp_path / "autotune"
    tune._CACHE, tune._LOADED = None, False
    tune._MEMO.clear()
    tune._SIZES.clear()


def _fake_bench(fn):
    """A deterministic 'timer': runs the launch and makes BLOCK=2048 the fastest."""
    return 1.0 / fn()["BLOCK"]


def _tuned(cache):
    with tune.Session(cache, bench=_fake_bench) as session:
        cfg = tune.config("fused_k", (3000, 64), DEFAULT, CONFIGS, lambda c: c)
    return session, cfg


def test_paths_buckets_and_round_trip(cache_home):
    path = tune.cache_path(KEY)
    assert path.parent == cache_home and path.name == "nvidia-h200-sm9-0-triton3-6-0.json"
    assert tune.bucket((3000, 64)) == "R=4096,C=64" and tune.bucket((1, 1)) == "R=1,C=1"
    cache = tune.load(KEY)
    session, cfg = _tuned(cache)
    assert cfg == CONFIGS[2] and session.best[("fused_k", "R=4096,C=64")][0] == CONFIGS[2]
    cache.save()
    assert [p.name for p in cache_home.iterdir()] == [path.name]        # no temporary file left behind
    data = json.loads(path.read_text())
    assert data["format"] == tune.FORMAT and data["device"] == KEY
    assert data["kernels"]["fused_k"]["buckets"]["R=4096,C=64"]["config"] == CONFIGS[2]
    tune.load(KEY)                                                     # a fresh process reads it back
    assert tune.config("fused_k", (4000, 50), DEFAULT, CONFIGS, None) == CONFIGS[2]     # same bucket
    assert tune.config("fused_k", (100, 64), DEFAULT, CONFIGS, None) == DEFAULT        # no entry: default
    assert tune.config("other", (3000, 64), DEFAULT, CONFIGS, None) == DEFAULT


def test_dry_session_counts_work_without_timing():
    with tune.Session(None, dry=True) as dry:
        assert tune.config("a", (10, 10), DEFAULT, CONFIGS, lambda c: 1 / 0) == DEFAULT
        tune.config("a", (12, 9), DEFAULT, CONFIGS, lambda c: 1 / 0)     # same bucket: counted once
        tune.config("b", (10, 10), DEFAULT, CONFIGS[:2], lambda c: 1 / 0)
    assert dry.seen == {("a", "R=16,C=16"): 3, ("b", "R=16,C=16"): 2}


def test_a_failing_configuration_is_skipped():
    def launch(c):
        if c["BLOCK"] == 2048:
            raise RuntimeError("out of resources")
        return c
    with tune.Session(None, bench=_fake_bench) as session:
        assert tune.config("k", (8, 8), DEFAULT, CONFIGS, launch) == CONFIGS[1]
    assert session.best[("k", "R=8,C=8")][0] == CONFIGS[1]


@pytest.mark.parametrize("text", ["{not json", json.dumps([1, 2]), json.dumps({"format": 99, "kernels": {}}),
                                  json.dumps({"format": 1, "device": {**KEY, "triton": "3.1.0"}, "kernels": {}})])
def test_corrupted_or_foreign_cache_is_reported_once_and_rebuilt(text):
    path = tune.cache_path(KEY)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = tune.load(KEY)
        assert tune.config("fused_k", (3000, 64), DEFAULT, CONFIGS, None) == DEFAULT
        assert tune.config("fused_k", (3000, 64), DEFAULT, CONFIGS, None) == DEFAULT
    assert len([w for w in caught if issubclass(w.category, tune.CacheWarning)]) == 1
    assert "will be rebuilt" in str(caught[0].message) and cache.problem
    _tuned(cache)
    cache.save()
    assert json.loads(path.read_text())["kernels"]["fused_k"]["buckets"]["R=4096,C=64"]["config"] == CONFIGS[2]
    assert tune.Cache(path, KEY).problem is None


def test_stale_entry_is_ignored_and_reported_once():
    cache = tune.load(KEY)
    _tuned(cache)
    cache.save()
    changed = CONFIGS[:2] + ({"BLOCK": 4096, "num_warps": 8, "num_stages": 1},)      # the kernel's space changed
    tune.load(KEY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tune.config("fused_k", (3000, 64), DEFAULT, changed, None) == DEFAULT
        assert tune.config("fused_k", (3000, 64), DEFAULT, changed, None) == DEFAULT
    assert len(caught) == 1 and "stale" in str(caught[0].message)


def test_without_a_device_generated_kernels_use_defaults(monkeypatch):
    monkeypatch.setattr(tune, "device_key", lambda: None)
    assert tune.load() is None
    assert tune.config("fused_k", (3000, 64), DEFAULT, CONFIGS, None) == DEFAULT


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_autotune_without_a_gpu_fails_clearly(monkeypatch):
    import torch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = cli("autotune", stdlib.path("mor"))
    assert r.exit_code == 1
    assert "needs a CUDA GPU" in r.output and "Traceback" not in r.output
    r = cli("autotune", "missing.arch")
    assert r.exit_code == 1 and "no such file" in r.output


def test_cli_show_and_clear(cache_home):
    r = cli("autotune", "--show")
    assert r.exit_code == 0 and "no autotuning cache" in r.output
    cache = tune.load(KEY)
    _tuned(cache)
    cache.save()
    (cache_home / "broken.json").write_text("{")
    r = cli("autotune", "--show")
    assert r.exit_code == 0
    assert "NVIDIA H200 (sm 9.0), triton 3.6.0" in r.output and "fused_k" in r.output and "R=4096,C=64" in r.output
    assert "BLOCK=2048" in r.output and "unreadable" in r.output
    r = cli("autotune", "--clear")
    assert r.exit_code == 0 and "removed 2 cache file(s)" in r.output
    assert not list(cache_home.glob("*.json"))


def test_autotune_flow_with_a_stand_in_device(monkeypatch, cache_home):
    """`archc autotune FILE` end to end, with the GPU replaced by the Triton interpreter and a fake timer:
    the dry run counts every (kernel, bucket), the real run times each configuration, the cache is written."""
    pytest.importorskip("triton")
    import torch

    from archc.backends.triton import tuning
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tuning, "require_gpu", lambda: KEY)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    timings = iter(range(10_000, 0, -1))                   # every later configuration is "faster"
    monkeypatch.setattr(tune, "_do_bench", lambda fn: (fn(), next(timings) * 1e-3)[1])
    lines = []
    tuning.tune_file(str(stdlib.path("depth_recurrent")), None, {"d": 8, "steps": 1, "B": 2, "T": 4}, True,
                     lines.append)
    data = json.loads(tune.cache_path(KEY).read_text())
    kernels = data["kernels"]
    assert any(k.startswith("fused_") for k in kernels) and any(k.endswith("_bwd") for k in kernels)
    assert any(k.endswith("_path") for k in kernels)      # each fused launcher's size gate: torch vs kernel
    for name, entry in kernels.items():
        for bkt, hit in entry["buckets"].items():
            if name.endswith("_path"):
                assert bkt.startswith("n0=") and hit["config"] in [dict(p) for p in tune.PATHS]
            else:
                assert bkt.startswith("R=") and hit["config"]["num_warps"] >= 1
    assert lines[0].startswith("device: NVIDIA H200") and lines[-1].startswith("wrote ")
