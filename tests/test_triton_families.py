"""Triton kernel families (SPEC §20) on the CPU under TRITON_INTERPRET=1, against the IR interpreter.

Each test takes an IR node from a small .arch program, generates its kernel source, loads it the way
the emitter does (a module of its own, source registered for inspect), runs it on random inputs
and compares values and gradients with the interpreter's implementation of the same node (fp32;
atol/rtol stated per test). Shapes are tiny: the interpreter runs every program instance in Python.
"""
from __future__ import annotations

import itertools
import linecache
import os
import subprocess
import sys
import types

import pytest

os.environ["TRITON_INTERPRET"] = "1"      # read by triton.jit when a kernel is defined

import torch  # noqa: E402

triton = pytest.importorskip("triton")

from archc import api  # noqa: E402
from archc.api import check  # noqa: E402
from archc.backends import torch_runtime as rt  # noqa: E402
from archc.backends.triton.families import decode_attention, gated_scan, memory_update, routing  # noqa: E402
from archc.backends.triton.families._util import is_zero_fill  # noqa: E402
from archc.ir.interpret import IMPL, Env, Interpreter  # noqa: E402
from archc.ir.ops import Op  # noqa: E402

HEADER = ("import torch\nimport triton\nimport triton.language as tl\n"
          "from archc.backends.triton import autotune as _tune\n\n\n")
_COUNT = itertools.count()
SMALL = {"BLOCK_T": 8, "BLOCK_N": 8, "num_warps": 1, "num_stages": 1}


def load(ks):
    """The kernel source as a module (source registered in linecache, as triton.jit reads it)."""
    code = HEADER + ks.source
    filename = f"<archc-triton:{ks.name}:{next(_COUNT)}>"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    mod = types.ModuleType(ks.name)
    mod.__file__ = filename
    exec(compile(code, filename, "exec"), mod.__dict__)
    return getattr(mod, ks.name), mod


def graph(src: str, name: str | None = None):
    gs = check(src)
    return gs[0] if name is None else next(g for g in gs if g.name == name)


def nodes(g, op):
    return [n for n in g.walk() if n.op is op]


def interpret(g, node, ins, bindings=None):
    """The interpreter's result for one node on the given operands."""
    env = Env({**g.symbol_defaults(), **(bindings or {})})
    return IMPL[node.op](Interpreter(g, {}, env), node, ins, {})


