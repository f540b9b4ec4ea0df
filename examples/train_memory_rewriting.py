"""Memory rewriting: gated recurrences and a forget-gated memory overwrite, an additive memory cannot.

Trains the baseline agent cores of stdlib/memory_rewriting_bench.arch ("Memory Retention Is Not
Enough to Master Memory Tasks in Reinforcement Learning") on the same last-write-wins sequences
(`archc.tasks.last_write_batch`): values are shown at random steps, each one overwriting the
value before it, and the last step asks for the value shown last (chance 1/4). Models:

* GRUAgent, LSTMAgent: gated recurrences, h_t = z_t * h_{t-1} + (1 - z_t) * n_t;
* ForgetMemoryAgent: a matrix memory S_t = f_t * S_{t-1} + i_t v_t k_t^T with a trainable forget
  gate f_t and write gate i_t;
* AdditiveMemoryAgent: the same memory and write gate without forgetting (f_t = 1, archc's
  LinearMemory): its state at the query is a sum over the writes, the same whatever their order;
* AttentionAgent: a 2-layer causal Transformer over the whole sequence (full run only), and the
  same with a 4-step window (2 layers see 7 steps back), which cannot see early writes.

Training: 1 to 4 writes per 24-step sequence, cross-entropy on the query step only. Evaluation on
held-out sequences: "retention" (one write: nothing to overwrite), "rewriting" (2 to 4 writes), the
fraction of rewriting answers that name an overwritten, stale value, and both again on sequences
twice as long as any in training ("long ret.": one write; "long rew.": 2 to 8 writes). The
"order-blind bound" is the best accuracy any model whose answer ignores the order of the writes can
reach on the rewriting set (for each multiset of written values, the most frequent last value); the
additive memory is such a model.

    python examples/train_memory_rewriting.py          # full run
    python examples/train_memory_rewriting.py --quick  # seconds-long reduced run, as in the tests
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

from archc import stdlib
from archc.tasks import last_write_batch
from archc.training import example_cli, progress

VALUES = 4
FULL = {"iters": 400, "length": 24, "batch": 64, "test": 2000,
        "models": ["GRUAgent", "LSTMAgent", "ForgetMemoryAgent", "AdditiveMemoryAgent", "AttentionAgent",
                   "AttentionAgent, window 4"]}
QUICK = {"iters": 60, "length": 12, "batch": 64, "test": 500,
         "models": ["GRUAgent", "ForgetMemoryAgent", "AdditiveMemoryAgent"]}
LR = 1e-2


def build(name: str):
    if name.startswith("AttentionAgent, window"):
        window = int(name.split()[-1])
        return stdlib.load("memory_rewriting_bench", arch="AttentionAgent", actions=VALUES, window=window)
    return stdlib.load("memory_rewriting_bench", arch=name, actions=VALUES)


def answers(model, obs: torch.Tensor) -> torch.Tensor:
    out = model(obs)
    logits = out["logits"] if isinstance(out, dict) else out
    return logits[:, -1].argmax(-1)


def order_blind_bound(obs: torch.Tensor, targets: torch.Tensor) -> float:
    """The best accuracy of a predictor that sees only the multiset of written values."""
    by_multiset: dict[tuple, Counter] = defaultdict(Counter)
    for row, y in zip(obs.tolist(), targets.tolist()):
        by_multiset[tuple(sorted(v for v in row if v < VALUES))][y] += 1
    return sum(max(c.values()) for c in by_multiset.values()) / len(targets)


def stale(pred: torch.Tensor, obs: torch.Tensor, targets: torch.Tensor) -> float:
    """The fraction of answers that are a value written earlier and overwritten since."""
    written = F.one_hot(obs, VALUES + 2)[..., :VALUES].any(1)          # [batch, VALUES]
    hit = written.gather(1, pred[:, None])[:, 0] & (pred != targets)
    return hit.float().mean().item()


def main(quick: bool = False, seed: int = 0, threads: int = 1, **overrides) -> dict:
    """Train each model on the same sequences; returns the measured numbers."""
    cfg = {**(QUICK if quick else FULL), **overrides}
    torch.set_num_threads(threads)
    start, cpu_start = time.time(), time.process_time()
    T, n = cfg["length"], cfg["test"]
    sets = {"retention": last_write_batch(n, T, VALUES, writes=(1, 1), seed=seed + 1001),
            "rewriting": last_write_batch(n, T, VALUES, writes=(2, 4), seed=seed + 1002),
            "long retention": last_write_batch(n, 2 * T, VALUES, writes=(1, 1), seed=seed + 1003),
            "long rewriting": last_write_batch(n, 2 * T, VALUES, writes=(2, 8), seed=seed + 1004)}
    bound = order_blind_bound(*sets["rewriting"][:2])
    rows = []
    for name in cfg["models"]:
        torch.manual_seed(seed)
        model = build(name)
        opt = torch.optim.Adam(model.parameters(), lr=LR)
        t0 = time.time()
        model.train()
        for it in range(1, cfg["iters"] + 1):
            obs, targets, _ = last_write_batch(cfg["batch"], T, VALUES, writes=(1, 4), seed=seed * 100_003 + it)
            out = model(obs)
            logits = out["logits"] if isinstance(out, dict) else out
            loss = F.cross_entropy(logits[:, -1], targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if it % 10 == 0 or it == cfg["iters"]:
                progress(name, it, cfg["iters"], t0, loss.item(), label_width=24)
        seconds = time.time() - t0
        model.eval()
        row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "seconds": seconds}
        with torch.no_grad():
            for key, (obs, targets, _) in sets.items():
                pred = answers(model, obs)
                row[key] = (pred == targets).float().mean().item()
                if key == "rewriting":
                    row["stale"] = stale(pred, obs, targets)
        rows.append(row)

    print(f"\nLast-write-wins recall ({VALUES} values, chance {1 / VALUES:.2f}), {cfg['iters']} updates of batch "
          f"{cfg['batch']} at length {T} with 1-4 writes, {n} test sequences per column; "
          f"order-blind bound on rewriting {bound:.3f}")
    print(f"{'model':<26} {'params':>7} {'train s':>8} {'retention':>10} {'rewriting':>10} {'stale':>6} "
          f"{'long ret.':>10} {'long rew.':>10}")
    for r in rows:
        print(f"{r['model']:<26} {r['params']:>7} {r['seconds']:>8.1f} {r['retention']:>10.3f} "
              f"{r['rewriting']:>10.3f} {r['stale']:>6.3f} {r['long retention']:>10.3f} {r['long rewriting']:>10.3f}")
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    print(f"total {seconds:.0f}s wall, {cpu_seconds:.0f}s CPU")
    return {"rows": rows, "bound": bound, "accuracy": {r["model"]: r["rewriting"] for r in rows},
            "seconds": seconds, "cpu_seconds": cpu_seconds}


if __name__ == "__main__":
    example_cli(main, __doc__, "reduced run (GRU and the two memories only)")
