"""Per-GPU autotuning cache for generated Triton kernels (SPEC §19).

Generated launchers call `config(kernel, sizes, default, configs, runner)` on every launch. It
returns the best configuration recorded for this GPU, kernel and shape bucket, or `default` when
there is none. `archc autotune FILE` runs the model inside a `Session`, which times every
configuration of every (kernel, bucket) it meets and records the fastest.

The cache is one JSON file per device under `cache_dir()` (`$ARCHC_CACHE_DIR`, else
`$XDG_CACHE_HOME/archc/autotune`, else `~/.cache/archc/autotune`), named after the device name,
compute capability and Triton version, which it also records inside:

    {"format": 1, "device": {"name": ..., "capability": "9.0", "triton": "3.6.0"},
     "kernels": {"fused_1a2b3c4d5e": {"space": "<hash of the config space>",
                                       "buckets": {"R=4096,C=64": {"config": {...}, "ms": 0.012}}}}}

Kernel names carry a hash of the kernel's specification, so a changed kernel is a new entry; an
entry whose `space` differs from the kernel's current configuration space is stale and ignored.
Writes are atomic (a temporary file in the same directory, then `os.replace`). A file that does
not parse, has another format or another device is reported once (a warning) and rebuilt on the
next write.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

FORMAT = 1


class CacheWarning(UserWarning):
    """The autotuning cache was unreadable or stale; defaults are used and it is rebuilt."""


def cache_dir() -> Path:
    if os.environ.get("ARCHC_CACHE_DIR"):
        return Path(os.environ["ARCHC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "archc" / "autotune"


def device_key() -> dict[str, str] | None:
    """Name, compute capability and Triton version of the current CUDA device; None without one."""
    try:
        import torch
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return None
        import triton
        major, minor = torch.cuda.get_device_capability()
        return {"name": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "triton": triton.__version__}
    except Exception:      # no driver, no triton: no device to tune for
        return None


def cache_path(key: dict[str, str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{key['name']}-sm{key['capability']}-triton{key['triton']}").strip("-")
    return cache_dir() / f"{slug.lower()}.json"


def space_hash(configs) -> str:
    return hashlib.sha256(json.dumps(list(configs), sort_keys=True).encode()).hexdigest()[:12]


def bucket(sizes) -> str:
    """Shape bucket: each size rounded up to a power of two (`R=4096,C=64`)."""
    names = ("R", "C") if len(sizes) == 2 else tuple(f"n{i}" for i in range(len(sizes)))
    return ",".join(f"{k}={1 << max(0, int(v) - 1).bit_length()}" for k, v in zip(names, sizes))


class Cache:
    """One device's cache file: read once, validated, written atomically."""

    def __init__(self, path: Path, key: dict[str, str]):
        self.path, self.key = path, key
        self.kernels: dict[str, Any] = {}
        self.reported: set[str] = set()
        self.problem = self._read()

    def _read(self) -> str | None:
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            return self._report(f"cannot read {self.path} ({type(err).__name__}: {err})")
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("kernels"), dict):
            return self._report(f"{self.path} is not an archc autotune cache of format {FORMAT}")
        if data.get("device") != self.key:
            return self._report(f"{self.path} was written for {data.get('device')}, not {self.key}")
        for name, entry in data["kernels"].items():
            if isinstance(entry, dict) and isinstance(entry.get("buckets"), dict):
                self.kernels[name] = entry
        return None

    def _report(self, message: str) -> str:
        if message not in self.reported:
            self.reported.add(message)
            warnings.warn(f"archc autotune cache: {message}; using default configurations, "
                          "the file will be rebuilt", CacheWarning, stacklevel=3)
        return message

    def lookup(self, name: str, bkt: str, configs) -> dict | None:
        entry = self.kernels.get(name)
        if entry is None:
            return None
        if entry.get("space") != space_hash(configs):
            self._report(f"entry for {name} is stale (its configuration space changed)")
            return None
        hit = entry["buckets"].get(bkt)
        if not isinstance(hit, dict) or hit.get("config") not in list(configs):
            if hit is not None:
                self._report(f"entry {name}[{bkt}] is not one of the kernel's configurations")
            return None
        return dict(hit["config"])

    def record(self, name: str, bkt: str, configs, cfg: dict, ms: float) -> None:
        entry = self.kernels.get(name)
        space = space_hash(configs)
        if entry is None or entry.get("space") != space:
            entry = self.kernels[name] = {"space": space, "buckets": {}}
        entry["buckets"][bkt] = {"config": dict(cfg), "ms": round(float(ms), 6)}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": FORMAT, "device": self.key, "kernels": self.kernels}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.problem = None


# -- the process-wide state generated modules use -------------------------------------------------

_CACHE: Cache | None = None
_LOADED = False
_MEMO: dict[tuple[str, str], dict] = {}         # (kernel, bucket) -> configuration
_SIZES: dict[tuple[str, tuple], dict] = {}      # (kernel, exact sizes) -> configuration
_SESSION: "Session | None" = None