def close(a, b, atol=1e-5, rtol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# -- gated scan ----------------------------------------------------------------------------------

SCANS = """
arch Scans(d: int = 5) {
  input x: f32[B, T, d]
  input h: f32[B, d]
  input q: f32[B, 3, T, d]
  param decay: f32[d] = normal(std = 1.0)
  y1 = linear_scan(sigmoid(x), x, h)
  y2 = linear_scan(unsqueeze(sigmoid(h * decay), axis = 1), x, zeros([B, d]))
  y3 = linear_scan(sigmoid(x[:, :, 0:1]), tanh(x), h)
  y4 = linear_scan(sigmoid(q), q, zeros([B, 3, d]), axis = 2)
  output y = y1 + y2 + y3 + sum(y4, axis = 1)
}
"""


def _scan_operands(g, node, sizes, gen):
    types_ = {a.name: a.type for a in g.inputs}
    for n in g.walk():
        for o in n.outputs:
            types_[o.name] = o.type
    env = Env({**g.symbol_defaults(), **sizes})
    ins = []
    for i, name in enumerate(node.inputs):
        shape = [env.eval_int(d) for d in types_[name].shape]
        t = torch.rand(shape, generator=gen) if i == 0 else torch.randn(shape, generator=gen)
        if is_zero_fill(g, name):
            ins.append(torch.zeros(shape))        # the kernel relies on the IR's zero fill
        else:
            ins.append(t.requires_grad_(True))
    return ins


@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_gated_scan_forward_backward(which):
    g = graph(SCANS)
    node = nodes(g, Op.LINEAR_SCAN)[which]
    assert gated_scan.matches(node, g)
    ks = gated_scan.generate(node, g)
    assert ks.needs_grad and ks.default in ks.configs
    fn, _ = load(ks)
    gen = torch.Generator().manual_seed(which)
    ins = _scan_operands(g, node, {"B": 2, "T": 19}, gen)
    ref = interpret(g, node, ins)[0]
    out = fn(*ins, SMALL if which else None)          # None: the default via the autotune cache
    close(out, ref)
    dh = torch.randn(ref.shape, generator=gen)
    diff = [t for t in ins if t.requires_grad]
    for w, gt in zip(torch.autograd.grad(ref, diff, dh), torch.autograd.grad(out, diff, dh)):
        close(gt, w, atol=1e-4, rtol=1e-3)


def test_gated_scan_specialises_on_gate_form():
    g = graph(SCANS)
    specs = [gated_scan.spec(n, g) for n in nodes(g, Op.LINEAR_SCAN)]
    forms = [(s[2], s[3], s[4]) for s in specs]
    assert forms == [("PTN", "PTN", False), ("PN", "PTN", True), ("PT", "PTN", False), ("PTN", "PTN", True)]
    srcs = [gated_scan.generate(n, g).source for n in nodes(g, Op.LINEAR_SCAN)]
    assert len({s for s in srcs}) == 4
    assert "a_row = tl.load" in srcs[1] and "a_row" not in srcs[0]
    assert gated_scan.generate(nodes(g, Op.LINEAR_SCAN)[0], g).source == srcs[0]     # deterministic


# -- routing -------------------------------------------------------------------------------------

ROUTES = """
arch Routes(d: int = 6) {
  input x: f32[B, T, d]
  input s: f32[B, T]
  input m: bool[B, T]
  input w: f32[B, T]
  input j: i64[B, 4]
  y = x
  route y by topk(s, capacity = 0.5, among = m) weight w as sel { y = tanh(y) * 2.0 }
  z = x
  route z by topk(s, capacity = 0.4) { z = z * z }
  output out = y + z + unsqueeze(sum(gather(x, j, axis = 1), axis = 1), axis = 1)
  output active = sel
}
"""


def _route_inputs(B, T, d, gen):
    x = torch.randn(B, T, d, generator=gen, requires_grad=True)
    s = torch.randn(B, T, generator=gen)
    m = torch.rand(B, T, generator=gen) < 0.6
    w = torch.rand(B, T, generator=gen, requires_grad=True)
    return x, s, m, w


@pytest.mark.parametrize("which", [0, 1])
def test_route_gather_scatter_forward_backward(which):
    g = graph(ROUTES)
    node = nodes(g, Op.ROUTE_TOPK)[which]
    assert routing.region_matches(node, g) and not routing.matches(node, g)
    ks = routing.generate(node, g)
    scatter, mod = load(ks)
    gen = torch.Generator().manual_seed(which)
    x, s, m, w = _route_inputs(2, 9, 6, gen)
    ops = [x, s] + ([m] if node.attr("has_among") else []) + ([w] if node.attr("has_weight") else [])
    ref_out, ref_sel = interpret(g, node, ops)
    k = max(1, int(float(node.attr("capacity")) * 9 + 1e-9))
    idx = rt.route_select(s, k, m if node.attr("has_among") else None)
    x_sel = getattr(mod, ks.meta["gather"])(x, idx, {**SMALL, "BLOCK_K": 2, "BLOCK_R": 4})
    close(x_sel, rt.gather_along(x, idx, 1))
    body = (lambda t: torch.tanh(t) * 2.0) if which == 0 else (lambda t: t * t)
    gates = {"weight": w, "among": m} if which == 0 else {}
    out, sel = scatter(x, idx, x_sel, body(x_sel), config={**SMALL, "BLOCK_K": 2, "BLOCK_R": 4}, **gates)
    close(out, ref_out)
    assert torch.equal(sel, ref_sel)
    dout = torch.randn(out.shape, generator=gen)
    diff = [x, w] if which == 0 else [x]
    for want, got in zip(torch.autograd.grad(ref_out, diff, dout), torch.autograd.grad(out, diff, dout)):
        close(got, want, atol=1e-5, rtol=1e-4)


def test_gather_repeated_indices_forward_backward():
    g = graph(ROUTES)
    node = nodes(g, Op.GATHER)[0]
    assert routing.matches(node, g)
    ks = routing.generate(node, g)
    assert "atomic_add" in ks.source          # indices may repeat: the backward accumulates
    fn, _ = load(ks)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 6, generator=gen, requires_grad=True)
    j = torch.tensor([[0, 3, 3, 6], [5, 5, 5, 1]])
    ref = interpret(g, node, [x, j])[0]
    out = fn(x, j, {**SMALL, "BLOCK_K": 2, "BLOCK_R": 4})
    close(out, ref)
    dout = torch.randn(out.shape, generator=gen)
    close(torch.autograd.grad(out, x, dout)[0], torch.autograd.grad(ref, x, dout)[0])


