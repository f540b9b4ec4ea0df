"""Depth recurrence: more thinking steps at test time solve more hops.

Trains stdlib/depth_recurrent.arch (one shared Transformer block iterated `steps` times, with
an attention mask input) on graph reachability with at most S steps, then evaluates the trained
model at 1 .. 2S, 3S and 4S steps.

The task: a graph of n nodes made of disjoint paths; one node is marked as the source (token 1,
every other node token 0). `adj` holds the path edges plus self loops and is the attention mask,
so one application of the block can move information exactly one hop. The label of a node is 1
when it lies on the source's path (reachable from the source), else 0. The model has no position
information: it can only find the answer by propagating "reached" along the edges, one hop per
step, so k steps can settle nodes at most k hops from the source.

Training draws the step count k of each batch uniformly from 1 .. S (as recurrent-depth models
are trained, so that the block learns one rule for every step count rather than a fixed-length
program) and gives that batch graphs whose nodes are all at most k hops from the source. Only the
final state is supervised. Evaluation:

* "within S hops": held-out 16-node graphs drawn like the training ones (at most S hops);
* "S+1 .. 2S hops": 24-node graphs whose source sits at the end of a path of S+1 .. 2S hops,
  longer than any path seen in training.

The table shows node accuracy and the fraction of graphs solved (every node right) per number of
steps. The changeable step count is the model's own: `model.steps = k` on the trained instance.

    python examples/train_depth_recurrent.py          # full run (S = 6)
    python examples/train_depth_recurrent.py --quick  # reduced run (S = 4), as in the tests
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from archc import stdlib
from archc.training import example_cli, progress

FULL = {"train_steps": 6, "iters": 300, "d": 32, "heads": 2, "lr": 1e-2, "batch": 64, "eval_graphs": 512}
QUICK = {"train_steps": 4, "iters": 150, "d": 32, "heads": 2, "lr": 1e-2, "batch": 64, "eval_graphs": 256}


def make_graphs(batch: int, nodes: int, min_hops: int, max_hops: int, rng: np.random.Generator,
                source_at_end: float = 0.5):
    """Graphs of disjoint paths. The source's path has min_hops+1 .. max_hops+1 nodes; other paths
    have at most max_hops+1 nodes. With probability `source_at_end` the source is an end of its path
    (its farthest node is then exactly len-1 hops away), otherwise a random node of it."""
    tokens = np.zeros((batch, nodes), np.int64)
    adj = np.zeros((batch, nodes, nodes), bool)
    labels = np.zeros((batch, nodes), np.int64)
    eye = np.arange(nodes)
    for b in range(batch):
        order = rng.permutation(nodes)
        length = int(rng.integers(min_hops + 1, max_hops + 2))
        paths, i = [order[:length]], length
        while i < nodes:
            n = min(int(rng.integers(1, max_hops + 2)), nodes - i)
            paths.append(order[i:i + n])
            i += n
        for path in paths:
            adj[b, path[:-1], path[1:]] = True
            adj[b, path[1:], path[:-1]] = True
        adj[b, eye, eye] = True
        at = 0 if rng.random() < source_at_end else int(rng.integers(length))
        tokens[b, paths[0][at]] = 1
        labels[b, paths[0]] = 1
    return torch.from_numpy(tokens), torch.from_numpy(adj), torch.from_numpy(labels)


def main(quick: bool = False, seed: int = 0, threads: int = 1, **overrides) -> dict:
    """Train at 1 .. S steps, evaluate at 1 .. 2S, 3S and 4S; returns the measured numbers."""
    cfg = {**(QUICK if quick else FULL), **overrides}
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    S = cfg["train_steps"]

    model = stdlib.load("depth_recurrent", vocab=2, d=cfg["d"], heads=cfg["heads"], steps=S, classes=2)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=cfg["iters"], pct_start=0.1)

    start, cpu_start = time.time(), time.process_time()
    model.train()
    for it in range(1, cfg["iters"] + 1):
        model.steps = int(rng.integers(1, S + 1))
        tokens, adj, labels = make_graphs(cfg["batch"], 16, 1, model.steps, rng)
        logits = model(tokens, adj)
        loss = F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if it % 10 == 0 or it == cfg["iters"]:
            progress(f"train steps<={S}", it, cfg["iters"], start, loss.item(), label_width=16)
    train_seconds = time.time() - start

    erng = np.random.default_rng(seed + 1000)
    sets = {
        "near": make_graphs(cfg["eval_graphs"], 16, 1, S, erng),
        "far": make_graphs(cfg["eval_graphs"], 24, S + 1, 2 * S, erng, source_at_end=1.0),
    }
    res = {"train_steps": S, "params": params, "train_seconds": train_seconds, "steps": [],
           "near_node": [], "near_solved": [], "far_node": [], "far_solved": []}
    model.eval()
    with torch.no_grad():
        for k in [*range(1, 2 * S + 1), 3 * S, 4 * S]:
            model.steps = k
            res["steps"].append(k)
            for name, (tokens, adj, labels) in sets.items():
                right = model(tokens, adj).argmax(-1) == labels
                res[f"{name}_node"].append(right.float().mean().item())
                res[f"{name}_solved"].append(right.all(1).float().mean().item())
    model.steps = S
    res["seconds"], res["cpu_seconds"] = time.time() - start, time.process_time() - cpu_start

    print(f"\nDepthRecurrent d={cfg['d']}, {params} parameters, trained {cfg['iters']} iterations at "
          f"1 .. {S} steps in {train_seconds:.0f}s")
    print(f"{'steps':>7} | {'within S hops':^23} | {'S+1 .. 2S hops':^23}")
    print(f"{'':>7} | {'node acc':>10} {'solved':>12} | {'node acc':>10} {'solved':>12}")
    for i, k in enumerate(res["steps"]):
        mark = "*" if k == S else " "
        print(f"{k:>6}{mark} | {res['near_node'][i]:>10.3f} {res['near_solved'][i]:>12.3f} | "
              f"{res['far_node'][i]:>10.3f} {res['far_solved'][i]:>12.3f}")
    print("* the most steps used in training")
    print(f"total {res['seconds']:.0f}s wall, {res['cpu_seconds']:.0f}s CPU")
    return res


if __name__ == "__main__":
    example_cli(main, __doc__, "reduced run (S = 4, fewer iterations)",
                {"--train-steps": "S, the most recurrence steps used in training"})
