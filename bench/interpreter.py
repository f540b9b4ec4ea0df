"""Reference-interpreter speed: forward + backward per stdlib model at the default (tiny) sizes.

Run: python -m bench.interpreter [--repeat 5]. Writes bench/results/interpreter.md.
The budget from the language issue is < 2 s per model on this 2-core CPU machine.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

import archc.stdlib as stdlib
from archc.ir.interpret import GraphModule
from archc.testing import example_inputs


def measure(repeat: int) -> list[tuple[str, int, float, float]]:
    rows = []
    for name in stdlib.names():
        for g in stdlib.graphs(name):
            m = GraphModule(g, seed=0)
            inputs = example_inputs(g, seed=0)
            times = []
            for _ in range(repeat + 1):
                m.zero_grad()
                t0 = time.perf_counter()
                out = m(**inputs)
                sum(v.float().pow(2).mean() for v in out.values() if v.is_floating_point()).backward()
                times.append(time.perf_counter() - t0)
            seq = next(iter(inputs.values())).shape[1]
            rows.append((g.name, seq, times[0], statistics.median(times[1:])))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = measure(args.repeat)
    lines = ["# Interpreter forward+backward (batch 2, default sizes)", "",
             f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
             f"python {platform.python_version()}", "",
             "| model | T | first call (s) | median of warm calls (s) | within 2 s |", "|---|---|---|---|---|"]
    for name, seq, first, med in rows:
        lines.append(f"| {name} | {seq} | {first:.3f} | {med:.3f} | {'yes' if max(first, med) < 2 else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "interpreter.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
