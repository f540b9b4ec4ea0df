"""Adaptive depth: MoR's routed recursions at capacity 0.25 vs 1.0, FLOPs (cost model) and wall time.

Run: python -m bench.adaptive_depth [--seq 1024] [--reps 7]. Writes bench/results/adaptive_depth.md.
The model is MoR's routed part alone (stdlib/mor.arch: `n_r` recursions of a shared block of
`block_layers` pre-norm layers, expert-choice routing with hierarchical `among`, sigmoid gate), fed
hidden states, so its whole forward is the routed recursions. Each capacity is compiled with -O2
(schedule-depth at T = --seq picks masking for capacity 1.0 and compaction for 0.25) to a PyTorch
module; wall time is the median of --reps forwards under no_grad after one warm-up, the variants
taking turns, all in one run, on one torch thread by default (on this shared 2-core machine two
threads make every op wait for a descheduled peer: 10x slower and far noisier). Two more tables
force each schedule at capacity 0.25 and 1.0 over several lengths: where the cost model's
crossover (the `overhead` constant of schedule-depth) sits against measured time.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import types
from pathlib import Path

import torch

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import generate
from archc.ir.cost import cost
from archc.passes import PRESETS, run_pipeline

SOURCE = """
block Layer(d: int, heads: int, ffn: int) {
  input x: f32[B, T, d]
  layer attn_norm = RMSNorm(d)
  layer attn = Attention(d, heads, causal = true)
  layer mlp_norm = RMSNorm(d)
  layer mlp = SwiGLU(d, ffn)
  h = x + attn(attn_norm(x))
  return h + mlp(mlp_norm(h))
}

arch MoRRecursions(d: int = 128, heads: int = 4, ffn: int = 4 * d, n_r: int = 3, block_layers: int = 2,
                   alpha: float = 1.0) {
  input hidden: f32[B, T, d]
  layer core[block_layers] = Layer(d, heads, ffn)
  layer router = Linear(d, 1)
  x = hidden
  active = full([B, T], 1, dtype = "bool")
  repeat r in n_r {
    s = router(x)[:, :, 0]
    route x by topk(s, capacity = CAPACITY, among = active) weight alpha * sigmoid(s) as active {
      repeat j in block_layers {
        x = core[j](x)
      }
    }
  }
  output y = x
}
"""


def build(capacity: float, passes: list[str]):
    """(IR after `passes`, an instance of its generated module) for one capacity."""
    (g,) = api.check(SOURCE.replace("CAPACITY", repr(capacity)))
    h = run_pipeline(g, passes)
    mod = types.ModuleType("archc_bench_adaptive_depth")
    exec(compile(generate([h]).source, "<archc-bench-adaptive-depth>", "exec"), mod.__dict__)
    torch.manual_seed(0)
    return h, mod.MoRRecursions()


def walls(models: dict, x, reps: int) -> dict:
    """Median forward time of each model; the models take turns, so load drifts hit them alike."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        order = list(models.items())
        for rep in range(reps):
            for k, m in (order if rep % 2 == 0 else order[::-1]):     # ABBA: no variant always goes first
                t0 = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def schedules(g) -> str:
    return ", ".join(sorted({n.attr("schedule") for n in g.walk() if n.attr("schedule")}))


