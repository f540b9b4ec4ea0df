"""Per-token decode cost and cache bytes of every stdlib language model against the context length.

Run: python -m bench.decode_state [--threads 2] [--steps 16] [--recompute-steps 5] [--smoke].
Writes bench/results/decode_state.{md,json} (`decode_state_smoke.*` with --smoke, or under --out).

For each language model (`archc.ir.analysis.lm_token_input(g)` is not None) at each context C
(256, 1024, 4096 tokens; batch 1, fp32, `model.eval()`, `torch.no_grad()`):

* *decode*: `prefill(tokens[:, :C])`, one untimed `decode` step, then `--steps` timed single-token
  `decode` steps; the number is their median. `cache.nbytes()` is read right after the prefill.
* *recompute*: what `TokenCache`'s decode did, `model(tokens[:, :n])[:, -1:]` over the whole history
  with the new token (n = C + 2, C + 3, ...: the same history as the paired decode step), median
  of `--recompute-steps` (`--largest-steps` at the largest context); its bytes are the token
  history (8 B/token). A recompute-path model's decode is the same forward and runs as many steps.

The path is the one the generated class takes (SPEC §17): "state" (no decode blocker, and the graph
has a segment scan or a linear recurrence whose carries the cache keeps), "kv" (no blocker, no
recurrence: per-site K/V only) or "recompute" (the blocker's reason; the cache is the token history).

The machine is shared, so the measurement is interleaved: every (model, context) is prefilled
first, then step i of every (model, context) runs before step i + 1 of any, the contexts' order
turning with i, each decode step paired with its recompute step (alternating which goes first);
each number is a median. A prefill predicted (from the smaller contexts) or seen to take longer
than `--budget` seconds skips that context and the larger ones for the model; where the prefill
took longer than `--recompute-limit` seconds, one forward is tried under that limit, and if it does
not finish the recompute at that context is skipped (a recompute-path model then times 1 decode
step) and the speedup is estimated from the prefill time instead (marked `~`).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

import archc.api as api
import archc.stdlib as stdlib
from archc.ir.analysis import decode_blocker, lm_token_input
from archc.ir.ops import Op

RESULTS = Path(__file__).resolve().parent / "results"
CONTEXTS = (256, 1024, 4096)
SMOKE_CONTEXTS = (16, 32)
# smoke: one model per path and per kind of state (K/V, segment-scan carries, per-step recurrence)
SMOKE_MODELS = ("ThinK", "TitansMAC", "GRUAgent", "ForgetMemoryAgent", "LocasGLU")
REFERENCE_KV = "ThinK"          # the stdlib's K/V-cached Transformer
GOAL_RATIO = 1.3                # t(4096) / t(256) for models whose cache holds no per-token entries
KV_MARGIN = 1.25                # noise margin on the K/V reference's own ratio


class OverBudget(Exception):
    pass


def _alarm(_signum, _frame):
    raise OverBudget


class Deadline:
    """Raise OverBudget in the main thread after `seconds` (the generated code is Python between ops)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        self.old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)
        return False


def language_models(only=None) -> list[tuple[str, object]]:
    """(stdlib file, graph) of every architecture with one i64 [B, T] token input, in stdlib order."""
    out = []
    for name in stdlib.names():
        if only is not None and not any(a in only for a in _archs_in(name)):
            continue
        for g in stdlib.graphs(name):
            if lm_token_input(g) is not None and (only is None or g.name in only):
                out.append((name, g))
    return out


def _archs_in(name: str) -> list[str]:
    import re
    return re.findall(r"^\s*arch\s+(\w+)", stdlib.source(name), flags=re.MULTILINE)


_RECURRENT = (Op.SCAN, Op.LINEAR_SCAN, Op.LINEAR_ATTN)


def blocker_of(g) -> str | None:
    """`decode_blocker` with the options the PyTorch backend passes (SPEC §17)."""
    params = inspect.signature(decode_blocker).parameters
    options = {k: True for k in ("torch_step", "prefix") if k in params}
    return decode_blocker(g, **options)


