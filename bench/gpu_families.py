"""GPU micro-benchmarks of the Triton kernel families (SPEC §20): `python bench/gpu_families.py`.

Each case builds the IR node from a small .arch program, generates the family's kernel, and times
it at a realistic GPU shape against torch eager (the interpreter's implementation of the node:
what the PyTorch backend runs) and `torch.compile` of that same reference, forward and (where the
family has a backward) forward+backward. Times are medians from `triton.testing.do_bench`; the
largest difference from eager is reported. Results: bench/results/gpu_families_<card>.{md,json},
rewritten after every case. `--budget-s` stops starting new cases; `--cases` picks some.

Cases (B batch, T length, d features, H/Hk query/K-V heads, D head size):

* gated_scan: h_t = a_t h_{t-1} + b_t, full gate [B, T, d] and per-row gate [B, T, 1]. The
  reference is a Python loop over T (what eager runs); torch.compile unrolls it, so the compiled
  column is measured at T = 128 for the full gate only (compiling thousands of unrolled steps
  takes minutes);
* routing: MoR-style route_topk write-back with weight and among masks (gather of the routed
  tokens, a cheap body, gated scatter-back), and its backward;
* decode_attention: one new token per sample against an 8k-token cache, GQA; dense, ThinK with
  half the key channels pruned, and LycheeDecode top-k (256 keys, 8 dense heads of 32);
* memory_update: a Titans-sized mem_write (2-layer gelu MLP memory, d 512, hidden 1024, a
  64-token chunk, momentum and forget gate), forward and the second-order backward. torch.compile
  runs the reference eagerly (it calls autograd.grad), so there is no compiled column;
* recursion_body: a shared-weight loop of per-token work over 64k rows, every trip in one launch
  (an LSTM cell iterated 8 times, hidden 32, as in LSTM-PINN; a pre-norm residual MLP, d 32/64
  with hidden 64/128, 8 trips) against the same loop as torch ops in a Python loop (the kernel
  source's `<name>_torch`: what `--target torch` runs) and torch.compile of that loop. The last
  case sits at the on-chip bound (2^14 weight elements); the label says whether the launcher's
  guard would take the kernel.

`--smoke` runs every case on the CPU under TRITON_INTERPRET=1 at tiny sizes (numbers mean nothing;
tests/test_triton_families.py runs it so the script does not rot).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if "--smoke" in sys.argv:               # must precede the first `triton.jit`
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu import Timer, _max_err, _train, copy_bandwidth  # noqa: E402  (also makes archc importable)

import torch  # noqa: E402

import archc.api as api  # noqa: E402
from archc.backends import torch_runtime as rt  # noqa: E402
from archc.backends.triton.emit import generate  # noqa: E402
from archc.backends.triton.families import (decode_attention, gated_scan, memory_update,  # noqa: E402
                                            recursion_body, routing)
from archc.ir.ops import Op  # noqa: E402
from archc.passes import PRESETS, run_pipeline  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HEADER = ("import torch\nimport triton\nimport triton.language as tl\n"
          "from archc.backends.triton import autotune as _tune\n\n\n")

SCAN = """
arch Scan(d: int = 8) {
  input x: f32[B, T, d]
  input g: f32[B, T, d]
  input h: f32[B, d]
  y1 = linear_scan(sigmoid(g), x, h)
  y2 = linear_scan(sigmoid(g[:, :, 0:1]), x, h)
  output y = y1 + y2
}
"""

ROUTE = """
arch Route(d: int = 8) {
  input x: f32[B, T, d]
  input s: f32[B, T]
  input m: bool[B, T]
  input w: f32[B, T]
  route x by topk(s, capacity = 0.5, among = m) weight w { x = x * 2.0 }
  output y = x
}
"""

DECODE = """
arch Dec(vocab: int = 16, d: int = 64, heads: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer attn = Attention(d, heads, kv_heads = 2)
  layer head = Linear(d, vocab)
  output logits = head(attn(embed(tokens)))
  @POLICY@
}
"""


def _kernel(family, src: str, op: Op, pick: int = 0):
    """(launcher, module, KernelSource) for the `pick`-th node `op` of the program."""
    (g,) = api.check(src)
    node = [n for n in g.walk() if n.op is op][pick]
    ks = family.generate(node, g)
    mod = api.exec_module(HEADER + ks.source, f"<bench-families:{ks.name}>", f"bench_families_{ks.name}")
    return getattr(mod, ks.name), mod, ks, node


# -- cases: each returns (label, KernelSource, archc_fn, eager_fn, args, differentiable, compile_ok) ------


def scan_cases(sizes, device):
    B, T, d = sizes["scan"]
    out = []
    for pick, label in ((0, "full gate [B,T,d]"), (1, "per-row gate [B,T,1]")):
        fn, _, ks, node = _kernel(gated_scan, SCAN, Op.LINEAR_SCAN, pick)
        for t in sorted({T, sizes["scan_compile_T"]}):
            gen = torch.Generator(device).manual_seed(0)
            a = torch.rand(B, t, d if pick == 0 else 1, device=device, generator=gen)
            b = torch.randn(B, t, d, device=device, generator=gen)
            h0 = torch.randn(B, d, device=device, generator=gen)
            out.append((f"{label} B={B} T={t} d={d}", ks, lambda a, b, h0, fn=fn: fn(a, b, h0),
                        lambda a, b, h0: rt.linear_scan(a, b, h0, 1), [a, b, h0], True,
                        t <= sizes["scan_compile_T"] and pick == 0))
    return out


def route_cases(sizes, device):
    B, T, d = sizes["route"]
    scatter, mod, ks, node = _kernel(routing, ROUTE, Op.ROUTE_TOPK)
    gather = getattr(mod, ks.meta["gather"])
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(B, T, d, device=device, generator=gen)
    s = torch.randn(B, T, device=device, generator=gen)
    m = torch.rand(B, T, device=device, generator=gen) < 0.75
    w = torch.rand(B, T, device=device, generator=gen)
    k = max(1, int(0.5 * T))
    idx = rt.route_select(s, k, m)

    def archc(x, w):
        xs = gather(x, idx)
        return scatter(x, idx, xs, xs * 2.0, weight=w, among=m)[0]

    def eager(x, w):
        xs = rt.gather_along(x, idx, 1)
        return rt.route_scatter(x, idx, xs, xs * 2.0, w, m)[0]

    return [(f"route_topk gather+scatter, weight+among, B={B} T={T} d={d} k={k}", ks, archc, eager, [x, w], True,
             True)]


def decode_cases(sizes, device):
    B, ctx, H, HK, D = sizes["decode"]
    policies = {"dense": "", "think": "cache prune_key_channels(attn, ratio = 0.5, recent = 32, observe = 32)",
                "topk": f"cache topk_decode(attn, k = {sizes['decode_top']}, dense_heads = {H // 4})"}
    out = []
    for label, policy in policies.items():
        fn, _, ks, node = _kernel(decode_attention, DECODE.replace("@POLICY@", policy), Op.ATTEND)
        gen = torch.Generator(device).manual_seed(0)
        pol = {}
        if label == "think":
            pol = {"attn": ("prune_key_channels", {"ratio": 0.5, "recent": 32, "observe": 32})}
        elif label == "topk":
            pol = {"attn": ("topk_decode", {"k": sizes["decode_top"], "dense_heads": H // 4})}
        cache = rt.KVCache(pol)
        qp, kp, vp = (torch.randn(B, ctx, h, D, device=device, generator=gen) for h in (H, HK, HK))
        cache.store("attn", "attn", qp, kp, vp)
        cache.compress()
        cache.length = ctx
        q = torch.randn(B, 1, H, D, device=device, generator=gen)
        pos = torch.full((B, 1), ctx - 1, device=device, dtype=torch.long)
        none = q[:, :0]

        def archc(q, fn=fn, cache=cache, pos=pos, none=none):
            return fn(cache, "step", "attn", q, none, none, pos, 0, reads="attn")

        def eager(q, cache=cache, pos=pos, none=none):
            return cache.attend("step", "attn", q, none, none, pos, 0, reads="attn")

        out.append((f"decode {label}: B={B} ctx={ctx} H={H} Hk={HK} D={D}", ks, archc, eager, [q], False, True))
    return out


MEMORY = """
arch Mem(d: int = 8, hidden: int = 16) {
  input k: f32[B, T, d]
  input v: f32[B, T, d]
  input lr: f32[B, T]
  input eta: f32[B]
  input alpha: f32[B]
  memory m = NeuralMemory(d, hidden = hidden, layers = 2)
  m.write(k, v, lr = lr, momentum = eta, forget = alpha)
  output y = m.read(k)
}
"""


def memory_cases(sizes, device):
    B, T, d, hidden = sizes["memory"]
    fn, _, ks, node = _kernel(memory_update, MEMORY, Op.MEM_WRITE)
    gen = torch.Generator(device).manual_seed(0)
    k, v = (torch.nn.functional.normalize(torch.randn(B, T, d, device=device, generator=gen), dim=-1)
            for _ in range(2))
    lr = 0.1 * torch.rand(B, T, device=device, generator=gen)
    eta, alpha = (torch.rand(B, device=device, generator=gen) for _ in range(2))
    ws = [torch.randn(B, hidden, d, device=device, generator=gen) / d ** 0.5,
          torch.randn(B, d, hidden, device=device, generator=gen) / hidden ** 0.5]
    ss = [torch.zeros_like(w) for w in ws]

    def eager(*a):
        new_w, new_s = rt.memory_write(*a[:5], list(a[5:7]), list(a[7:]), "gelu", False, "mse")
        return new_w + new_s

    # torch.compile runs memory_write eagerly (it calls autograd.grad): no compiled column
    return [(f"mem_write 2-layer gelu mse, B={B} chunk T={T} d={d} hidden={hidden}", ks, fn, eager,
             [k, v, lr, eta, alpha] + ws + ss, True, False)]


RECURSION = """
arch ResMLP(d: int = 8, hidden: int = 16, steps: int = 4) {
  input x: f32[B, d]
  layer norm = RMSNorm(d)
  layer mlp = MLP(d, hidden)
  h = x
  repeat t in steps {
    h = h + mlp(norm(h))
  }
  output y = h
}