def schedule_table(capacity: float, seqs, batch: int, reps: int, seed: int) -> list[str]:
    """Markdown rows: per length, the schedule -O2 picks and both schedules' forced wall times."""
    lines = ["| T | -O2 picks | compacted (ms) | masked (ms) | masked / compacted |", "|---|---|---|---|---|"]
    for seq in seqs:
        xs = torch.randn(batch, seq, 128, generator=torch.Generator().manual_seed(seed))
        picked = schedules(build(capacity, [f"schedule-depth{{seq={seq},batch={batch}}}"])[0])
        forced = {s: build(capacity, [f"schedule-depth{{strategy={s}}}", *PRESETS["O1"]])[1] for s in ("compact", "mask")}
        t = walls(forced, xs, reps)
        lines.append(f"| {seq} | {picked} | {t['compact'] * 1e3:.2f} | {t['mask'] * 1e3:.2f} | "
                     f"{t['mask'] / t['compact']:.2f} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, oversubscribed machine every op's thread barrier "
                         "otherwise waits for a descheduled peer)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    T, B = args.seq, args.batch
    o2 = ["insert-kv-sharing", f"schedule-depth{{seq={T},batch={B}}}", *PRESETS["O1"]]
    x = torch.randn(B, T, 128, generator=torch.Generator().manual_seed(1))
    built = {cap: build(cap, o2) for cap in (1.0, 0.25)}
    secs = walls({cap: m for cap, (_, m) in built.items()}, x, args.reps)
    rows = {cap: (schedules(g), cost(g).evaluate({"B": B, "T": T})["flops"], secs[cap]) for cap, (g, _) in built.items()}
    ref_flops, ref_time = rows[1.0][1], rows[1.0][2]
    lines = [f"# Adaptive depth: MoR's routed recursions, capacity 0.25 vs 1.0 (T={T}, batch {B}, fp32, CPU)", "",
             f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"d=128, heads=4, ffn=512, n_r=3, block_layers=2; median of {args.reps} forwards each (no_grad, "
             f"the variants taking turns), one run", "",
             "| capacity | schedule (-O2) | FLOPs (cost model) | FLOPs ratio | wall time (ms) | time ratio |",
             "|---|---|---|---|---|---|"]
    for cap, (sched, flops, secs) in rows.items():
        lines.append(f"| {cap} | {sched} | {flops / 1e9:.3f} G | {flops / ref_flops:.3f} | {secs * 1e3:.1f} | "
                     f"{secs / ref_time:.3f} |")
    f_ratio, t_ratio = rows[0.25][1] / ref_flops, rows[0.25][2] / ref_time
    lines += ["", f"Targets: FLOPs ratio <= 0.40 ({'met' if f_ratio <= 0.40 else 'MISSED'}: {f_ratio:.3f}); "
                  f"wall-time ratio <= 0.55 ({'met' if t_ratio <= 0.55 else 'MISSED'}: {t_ratio:.3f}).", ""]
    whole = {}
    for cap in (1.0, 0.25):
        src = stdlib.source("mor").replace("capacity = (n_r - r) / n_r", f"capacity = {cap}")
        g = next(g for g in api.check(src) if g.name == "MoR")
        whole[cap] = cost(run_pipeline(g, o2)).evaluate({"B": B, "T": T, "d": 128, "heads": 4})["flops"]
    lines += [f"The whole stdlib MoR at the same sizes (embedding, the unshared first and last layers and the "
              f"{256}-way head included, which routing does not touch): FLOPs ratio "
              f"{whole[0.25] / whole[1.0]:.3f} ({whole[0.25] / 1e9:.3f} G vs {whole[1.0] / 1e9:.3f} G).", ""]
    lines += ["## Masking vs compaction at capacity 0.25", "",
              "Both schedules forced (`schedule-depth{strategy=...}`); `-O2 picks` is the cost model's choice at "
              "that length (default overhead 2^21 FLOP-equivalents per route execution).", "",
              *schedule_table(0.25, (16, 64, 256, T), B, args.reps, seed=2)]
    lines += ["", "## Masking vs compaction at capacity 1.0", "",
              "Every token is selected: compaction only adds a top-k, a sort, a gather and a scatter.", "",
              *schedule_table(1.0, (64, T), B, args.reps, seed=3)]
    lines += ["", "Reading the tables: below capacity 1 compaction's advantage grows with T (attention is quadratic "
              "in the tokens that run); at short T the extra top-k/gather/scatter launches weigh as much as the "
              "saved arithmetic, and the overhead constant decides. At capacity 1 both schedules do the same "
              "arithmetic and masking only drops the selection and the gather/scatter (small next to the body); "
              "its point there is that the route becomes token-wise, so K/V-cached decoding applies "
              "(bench/results/decode_cache.md)."]
    text = "\n".join(lines) + "\n"
    print(text)
    (Path(__file__).parent / "results" / "adaptive_depth.md").write_text(text)


if __name__ == "__main__":
    main()