def test_routing_specialises_on_gates():
    g = graph(ROUTES)
    gated, plain = (routing.generate(n, g) for n in nodes(g, Op.ROUTE_TOPK))
    assert "w_ptr + b * T + row" in gated.source and "valid" in gated.source
    assert "w_ptr + b * T + row" not in plain.source and "valid" not in plain.source
    assert "atomic_add" not in gated.source    # top-k rows are distinct
    assert routing.call(nodes(g, Op.ROUTE_TOPK)[0], gated, ["x", "i", "xs", "y", "w", "m"]) == \
        f"{gated.name}(x, i, xs, y, weight=w, among=m)"


# -- decode attention -----------------------------------------------------------------------------

DECODE = """
block Layer(d: int, heads: int) {
  input x: f32[B, T, d]
  layer attn = Attention(d, heads, kv_heads = 2, window = @WINDOW@)
  return x + attn(x)
}

arch Dec(vocab: int = 16, d: int = 24, heads: int = 4) {
  input tokens: i64[B, T]
  layer embed = Embedding(vocab, d)
  layer a = Layer(d, heads)
  layer b = Layer(d, heads)
  layer head = Linear(d, vocab)
  output logits = head(b(a(embed(tokens))))
  @POLICIES@
}
"""

_DEC_CASES = {
    "dense": ("0", ""),
    "shared": ("0", "cache share_kv(b.attn, source = a.attn)"),
    "think": ("0", "cache prune_key_channels(a.attn, ratio = 0.5, recent = 3, observe = 4)"),
    "topk": ("5", "cache topk_decode(a.attn, k = 3, dense_heads = 1)"),
    "think_topk": ("0", "cache prune_key_channels(a.attn, ratio = 0.5, recent = 3, observe = 4)\n"
                        "  cache topk_decode(a.attn, k = 4, dense_heads = 3)"),
}


