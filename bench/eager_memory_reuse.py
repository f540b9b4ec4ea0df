"""The generated module's eager speed with and without releasing dead activations (`del` at last use).

    python -m bench.eager_memory_reuse [--threads 1] [--iters 15]

For each model of the suite's eager comparison (bench/suite.py `FULL`), one process builds three
modules with the same weights: the generated module as archc emits it (each activation's name is
dropped right after its last use, `_Emitter.releases`), the same module generated with releasing
turned off (every name held until it is rebound, as archc emitted before), and the hand-written
reference (bench/reference/). Forward calls alternate between the three (order reversed every
other round) under `torch.no_grad()`; the table gives medians and ratios to the reference.
Writes bench/results/eager_memory_reuse.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import types

import torch
from archc.backends import torch as torch_backend

from archc import stdlib
from bench.suite import FULL, RESULTS, pair


def _without_release(name: str, overrides: dict):
    """The generated module class of `name` with `_Emitter.releases` returning nothing."""
    original = torch_backend._Emitter.releases
    torch_backend._Emitter.releases = lambda self, r: {}
    try:
        gen = torch_backend.generate(stdlib.graphs(name)[:1])
    finally:
        torch_backend._Emitter.releases = original
    mod = types.ModuleType(f"archc_bench_norelease_{name}")
    exec(compile(gen.source, f"<archc-bench-norelease:{name}>", "exec"), mod.__dict__)  # noqa: S102 (archc's own output)
    return getattr(mod, gen.class_names[0])(**overrides)


def measure(case, iters: int) -> dict:
    gen, ref, ins = pair(case)
    held = _without_release(case.name, case.overrides)
    held.load_state_dict(gen.state_dict())
    held = held.to(next(gen.parameters()).device).eval() if not gen.training else held
    times = {"released": [], "held": [], "reference": []}
    mods = {"released": gen, "held": held, "reference": ref}
    with torch.no_grad():
        a, b = gen(**ins), held(**ins)
        a = a if isinstance(a, torch.Tensor) else next(iter(a.values()))
        b = b if isinstance(b, torch.Tensor) else next(iter(b.values()))
        assert torch.equal(a, b), f"{case.name}: releasing names changed the output"
        for m in mods.values():
            m(**ins)
        for i in range(iters):
            order = list(mods) if i % 2 == 0 else list(reversed(mods))
            for k in order:
                t = time.perf_counter()
                mods[k](**ins)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"model": case.name, "batch": case.batch, "seq": case.seq, **{f"{k}_ms": v for k, v in med.items()},
            "held_ratio": med["held"] / med["reference"], "released_ratio": med["released"] / med["reference"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    rows = []
    for case in FULL:
        row = measure(case, args.iters)
        rows.append(row)
        print(f"{row['model']:16s} held {row['held_ms']:8.1f} ms  released {row['released_ms']:8.1f} ms  "
              f"reference {row['reference_ms']:8.1f} ms  held/ref {row['held_ratio']:.3f}  "
              f"released/ref {row['released_ratio']:.3f}", flush=True)
    load1 = os.getloadavg()[0]
    lines = [
        "# Generated eager forward: releasing dead activations",
        "",
        (f"`python -m bench.eager_memory_reuse --threads {args.threads} --iters {args.iters}`: forward under "
        "`torch.no_grad()`, the suite's eager sizes, median of the alternating calls in one process. "
        "*held*: archc's module with every name kept until rebound (as emitted before); *released*: as "
        "emitted now (`del` after each activation's last use); *reference*: hand-written "
        "(bench/reference/). Ratios < 1: faster than hand-written."),
        "",
        (f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s); torch {torch.__version__}, "
        f"python {platform.python_version()}; load average {load0:.1f} at the start, {load1:.1f} at the end, "
        f"on {os.cpu_count()} cores"),
        "",
        "| model | batch | T | held (ms) | released (ms) | reference (ms) | held / reference | released / reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['seq']} | {r['held_ms']:.1f} | {r['released_ms']:.1f} | "
                     f"{r['reference_ms']:.1f} | {r['held_ratio']:.3f} | {r['released_ratio']:.3f} |")
    (RESULTS / "eager_memory_reuse.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'eager_memory_reuse.md'}")


if __name__ == "__main__":
    main()
