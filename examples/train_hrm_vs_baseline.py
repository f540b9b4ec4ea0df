"""HRM versus a non-recurrent Transformer with the same parameters, on 4x4 Sudoku.

Trains stdlib/hrm.arch (two 2-layer Transformer modules iterated at two timescales: l_cycles
low-level steps per high-level step, h_cycles high-level steps per segment, `segments` segments)
and examples/post_norm_transformer.arch (the same post-norm layer stacked 4 deep and applied
once) on the same puzzles with the same optimiser, batch and number of updates, then compares
how many blank cells each fills correctly and how many puzzles each solves completely.

The puzzles are minimal 4x4 Sudokus: a random one of the 288 solution grids with clues removed in
random order for as long as the solution stays unique (about 4.4 clues left on average), so most
cells can only be deduced after other blanks are filled. Each cell is one token,
`position * 5 + digit` (digit 0 = blank): HRM's only positional signal is RoPE, which is relative,
while a Sudoku's rows, columns and boxes are absolute, so the cell's position is part of its token.
Both models predict a digit for each of the 16 cells (the logits of tokens 1..4).

HRM runs 4 segments x 2 H-cycles x (2 L-steps + 1 H-step) = 24 applications of a 2-layer module
per forward pass and trains with its one-step gradient; its ACT Q-head is not trained here
(no Q-learning loss), so it never halts early. The baseline's 4 layers have the same shapes as
HRM's low and high modules, so the two parameter counts differ only by HRM's two initial states
and Q-head.

HRM does far more computation per update than the baseline, so the full run also trains the
baseline for 5x the updates. The table counts training compute in layer passes (one forward
pass of one layer over the batch = 1, its backward = 2): per update HRM runs 48 layers forward
(only the last L-step and H-step, 4 layers, keep gradients: + 8 backward) = 56, the baseline
4 forward + 8 backward = 12, so "Transformer x5" (60 per HRM update) gets at least HRM's compute.

    python examples/train_hrm_vs_baseline.py          # full run
    python examples/train_hrm_vs_baseline.py --quick  # seconds-long smoke run, as in the tests
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import archc
from archc import stdlib
from archc.training import example_cli, progress

BASELINE = Path(__file__).resolve().parent / "post_norm_transformer.arch"
MODEL = {"d": 32, "heads": 2, "segments": 4, "h_cycles": 2, "l_cycles": 2, "lr": 1e-2, "batch": 64}
FULL = {**MODEL, "iters": 500, "baseline_long": 5, "train_puzzles": 10000, "test_puzzles": 1000}
QUICK = {**MODEL, "iters": 15, "baseline_long": 0, "train_puzzles": 300, "test_puzzles": 100}


def all_grids() -> np.ndarray:
    """The 288 solved 4x4 Sudokus, [288, 16] with digits 1..4."""
    rows = list(itertools.permutations(range(1, 5)))
    grids = []
    for g in itertools.product(rows, repeat=4):
        a = np.array(g)
        if any(len(set(a[:, c])) < 4 for c in range(4)):
            continue
        if any(len(set(a[r:r + 2, c:c + 2].ravel())) < 4 for r in (0, 2) for c in (0, 2)):
            continue
        grids.append(a.ravel())
    return np.stack(grids)


def make_puzzles(n: int, grids: np.ndarray, rng: np.random.Generator):
    """n minimal puzzles: (solutions [n, 16], givens mask [n, 16])."""
    sols = grids[rng.integers(len(grids), size=n)]
    givens = np.ones((n, 16), bool)
    for i in range(n):
        for cell in rng.permutation(16):
            givens[i, cell] = False
            mask = givens[i]
            if ((grids[:, mask] == sols[i, mask]).all(1)).sum() > 1:   # no longer unique: keep it
                givens[i, cell] = True
    return sols, givens


def encode(sols: np.ndarray, givens: np.ndarray):
    tokens = np.arange(16) * 5 + np.where(givens, sols, 0)
    return torch.from_numpy(tokens), torch.from_numpy(sols - 1)


def digit_logits(model, tokens):
    out = model(tokens)
    logits = out["logits"] if isinstance(out, dict) else out
    return logits[..., 1:5]


def train(model, label: str, iters: int, cfg: dict, data, rng: np.random.Generator) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=iters, pct_start=0.1)
    sols, givens = data
    start = time.time()
    model.train()
    for it in range(1, iters + 1):
        idx = rng.integers(len(sols), size=cfg["batch"])
        tokens, target = encode(sols[idx], givens[idx])
        loss = F.cross_entropy(digit_logits(model, tokens).reshape(-1, 4), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if it % 5 == 0 or it == iters:
            progress(label, it, iters, start, loss.item(), label_width=16)
    return time.time() - start


def evaluate(model, data) -> tuple[float, float]:
    tokens, target = encode(*data)
    model.eval()
    with torch.no_grad():
        right = digit_logits(model, tokens).argmax(-1) == target
    blank = ~torch.from_numpy(data[1])
    return right[blank].float().mean().item(), right.all(1).float().mean().item()


def layer_passes(name: str, cfg: dict) -> int:
    """Training compute of one update in layer passes (a layer's forward = 1, its backward = 2).

    HRM applies its two 2-layer modules segments * h_cycles * (l_cycles + 1) times forward; the
    one-step gradient backpropagates through the last L-step and H-step of the last segment only.
    """
    if name == "HRM":
        return 2 * cfg["segments"] * cfg["h_cycles"] * (cfg["l_cycles"] + 1) + 2 * (2 + 2)
    return 4 + 2 * 4


def main(quick: bool = False, seed: int = 0, threads: int = 1, **overrides) -> dict:
    """Train HRM and the baseline on the same puzzles; returns the measured numbers."""
    cfg = {**(QUICK if quick else FULL), **overrides}
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    start, cpu_start = time.time(), time.process_time()
    grids = all_grids()
    train_data = make_puzzles(cfg["train_puzzles"], grids, rng)
    test_data = make_puzzles(cfg["test_puzzles"], grids, np.random.default_rng(seed + 1000))
    print(f"{cfg['train_puzzles']} training / {cfg['test_puzzles']} test puzzles, "
          f"{train_data[1].sum(1).mean():.2f} clues on average ({time.time() - start:.0f}s)")

    runs = [("HRM", cfg["iters"]), ("Transformer", cfg["iters"])]
    if cfg["baseline_long"]:
        runs.append((f"Transformer x{cfg['baseline_long']}", cfg["iters"] * cfg["baseline_long"]))
    rows = []
    for name, iters in runs:
        torch.manual_seed(seed)
        if name == "HRM":
            model = stdlib.load("hrm", vocab=80, d=cfg["d"], heads=cfg["heads"], h_cycles=cfg["h_cycles"],
                                l_cycles=cfg["l_cycles"], segments=cfg["segments"])
        else:
            model = archc.load(BASELINE, arch="PostNormTransformer", vocab=80, d=cfg["d"], heads=cfg["heads"], depth=4)
        seconds = train(model, name, iters, cfg, train_data, np.random.default_rng(seed + 1))
        cell, solved = evaluate(model, test_data)
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()), "iters": iters,
                     "passes": iters * layer_passes(name, cfg), "seconds": seconds, "cell_acc": cell,
                     "solved": solved})

    print(f"\n4x4 Sudoku (minimal puzzles), d={cfg['d']}, batch {cfg['batch']}, test on {cfg['test_puzzles']} "
          f"unseen puzzles")
    print(f"{'model':<16} {'params':>8} {'updates':>8} {'layer passes':>13} {'train s':>8} {'blank-cell acc':>15} "
          f"{'solved':>8}")
    for r in rows:
        print(f"{r['model']:<16} {r['params']:>8} {r['iters']:>8} {r['passes']:>13} {r['seconds']:>8.0f} "
              f"{r['cell_acc']:>15.3f} {r['solved']:>8.3f}")
    print("layer passes: training compute, one layer's forward pass over a batch = 1, its backward = 2")
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    print(f"total {seconds:.0f}s wall, {cpu_seconds:.0f}s CPU")
    return {"rows": rows, "hrm": rows[0], "baseline": rows[1], "seconds": seconds, "cpu_seconds": cpu_seconds}


if __name__ == "__main__":
    example_cli(main, __doc__, "smoke run in seconds (too short to show the effect)")