@pytest.mark.parametrize("case,dot", [(c, False) for c in sorted(_DEC_CASES)] + [("think_topk", True)])
def test_decode_attention_matches_the_cache(case, dot):
    window, policies = _DEC_CASES[case]
    g = graph(DECODE.replace("@WINDOW@", window).replace("@POLICIES@", policies))
    node = next(n for n in nodes(g, Op.ATTEND) if n.attr("site") == "a.attn")
    reader = next(n for n in nodes(g, Op.ATTEND) if n.attr("site") == "b.attn")
    assert decode_attention.matches_cached(node, g) and not decode_attention.matches(node, g)
    ks = decode_attention.generate(node, g)
    fn, _ = load(ks)
    # KVCache holds one policy per site: for think_topk, pruning acts at the end of the prompt and
    # top-k selection over the pruned keys afterwards
    policy = [{p.targets[0]: (p.kind, dict(p.args))} for p in g.policies if p.kind != "share_kv"] or [{}]
    ref_cache, cache = rt.KVCache(policy[0]), rt.KVCache(policy[0])
    gen = torch.Generator().manual_seed(len(case))
    B, H, HK, D = (2, 4, 2, 32) if dot else (2, 4, 2, 6)     # dot: 16-wide tiles take the tl.dot path
    cfg = {**SMALL, "BLOCK_M": 16, "BLOCK_N": 16} if dot else {**SMALL, "BLOCK_M": 4, "BLOCK_N": 4}
    win = int(window)
    length = 0
    for step, T in enumerate([21, 1, 2] if dot else [9, 1, 1, 2]):      # a prompt, then decode steps
        q, k, v = (torch.randn(B, T, h, D, generator=gen) for h in (H, HK, HK))
        pos = (length + torch.arange(T))[None].expand(B, T)
        want = ref_cache.attend("a.attn", "a.attn", q, k, v, pos, win)
        got = fn(cache, "a.attn", "a.attn", q, k, v, pos, win, None, cfg)
        close(got, want)
        if case == "shared":                                 # the reader attends over a's entry
            q2 = torch.randn(B, T, H, D, generator=gen)
            want = ref_cache.attend("b.attn", "b.attn", q2, k, v, pos, 0, reads="a.attn")
            got = fn(cache, "b.attn", "b.attn", q2, k, v, pos, 0, "a.attn", cfg)
            close(got, want)
            assert reader.attr("kv_share") == "from:a.attn"
        if step == 0:
            ref_cache.compress()
            cache.compress()
            ref_cache.policies = cache.policies = policy[-1]
        length += T
    if "think" in case:
        assert "kept" in cache.entries["a.attn"]          # the pruned layout was exercised


def test_decode_attention_keeps_what_a_cache_rewrite_reads():
    """rewrite_kv (SPEC §11.1) scores earlier entries with the step's queries and the site's window:
    the kernel's launcher records them like KVCache.attend, so rewrites and later steps agree."""
    g = graph(DECODE.replace("@WINDOW@", "4").replace("@POLICIES@", ""))
    node = next(n for n in nodes(g, Op.ATTEND) if n.attr("site") == "a.attn")
    fn, _ = load(decode_attention.generate(node, g))

    def processor(k, v, pos):
        return k * 2 + pos[..., None, None], v - 1

    rewrites = {"a.attn": (3, 2, processor)}
    ref_cache, cache = rt.KVCache({}, rewrites), rt.KVCache({}, rewrites)
    gen = torch.Generator().manual_seed(5)
    tokens = torch.tensor([[0, 3, 0, 0, 0, 3, 0, 3], [0, 0, 3, 0, 0, 0, 3, 0]])
    cfg = {**SMALL, "BLOCK_M": 4, "BLOCK_N": 4}
    for piece in ref_cache.pieces(tokens):
        T = piece.shape[1]
        q, k, v = (torch.randn(2, T, h, 6, generator=gen) for h in (4, 2, 2))
        pos = (ref_cache.length + torch.arange(T))[None].expand(2, T)
        close(fn(cache, "a.attn", "a.attn", q, k, v, pos, 4, None, cfg),
              ref_cache.attend("a.attn", "a.attn", q, k, v, pos, 4))
        for c in (ref_cache, cache):
            c.length += T
            c.rewrite(piece)
    for name in ("k", "v", "q_step"):
        close(cache.entries["a.attn"][name], ref_cache.entries["a.attn"][name])
    assert cache.steps == {3: [8, 7]} and cache.windows == {"a.attn": 4}


def test_decode_attention_specialises_on_policies():
    srcs = {}
    for case, (window, policies) in _DEC_CASES.items():
        g = graph(DECODE.replace("@WINDOW@", window).replace("@POLICIES@", policies))
        node = next(n for n in nodes(g, Op.ATTEND) if n.attr("site") == "a.attn")
        srcs[case] = decode_attention.generate(node, g).source
    assert "ko_ptr + (" not in srcs["dense"] and "ko_ptr + (" in srcs["think"]
    assert "attend_selected" in srcs["topk"] and "attend_selected" not in srcs["think"]
    assert "< window" in srcs["topk"] and "< window" not in srcs["dense"]
    assert len(set(srcs.values())) == len(srcs) - 1     # the reader's policy does not change a's kernel


