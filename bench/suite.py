"""The CPU benchmark suite: `python -m bench` (or `archc bench`).

Sections, each a list of rows measured in one run of one process (ratios, not absolute times, are
what to compare: the machine is shared and noisy):

- compile: parse -> checked IR -> emitted PyTorch source, per stdlib architecture;
- eager: the generated module vs a hand-written eager PyTorch implementation of the same model
  (bench/reference/, same weights, outputs checked equal before timing), forward and training step;
- compiled: both under `torch.compile` (inductor; `aot_eager` in smoke mode), forward;
- onnx: onnxruntime (CPU) vs the generated module in eager mode, where the ONNX backend exists;
- decode_cache: bytes held by decode caches with and without each caching policy.

Every timing is the median of `repeat` runs after warm-up (9 by default; the eager comparison
interleaves the generated and the hand-written module's calls). Results go to
bench/results/suite.{json,md,png} (or `--out`); `--smoke` runs everything once at tiny sizes so
that none of it rots (tests/test_bench.py runs it: two compile rows, one torch.compile row with
the `aot_eager` backend).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

import archc
import archc.api as api
import archc.stdlib as stdlib
from archc.testing import example_inputs

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One model of the eager/compiled comparison: stdlib file, sizes, batch and sequence length."""
    name: str
    overrides: dict
    batch: int
    seq: int


FULL = [
    Case("depth_recurrent", {"d": 128, "steps": 8}, batch=8, seq=64),
    Case("mor", {"d": 128, "n_r": 3}, batch=4, seq=512),
    Case("hrm", {"d": 128}, batch=8, seq=81),
    Case("titans", {"d": 128, "seg": 32}, batch=4, seq=256),
]
# On a GPU (`--device cuda`): sizes where kernels, not launches, dominate.
GPU = [
    Case("depth_recurrent", {"d": 256, "steps": 8}, batch=64, seq=64),
    Case("mor", {"d": 256, "n_r": 3}, batch=16, seq=1024),
    Case("hrm", {"d": 256}, batch=64, seq=81),
    Case("titans", {"d": 256, "seg": 64}, batch=16, seq=512),
]
SMOKE = [
    Case("depth_recurrent", {"steps": 2}, batch=2, seq=8),
    Case("mor", {}, batch=2, seq=16),
    Case("hrm", {"segments": 2}, batch=2, seq=9),
    Case("titans", {}, batch=2, seq=32),
]


DEVICE = torch.device("cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def median_time(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_median_times(fa: Callable[[], object], fb: Callable[[], object], repeat: int,
                        warmup: int = 1) -> tuple[float, float]:
    """Medians of `repeat` timed calls of `fa` and of `fb`, interleaved (a b, then b a, ...), so that a
    drift of the shared machine's speed during the measurement falls on both alike."""
    for _ in range(warmup):
        fa()
        fb()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(repeat):
        order = ((0, fa), (1, fb)) if i % 2 == 0 else ((1, fb), (0, fa))
        for k, fn in order:
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def _floats(out) -> list[torch.Tensor]:
    values = out.values() if isinstance(out, dict) else [out]
    return [v for v in values if v.is_floating_point()]


def _loss(out) -> torch.Tensor:
    return sum(v.pow(2).mean() for v in _floats(out))


def _inputs(case: Case, g) -> dict[str, torch.Tensor]:
    ins = example_inputs(g, bindings=case.overrides, batch=case.batch, seq=case.seq, seed=1)
    if "adj" in ins:        # a graph adjacency with self-loops: every row attends somewhere
        ins["adj"] = ins["adj"] | torch.eye(ins["adj"].shape[-1], dtype=torch.bool)
    return ins


def pair(case: Case):
    """(generated module, reference module with the same weights, inputs), outputs checked equal."""
    from bench.reference import REFERENCES

    g = stdlib.graphs(case.name)[0]
    torch.manual_seed(0)
    gen = stdlib.load(case.name, **case.overrides)
    gen = gen() if isinstance(gen, type) else gen
    ref = REFERENCES[case.name](**case.overrides).load_archc_state(gen.state_dict())
    gen, ref = gen.to(DEVICE), ref.to(DEVICE)
    ins = {k: v.to(DEVICE) for k, v in _inputs(case, g).items()}
    with torch.no_grad():
        a, b = _floats(gen(**ins)), _floats(ref(**ins))
    if len(a) != len(b):
        raise AssertionError(f"{case.name}: the reference returns {len(b)} float outputs, not {len(a)}")
    for x, y in zip(a, b, strict=True):
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item()
        if err > (1e-3 if DEVICE.type == "cpu" else 1e-2):   # GPU attention kernels sum in other orders
            raise AssertionError(f"{case.name}: the reference disagrees with the generated module ({err:.2e})")
    return gen, ref, ins


