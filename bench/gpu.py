"""GPU benchmark of the generated Triton kernels: `python bench/gpu.py` on an H100 / H200.

For every kernel the Triton backend generates for the stdlib models (fused elementwise / norm /
residual regions, and every node a kernel family matches), on the operands the model really
feeds it at benchmark sizes:

* time of the archc kernel (default configuration, and tuned in place over its configuration
  space) vs torch eager (the interpreter's op implementations: what the PyTorch backend runs) vs
  `torch.compile` of the same region, forward and forward+backward where the kernel has a
  backward; the median of many runs timed with CUDA events (`triton.testing.do_bench`);
* achieved bandwidth of the forward kernel (bytes of its operands and results over its time)
  against a measured device-to-device copy (`torch.empty_like(x).copy_(x)` on 1 GiB);
* the largest difference from eager (the kernels compute in f32, as the IR does).

Operands are captured by running the IR interpreter on the model at benchmark sizes and recording
each kernel's inputs the first time its node runs. Results: bench/results/gpu_<card>.{md,json},
rewritten after each kernel so that an interrupted run keeps what it measured. `--budget-s` stops
starting new kernels after that many seconds.

`--smoke` runs the same code on the CPU under TRITON_INTERPRET=1 at tiny sizes with a wall-clock
timer and `torch.compile(backend="aot_eager")`, so that it does not rot (tests/test_triton_bench.py).
Numbers from a smoke run mean nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if "--smoke" in sys.argv:               # must precede the first `triton.jit`
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
_PACKAGES = {"archc": "archc", "archc.dsl": "dsl", "archc.ir": "ir", "archc.passes": "passes",
             "archc.backends": "backends", "archc.stdlib": "stdlib"}


def _ensure_archc() -> None:
    """Import archc from this checkout even when it is not pip-installed (pyproject's package map)."""
    try:
        import archc.ir  # noqa: F401
        return
    except ImportError:
        pass
    for name, folder in _PACKAGES.items():
        init = ROOT / folder / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        if "." in name:
            parent, _, leaf = name.rpartition(".")
            setattr(sys.modules[parent], leaf, mod)
        spec.loader.exec_module(mod)


_ensure_archc()

import torch

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.triton import autotune as tune
from archc.backends.triton import emit
from archc.backends.triton import fused as fused_gen
from archc.backends.triton.families._util import is_zero_fill
from archc.ir import interpret
from archc.ir.interpret import Env, Interpreter, init_params, resolve_bindings
from archc.ir.ops import Op
from archc.passes import PRESETS, run_pipeline
from archc.testing import example_inputs


@dataclass(frozen=True)
class Case:
    model: str                # a stdlib name, or a .arch path relative to the repository
    overrides: dict
    batch: int
    seq: int | None
    arch: str | None = None   # only this architecture of the file

    def graphs(self) -> list:
        gs = api.check(ROOT / self.model) if self.model.endswith(".arch") else stdlib.graphs(self.model)
        return [g for g in gs if self.arch is None or g.name == self.arch]


# benchmark sizes: activations of 16-64 MiB so that kernels, not launches, dominate
GPU_CASES = [          # the models with kernel-family nodes first: a run cut by --budget-s keeps them
    Case("examples/gated_recurrences.arch", {"d": 1024}, batch=8, seq=2048, arch="GatedRNN"),     # gated_scan
    Case("titans", {"d": 512, "seg": 64}, batch=8, seq=1024),                                      # memory update
    Case("lstm_pinn", {"hidden": 32, "depth": 8}, batch=65536, seq=None),                            # recursion body
    Case("depth_recurrent", {"d": 1024, "steps": 2}, batch=16, seq=1024),
    Case("mor", {"d": 1024, "n_r": 2}, batch=8, seq=2048),
    Case("hrm", {"d": 1024}, batch=128, seq=81),
    Case("hmt", {"d": 1024}, batch=8, seq=1024),
    Case("move", {"d": 1024}, batch=8, seq=1024),
    Case("think", {"d": 1024, "n_layers": 2}, batch=8, seq=1024),
    Case("memory_caching", {"d": 1024}, batch=8, seq=1024),
    Case("trm", {"d": 512}, batch=128, seq=81),
]
# decode_attention serves the K/V-cached step: timed as whole decode steps (torch vs triton module)
GPU_DECODE = [Case("think", {"d": 1024, "n_layers": 2}, batch=8, seq=4096)]
SMOKE_CASES = [Case("depth_recurrent", {"steps": 2}, batch=2, seq=8),
               Case("examples/gated_recurrences.arch", {}, batch=2, seq=8, arch="GatedRNN")]
SMOKE_DECODE = [Case("think", {"n_layers": 1}, batch=1, seq=8)]


# -- timing ------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke

    def __call__(self, fn) -> float:
        """Median seconds of `fn`."""
        if self.device.type == "cuda":
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
        fn()
        times = []
        for _ in range(2 if self.smoke else 5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, smoke: bool) -> dict:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    n = (1 << 20) if smoke else (1 << 30)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    x.fill_(1)
    y = torch.empty_like(x)
    t = timer(lambda: y.copy_(x))
    return {"bytes": n, "seconds": t, "gbps": 2 * n / t / 1e9}


# -- capturing each kernel's operands from a model run ------------------------------------------------


@dataclass
class Captured:
    graph: object
    node: object
    family: object
    ks: object
    names: list           # operand names in the launcher's order
    args: list            # tensors / Python scalars
    env: dict
    frozen: tuple = ()    # operands the model fills with zeros: constants, never differentiated


def capture(g, case: Case, device: torch.device, per_model: int) -> list[Captured]:
    """Run the interpreter on the model; record the operands of each planned kernel's first run."""
    plan = emit.plan([g])          # kernels that replace one node (not route regions, not the decode step)
    targets = {id(n): n for n in g.walk() if plan.lookup(g, n) is not None and plan.lookup(g, n)[2] == "node"}
    if not targets:
        return []
    params = {k: v.to(device) for k, v in init_params(g, case.overrides, seed=0).items()}
    inputs = example_inputs(g, case.overrides, batch=case.batch, seq=case.seq, seed=1)
    if "adj" in inputs:        # a graph adjacency with self-loops: every row attends somewhere
        inputs["adj"] = inputs["adj"] | torch.eye(inputs["adj"].shape[-1], dtype=torch.bool)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    found: dict[int, Captured] = {}
    saved = dict(interpret.IMPL)

    def spy(op):
        inner = saved[op]

        def run(it, n, ins, vals):
            if id(n) in targets and id(n) not in found:
                family, ks, _ = plan.lookup(g, n)
                if family is fused_gen:
                    ops = fused_gen.operands(n, g)
                    names = [o.name for o in ops]
                    args = [vals[o.name].item() if o.scalar else vals[o.name] for o in ops]
                elif hasattr(family, "operands"):     # a region: inits, the values its body reads, sizes
                    names = family.operands(n, g)
                    body = {o.name: m for r in n.regions for m in r.walk() for o in m.outputs}
                    args = list(ins) + [_operand(it, body, vals, x) for x in names[len(ins):]]
                    args += [it.env.eval(e) for e, _ in family.sizes(n, g)]
                else:
                    names, args = list(n.inputs), list(ins)
                frozen = tuple(i for i, x in enumerate(names) if isinstance(x, str) and is_zero_fill(g, x))
                found[id(n)] = Captured(g, n, family, ks, names, args, dict(it.env.values), frozen)
            return inner(it, n, ins, vals)
        return run

    for op in {n.op for n in targets.values()}:
        interpret.IMPL[op] = spy(op)
    try:
        with torch.no_grad(), torch.device(device):
            interpret.run(g, params, inputs, case.overrides)
    finally:
        interpret.IMPL.clear()
        interpret.IMPL.update(saved)
    # one case per distinct kernel, the largest operands first, at most `per_model` fused ones
    unique: dict[str, Captured] = {}
    for c in sorted(found.values(), key=lambda c: -_nbytes(c.args)):
        unique.setdefault(c.ks.name, c)
    fused = [c for c in unique.values() if c.family is fused_gen][:per_model]
    return [c for c in unique.values() if c.family is not fused_gen] + fused


def _operand(it, inner: dict, vals: dict, name: str):
    """An operand of a region kernel as the launcher receives it: a tensor, or a Python number for a
    `const`; in-body weights and fills are evaluated here (the interpreter has not run them yet)."""
    if name in vals:
        v = vals[name]
    else:
        node = inner[name]
        v = interpret.IMPL[node.op](it, node, [], vals)[0]
    producer = next((m for m in it.g.walk() if any(o.name == name for o in m.outputs)), None)
    return v.item() if producer is not None and producer.op is Op.CONST else v


def _nbytes(xs) -> int:
    seen, total = set(), 0
    for x in xs:
        if torch.is_tensor(x) and x.data_ptr() not in seen:
            seen.add(x.data_ptr())
            total += x.numel() * x.element_size()
    return total


# -- one kernel: archc vs eager vs torch.compile ---------------------------------------------------------


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def variants(c: Captured, module, smoke: bool):
    """(archc, eager, compiled) callables over the operands; each returns the list of results."""
    names = [f"a{i}" for i in range(len(c.args))]
    if c.family is fused_gen:
        expr = f"{c.ks.name}({', '.join(names)})"
    else:
        expr = c.family.call(c.node, c.ks, names)
    code = compile(expr, f"<bench:{c.ks.name}>", "eval")
    glb = module.__dict__

    def archc_fn(*args):
        return _as_list(eval(code, glb, dict(zip(names, args))))

    it = Interpreter(c.graph, {}, Env(dict(c.env)))
    impl = interpret.IMPL[c.node.op]

    def eager_fn(*args):
        if c.node.op is Op.FUSED:
            vals = {n: (torch.as_tensor(a) if not torch.is_tensor(a) else a) for n, a in zip(c.names, args)}
            return impl(it, c.node, [], vals)
        if c.node.regions:                   # a loop kernel: the interpreter runs the region on the operands
            vals = {n: (torch.as_tensor(a) if not torch.is_tensor(a) else a) for n, a in zip(c.names, args)}
            return impl(it, c.node, list(args[:len(c.node.inputs)]), vals)
        return impl(it, c.node, list(args), {})

    if c.node.op in NOT_COMPILED:
        return archc_fn, eager_fn, None
    compiled = torch.compile(eager_fn, backend="aot_eager" if smoke else "inductor", dynamic=False)
    return archc_fn, eager_fn, compiled


# the eager form is a Python loop over the sequence: torch.compile would unroll thousands of steps
NOT_COMPILED = {Op.LINEAR_SCAN}


def _train(fn, args, frozen: tuple = ()):
    """fn's forward and backward: gradients of a fixed random projection of its float results, with
    respect to every float operand except the `frozen` ones (a kernel may specialise on a zero fill,
    e.g. the gated scan's h0, and then rightly has no gradient for it)."""
    diff = [i for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point() and i not in frozen]
    leaves = [a.detach().requires_grad_(True) if i in diff else a for i, a in enumerate(args)]
    weights = {}

    def step():
        outs = [o for o in fn(*leaves) if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad]
        if not outs:
            return []
        for k, o in enumerate(outs):
            if k not in weights:
                weights[k] = torch.randn(o.shape, device=o.device, generator=torch.Generator(o.device).manual_seed(k))
        loss = sum((o * weights[k]).sum() for k, o in enumerate(outs))
        return torch.autograd.grad(loss, [leaves[i] for i in diff], allow_unused=True)
    return step


def _max_err(a: list, b: list) -> float:
    errs = [(x.float() - y.float()).abs().max().item() for x, y in zip(a, b)
            if torch.is_tensor(x) and torch.is_tensor(y) and x is not None and y is not None and x.numel()]
    return max(errs, default=0.0)


def bench_case(c: Captured, module, timer: Timer, peak: float, smoke: bool, do_tune: bool) -> list[dict]:
    archc_fn, eager_fn, compiled_fn = variants(c, module, smoke)
    args = c.args
    shape = next((tuple(a.shape) for a in args if torch.is_tensor(a) and a.dim()), ())
    base = {"model": c.graph.name, "family": c.ks.family, "kernel": c.ks.name, "doc": c.ks.doc,
            "shape": "x".join(map(str, shape))}
    rows = []
    with torch.no_grad():
        ref = eager_fn(*args)
        got = archc_fn(*args)
        err = _max_err(got, ref)
        t_default = timer(lambda: archc_fn(*args))
    tuned_cfg = None
    if do_tune and not smoke:          # time every configuration of the forward (and backward) kernel
        with tune.Session(None) as session:
            with torch.no_grad():
                archc_fn(*args)
            if c.ks.needs_grad:
                _train(archc_fn, args, c.frozen)()
        tuned_cfg = {k: v[0] for k, v in session.best.items()}
        tune._MEMO.update(tuned_cfg)
        tune._SIZES.clear()
    with torch.no_grad():
        t_archc = timer(lambda: archc_fn(*args)) if tuned_cfg else t_default
        t_eager = timer(lambda: eager_fn(*args))
        t_comp = _maybe(timer, (lambda: compiled_fn(*args)) if compiled_fn is not None else None)
    moved = _nbytes(args) + _nbytes(got)
    rows.append({**base, "mode": "fwd", "archc_default_us": 1e6 * t_default, "archc_us": 1e6 * t_archc,
                 "eager_us": 1e6 * t_eager, "compile_us": 1e6 * t_comp, "bytes": moved,
                 "gbps": moved / t_archc / 1e9, "pct_copy": 100 * moved / t_archc / 1e9 / peak,
                 "max_err": err, "config": _cfg_text(tuned_cfg, c.ks)})
    if c.ks.needs_grad:
        a_step, e_step = _train(archc_fn, args, c.frozen), _train(eager_fn, args, c.frozen)
        k_step = _train(compiled_fn, args, c.frozen) if compiled_fn is not None else None
        ga, ge = a_step(), e_step()
        rows.append({**base, "mode": "fwd+bwd", "archc_us": 1e6 * timer(a_step), "eager_us": 1e6 * timer(e_step),
                     "compile_us": 1e6 * _maybe(timer, k_step), "max_err": _max_err(list(ga), list(ge))})
    return rows


def bench_decode(g, case: Case, device: torch.device, timer: Timer) -> list[dict]:
    """One decode step after a prompt of `case.seq` tokens: the triton module vs the torch module.

    The decode_attention family replaces `cache.attend` in the K/V-cached step; the rest of the
    step is the same code in both modules (fused kernels aside), so the difference is the family's.
    Each timed call appends one token to the cache (both modules alike). torch.compile is not run:
    the step mutates a Python cache object.
    """
    from archc.backends.torch import generate as torch_generate
    plan = emit.plan([g])
    kernels = sorted({ks.name for (_, _, cached), (_, ks, _) in plan.by_node.items() if cached})
    if not kernels:
        return []
    tmod = api.exec_module(emit.generate([g]).source, f"<bench-decode-triton:{g.name}>", f"bench_dt_{g.name}")
    pmod = api.exec_module(torch_generate([g]).source, f"<bench-decode-torch:{g.name}>", f"bench_dp_{g.name}")
    params = {k: v for k, v in case.overrides.items() if k in {s.name for s in g.symbols}}
    a = getattr(pmod, g.name)(**params).to(device).eval()
    b = getattr(tmod, g.name)(**params).to(device).eval()
    b.load_state_dict(a.state_dict())
    vocab = int(resolve_bindings(g, params).get("vocab", 16))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (case.batch, case.seq), generator=gen).to(device)
    tok = torch.randint(0, vocab, (case.batch, 1), generator=gen).to(device)
    with torch.no_grad():
        _, ca = a.prefill(prompt)
        _, cb = b.prefill(prompt)
        oa, _ = a.decode(tok, ca)
        ob, _ = b.decode(tok, cb)
        err = _max_err(_as_list(oa) if not isinstance(oa, dict) else list(oa.values()),
                       _as_list(ob) if not isinstance(ob, dict) else list(ob.values()))
        t_torch = timer(lambda: a.decode(tok, ca))
        t_triton = timer(lambda: b.decode(tok, cb))
    return [{"model": g.name, "family": "decode_attention", "kernel": ", ".join(kernels),
             "doc": f"whole decode step after {case.seq} tokens (torch module = eager column)",
             "shape": f"{case.batch}x1", "mode": "decode", "archc_us": 1e6 * t_triton, "eager_us": 1e6 * t_torch,
             "compile_us": float("nan"), "max_err": err, "config": "default or cache"}]