# -- memory update -------------------------------------------------------------------------------

MEMORY = """
arch Mem(d: int = 6) {
  input k: f32[B, T, d]
  input v: f32[B, T, d]
  input lr: f32[B, T]
  input eta: f32[B]
  input alpha: f32[B]
  memory m = NeuralMemory(d, hidden = 5, layers = 2, act = "silu", loss = "huber")
  m.write(k, v, lr = lr, momentum = eta, forget = alpha)
  memory n = NeuralMemory(d, layers = 1, loss = "l1")
  n.write(k, v, lr = 0.5)
  memory r = NeuralMemory(d, hidden = 4, layers = 3, act = "tanh", residual = true)
  r.write(k, v, lr = lr, momentum = eta)
  memory q = NeuralMemory(d, hidden = 32, layers = 2, act = "gelu")
  q.write(k, v, lr = lr, momentum = eta, forget = alpha)
  output y = m.read(k) + n.read(k) + r.read(k) + q.read(k)
}
"""


def _memory_operands(g, node, B, T, gen):
    types_ = {a.name: a.type for a in g.inputs}
    for n in g.walk():
        for o in n.outputs:
            types_[o.name] = o.type
    env = Env({**g.symbol_defaults(), "B": B, "T": T})
    ins = []
    for j, name in enumerate(node.inputs):
        shape = [env.eval_int(d) for d in types_[name].shape]
        if is_zero_fill(g, name):
            t = torch.zeros(shape)
        elif j in (2, 3, 4):                             # rates and gates in (0, 1)
            t = torch.rand(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (0.5 if j >= 5 else 1.0)
        ins.append(t.requires_grad_(not is_zero_fill(g, name)))
    return ins


@pytest.mark.parametrize("which,dot", [(0, False), (1, False), (2, False), (3, True)])
def test_memory_update_forward_backward(which, dot):
    g = graph(MEMORY)
    node = nodes(g, Op.MEM_WRITE)[which]
    assert memory_update.matches(node, g)
    ks = memory_update.generate(node, g)
    fn, _ = load(ks)
    gen = torch.Generator().manual_seed(which)
    T = 16 if dot else 5                                  # dot: 16-wide tiles take the tl.dot path
    ins = _memory_operands(g, node, 2, T, gen)
    ref = interpret(g, node, ins)
    cfg = {"BLOCK_T": 16, "BLOCK_O": 16, "BLOCK_I": 16, "num_warps": 1, "num_stages": 1} if dot else \
        {"BLOCK_T": 4, "BLOCK_O": 4, "BLOCK_I": 4, "num_warps": 1, "num_stages": 1}
    out = fn(*ins, config=cfg)
    assert len(out) == len(ref) == 2 * node.attr("layers")
    for o, r in zip(out, ref):
        close(o, r)
    # transposed views: the backward receives strided cotangents, as from an einsum's backward
    ws = [torch.randn(r.shape[0], r.shape[2], r.shape[1], generator=gen).transpose(1, 2) for r in ref]
    diff = [t for t in ins if t.requires_grad]
    want = torch.autograd.grad(sum((r * w).sum() for r, w in zip(ref, ws)), diff, allow_unused=True)
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, ws)), diff, allow_unused=True)
    for w_, g_ in zip(want, got):
        if w_ is None:
            assert g_ is None or not g_.abs().any()
        else:
            close(g_, w_, atol=1e-4, rtol=1e-3)