def bench_compile(repeat: int, warmup: int = 1, limit: int | None = None) -> list[dict]:
    rows = []
    for name in stdlib.names()[:limit]:
        path = stdlib.path(name)
        t = median_time(lambda path=path: api.compile(path), repeat, warmup)
        graphs = stdlib.graphs(name)
        rows.append({"model": name, "archs": len(graphs), "nodes": sum(sum(1 for _ in g.walk()) for g in graphs),
                     "compile_ms": 1e3 * t})
    return rows


def bench_eager(cases: list[Case], repeat: int) -> list[dict]:
    rows = []
    for case in cases:
        gen, ref, ins = pair(case)

        def fwd(m, ins=ins):
            with torch.no_grad():
                m(**ins)

        def step(m, ins=ins):
            m.zero_grad(set_to_none=True)
            _loss(m(**ins)).backward()

        row = {"model": case.name, "batch": case.batch, "seq": case.seq}
        for label, fn in (("forward", fwd), ("train_step", step)):
            tg, tr = paired_median_times(lambda fn=fn, m=gen: fn(m), lambda fn=fn, m=ref: fn(m), repeat)
            row[f"{label}_generated_ms"], row[f"{label}_reference_ms"] = 1e3 * tg, 1e3 * tr
            row[f"{label}_ratio"] = tg / tr
        print(f"[bench] {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def bench_compiled(cases: list[Case], repeat: int, backend: str) -> list[dict]:
    rows = []
    for case in cases:
        gen, ref, ins = pair(case)
        row = {"model": case.name, "backend": backend}
        for label, m in (("generated", gen), ("reference", ref)):
            torch._dynamo.reset()
            cm = torch.compile(m, backend=backend)
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    cm(**ins)
                    row[f"{label}_compile_s"] = time.perf_counter() - t0

                    def fwd(cm=cm, ins=ins):
                        with torch.no_grad():
                            cm(**ins)
                    row[f"{label}_ms"] = 1e3 * median_time(fwd, repeat)
            except Exception as e:          # recorded, not hidden: the table says which one failed
                row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        if "generated_ms" in row and "reference_ms" in row:
            row["ratio"] = row["generated_ms"] / row["reference_ms"]
        print(f"[bench] {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    torch._dynamo.reset()
    return rows


def bench_onnx(cases: list[Case], repeat: int) -> list[dict]:
    """onnxruntime vs the generated module in eager mode (needs the ONNX backend and onnxruntime)."""
    try:
        from bench.onnx_latency import measure_case
    except ImportError as e:
        return [{"model": "-", "error": f"ONNX backend not available: {e}"}]
    return [measure_case(case.name, case.overrides, case.batch, case.seq, repeat) for case in cases]


def bench_decode_cache(prompt: int) -> list[dict]:
    from bench.decode_cache import measure
    return [{"model": m, "policy": p, "bytes": b, "ratio": r, "cost_model_bytes": int(c)}
            for m, p, b, r, c in measure(prompt)]


def environment(mode: str) -> dict:
    import lark
    return {"mode": mode, "machine": platform.machine(), "processor": platform.processor() or "?",
            "cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "lark": lark.__version__, "archc": archc.__version__ if hasattr(archc, "__version__") else "0.1.0",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": _device_name()}


def _device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            v = r.get(key)
            cells.append("—" if v is None else (format(v, fmt) if fmt else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return out


def markdown(res: dict) -> str:
    env, s = res["environment"], res["sections"]
    lines = [f"# archc benchmark suite ({env['mode']})", "",
             f"{env['date']}; {env.get('device', 'cpu')}; {env['machine']} ({env['processor']}), {env['cpus']} torch threads, "
             f"Python {env['python']}, torch {env['torch']}. Median of {res['repeat']} runs after warm-up; "
             "ratios are generated / hand-written (below 1: archc is faster), measured in this one run.", ""]
    if "compile" in s:
        lines += ["## Compile time (parse -> checked IR -> PyTorch source)", ""]
        lines += _table(s["compile"], [("model", "model", ""), ("archs", "archs", ""), ("IR nodes", "nodes", ""),
                                       ("ms", "compile_ms", ".1f")]) + [""]
    if "eager" in s:
        lines += ["## Generated module vs hand-written PyTorch, eager", ""]
        lines += _table(s["eager"], [("model", "model", ""), ("B", "batch", ""), ("T", "seq", ""),
                                     ("fwd gen ms", "forward_generated_ms", ".1f"),
                                     ("fwd ref ms", "forward_reference_ms", ".1f"),
                                     ("fwd ratio", "forward_ratio", ".2f"),
                                     ("train gen ms", "train_step_generated_ms", ".1f"),
                                     ("train ref ms", "train_step_reference_ms", ".1f"),
                                     ("train ratio", "train_step_ratio", ".2f")]) + [""]
    if "compiled" in s:
        lines += ["## Both under torch.compile, forward", ""]
        lines += _table(s["compiled"], [("model", "model", ""), ("backend", "backend", ""),
                                        ("gen compile s", "generated_compile_s", ".1f"),
                                        ("gen ms", "generated_ms", ".1f"),
                                        ("ref compile s", "reference_compile_s", ".1f"),
                                        ("ref ms", "reference_ms", ".1f"), ("ratio", "ratio", ".2f"),
                                        ("generated failed", "generated_error", ""),
                                        ("reference failed", "reference_error", "")]) + [""]
    if "onnx" in s:
        lines += ["## onnxruntime (CPU) vs the generated module, eager forward", ""]
        keys = sorted({k for r in s["onnx"] for k in r} - {"model"})
        lines += _table(s["onnx"], [("model", "model", "")] + [(k, k, ".3g" if k.endswith(("ms", "ratio")) else "")
                                                                for k in keys]) + [""]
    if "decode_cache" in s:
        lines += ["## Decode-cache bytes (measured from the cache's tensors)", ""]
        lines += _table(s["decode_cache"], [("model", "model", ""), ("policy", "policy", ""),
                                            ("bytes", "bytes", ","), ("ratio", "ratio", ".3f"),
                                            ("cost model", "cost_model_bytes", ",")]) + [""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    """A bar chart of the generated/hand-written ratios; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    s = res["sections"]
    series = {}
    for r in s.get("eager", []):
        series.setdefault("eager forward", {})[r["model"]] = r["forward_ratio"]
        series.setdefault("eager train step", {})[r["model"]] = r["train_step_ratio"]
    for r in s.get("compiled", []):
        if "ratio" in r:
            series.setdefault("torch.compile forward", {})[r["model"]] = r["ratio"]
    models = sorted({m for v in series.values() for m in v})
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + i * width for j, m in enumerate(models) if m in vals]
        ax.bar(xs, [vals[m] for m in models if m in vals], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("time ratio, generated / hand-written")
    ax.set_title(f"archc vs hand-written PyTorch ({res['environment']['mode']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def run(smoke: bool = False, out: Path = RESULTS, repeat: int | None = None,
        sections: tuple[str, ...] = ("compile", "eager", "compiled", "onnx", "decode_cache"),
        log=sys.stderr, device: str = "cpu") -> dict:
    global DEVICE
    DEVICE = torch.device(device)
    mode = "smoke" if smoke else "full"
    repeat = repeat or (1 if smoke else 9)
    cases = SMOKE if smoke else (GPU if DEVICE.type == "cuda" else FULL)
    res = {"environment": environment(mode), "repeat": repeat, "sections": {}}
    steps = {
        "compile": lambda: bench_compile(repeat, warmup=0 if smoke else 1, limit=2 if smoke else None),
        "eager": lambda: bench_eager(cases, repeat),
        "compiled": lambda: bench_compiled(cases[:1] if smoke else cases, repeat, "aot_eager" if smoke else "inductor"),
        "onnx": lambda: bench_onnx(cases, repeat),
        "decode_cache": lambda: bench_decode_cache(64 if smoke else 1024),
    }
    for name in sections:
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=log, flush=True)
        res["sections"][name] = steps[name]()
        print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=log, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    stem = "suite" if not smoke else "suite_smoke"
    if DEVICE.type == "cuda":
        stem += "_" + "".join(c if c.isalnum() else "_" for c in _device_name()).strip("_").lower()
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    (out / f"{stem}.md").write_text(markdown(res) + "\n")
    res["plot"] = plot(res, out / f"{stem}.png")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="each benchmark once, tiny sizes")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where to write suite.{json,md,png}")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (median)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: GPU-sized cases, results named after the card")
    ap.add_argument("--only", default=None, help="comma-separated sections: compile,eager,compiled,onnx,decode_cache")
    a = ap.parse_args(argv)
    sections = tuple(a.only.split(",")) if a.only else ("compile", "eager", "compiled", "onnx", "decode_cache")
    res = run(a.smoke, a.out, a.repeat, sections, device=a.device)
    print(markdown(res))
    return 0
