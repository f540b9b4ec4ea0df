"""onnxruntime decode per token: the state graph (`state_decode`, SPEC §21.4) against the recompute
graph (`recompute_decode`) of the same model, at a short and a long context.

    python -m bench.onnx_decode_state            # writes bench/results/onnx_decode_state.md
    python -m bench.onnx_decode_state --smoke    # tiny contexts, one model: checks the script

Each model: prefill a random prompt of `context` tokens through the graph (the state graph one
token per call is too slow for a long prompt, so the state graph is prefilled in one call), then
time `steps` single-token calls; the median per token. The two graphs of one model are timed
interleaved (state step, recompute step, ...), one onnxruntime thread each.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODELS = [("memory_caching", "MemoryCachingGRM"), ("titans", "TitansMAC"), ("miras", "MirasMoneta"),
          ("memory_rewriting_bench", "GRUAgent")]
RESULTS = Path(__file__).resolve().parent / "results"


def _graphs(name: str, arch: str):
    from archc import stdlib
    from archc.backends.onnx import export_decode, seeded_weights, session
    g = next(x for x in stdlib.graphs(name) if x.name == arch)
    w = seeded_weights(g, seed=0)
    return {kind: session(export_decode(g, w, kind=kind).model, threads=1)
            for kind in ("state_decode", "recompute_decode")}


def _vocab(sess) -> int:
    out = next(o for o in sess.get_outputs() if o.name == "logits")
    return int(out.shape[-1]) if isinstance(out.shape[-1], int) else 16


def _step(sess, feeds: dict) -> dict:
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feeds)))
    return {n.replace("present", "past", 1): v for n, v in outs.items() if n.startswith("present")}


def measure(name: str, arch: str, contexts: list[int], steps: int, seed: int = 0) -> list[dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from onnx_generate import empty_caches
    sessions = _graphs(name, arch)
    vocab = _vocab(sessions["state_decode"])
    rng = np.random.default_rng(seed)
    rows = []
    for context in contexts:
        tokens = rng.integers(0, vocab, (1, context + steps), dtype=np.int64)
        caches = {}
        for kind, sess in sessions.items():
            caches[kind] = _step(sess, {"tokens": tokens[:, :context], **empty_caches(sess, 1)})
        times = {kind: [] for kind in sessions}
        for i in range(context, context + steps):
            for kind, sess in sessions.items():
                feeds = {"tokens": tokens[:, i:i + 1], **caches[kind]}
                start = time.perf_counter()
                caches[kind] = _step(sess, feeds)
                times[kind].append(time.perf_counter() - start)
        state_bytes = sum(v.nbytes for v in caches["state_decode"].values())
        rows.append({"model": arch, "context": context,
                     "state_ms": 1e3 * statistics.median(times["state_decode"]),
                     "recompute_ms": 1e3 * statistics.median(times["recompute_decode"]),
                     "state_bytes": state_bytes})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | context | state graph ms/token | recompute graph ms/token | recompute / state | state bytes |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['context']} | {r['state_ms']:.2f} | {r['recompute_ms']:.2f} | "
                     f"{r['recompute_ms'] / r['state_ms']:.1f}x | {r['state_bytes']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--contexts", default="256,2048")
    ap.add_argument("-o", "--output", default=str(RESULTS / "onnx_decode_state.md"))
    args = ap.parse_args(argv)
    models = MODELS[:1] if args.smoke else MODELS
    contexts = [16, 40] if args.smoke else [int(c) for c in args.contexts.split(",")]
    steps = 2 if args.smoke else args.steps
    rows = [r for name, arch in models for r in measure(name, arch, contexts, steps)]
    import onnxruntime
    head = (f"# onnxruntime decode: state graph vs recompute graph\n\n"
            f"{datetime.date.today()}, `python -m bench.onnx_decode_state{' --smoke' if args.smoke else ''}`, "
            f"onnxruntime {onnxruntime.__version__}, one intra-op thread, {platform.machine()} CPU "
            f"(a shared 2-core machine: ratios from one run, medians of {steps} steps).\n\n")
    text = head + table(rows)
    if args.smoke:
        print(text)
        return 0
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