def _maybe(timer: Timer, fn) -> float:
    """Seconds of a torch.compile'd callable, NaN when it does not compile (reported, not fatal)."""
    if fn is None:
        return float("nan")
    try:
        fn()
        return timer(fn)
    except Exception as err:
        print(f"  torch.compile failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return float("nan")


def _cfg_text(tuned: dict | None, ks) -> str:
    if not tuned:
        return "default " + ",".join(f"{k}={v}" for k, v in sorted(ks.default.items()))
    fwd = [cfg for (name, _), cfg in tuned.items() if name == ks.name]
    return "tuned " + ",".join(f"{k}={v}" for k, v in sorted(fwd[0].items())) if fwd else "default"


# -- report ----------------------------------------------------------------------------------------------


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def write(out_dir: Path, card: str, meta: dict, rows: list[dict], errors: list[dict]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_{_slug(card)}"
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors}, indent=1) + "\n")
    lines = [f"# Generated Triton kernels on {card}", "",
             f"Measured by `python bench/gpu.py{' --smoke' if meta['smoke'] else ''}` "
             f"({meta['date']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}).",
             f"Device-to-device copy: {meta['copy']['gbps']:.0f} GB/s (read + write of "
             f"{meta['copy']['bytes'] / 2**30:.2f} GiB); kernel bandwidth is bytes of operands and "
             "results over the kernel's median time. Times are medians (CUDA events, do_bench); "
             "speedups are eager/archc and compile/archc from the same run.", ""]
    if meta["smoke"]:
        lines += ["**Smoke run on the CPU under TRITON_INTERPRET=1: these numbers mean nothing.**", ""]
    lines += ["| family | model | kernel | shape | mode | archc µs | eager µs | compile µs | vs eager | vs compile "
              "| GB/s | % copy | max err | config |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["model"], r["kernel"], r["mode"])):
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        pct = f"{r['pct_copy']:.0f}%" if "pct_copy" in r else ""
        lines.append(f"| {r['family']} | {r['model']} | `{r['kernel']}` {r['doc']} | {r['shape']} | {r['mode']} "
                     f"| {r['archc_us']:.1f} | {r['eager_us']:.1f} | {r['compile_us']:.1f} "
                     f"| {r['eager_us'] / r['archc_us']:.2f}x | {r['compile_us'] / r['archc_us']:.2f}x "
                     f"| {gbps} | {pct} | {r['max_err']:.1e} | {r.get('config', '')} |")
    if errors:
        lines += ["", "## Failures", ""] + [f"- {e['model']} {e.get('kernel', '')}: {e['error']}" for e in errors]
    md.write_text("\n".join(lines) + "\n")
    return md, js


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes (checks it runs)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where gpu_<card>.{md,json} go")
    ap.add_argument("--models", help="comma-separated stdlib names (default: all)")
    ap.add_argument("--per-model", type=int, default=2, help="fused kernels per model (largest first; family "
                                                               "kernels are all benchmarked, first)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no new kernel after this many seconds")
    ap.add_argument("--no-tune", action="store_true", help="time the default configurations only")
    opts = ap.parse_args(argv)
    start = time.perf_counter()
    if opts.smoke:
        device = torch.device("cpu")
        cases = SMOKE_CASES
        card = "smoke"
    else:
        if not torch.cuda.is_available():
            print("bench/gpu.py needs a CUDA GPU (or --smoke for the CPU check)", file=sys.stderr)
            return 1
        device = torch.device("cuda")
        cases = GPU_CASES
        card = torch.cuda.get_device_name()
    if opts.models:
        wanted = opts.models.split(",")
        if opts.smoke:          # any GPU case at the model's default (tiny) sizes
            cases = [Case(c.model, {}, 2, None, c.arch) for c in GPU_CASES if c.model in wanted]
        else:
            cases = [c for c in cases if c.model in wanted]
    import triton
    tune._CACHE, tune._LOADED = None, True       # ignore this machine's autotune cache: tune in place
    timer = Timer(device, opts.smoke)
    copy = copy_bandwidth(device, timer, opts.smoke)
    meta = {"card": card, "smoke": opts.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy": copy, "families": _family_names()}
    print(f"{card}: device-to-device copy {copy['gbps']:.0f} GB/s; families: {['fused'] + meta['families']}",
          flush=True)
    rows, errors = [], []
    done: set[str] = set()
    for case in (SMOKE_DECODE if opts.smoke else GPU_DECODE):
        if opts.models and case.model not in opts.models.split(","):
            continue
        for g0 in case.graphs():
            if time.perf_counter() - start > opts.budget_s:
                errors.append({"model": g0.name, "error": "decode: skipped: past the budget"})
                continue
            try:
                new = bench_decode(emit_graph(g0), case, device, timer)
            except Exception as err:
                errors.append({"model": g0.name, "kernel": "decode", "error": f"{type(err).__name__}: {err}"})
                traceback.print_exc()
                continue
            rows += new
            for r in new:
                print(f"{r['model']:<16} decode step: triton module {r['archc_us']:9.1f} us  "
                      f"torch module {r['eager_us']:9.1f} us  err {r['max_err']:.1e}", flush=True)
            write(opts.out, card, meta, rows, errors)
    for case in cases:
        for g0 in case.graphs():
            if time.perf_counter() - start > opts.budget_s:
                errors.append({"model": g0.name, "error": f"skipped: past the {opts.budget_s:.0f} s budget"})
                continue
            try:
                g = emit_graph(g0)
                resolve_bindings(g, case.overrides)
                module = api.exec_module(emit.generate([g]).source, f"<bench-gpu:{g.name}>", f"bench_gpu_{g.name}")
                captured = capture(g, case, device, opts.per_model)
            except Exception as err:  # one model failing must not lose the others
                errors.append({"model": g0.name, "error": f"{type(err).__name__}: {err}"})
                traceback.print_exc()
                continue
            for c in captured:
                if c.ks.name in done:           # the same kernel met in an earlier model
                    continue
                done.add(c.ks.name)
                if time.perf_counter() - start > opts.budget_s:
                    errors.append({"model": g.name, "kernel": c.ks.name, "error": "skipped: past the budget"})
                    continue
                try:
                    new = bench_case(c, module, timer, copy["gbps"], opts.smoke, not opts.no_tune)
                except Exception as err:
                    errors.append({"model": g.name, "kernel": c.ks.name, "error": f"{type(err).__name__}: {err}"})
                    traceback.print_exc()
                    continue
                rows += new
                for r in new:
                    print(f"{r['model']:<16} {r['kernel']:<18} {r['mode']:<8} archc {r['archc_us']:9.1f} us  "
                          f"eager {r['eager_us']:9.1f} us  compile {r['compile_us']:9.1f} us  "
                          f"err {r['max_err']:.1e}", flush=True)
                write(opts.out, card, meta, rows, errors)
    md, js = write(opts.out, card, meta, rows, errors)
    print(f"wrote {md} and {js} ({len(rows)} rows, {len(errors)} failures, {time.perf_counter() - start:.0f} s)")
    return 0 if rows else 1


def _family_names() -> list[str]:
    try:
        return [f.FAMILY for f in emit.families()]
    except Exception as err:  # a broken family module is reported by the models that reach it
        return [f"unavailable ({type(err).__name__}: {err})"]


def emit_graph(g):
    """The graph as `--target triton` compiles it: -O2 (which ends with fuse-elementwise)."""
    return run_pipeline(g, PRESETS["O2"])




if __name__ == "__main__":
    sys.exit(main())