def path_of(g) -> tuple[str, str | None]:
    """("recompute", why) or ("state" when the graph has a segment scan or a linear recurrence, else "kv")."""
    why = blocker_of(g)
    if why is not None:
        return "recompute", why
    return ("state" if any(n.op in _RECURRENT for n in g.walk()) else "kv"), None


def _vocab(m) -> int:
    for k in ("vocab", "nodes", "n_obs", "phonemes"):
        v = getattr(m, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2


def _last(y):
    if isinstance(y, dict):
        return {k: v[:, -1:] if v.dim() >= 2 else v for k, v in y.items()}
    return y[:, -1:]


class Model:
    def __init__(self, file: str, g):
        self.file, self.arch = file, g.name
        self.path, self.blocker = path_of(g)
        torch.manual_seed(0)
        self.m = api.load(stdlib.path(file), arch=g.name)().eval()
        self.vocab = _vocab(self.m)
        self.tokens = None
        self.stopped = None                     # why larger contexts are skipped
        self.path_note = None
        self.res = {}                           # context -> dict

    def prefill_seconds(self, C: int) -> float | None:
        """Predicted prefill time at C from the measured ones (exponent in [1, 2])."""
        done = sorted((c, r["prefill_s"]) for c, r in self.res.items() if r.get("prefill_s"))
        if not done:
            return None
        (c1, t1) = done[-1]
        e = 1.0
        if len(done) >= 2:
            (c0, t0) = done[-2]
            e = min(2.0, max(1.0, math.log(max(t1, 1e-9) / max(t0, 1e-9)) / math.log(c1 / c0)))
        return t1 * (C / c1) ** e


def measure(models: list[Model], contexts, steps: int, recompute_steps: int, largest_steps: int, budget: float,
            recompute_limit: float, log=print) -> None:
    """Prefill every (model, context), then time decode steps and recompute steps round-robin over
    models and contexts: step i of every (model, context) runs before step i + 1 of any, so a drift
    of the shared machine's speed falls on all contexts alike and t(largest)/t(smallest) stays fair."""
    top = max(contexts) + steps + recompute_steps + 2
    for mo in models:
        gen = torch.Generator().manual_seed(1)
        mo.tokens = torch.randint(0, mo.vocab, (1, top), generator=gen)
        with torch.no_grad():                     # first-call overheads out of the way
            w = min(17, top - 3)
            mo.m(mo.tokens[:, :w])
            _, cache = mo.m.prefill(mo.tokens[:, :w])
            for i in range(2):
                _, cache = mo.m.decode(mo.tokens[:, w + i:w + i + 1], cache)
    caches = {}                                   # (arch, context) -> cache
    # 1. prefill every model at every context, smallest first (and one untimed decode step)
    for C in contexts:
        for mo in models:
            r = mo.res.setdefault(C, {})
            if mo.stopped:
                r["skipped"] = mo.stopped
                continue
            pred = mo.prefill_seconds(C)
            if pred is not None and pred > budget:
                mo.stopped = r["skipped"] = f"prefill at {C} predicted {pred:.0f} s > budget {budget:.0f} s"
                continue
            try:
                with torch.no_grad(), Deadline(budget):
                    t0 = time.perf_counter()
                    _, cache = mo.m.prefill(mo.tokens[:, :C])
                    r["prefill_s"] = time.perf_counter() - t0
                    r["bytes"] = cache.nbytes()
                    r["cache"] = type(cache).__name__
                    r["kv_entries"] = len(getattr(cache, "entries", {}) or {})
                    r["states"] = len(getattr(cache, "states", {}) or {})
                    if (r["cache"] == "TokenCache") != (mo.path == "recompute"):   # trust the generated class
                        mo.path_note = f"analysis said {mo.path}, the generated class keeps a {r['cache']}"
                        mo.path = "recompute" if r["cache"] == "TokenCache" else ("state" if r["states"] else "kv")
                    _, cache = mo.m.decode(mo.tokens[:, C:C + 1], cache)
            except OverBudget:
                mo.stopped = r["skipped"] = f"prefill at {C} took over the budget of {budget:.0f} s"
                continue
            except Exception as e:              # noqa: BLE001 - report, never hang or crash the table
                mo.stopped = r["skipped"] = f"prefill at {C} failed: {type(e).__name__}: {e}"[:200]
                continue
            r["recompute_bytes"] = C * mo.tokens.element_size()
            caches[mo.arch, C] = cache
            log(f"[decode_state] C={C} {mo.arch}: prefill {r['prefill_s']:.2f} s, {r['bytes']:,} B")
    live = list(caches)
    by_arch = {mo.arch: mo for mo in models}

    # a prefill over the recompute limit (on this machine often a stall, not the model) gets one
    # forward under that limit: the recompute is skipped only when that forward is slow too
    probe = {}
    for (arch, C) in live:
        mo = by_arch[arch]
        if mo.res[C]["prefill_s"] > recompute_limit:
            try:
                with torch.no_grad(), Deadline(recompute_limit):
                    t0 = time.perf_counter()
                    _last(mo.m(mo.tokens[:, :C + 1]))
                    probe[arch, C] = time.perf_counter() - t0
            except OverBudget:
                probe[arch, C] = None

    def quick(arch, C) -> bool:
        return by_arch[arch].res[C]["prefill_s"] <= recompute_limit or probe.get((arch, C)) is not None

    def n_decode(mo, C):
        if mo.path != "recompute":
            return steps
        return min(steps, n_recompute(mo, C) if quick(mo.arch, C) else 1)

    def n_recompute(mo, C):
        if not quick(mo.arch, C):
            return 0
        return min(recompute_steps, largest_steps) if C == max(contexts) else recompute_steps

    for (arch, C) in live:
        if not quick(arch, C):
            by_arch[arch].res[C]["recompute_note"] = (f"skipped: its prefill took {by_arch[arch].res[C]['prefill_s']:.0f} s "
                                                      f"and one forward at {C} did not finish in "
                                                      f"{recompute_limit:.0f} s")
    # 2. timed steps, round-robin: step i of every (model, context) before step i + 1 of any; the
    # contexts' order turns with i; each decode step is paired with the recompute of the same
    # history (the new token included: what TokenCache's decode ran), in alternating order
    dec = {key: [] for key in live}
    rec = {key: [] for key in live}

    def decode_step(mo, C, i):
        key = (mo.arch, C)
        if i >= n_decode(mo, C) or caches.get(key) is None:
            return
        pos = C + 1 + i
        try:
            with torch.no_grad(), Deadline(budget):
                t0 = time.perf_counter()
                _, caches[key] = mo.m.decode(mo.tokens[:, pos:pos + 1], caches[key])
                dec[key].append(time.perf_counter() - t0)
            if dec[key][-1] > 5:
                log(f"[decode_state] C={C} {mo.arch}: decode step {i} took {dec[key][-1]:.1f} s")
        except OverBudget:
            caches[key] = None
            mo.res[C]["decode_note"] = f"a decode step took over {budget:.0f} s"

    def recompute_step(mo, C, i):
        key = (mo.arch, C)
        if i >= n_recompute(mo, C) or mo.res[C].get("recompute_note"):
            return
        try:
            with torch.no_grad(), Deadline(budget):
                t0 = time.perf_counter()
                _last(mo.m(mo.tokens[:, :C + 2 + i]))
                rec[key].append(time.perf_counter() - t0)
            if rec[key][-1] > 5:
                log(f"[decode_state] C={C} {mo.arch}: recompute step {i} took {rec[key][-1]:.1f} s")
        except OverBudget:
            mo.res[C]["recompute_note"] = f"a forward at {C} took over {budget:.0f} s"

    for i in range(max(steps, recompute_steps)):
        for mo in models:
            cs = [C for C in contexts if (mo.arch, C) in caches]
            for C in (cs[i % len(cs):] + cs[:i % len(cs)] if cs else cs):
                pair = (decode_step, recompute_step) if i % 2 == 0 else (recompute_step, decode_step)
                for fn in pair:
                    fn(mo, C, i)
    for (arch, C) in live:
        mo = by_arch[arch]
        r = mo.res[C]
        if dec[arch, C]:
            r["decode_ms"] = 1e3 * statistics.median(dec[arch, C])
            r["decode_steps"] = len(dec[arch, C])
            r["decode_samples_ms"] = [round(1e3 * t, 3) for t in dec[arch, C]]
            r["bytes_after_steps"] = caches[arch, C].nbytes() if caches[arch, C] is not None else None
        if rec[arch, C]:
            r["recompute_ms"] = 1e3 * statistics.median(rec[arch, C])
            r["recompute_steps"] = len(rec[arch, C])
            r["recompute_samples_ms"] = [round(1e3 * t, 3) for t in rec[arch, C]]
        log(f"[decode_state] C={C} {arch} ({mo.path}): decode {r.get('decode_ms', float('nan')):.2f} ms, "
            f"recompute {r.get('recompute_ms', float('nan')):.2f} ms")
    caches.clear()
    gc.collect()


def summarize(models: list[Model], contexts) -> list[dict]:
    """One row per model: the measurements plus ratio, speedup and whether it meets the goal."""
    lo, hi = contexts[0], contexts[-1]
    rows = []
    for mo in models:
        row = {"file": mo.file, "model": mo.arch, "path": mo.path, "blocker": mo.blocker, "path_note": mo.path_note,
               "contexts": {str(c): mo.res.get(c, {}) for c in contexts}}
        a, b = mo.res.get(lo, {}), mo.res.get(hi, {})
        row["ratio"] = b["decode_ms"] / a["decode_ms"] if "decode_ms" in a and "decode_ms" in b else None
        if "decode_ms" in b and "recompute_ms" in b:
            row["speedup"], row["speedup_estimated"] = b["recompute_ms"] / b["decode_ms"], False
        elif "decode_ms" in b and "prefill_s" in b:
            row["speedup"], row["speedup_estimated"] = 1e3 * b["prefill_s"] / b["decode_ms"], True
        else:
            row["speedup"], row["speedup_estimated"] = None, False
        entries = [mo.res[c].get("kv_entries", 0) for c in contexts if c in mo.res and "bytes" in mo.res[c]]
        row["per_token_entries"] = mo.path == "recompute" or any(entries)
        rows.append(row)
    ref = next((r for r in rows if r["model"] == REFERENCE_KV), None)
    for row in rows:
        row["goal"], row["goal_note"] = goal(row, ref, contexts)
    return rows


def goal(row: dict, ref: dict | None, contexts) -> tuple[bool | None, str]:
    lo, hi = contexts[0], contexts[-1]
    c = row["contexts"]
    if row["path"] == "recompute":
        return False, "recomputes the history: O(context) per token"
    if row["ratio"] is None:
        return None, "not measured at both ends"
    b0, b1 = c[str(lo)].get("bytes"), c[str(hi)].get("bytes")
    if not row["per_token_entries"]:
        ok = row["ratio"] <= GOAL_RATIO and b0 == b1
        why = [f"t{hi}/t{lo} = {row['ratio']:.2f}" + (" <= " if row["ratio"] <= GOAL_RATIO else " > ") + f"{GOAL_RATIO}",
               "bytes constant" if b0 == b1 else f"bytes {b0:,} -> {b1:,}"]
        return ok, "; ".join(why)
    if ref is None or ref["ratio"] is None:
        return None, "no K/V reference measured"
    bound = max(GOAL_RATIO, ref["ratio"] * KV_MARGIN)
    grow = b1 / b0 if b0 else float("inf")
    ok = row["ratio"] <= bound and grow <= hi / lo * 1.01
    return ok, (f"K/V cache: t{hi}/t{lo} = {row['ratio']:.2f} vs bound {bound:.2f} "
                f"({REFERENCE_KV} {ref['ratio']:.2f} x {KV_MARGIN}); bytes x{grow:.1f}")


def _ms(r: dict, key: str, note: str | None = None) -> str:
    if key in r:
        return f"{r[key]:.2f}"
    if r.get("skipped"):
        return "skipped"
    return "skipped" if note and r.get(note) else "—"


def markdown(res: dict) -> str:
    contexts = res["contexts"]
    lo, hi = contexts[0], contexts[-1]
    rows = res["rows"]
    L = [f"# Decode with compiled state: per-token time and cache bytes vs context ({', '.join(map(str, contexts))})",
         "", (f"date: {res['date']}; machine: {res['machine']}; command: `{res['command']}`; "
              f"source: {res.get('source', '?')}"), "",
         (f"batch 1, fp32, `model.eval()`, `torch.no_grad()`, stdlib default sizes, {res['threads']} torch "
          f"thread(s). After `prefill` of the context and one untimed `decode` step: decode = median of "
          f"{res['steps']} timed single-token `decode` steps; recompute = `model(history)[:, -1:]` over the same "
          f"history, new token included (what `TokenCache`'s decode ran), median of {res['recompute_steps']} steps, "
          f"{res['largest_steps']} at {hi}. A recompute-path model's decode is that same forward, so it runs as "
          f"many steps as its recompute (its speedup is 1x up to noise). Per-model prefill budget "
          f"{res['budget']:.0f} s; where a prefill took over {res['recompute_limit']:.0f} s and one forward did "
          f"not finish within that, the recompute is skipped and the speedup is prefill time / decode time "
          f"(marked ~). The machine is shared and other jobs' load makes single timings vary up to 10x "
          f"within a run: every (model, context) runs its step i before any runs step i + 1, the contexts' "
          f"order turns with i, and each decode step is paired with its recompute step, so ratios within a "
          f"row are fairer than absolute times; per-step samples are in the .json."), "",
         "## Time per token (ms)", "",
         "| model | path | " + " | ".join(f"decode @{c}" for c in contexts) + f" | t{hi}/t{lo} | "
         + " | ".join(f"recompute @{c}" for c in contexts) + f" | speedup @{hi} | goal |",
         "|" + "---|" * (2 * len(contexts) + 5)]
    for r in rows:
        c = r["contexts"]
        sp = "—" if r["speedup"] is None else ("~" if r["speedup_estimated"] else "") + f"{r['speedup']:.1f}x"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        g = {True: "yes", False: "no", None: "?"}[r["goal"]]
        L.append(f"| {r['model']} | {r['path']} | " + " | ".join(_ms(c[str(x)], "decode_ms") for x in contexts)
                 + f" | {ratio} | " + " | ".join(_ms(c[str(x)], "recompute_ms", "recompute_note") for x in contexts)
                 + f" | {sp} | {g} |")
    L += ["", "## Cache bytes after prefill", "",
          "| model | path | " + " | ".join(f"bytes @{c}" for c in contexts) + " | recompute (token history) "
          + " | ".join(f"@{c}" for c in contexts) + " | cache holds | prefill s " + " / ".join(map(str, contexts)) + " |",
          "|" + "---|" * (2 * len(contexts) + 4)]
    for r in rows:
        c = r["contexts"]
        b = [f"{c[str(x)]['bytes']:,}" if "bytes" in c[str(x)] else "skipped" for x in contexts]
        hb = [f"{c[str(x)]['recompute_bytes']:,}" if "recompute_bytes" in c[str(x)] else "—" for x in contexts]
        holds = ("token ids" if r["path"] == "recompute" else
                 ("per-token K/V" if r["per_token_entries"] else "") +
                 (" + " if r["per_token_entries"] and any(c[str(x)].get("states") for x in contexts) else "") +
                 ("state" if any(c[str(x)].get("states") for x in contexts) else "") or "nothing")
        pf = " / ".join(f"{c[str(x)]['prefill_s']:.2f}" if "prefill_s" in c[str(x)] else "—" for x in contexts)
        L.append(f"| {r['model']} | {r['path']} | " + " | ".join(b) + " | " + " | ".join(hb) + f" | {holds} | {pf} |")
    L += ["", "## Goal", "",
          (f"Goal: a model whose cache holds no per-token entries (scan carries, recurrent states) has "
          f"t({hi})/t({lo}) <= {GOAL_RATIO} and cache bytes independent of the context; a model that "
          f"keeps per-token K/V does no worse than the K/V-cached Transformer ({REFERENCE_KV}): its "
          f"t({hi})/t({lo}) at most max({GOAL_RATIO}, {KV_MARGIN} x {REFERENCE_KV}'s ratio) and bytes at most "
          f"linear in the context. A recompute-path model does not meet it by construction."), ""]
    for label, want in (("Meet the goal", True), ("Do not meet the goal", False), ("Not decided", None)):
        these = [r for r in rows if r["goal"] is want]
        if not these:
            continue
        L += [f"**{label}** ({len(these)}):", ""]
        for r in these:
            extra = f" — blocker: {r['blocker']}" if r["blocker"] else ""
            L.append(f"- {r['model']} ({r['path']}): {r['goal_note']}{extra}")
        L.append("")
    notes = []
    for r in rows:
        first_skip = True
        for x in res["contexts"]:
            cx = r["contexts"][str(x)]
            if cx.get("skipped") and first_skip:        # the larger contexts are skipped for the same reason
                notes.append(f"- {r['model']} @{x} and above: {cx['skipped']}")
                first_skip = False
            if r.get("path_note") and x == res["contexts"][0]:
                notes.append(f"- {r['model']}: {r['path_note']}")
            for key in ("decode_note", "recompute_note"):
                if cx.get(key):
                    notes.append(f"- {r['model']} @{x}: {cx[key]}")
    if notes:
        L += ["## Skipped measurements", ""] + notes + [""]
    if res.get("notes"):
        L += ["## Notes", ""] + res["notes"] + [""]
    return "\n".join(L).rstrip() + "\n"


def _source() -> str:
    """The checkout measured: commit, and whether the working tree differs from it."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return f"commit {head}" + (" with uncommitted changes in the working tree" if dirty else "")


def run(smoke: bool = False, out: Path = RESULTS, contexts=None, steps: int | None = None,
        recompute_steps: int | None = None, largest_steps: int = 3, threads: int = 2, budget: float | None = None,
        recompute_limit: float = 20.0, only=None, command: str | None = None, notes=None, log=print) -> dict:
    torch.set_num_threads(threads)
    contexts = tuple(contexts or (SMOKE_CONTEXTS if smoke else CONTEXTS))
    steps = steps or (2 if smoke else 16)
    recompute_steps = recompute_steps or (2 if smoke else 5)
    budget = budget or (20.0 if smoke else 150.0)
    if only is None and smoke:
        only = SMOKE_MODELS
    models = [Model(f, g) for f, g in language_models(only)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    measure(models, contexts, steps, recompute_steps, largest_steps, budget, recompute_limit, log=log)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    res = {"mode": "smoke" if smoke else "full",
           "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": (f"{platform.machine()} {cpu}, {os.cpu_count()} cores (CPU only), torch {torch.__version__}, "
                       f"python {platform.python_version()}; load average {load0:.1f} at the start, "
                       f"{os.getloadavg()[0]:.1f} at the end (shared machine)"),
           "command": command or "python -m bench.decode_state" + (" --smoke" if smoke else ""),
           "source": _source(), "threads": threads, "contexts": list(contexts), "steps": steps, "recompute_steps": recompute_steps,
           "largest_steps": largest_steps,
           "budget": budget, "recompute_limit": recompute_limit, "wall_s": time.perf_counter() - t0,
           "notes": list(notes or []), "rows": summarize(models, contexts)}
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_state_smoke" if smoke else "decode_state"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="contexts 16/32, 2 steps, a handful of models")
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per context (16)")
    ap.add_argument("--recompute-steps", type=int, default=None, help="timed recompute steps per context (5)")
    ap.add_argument("--largest-steps", type=int, default=3,
                    help="at most this many recompute steps (and recompute-path decode steps) at the largest context")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=None, help="seconds per prefill / step before skipping (150)")
    ap.add_argument("--recompute-limit", type=float, default=20.0,
                    help="skip the recompute at a context where one forward took longer (s)")
    ap.add_argument("--models", type=lambda s: s.split(","), default=None, help="architecture names")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", action="append", default=[], help="a line for the Notes section")
    a = ap.parse_args(argv)
    cmd = "python -m bench.decode_state" + ("".join(" " + shlex.quote(x) for x in (argv if argv is not None
                                                                                   else sys.argv[1:])))
    res = run(smoke=a.smoke, out=a.out, contexts=a.contexts, steps=a.steps, recompute_steps=a.recompute_steps,
              largest_steps=a.largest_steps, threads=a.threads, budget=a.budget, recompute_limit=a.recompute_limit, only=a.models, command=cmd,
              notes=a.note, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
