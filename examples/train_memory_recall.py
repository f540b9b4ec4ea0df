"""Associative recall beyond the attention window: memory models versus window attention.

Trains three models on the same key -> value recall sequences and measures how often each returns
the right value when a key is queried ~50 tokens after it was stored:

* MemoryCachingGRM (stdlib/memory_caching.arch): a linear-attention memory S += v k^T carried
  across segments, with the state of every past segment cached and mixed back in;
* TitansMAC (stdlib/titans.arch; full run only): attention inside each 16-token segment plus a
  neural long-term memory (an MLP whose weights are written by gradient steps at test time),
  read into the segment as extra context tokens;
* WindowAttentionLM (examples/window_attention.arch): 2 causal attention layers with a sliding
  window of 16 tokens, so it sees at most the last 31 tokens, and no memory.

Sequences are 64 tokens, 4 segments of 16. The first segment holds 6 key-value pairs (8 keys,
8 values; a pair is one token, `pair(k, v)`) at random positions among filler tokens; the next two
segments are filler; the last 4 tokens are queries `query(k)` for stored keys, each trained and
scored on the value stored with k (chance: 1/8). Every query is at least 45 tokens after every pair,
beyond what the window model can attend to, and in a different segment from it, so the memory
models can only answer from memory. The full run also trains the window model with a 64-token
window (full causal attention) as a control showing the task is learnable when the pairs are
visible.

    python examples/train_memory_recall.py          # full run
    python examples/train_memory_recall.py --quick  # seconds-long reduced run (no Titans), as in the tests
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import archc
from archc import stdlib
from archc.training import example_cli, progress

WINDOW_ARCH = Path(__file__).resolve().parent / "window_attention.arch"
KEYS = VALUES = 8
FILLER = 16
PAIR0 = FILLER                     # pair(k, v) = PAIR0 + k * VALUES + v
QUERY0 = PAIR0 + KEYS * VALUES     # query(k) = QUERY0 + k
VOCAB = QUERY0 + KEYS
SEQ, SEG, PAIRS, QUERIES = 64, 16, 6, 4
WINDOW = 16

FULL = {"iters": 600, "d": 32, "batch": 64, "test": 2000,
        "models": ["MemoryCachingGRM", "TitansMAC", "WindowAttentionLM", "full attention (control)"]}
QUICK = {"iters": 80, "d": 32, "batch": 64, "test": 300, "models": ["MemoryCachingGRM", "WindowAttentionLM"]}
LR = {"MemoryCachingGRM": 2e-2, "TitansMAC": 5e-3, "WindowAttentionLM": 1e-2, "full attention (control)": 3e-3}


def make_batch(batch: int, rng: np.random.Generator):
    """tokens [batch, SEQ]; targets [batch, QUERIES]: the values asked for by the last QUERIES tokens."""
    tokens = rng.integers(0, FILLER, (batch, SEQ))
    targets = np.zeros((batch, QUERIES), np.int64)
    for b in range(batch):
        keys = rng.choice(KEYS, PAIRS, replace=False)
        values = rng.integers(0, VALUES, PAIRS)
        tokens[b, np.sort(rng.choice(SEG, PAIRS, replace=False))] = PAIR0 + keys * VALUES + values
        asked = rng.integers(0, PAIRS, QUERIES)
        tokens[b, SEQ - QUERIES:] = QUERY0 + keys[asked]
        targets[b] = values[asked]
    return torch.from_numpy(tokens), torch.from_numpy(targets)


def build(name: str, d: int):
    if name == "MemoryCachingGRM":
        return stdlib.load("memory_caching", arch="MemoryCachingGRM", vocab=VOCAB, d=d, seg=SEG,
                           max_segments=SEQ // SEG)
    if name == "TitansMAC":
        # max_lr: the inner write's learning rate cap; 1.0 (default 0.1) lets one write store a pair
        return stdlib.load("titans", vocab=VOCAB, d=d, heads=4, seg=SEG, persist=4, max_lr=1.0)
    window = WINDOW if name == "WindowAttentionLM" else SEQ
    return archc.load(WINDOW_ARCH, arch="WindowAttentionLM", vocab=VOCAB, d=d, heads=4, depth=2, window=window)


def value_logits(model, tokens):
    return model(tokens)[:, SEQ - QUERIES:, :VALUES]       # the value classes at the query positions


def main(quick: bool = False, seed: int = 0, threads: int = 1, **overrides) -> dict:
    """Train each model on the same sequences; returns the measured numbers."""
    cfg = {**(QUICK if quick else FULL), **overrides}
    torch.set_num_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    test_tokens, test_targets = make_batch(cfg["test"], np.random.default_rng(seed + 1000))
    rows = []
    for name in cfg["models"]:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)            # the same training sequences for every model
        model = build(name, cfg["d"])
        lr = LR[name]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=cfg["iters"], pct_start=0.1)
        t0 = time.time()
        model.train()
        for it in range(1, cfg["iters"] + 1):
            tokens, targets = make_batch(cfg["batch"], rng)
            loss = F.cross_entropy(value_logits(model, tokens).reshape(-1, VALUES), targets.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if it % 10 == 0 or it == cfg["iters"]:
                progress(name, it, cfg["iters"], t0, loss.item())
        seconds = time.time() - t0
        model.eval()
        with torch.no_grad():
            recall = (value_logits(model, test_tokens).argmax(-1) == test_targets).float().mean().item()
        span = {"MemoryCachingGRM": "all (memory)", "TitansMAC": f"{SEG} + memory",
                "WindowAttentionLM": f"{2 * (WINDOW - 1) + 1}", "full attention (control)": f"{SEQ}"}[name]
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "lr": lr,
                     "seconds": seconds, "recall": recall, "sees": span})

    print(f"\nKey-value recall at distance >= {SEQ - SEG - QUERIES + 1} tokens ({PAIRS} pairs, {KEYS} keys, "
          f"{VALUES} values: chance {1 / VALUES:.3f}), d={cfg['d']}, {cfg['iters']} updates of batch "
          f"{cfg['batch']}, {cfg['test']} test sequences")
    print(f"{'model':<26} {'params':>7} {'sees (tokens back)':>19} {'train s':>8} {'recall':>7}")
    for r in rows:
        print(f"{r['model']:<26} {r['params']:>7} {r['sees']:>19} {r['seconds']:>8.0f} {r['recall']:>7.3f}")
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    print(f"total {seconds:.0f}s wall, {cpu_seconds:.0f}s CPU")
    return {"rows": rows, "recall": {r["model"]: r["recall"] for r in rows}, "seconds": seconds,
            "cpu_seconds": cpu_seconds}


if __name__ == "__main__":
    example_cli(main, __doc__, "reduced run (MemoryCachingGRM and the window model only)")
