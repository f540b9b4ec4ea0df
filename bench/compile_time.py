"""Compile time at -O2: a stdlib .arch file -> emitted PyTorch module source, per model.

Run: python -m bench.compile_time [--baseline-python PY] [--rounds 3] [--reps 5]
Writes bench/results/compile_time.md (or --out).

Three numbers per model, each the median over `rounds` fresh worker processes:

* cold: the first compile in a fresh process after `import archc.api` (builds the parser, pays
  sympy's lazily imported modules); one process per measurement, so only for `--cold` models;
* first: the model's first compile in a process that has compiled a small warm-up program and
  the stdlib models before it in name order (nothing is memoised for this model's text yet);
* warm: the median of `reps` further compiles of the same text, each with a fresh comment
  appended (nothing keyed on the source text can be reused). The issue's bar (under 200 ms for
  loop-fused depth_recurrent and hrm) is on this number.

"Compile" is `archc.api.compile(..., optimize=<the -O2 pipeline>)`: parse, lower, verify, the
-O2 passes (loop fusion included) and PyTorch code generation. With `--baseline-python`, an
interpreter whose `archc` is another checkout (e.g. the commit before a change), both sides run
in the same invocation, alternating round by round, and the table gives after/before ratios:
the machine is shared, so compare the ratios, not the milliseconds across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLD = ("depth_recurrent", "hrm")
BAR_MS = 200.0


# -- the worker: runs in the process being measured (only APIs every archc version has) -------------


def _o2():
    from archc.passes import PRESETS, run_pipeline
    return lambda g: run_pipeline(g, PRESETS["O2"])


WARMUP = """
block Blk(d: int) {
  input x: f32[B, T, d]
  layer norm = RMSNorm(d)
  layer mlp = MLP(d, 2 * d)
  return x + mlp(norm(x))
}