arch Cell(hidden: int = 32, depth: int = 8) {
  input x: f32[B, hidden]
  layer cell = LSTMCell(hidden, hidden)
  h = zeros([B, hidden])
  c = zeros([B, hidden])
  repeat k in depth {
    h, c = cell(x, h, c)
  }
  output y = h + c
}
"""


def recursion_cases(sizes, device):
    from bench.gpu import Case, capture
    out = []
    for arch, over, rows in sizes["recursion"]:
        (g,) = [run_pipeline(g, PRESETS["O2"]) for g in api.check(RECURSION) if g.name == arch]
        mod = api.exec_module(generate([g]).source, f"<bench-families:{arch}>", f"bench_families_{arch}_{rows}")
        sys.modules[mod.__name__] = mod          # torch.compile imports the module of the function it traces
        (c,) = [c for c in capture(g, Case(arch, over, batch=rows, seq=None), device, 0)
                if c.family is recursion_body]
        launcher, loop = getattr(mod, c.ks.name), getattr(mod, c.ks.name + "_torch")
        fits = getattr(mod, c.ks.name + "_fits")(*c.args[len(c.args) - c.ks.meta["sizes"]:])
        label = f"{arch} {', '.join(f'{k}={v}' for k, v in over.items())} rows={rows} (guard: {fits})"
        out.append((label, c.ks, lambda *a, f=launcher: f(*a), lambda *a, f=loop: f(*a), c.args, True, True))
    return out


GPU_SIZES = {"scan": (16, 4096, 2048), "scan_compile_T": 128, "route": (8, 2048, 2048),
             "decode": (8, 8192, 32, 8, 128), "decode_top": 256,
             "memory": (8, 64, 512, 1024),
             "recursion": [("Cell", {"hidden": 32, "depth": 8}, 65536),
                           ("ResMLP", {"d": 32, "hidden": 64, "steps": 8}, 65536),
                           ("ResMLP", {"d": 64, "hidden": 128, "steps": 8}, 65536)]}
SMOKE_SIZES = {"scan": (2, 12, 5), "scan_compile_T": 12, "route": (2, 8, 6), "decode": (1, 40, 4, 2, 8),
               "decode_top": 4, "memory": (2, 5, 6, 4),
               "recursion": [("ResMLP", {"d": 8, "hidden": 16, "steps": 3}, 5), ("Cell", {"hidden": 8, "depth": 3}, 5)]}
# cheapest to compile first: a run cut short by its budget still covers most families
CASES = {"decode_attention": decode_cases, "routing": route_cases, "recursion_body": recursion_cases,
         "memory_update": memory_cases, "gated_scan": scan_cases}


def _listed(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def bench(label, ks, archc, eager, args, differentiable, compile_ok, timer, smoke) -> list[dict]:
    base = {"family": ks.family, "case": label, "kernel": ks.name}
    with torch.no_grad():
        ref, got = eager(*args), archc(*args)
        err = _max_err(_listed(got), _listed(ref))
        t_archc = timer(lambda: archc(*args))
        t_eager = timer(lambda: eager(*args))
        t_comp = None
        if compile_ok:
            compiled = torch.compile(eager, backend="aot_eager" if smoke else "inductor", dynamic=False)
            compiled(*args)
            t_comp = timer(lambda: compiled(*args))
    rows = [{**base, "mode": "fwd", "archc_us": 1e6 * t_archc, "eager_us": 1e6 * t_eager,
             "compile_us": None if t_comp is None else 1e6 * t_comp, "max_err": err}]
    if differentiable:
        wrap = (lambda f: lambda *a: _listed(f(*a)))
        a_step, e_step = _train(wrap(archc), args), _train(wrap(eager), args)
        g_err = _max_err(list(a_step()), list(e_step()))
        row = {**base, "mode": "fwd+bwd", "archc_us": 1e6 * timer(a_step), "eager_us": 1e6 * timer(e_step),
               "compile_us": None, "max_err": g_err}
        if compile_ok:
            c_step = _train(wrap(torch.compile(eager, backend="aot_eager" if smoke else "inductor", dynamic=False)),
                            args)
            c_step()
            row["compile_us"] = 1e6 * timer(c_step)
        rows.append(row)
    return rows


def write(out_dir: Path, meta: dict, rows: list[dict], errors: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu_families_" + "".join(ch if ch.isalnum() else "_" for ch in meta["card"].lower()).strip("_")
    (out_dir / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "errors": errors}, indent=1) + "\n")
    lines = [f"# Triton kernel families on {meta['card']}", "",
             f"Measured by `python bench/gpu_families.py{' --smoke' if meta['smoke'] else ''}` ({meta['date']}; "
             f"torch {meta['torch']}, triton {meta['triton']}). Medians; ratios are eager/archc and "
             "compile/archc from the same run; default kernel configurations (no tuning).", ""]
    if meta["smoke"]:
        lines += ["**Smoke run on the CPU under TRITON_INTERPRET=1: these numbers mean nothing.**", ""]
    lines += ["| family | case | mode | archc µs | eager µs | compile µs | vs eager | vs compile | max err |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        comp = "" if r["compile_us"] is None else f"{r['compile_us']:.1f}"
        vs_comp = "" if r["compile_us"] is None else f"{r['compile_us'] / r['archc_us']:.2f}x"
        lines.append(f"| {r['family']} | {r['case']} | {r['mode']} | {r['archc_us']:.1f} | {r['eager_us']:.1f} "
                     f"| {comp} | {r['eager_us'] / r['archc_us']:.2f}x | {vs_comp} | {r['max_err']:.1e} |")
    if errors:
        lines += ["", "## Failures", ""] + [f"- {e}" for e in errors]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes (checks it runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--cases", help="comma-separated families (default: all)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new case after this many seconds")
    opts = ap.parse_args(argv)
    start = time.perf_counter()
    if opts.smoke:
        device, sizes, card = torch.device("cpu"), SMOKE_SIZES, "smoke"
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_families.py needs a CUDA GPU (or --smoke for the CPU check)", file=sys.stderr)
            return 1
        device, sizes, card = torch.device("cuda"), GPU_SIZES, torch.cuda.get_device_name()
    import triton
    timer = Timer(device, opts.smoke)
    meta = {"card": card, "smoke": opts.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "copy_gbps": copy_bandwidth(device, timer, opts.smoke)["gbps"], "sizes": sizes}
    rows, errors = [], []
    wanted = opts.cases.split(",") if opts.cases else list(CASES)
    for family in wanted:
        try:
            cases = CASES[family](sizes, device)
        except Exception as err:
            errors.append(f"{family}: {type(err).__name__}: {err}")
            traceback.print_exc()
            continue
        for case in cases:
            if time.perf_counter() - start > opts.budget_s:
                errors.append(f"{family} {case[0]}: skipped, past the {opts.budget_s:.0f} s budget")
                continue
            try:
                new = bench(*case, timer, opts.smoke)
            except Exception as err:      # one case failing must not lose the others
                errors.append(f"{family} {case[0]}: {type(err).__name__}: {err}")
                traceback.print_exc()
                continue
            rows += new
            for r in new:
                comp = "-" if r["compile_us"] is None else f"{r['compile_us']:.1f}"
                print(f"{r['case'][:60]:<60} {r['mode']:<8} archc {r['archc_us']:10.1f} us  eager "
                      f"{r['eager_us']:10.1f} us  compile {comp:>10} us  err {r['max_err']:.1e}", flush=True)
            write(opts.out, meta, rows, errors)
    md = write(opts.out, meta, rows, errors)
    print(f"wrote {md} ({len(rows)} rows, {len(errors)} failures, {time.perf_counter() - start:.0f} s)")
    return 0 if rows and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
