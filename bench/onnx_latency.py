"""onnxruntime latency vs the generated PyTorch module (eager), per stdlib model, same weights.

Run: python -m bench.onnx_latency [--seq 64] [--batch 1] [--iters 30] [--threads 1] [--provider cpu|cuda]
Writes bench/results/onnx_latency.md (`--provider cuda` needs onnxruntime-gpu and a GPU, and writes
onnx_latency_cuda.md). Timings alternate between the two runtimes call by call, in one process, so
both see the same machine load; the table gives medians and their ratio (< 1: onnxruntime faster).
A second table runs one exported DepthRecurrent graph at several recursion counts, fed as an
input, against the module with `steps` set to the same count.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from archc.backends.onnx import export_forward, seeded_weights
from archc.backends.torch import generate, state_key

from archc import stdlib
from archc.testing import example_inputs


def _module(g, w, bindings: dict | None = None):
    namespace: dict = {}
    exec(compile(generate([g]).source, f"<archc:{g.name}>", "exec"), namespace)   # archc's generated code
    symbols = {s.name for s in g.symbols if s.kind != "dim"}
    m = namespace[g.name](**{k: v for k, v in (bindings or {}).items() if k in symbols})
    m.load_state_dict({state_key(k): torch.from_numpy(v) for k, v in w.items()})
    return m.eval()


def _session(model, threads: int, provider: str):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)


def _alternate(torch_call, ort_call, iters: int, warmup: int = 3) -> tuple[float, float]:
    for _ in range(warmup):
        torch_call()
        ort_call()
    t_torch, t_ort = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch_call()
        t1 = time.perf_counter()
        ort_call()
        t2 = time.perf_counter()
        t_torch.append(t1 - t0)
        t_ort.append(t2 - t1)
    return statistics.median(t_torch), statistics.median(t_ort)


def measure(g, weights, inputs, iters: int, threads: int = 1, provider: str = "cpu",
            bindings: dict | None = None, warmup: int = 3) -> tuple[float, float, float]:
    """(PyTorch eager s, onnxruntime s, max relative output difference) for one graph and input."""
    m = _module(g, weights, bindings)
    sess = _session(export_forward(g, weights, bindings).model, threads, provider)
    args_t = [inputs[a.name] for a in g.inputs]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    with torch.no_grad():
        ref = m(*args_t)
        ref = ref if isinstance(ref, dict) else {g.output_names[0]: ref}
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        err = max(float(np.abs(out[k] - v.numpy()).max() / max(np.abs(v.numpy()).max(), 1e-6))
                  for k, v in ref.items() if v.is_floating_point())
        t_torch, t_ort = _alternate(lambda: m(*args_t), lambda: sess.run(None, feeds), iters, warmup)
    return t_torch, t_ort, err


def measure_case(name: str, overrides: dict, batch: int, seq: int, repeat: int, threads: int = 2) -> dict:
    """One row of `python -m bench`'s onnx section: the stdlib file's first architecture at the
    suite's sizes, onnxruntime (CPU) vs the generated module in eager mode, same weights."""
    g = stdlib.graphs(name)[0]
    w = seeded_weights(g, overrides, seed=0)
    inputs = example_inputs(g, bindings=overrides, batch=batch, seq=seq, seed=0)
    t_torch, t_ort, err = measure(g, w, inputs, max(repeat, 1), threads, bindings=overrides, warmup=1)
    return {"model": name, "batch": batch, "seq": seq, "eager_ms": 1e3 * t_torch, "onnxruntime_ms": 1e3 * t_ort,
            "ratio": t_ort / t_torch, "rel_err": err}


def per_model(args) -> list[tuple]:
    rows = []
    for name in stdlib.names():
        for g in stdlib.graphs(name):
            w = seeded_weights(g, seed=0)
            inputs = example_inputs(g, batch=args.batch, seq=args.seq, seed=0)
            t_torch, t_ort, err = measure(g, w, inputs, args.iters, args.threads, args.provider)
            rows.append((g.name, inputs[g.inputs[0].name].shape[1], t_torch, t_ort, err))
            print(f"{g.name:18s} torch {t_torch * 1e3:8.2f} ms  onnxruntime {t_ort * 1e3:8.2f} ms  "
                  f"ratio {t_ort / t_torch:5.2f}  rel.err {err:.1e}", flush=True)
    return rows


def depth_sweep(args):
    """One graph, the recursion count as an input: latency as the count grows."""
    (g,) = stdlib.graphs("depth_recurrent")
    w = seeded_weights(g, seed=0)
    m = _module(g, w)
    fwd = export_forward(g, w)
    sess = _session(fwd.model, args.threads, args.provider)
    inputs = example_inputs(g, batch=args.batch, seq=args.seq, seed=0)
    rows = []
    for steps in (2, 8, 32):
        m.steps = steps
        feeds = dict({k: v.numpy() for k, v in inputs.items()}, steps=np.array(steps, np.int64))
        with torch.no_grad():
            t_torch, t_ort = _alternate(lambda: m(**inputs), lambda f=feeds: sess.run(None, f), args.iters)
        rows.append((steps, t_torch, t_ort))
        print(f"steps {steps:3d}: torch {t_torch * 1e3:8.2f} ms  onnxruntime {t_ort * 1e3:8.2f} ms  "
              f"ratio {t_ort / t_torch:5.2f}", flush=True)
    return rows, len(fwd.model.SerializeToString())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    import onnxruntime as ort
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = per_model(args)
    sweep, size = depth_sweep(args)
    load = f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores"
    ratios = [t_ort / t_torch for _, _, t_torch, t_ort, _ in rows]
    setup = (f"Batch {args.batch}, default model sizes, fp32, `torch.no_grad()`, {args.threads} threads each, "
             f"median of {args.iters} calls alternating between the two runtimes in one process "
             f"(`python -m bench.onnx_latency`). Ratio = onnxruntime time / PyTorch time (< 1: onnxruntime is faster).")
    machine = (f"machine: {platform.machine()}, {platform.processor() or 'cpu'}; torch {torch.__version__}, "
               f"onnxruntime {ort.__version__}, python {platform.python_version()}; {load}")
    lines = [f"# onnxruntime ({args.provider}) vs the generated PyTorch module (eager)", "", setup, "", machine, "",
             "| model | T | PyTorch eager (ms) | onnxruntime (ms) | ratio | max rel. error |", "|---|---|---|---|---|---|"]
    for name, seq, t_torch, t_ort, err in rows:
        lines.append(f"| {name} | {seq} | {t_torch * 1e3:.2f} | {t_ort * 1e3:.2f} | {t_ort / t_torch:.2f} | {err:.1e} |")
    summary = (f"Geometric mean of the ratios: {float(np.exp(np.mean(np.log(ratios)))):.2f} "
               f"(min {min(ratios):.2f}, max {max(ratios):.2f}).")
    lines += ["", summary, "",
              f"## DepthRecurrent: one exported graph ({size / 1e6:.2f} MB), the recursion count fed as an input", "",
              "| steps | PyTorch eager (ms) | onnxruntime (ms) | ratio |", "|---|---|---|---|"]
    for steps, t_torch, t_ort in sweep:
        lines.append(f"| {steps} | {t_torch * 1e3:.2f} | {t_ort * 1e3:.2f} | {t_ort / t_torch:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    name = "onnx_latency.md" if args.provider == "cpu" else f"onnx_latency_{args.provider}.md"
    (Path(__file__).parent / "results" / name).write_text(text)


if __name__ == "__main__":
    main()
