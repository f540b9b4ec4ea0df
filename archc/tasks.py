"""Synthetic tasks that the analysis papers of the stdlib define (for tests and training scripts).

* SelectivBench (stdlib `selectivbench`): random artificial grammars whose ambiguous symbols are
  emitted by several states; the target of every element is the state that emitted it, so a model
  must remember the context that disambiguates it; gaps of rule-violating distractor symbols are
  inserted between elements and masked out of the loss.
* N-parity and N-delayed-match-to-sample (stdlib `timescale_curriculum`): binary streams whose
  targets need the last N inputs, one target per N (the multi-head curriculum's heads).
* Graph memorisation and in-weights path-finding (stdlib `geometric_memory`): the edges of a path
  or a random tree as "u v" pairs, and path queries "source target SEP path" over the same graph.
* Last-write-wins memory rewriting (stdlib `memory_rewriting_bench`): values shown at random
  times, each overwriting the one before, and a query at the end whose answer is the latest value.

Everything is seeded and CPU-only; sizes are small enough for unit tests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

END = 0          # the end-of-string symbol `#` of a grammar


@dataclass(frozen=True)
class Grammar:
    """A finite-state grammar: state s emits symbol `emits[s]` (0 is the end symbol `#`)."""

    emits: tuple[int, ...]                      # state -> symbol; state 0 is the end state
    successors: tuple[tuple[int, ...], ...]     # state -> allowed next states (equiprobable)
    start: tuple[int, ...]

    @property
    def symbols(self) -> int:
        return max(self.emits) + 1

    def allowed_symbols(self, state: int) -> set[int]:
        return {self.emits[s] for s in self.successors[state]}


def _reaches_end(successors: list[list[int]]) -> bool:
    reach = {END}
    changed = True
    while changed:
        changed = False
        for s, nxt in enumerate(successors):
            if s not in reach and any(n in reach for n in nxt):
                reach.add(s)
                changed = True
    return len(reach) == len(successors)


def selectivbench_grammar(alphabet: int = 6, ambiguities: int = 2, depth: int = 3, density: float = 0.3,
                          seed: int = 0) -> Grammar:
    """A random grammar as SelectivBench's generate_grammar draws it.

    `alphabet` symbols including the end symbol; `ambiguities` of them are emitted by `depth`
    states each. For every source state and symbol, one random state emitting that symbol becomes
    a successor with probability (number of such states) * density; the end state has no
    successors; grammars where some state cannot reach the end are redrawn.
    """
    rng = random.Random(seed)
    for _ in range(10_000):
        letters = list(range(1, alphabet))
        repeated = set(rng.sample(letters, ambiguities))
        emits = [END] + [a for a in letters for _ in range(depth if a in repeated else 1)]
        by_symbol = {a: [s for s, e in enumerate(emits) if e == a] for a in range(alphabet)}
        successors: list[list[int]] = [[] for _ in emits]
        for src in range(1, len(emits)):
            for a in range(alphabet):
                candidates = by_symbol[a]
                if rng.random() < len(candidates) * density:
                    successors[src].append(rng.choice(candidates))
            successors[src] = sorted(set(successors[src]))
        start = [s for s in range(1, len(emits)) if successors[s]]
        if _reaches_end(successors) and start:
            return Grammar(tuple(emits), tuple(tuple(s) for s in successors),
                           tuple(rng.sample(start, 1)))
    raise ValueError("no valid grammar for these parameters")


def selectivbench_batch(g: Grammar, batch: int, length: int, gap_prob: float = 0.3, gap_max: int = 3,
                        seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens, states, mask), each [batch, length]: strings of `g` back to back; after each element a
    gap of 1..gap_max distractor symbols (ones the grammar does not allow next) with probability
    gap_prob. `states[b, t]` is the state that emitted token t (the classification target);
    `mask` is false on distractors."""
    rng = random.Random(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    states = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        t, state = 0, END
        while t < length:
            state = rng.choice(g.start) if state == END else rng.choice(g.successors[state])
            tokens[b, t], states[b, t], mask[b, t] = g.emits[state], state, True
            t += 1
            if state != END and rng.random() < gap_prob:
                wrong = sorted(set(range(g.symbols)) - g.allowed_symbols(state))
                for _ in range(rng.randint(1, gap_max)):
                    if t >= length or not wrong:
                        break
                    tokens[b, t], states[b, t] = rng.choice(wrong), state
                    t += 1
    return tokens, states, mask


def n_parity(batch: int, length: int, ns: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [B, T] in {0, 1}, targets [B, T, len(ns)], mask [B, T, len(ns)]): target j at t is
    the parity of inputs t - N_j + 1 .. t (defined once t >= N_j - 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (batch, length), generator=gen)
    c = torch.cat([torch.zeros(batch, 1, dtype=torch.long), x.cumsum(1)], 1)
    targets, mask = [], []
    for n in ns:
        t = torch.arange(length)
        window = c[:, t + 1] - c[:, (t + 1 - n).clamp(min=0)]
        targets.append(window % 2)
        mask.append((t >= n - 1).expand(batch, length))
    return x, torch.stack(targets, -1), torch.stack(mask, -1)


def n_dms(batch: int, length: int, ns: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Delayed match-to-sample: target j at t is 1 when input t equals input t - N_j."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 2, (batch, length), generator=gen)
    targets, mask = [], []
    for n in ns:
        t = torch.arange(length)
        targets.append((x == x[:, (t - n).clamp(min=0)]).long())
        mask.append((t >= n).expand(batch, length))
    return x, torch.stack(targets, -1), torch.stack(mask, -1)


def graph_edges(nodes: int, kind: str = "path", seed: int = 0) -> torch.Tensor:
    """The edges of a graph on `nodes` nodes as (u, v) rows, both directions ([2 * (nodes - 1), 2]):
    a path 0 - 1 - ... - (n-1), or a random tree (each node i > 0 joins a uniformly drawn earlier
    node). The memorisation task of "Deep sequence models tend to memorize geometrically" (stdlib
    `geometric_memory`): a model sees each edge as the pair "u v" (u predicts v)."""
    if kind == "path":
        parent = list(range(-1, nodes - 1))
    elif kind == "tree":
        rng = random.Random(seed)
        parent = [-1] + [rng.randrange(i) for i in range(1, nodes)]
    else:
        raise ValueError(f"unknown graph kind {kind!r}; one of: path, tree")
    one = torch.tensor([(parent[i], i) for i in range(1, nodes)], dtype=torch.long)
    return torch.cat([one, one.flip(1)])


def path_queries(edges: torch.Tensor, nodes: int, count: int, seed: int = 0) -> torch.Tensor:
    """Path-finding queries on a tree (`graph_edges`): rows [source, target, SEP, path...] padded with
    PAD, where SEP = nodes, PAD = nodes + 1 and the path runs from source to target (both included).
    The paper's in-weights path-finding: the edges are only in the weights, never in the context."""
    adj: dict[int, list[int]] = {i: [] for i in range(nodes)}
    for u, v in edges.tolist():
        adj[u].append(v)
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        s, t = rng.sample(range(nodes), 2)
        prev, todo = {s: s}, [s]
        while todo:                                     # breadth-first search from s
            u = todo.pop(0)
            for v in adj[u]:
                if v not in prev:
                    prev[v] = u
                    todo.append(v)
        path = [t]
        while path[-1] != s:
            path.append(prev[path[-1]])
        rows.append([s, t, nodes] + path[::-1])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [nodes + 1] * (width - len(r)) for r in rows], dtype=torch.long)