def test_memory_update_specialises():
    g = graph(MEMORY)
    srcs = [memory_update.generate(n, g).source for n in nodes(g, Op.MEM_WRITE)]
    assert "s = -g" in srcs[1] and "w = w + s" in srcs[1]                 # momentum and forget are 0
    assert "tl.load(eta_ptr + b)" in srcs[0] and "tl.load(alpha_ptr + b)" in srcs[0]
    assert "tl.erf" in srcs[1] and "tl.sigmoid(z)" in srcs[0] and "p += tl.load(k_ptr" in srcs[2]
    assert "tl.minimum(tl.maximum(e, -1.0), 1.0)" in srcs[0] and "2.0 * e" in srcs[2]


# -- through the emitter ---------------------------------------------------------------------------


def _through_the_emitter(g, bindings, seq, family_call):
    """`--target triton` on g: the family's launcher is called; outputs and parameter gradients agree."""
    from archc.backends.torch import state_key
    from archc.backends.triton.emit import generate
    from archc.ir.interpret import GraphModule
    from archc.testing import example_inputs

    code = generate([g]).source
    assert family_call in code
    mod = api.exec_module(code, f"<archc-triton-families:{g.name}>", f"archc_triton_families_{g.name}")
    gm = GraphModule(g, bindings, seed=2)
    m = getattr(mod, g.name)(**bindings)
    m.load_state_dict({state_key(k): v.detach() for k, v in gm.param_dict().items()}, strict=True)
    inputs = example_inputs(g, bindings, batch=2, seq=seq, seed=4)
    ref, out = gm(**inputs)["logits"], m(**inputs)
    close(out, ref)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))
    (ref * w).sum().backward()
    (out * w).sum().backward()
    got = dict(m.named_parameters())
    for name, p in zip(gm.names, gm.weights):
        close(got[state_key(name)].grad, p.grad, atol=1e-4, rtol=1e-3)


def test_gated_rnn_through_the_triton_emitter_matches_the_interpreter():
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "gated_recurrences.arch")
    _through_the_emitter(graph(open(path).read(), "GatedRNN"), {"d": 6}, 11, "= gated_scan_")


def test_titans_through_the_triton_emitter_matches_the_interpreter():
    """The memory writes of every segment run the memory-update kernels; training gradients agree."""
    import archc.stdlib as stdlib
    g = next(g for g in stdlib.graphs("titans") if g.name == "TitansMAC")
    _through_the_emitter(g, {"d": 16, "seg": 4, "persist": 2, "heads": 2}, 8, "= memory_update_")


# -- every family ---------------------------------------------------------------------------------


def _all_sources():
    cases = [(SCANS, gated_scan, Op.LINEAR_SCAN), (ROUTES, routing, Op.ROUTE_TOPK), (ROUTES, routing, Op.GATHER)]
    cases += [(DECODE.replace("@WINDOW@", w).replace("@POLICIES@", p), decode_attention, Op.ATTEND)
              for w, p in _DEC_CASES.values()]
    cases.append((MEMORY, memory_update, Op.MEM_WRITE))
    for src, family, op in cases:
        g = graph(src)
        for n in nodes(g, op):
            yield family.generate(n, g)


def test_generated_kernel_sources_pass_ruff(tmp_path):
    pytest.importorskip("ruff")
    for i, ks in enumerate(_all_sources()):
        (tmp_path / f"k{i}.py").write_text(HEADER + ks.source)
        assert ks.name.isidentifier() and ks.default in ks.configs
        assert all({"num_warps", "num_stages"} <= set(c) for c in ks.configs)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_family_benchmark_smoke(tmp_path):
    """bench/gpu_families.py stays runnable: every case on the CPU at tiny sizes, agreeing with eager."""
    root = os.path.join(os.path.dirname(__file__), "..")
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "gpu_families.py"), "--smoke", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json
    data = json.loads((tmp_path / "gpu_families_smoke.json").read_text())
    assert {r["family"] for r in data["rows"]} == {"gated_scan", "routing", "decode_attention", "memory_update",
                                                  "recursion_body"}
    assert all(r["max_err"] < 1e-4 for r in data["rows"])
