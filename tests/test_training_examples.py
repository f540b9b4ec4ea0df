"""The training scripts in examples/ show their effects in their reduced (--quick) runs.

Each test imports a script's `main`, runs it with its quick settings (seed 0, one thread) and
asserts the direction of the effect the script demonstrates. The bounds leave wide margins to what
the quick runs measured over seeds 0, 1 and 2 (examples/README.md, "Training results", lists the
numbers), so they are not flaky. The three take about three CPU-minutes together.
"""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"archc_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def never_drops(values: list[float], slack: float = 0.02) -> bool:
    return all(b >= a - slack for a, b in itertools.pairwise(values))


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The scripts set torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_depth_recurrent_more_steps_at_test_time_solve_more_hops():
    r = script("train_depth_recurrent").main(quick=True)
    S = r["train_steps"]
    near_solved, far_solved, far_node = r["near_solved"], r["far_solved"], r["far_node"]
    assert r["steps"] == [*range(1, 2 * S + 1), 3 * S, 4 * S]
    # within the trained depth: one step solves few graphs, S steps (nearly) all (seeds 0-2: 0.27-0.32 -> 1.0)
    assert near_solved[0] <= 0.5
    assert near_solved[S - 1] >= 0.95
    assert never_drops(near_solved)                       # extra steps do not undo solved graphs
    # paths longer than any seen in training: S steps solve none; 4S steps solve many
    # (seeds 0-2: 0.0 -> 1.0, 0.49, 0.48 graphs; node accuracy +0.07 to +0.11)
    assert far_solved[S - 1] <= 0.05
    assert far_solved[-1] >= far_solved[S - 1] + 0.3
    assert far_node[-1] >= far_node[S - 1] + 0.04
    assert never_drops(far_solved)


def test_hrm_beats_a_non_recurrent_transformer_with_the_same_parameters():
    r = script("train_hrm_vs_baseline").main(quick=True)
    hrm, base = r["hrm"], r["baseline"]
    assert abs(hrm["params"] - base["params"]) <= 0.01 * base["params"]
    assert hrm["iters"] == base["iters"]
    # seeds 0-2: blank-cell accuracy +0.07 to +0.16, puzzles solved +0.43 to +0.73
    assert hrm["cell_acc"] >= base["cell_acc"] + 0.03
    assert hrm["solved"] >= base["solved"] + 0.25


def test_memory_recalls_pairs_that_window_attention_cannot_see():
    r = script("train_memory_recall").main(quick=True)
    recall = r["recall"]
    # seeds 0-2: MemoryCachingGRM 0.83-0.91, the window model 0.11-0.12 (chance is 1/8)
    assert recall["MemoryCachingGRM"] >= 0.6
    assert recall["WindowAttentionLM"] <= 0.2
    assert recall["MemoryCachingGRM"] >= recall["WindowAttentionLM"] + 0.4