def last_write_batch(batch: int, length: int, values: int = 4, writes: tuple[int, int] = (2, 4),
                     min_delay: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(obs [batch, length], targets [batch], last [batch]): the memory-rewriting task of "Memory
    Retention Is Not Enough" (stdlib `memory_rewriting_bench`) as a last-write-wins sequence.

    Observation ids: write(v) = v for v < values, blank = values, query = values + 1. Each row
    shows between writes[0] and writes[1] values at distinct random steps before
    `length - 1 - min_delay` (so at least `min_delay` blanks precede the query); every value differs
    from the one before it, so each write after the first overwrites the stored value. The last
    step is the query; its target is the value written last, at step `last`.
    """
    lo, hi = writes
    if not 1 <= lo <= hi or values < 2 or min_delay < 0 or length - 1 - min_delay < hi:
        raise ValueError(f"no room for {hi} writes, a delay of {min_delay} and the query in {length} steps "
                         f"(need 1 <= writes[0] <= writes[1], values >= 2)")
    rng = random.Random(seed)
    obs = torch.full((batch, length), values, dtype=torch.long)
    obs[:, -1] = values + 1
    targets = torch.zeros(batch, dtype=torch.long)
    last = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        steps = sorted(rng.sample(range(length - 1 - min_delay), rng.randint(lo, hi)))
        v = rng.randrange(values)
        for t in steps:
            obs[b, t] = v
            targets[b], last[b] = v, t
            v = (v + rng.randrange(1, values)) % values          # the next write changes the value
    return obs, targets, last