def load(key: dict[str, str] | None = None, path: Path | None = None) -> Cache | None:
    """Read this device's cache (once per process; generated modules call it at import)."""
    global _CACHE, _LOADED
    if _LOADED and key is None and path is None:
        return _CACHE
    key = key if key is not None else device_key()
    _CACHE = Cache(path or cache_path(key), key) if key is not None else None
    _LOADED = True
    _MEMO.clear()
    _SIZES.clear()
    return _CACHE


def config(name: str, sizes, default: dict, configs, runner: Callable[[dict], Any]) -> dict:
    """The configuration to launch `name` with on inputs of these sizes."""
    sizes = tuple(sizes)
    if _SESSION is None:
        hit = _SIZES.get((name, sizes))       # the launch path: one dict lookup
        if hit is not None:
            return hit
    bkt = bucket(sizes)
    if _SESSION is not None:
        return _SESSION.tune(name, bkt, configs, default, runner)
    hit = _MEMO.get((name, bkt))
    if hit is None:
        cache = load()
        hit = (cache.lookup(name, bkt, configs) if cache is not None else None) or dict(default)
        _MEMO[(name, bkt)] = hit
    _SIZES[(name, sizes)] = hit
    return hit


# -- the size gate: a kernel's inline torch expression where launch overhead would dominate -----------

PATHS = ({"path": "torch"}, {"path": "kernel"})     # the gate's space: `archc autotune` times both
_AUTO = {"path": "auto"}                              # no cache entry: the declared threshold decides


def torch_numel(default: int) -> int:
    """A launcher's threshold, in elements, at or below which it runs its torch expression.
    `$ARCHC_TRITON_TORCH_NUMEL` overrides every kernel's default (0: always the kernel; the tests
    set it so that they exercise the kernels at their tiny sizes)."""
    env = os.environ.get("ARCHC_TRITON_TORCH_NUMEL")
    return int(env) if env not in (None, "") else int(default)


def path(name: str, numel: int, threshold: int, runner: Callable[[dict], Any]) -> str:
    """"torch" or "kernel" for one launch of `name` over `numel` elements: this GPU's tuned choice
    for the size's bucket (`<name>_path` in the cache, timed by `archc autotune` as two
    configurations), else "torch" when numel <= threshold."""
    chosen = config(f"{name}_path", (numel,), _AUTO, PATHS, runner)["path"]
    if chosen == "auto":
        return "torch" if numel <= threshold else "kernel"
    return chosen


class Session:
    """Inside `with Session(cache, ...)`, every launch of a new (kernel, bucket) times each configuration.

    With `dry=True` it only records which (kernel, bucket, #configs) the run meets, so a caller
    can size a progress bar; `step(n)` is called after each timed configuration.
    """

    def __init__(self, cache: Cache | None, dry: bool = False, step: Callable[[int], None] | None = None,
                 bench: Callable[[Callable[[], Any]], float] | None = None):
        self.cache, self.dry, self.step = cache, dry, step
        self.bench = bench or _do_bench
        self.seen: dict[tuple[str, str], int] = {}
        self.best: dict[tuple[str, str], tuple[dict, float]] = {}

    def __enter__(self):
        global _SESSION
        self.prev, _SESSION = _SESSION, self
        return self

    def __exit__(self, *exc):
        global _SESSION
        _SESSION = self.prev
        _MEMO.clear()
        _SIZES.clear()

    def tune(self, name: str, bkt: str, configs, default: dict, runner) -> dict:
        k = (name, bkt)
        if k in self.best:
            return self.best[k][0]
        self.seen.setdefault(k, len(configs))
        if self.dry:
            return dict(default)
        timings = []
        for cfg in configs:
            try:
                ms = self.bench(lambda: runner(cfg))
            except Exception:      # a configuration this GPU cannot run (resources): not a candidate
                ms = float("inf")
            timings.append((ms, cfg))
            if self.step is not None:
                self.step(1)
        ms, cfg = min(timings, key=lambda t: t[0])
        if ms == float("inf"):
            cfg, ms = dict(default), float("nan")
        self.best[k] = (dict(cfg), ms)
        if self.cache is not None and ms == ms:
            self.cache.record(name, bkt, configs, cfg, ms)
        return dict(cfg)


def _do_bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def show(out=print) -> int:
    """Print every cache file under cache_dir(); returns how many were found."""
    d = cache_dir()
    files = sorted(d.glob("*.json")) if d.exists() else []
    if not files:
        out(f"no autotuning cache under {d}")
        return 0
    for p in files:
        out(f"== {p}")
        try:
            data = json.loads(p.read_text())
            dev = data["device"]
            out(f"device: {dev['name']} (sm {dev['capability']}), triton {dev['triton']}")
            for name in sorted(data["kernels"]):
                for bkt, hit in sorted(data["kernels"][name]["buckets"].items()):
                    cfg = ", ".join(f"{k}={v}" for k, v in sorted(hit["config"].items()))
                    out(f"  {name:<24} {bkt:<22} {cfg}   {hit['ms'] * 1e3:.1f} us")
        except (OSError, ValueError, KeyError, TypeError) as err:
            out(f"  unreadable ({type(err).__name__}: {err}); it will be rebuilt by the next `archc autotune`")
    return len(files)