arch Straight(d: int = 8) {
  input x: f32[B, T, d]
  layer blk = Blk(d)
  x = blk(x)
  x = blk(x)
  output y = x
}
"""


def measure(models: list[str], reps: int) -> dict[str, dict[str, float]]:
    """Per model: the first compile of its file in this process, then the median of `reps` more (ms).

    A small program is compiled first, so that the first model does not pay the process's set-up.
    """
    import archc.api as api
    import archc.stdlib as stdlib
    opt = _o2()
    api.compile(WARMUP, optimize=opt)
    out = {}
    for name in models:
        path = stdlib.path(name)
        t0 = time.perf_counter()
        api.compile(path, optimize=opt)
        first = time.perf_counter() - t0
        text = path.read_text()
        warm = []
        for i in range(reps):
            src = f"{text}\n# compile-time bench {i} {time.time_ns()}\n"
            t0 = time.perf_counter()
            api.compile(src, optimize=opt)
            warm.append(time.perf_counter() - t0)
        out[name] = {"first_ms": 1e3 * first, "warm_ms": 1e3 * statistics.median(warm) if warm else float("nan")}
    return out


def measure_cold(model: str) -> float:
    """Milliseconds of the first compile in this (fresh) process, imports excluded."""
    import archc.api as api
    import archc.stdlib as stdlib
    opt = _o2()
    path = stdlib.path(model)
    t0 = time.perf_counter()
    api.compile(path, optimize=opt)
    return 1e3 * (time.perf_counter() - t0)


def _worker(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args(argv)
    if a.cold:
        print(json.dumps({"cold_ms": measure_cold(a.models)}))
    else:
        print(json.dumps(measure(a.models.split(","), a.reps)))


# -- the driver ------------------------------------------------------------------------------------------


def _run_worker(python: str, args: list[str]) -> dict:
    # run by path, from the file's directory, so each interpreter imports its own `archc`
    r = subprocess.run([python, str(Path(__file__).resolve()), "--worker", *args], capture_output=True, text=True,
                       check=True, cwd=str(HERE.parent.parent))
    return json.loads(r.stdout.strip().splitlines()[-1])


def _commit(python: str) -> str:
    code = "import archc, os; print(os.path.dirname(os.path.dirname(archc.__file__)))"
    root = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()   # not the repository root, whose archc/ would shadow the install
    r = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{root} @ {r.stdout.strip()}" if r.returncode == 0 else root


def run(models: list[str], rounds: int, reps: int, cold: tuple[str, ...], baseline: str | None,
        baseline_label: str = "") -> dict:
    sides = {"after": sys.executable} | ({"before": baseline} if baseline else {})
    where = {s: _commit(py) for s, py in sides.items()}
    if baseline and baseline_label:
        where["before"] = f"{baseline_label} ({where['before']})"
    data: dict = {"models": models, "rounds": rounds, "reps": reps, "cold_models": list(cold),
                  "load_start": os.getloadavg(), "sides": where,
                  "first": {s: {m: [] for m in models} for s in sides},
                  "warm": {s: {m: [] for m in models} for s in sides},
                  "cold": {s: {m: [] for m in cold} for s in sides}}
    order = list(sides)
    for k in range(rounds):
        for side in (order if k % 2 == 0 else order[::-1]):       # alternate who goes first
            res = _run_worker(sides[side], ["--models", ",".join(models), "--reps", str(reps)])
            for m, r in res.items():
                data["first"][side][m].append(r["first_ms"])
                data["warm"][side][m].append(r["warm_ms"])
            for m in cold:
                data["cold"][side][m].append(_run_worker(sides[side], ["--models", m, "--cold"])["cold_ms"])
        print(f"round {k + 1}/{rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    data["load_end"] = os.getloadavg()
    return data


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def markdown(data: dict, command: str = "") -> str:
    import lark
    import sympy
    both = "before" in data["sides"]
    ls, le = data["load_start"], data["load_end"]
    lines = ["# Compile time at -O2: .arch file -> PyTorch module source", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, Python "
             f"{platform.python_version()}, sympy {sympy.__version__}, lark {lark.__version__}; "
             f"`{command or 'python -m bench.compile_time'}`. Medians over {data['rounds']} worker processes per side"
             + (", the two sides alternating" if both else "") + f"; warm = median of {data['reps']} compiles per process.",
             f"Load average (1/5/15 min): {ls[0]:.2f}/{ls[1]:.2f}/{ls[2]:.2f} at the start, "
             f"{le[0]:.2f}/{le[1]:.2f}/{le[2]:.2f} at the end (2 cores, shared: compare ratios within this run).", ""]
    for side, where in data["sides"].items():
        lines.append(f"* {side}: {where}")
    lines.append("")

    def row_vals(kind, side, m):
        return _med(data[kind][side][m])

    def ratio(kind, m):
        return row_vals(kind, "after", m) / row_vals(kind, "before", m)

    if data["cold_models"]:
        lines += ["## The issue's models", "",
                  "cold: first compile in a fresh process (imports excluded); first: first compile of the file in a "
                  "process that compiled other models; warm: the same text again (fresh comment), the issue's bar.", ""]
        if both:
            lines += ["| model | cold before ms | cold after ms | first before ms | first after ms | warm before ms "
                      "| warm after ms | warm after/before | warm < 200 ms |", "|---|---|---|---|---|---|---|---|---|"]
            for m in data["cold_models"]:
                lines.append(f"| {m} | {row_vals('cold', 'before', m):.0f} | {row_vals('cold', 'after', m):.0f} | "
                             f"{row_vals('first', 'before', m):.0f} | {row_vals('first', 'after', m):.0f} | "
                             f"{row_vals('warm', 'before', m):.1f} | {row_vals('warm', 'after', m):.1f} | "
                             f"{ratio('warm', m):.2f} | {'yes' if row_vals('warm', 'after', m) < BAR_MS else 'NO'} |")
        else:
            lines += ["| model | cold ms | first ms | warm ms | warm < 200 ms |", "|---|---|---|---|---|"]
            for m in data["cold_models"]:
                w = row_vals("warm", "after", m)
                lines.append(f"| {m} | {row_vals('cold', 'after', m):.0f} | {row_vals('first', 'after', m):.0f} | "
                             f"{w:.1f} | {'yes' if w < BAR_MS else 'NO'} |")
        lines.append("")
    lines += ["## Every stdlib model", ""]
    if both:
        lines += ["| model | first before ms | first after ms | first after/before | warm before ms | warm after ms "
                  "| warm after/before |", "|---|---|---|---|---|---|---|"]
        tot = {k: 0.0 for k in ("fb", "fa", "wb", "wa")}
        for m in data["models"]:
            fb, fa = row_vals("first", "before", m), row_vals("first", "after", m)
            wb, wa = row_vals("warm", "before", m), row_vals("warm", "after", m)
            for k, v in zip(tot, (fb, fa, wb, wa)):
                tot[k] += v
            lines.append(f"| {m} | {fb:.0f} | {fa:.0f} | {fa / fb:.2f} | {wb:.1f} | {wa:.1f} | {wa / wb:.2f} |")
        lines.append(f"| **all {len(data['models'])}** | {tot['fb']:.0f} | {tot['fa']:.0f} | {tot['fa'] / tot['fb']:.2f} | "
                     f"{tot['wb']:.0f} | {tot['wa']:.0f} | {tot['wa'] / tot['wb']:.2f} |")
    else:
        lines += ["| model | first ms | warm ms |", "|---|---|---|"]
        for m in data["models"]:
            lines.append(f"| {m} | {row_vals('first', 'after', m):.0f} | {row_vals('warm', 'after', m):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-python", default=None, help="an interpreter whose archc is the checkout to compare with")
    ap.add_argument("--baseline-label", default="", help="what the baseline checkout is (e.g. a commit)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="all", help="comma-separated stdlib names (default: all)")
    ap.add_argument("--cold", default=",".join(COLD), help="models also measured cold ('' for none)")
    ap.add_argument("--out", default=str(HERE / "results" / "compile_time.md"))
    a = ap.parse_args(argv)
    import archc.stdlib as stdlib
    models = stdlib.names() if a.models == "all" else a.models.split(",")
    cold = tuple(m for m in a.cold.split(",") if m)
    data = run(models, a.rounds, a.reps, cold, a.baseline_python, a.baseline_label)
    text = markdown(data, "python -m bench.compile_time " + " ".join(argv))
    print(text)
    Path(a.out).write_text(text)
    Path(a.out).with_suffix(".json").write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
