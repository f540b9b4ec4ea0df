"""The recursion-body kernel family (SPEC §20) and the fused kernels' size gate (SPEC §19.2), on the CPU
under TRITON_INTERPRET=1 against the IR interpreter.

Each per-token loop below compiles to one launch for all its trips (forward) and one for the backward;
the tests check that the kernels, not the per-step code, ran, and compare outputs, input gradients
and parameter gradients with the interpreter (fp32; outputs at atol 1e-5 / rtol 1e-4, gradients at
1e-4 / 1e-3, as every Triton test).
"""
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"      # before any kernel is jitted: run them on the CPU

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")     # masked lanes compute 0 / 0

import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import state_key
from archc.backends.triton import autotune as tune
from archc.backends.triton.emit import generate
from archc.backends.triton.families import recursion_body
from archc.ir.interpret import GraphModule, run
from archc.ir.ops import Op
from archc.ir.parser import parse_ir
from archc.passes import PASSES, PRESETS, run_pipeline
from archc.testing import example_inputs

BODIES = """
arch ResidualMLP(d: int = 12, hidden: int = 24, steps: int = 3) {
  input x: f32[B, T, d]
  layer norm = RMSNorm(d)
  layer mlp = MLP(d, hidden, bias = true)
  layer scale = LayerScale(d, init = 0.5)
  h = x
  repeat t in steps {
    h = h + scale(mlp(norm(h)))
  }
  output y = h
}

arch GatedInjection(d: int = 10, steps: int = 4) {
  input x: f32[B, T, d]
  input g: f32[B, T, 1]
  param w: f32[d, d] = normal(std = 0.3)
  layer ln = LayerNorm(d)
  h = zeros([B, T, d])
  repeat t in steps {
    u = tanh(h @ w + x)
    h = h + sigmoid(g) * (ln(u) - h) * 0.5
  }
  output y = h
}

arch TwoCarry(d: int = 8, steps: int = 3) {
  input x: f32[B, d]
  input m: bool[B, d]
  layer f = Linear(d, d, bias = true)
  a = x
  b = x * 0.5
  repeat t in steps {
    n = l2_normalize(a + f(b))
    a = b
    b = where(m, n, max(n, 0.1) ** 2.0)
  }
  output y = a + b
}

arch LastGrad(hidden: int = 8, depth: int = 4) {
  input x: f32[B, hidden]
  layer cell = LSTMCell(hidden, hidden)
  h = zeros([B, hidden])
  c = zeros([B, hidden])
  repeat k in depth grad last 2 {
    h, c = cell(x, h, c)
  }
  output y = h + c
}

arch TwoTimescale(d: int = 8, l_cycles: int = 3, h_cycles: int = 2) {
  input x: f32[B, T, d]
  layer low = MLP(d, 2 * d, act = "silu")
  layer high = MLP(d, 2 * d)
  layer norm = RMSNorm(d)
  zl = x
  zh = x
  repeat i in h_cycles grad last 1 {
    repeat j in l_cycles grad last 1 {
      zl = zl + low(norm(zl + zh + x))
    }
    zh = zh + high(zl)
  }
  output y = zh
}
"""

# what each body exercises: linear + bias, rms_norm, LayerScale | matmul against a weight, a [B, T, 1] gate
# broadcast over columns, layer_norm, a scalar | two carries swapped, l2_normalize, where on a bool
# input, maximum, pow | LSTM gates as four column slices of one linear, `grad last` | a loop nested in a
# `grad last` loop (the inner one is the kernel), an operand carried by the outer loop
NAMES = ["ResidualMLP", "GatedInjection", "TwoCarry", "LastGrad", "TwoTimescale"]


def _module(graphs, tag):
    code = generate(graphs).source
    return api.exec_module(code, f"<archc-recursion-test:{tag}>", f"archc_recursion_test_{tag}"), code


def _count_calls(mod, prefix="recursion_body_", suffixes=("_run", "_grads", "_torch")):
    """Wrap the module's kernel entry points; the returned list records which ran."""
    calls = []
    for name in [k for k in vars(mod) if k.startswith(prefix) and k.endswith(suffixes)]:
        fn = getattr(mod, name)
        setattr(mod, name, (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(fn, name))
    return calls


def _compare(g, mod, inputs, overrides=None, seed=3):
    """Outputs, input gradients and parameter gradients of the generated module vs the interpreter."""
    gm = GraphModule(g, overrides, seed=seed).eval()
    m = getattr(mod, g.name)(**(overrides or {})).eval()
    m.load_state_dict({state_key(k): v.detach() for k, v in gm.param_dict().items()}, strict=True)
    ins_ref = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    ins_got = {k: (v.clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    ref, out = gm(**ins_ref), m(**ins_got)
    out = out if isinstance(out, dict) else {g.output_names[0]: out}
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-4)
    gen = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(v.shape, generator=gen) for k, v in sorted(ref.items())}
    sum((ref[k] * w[k]).sum() for k in w).backward()
    sum((out[k] * w[k]).sum() for k in w).backward()
    got = dict(m.named_parameters())
    checked = 0
    for name, p in zip(gm.names, gm.weights):
        if p.grad is not None:
            torch.testing.assert_close(got[state_key(name)].grad, p.grad, atol=1e-4, rtol=1e-3)
            checked += 1
    for k, v in ins_ref.items():
        if v.is_floating_point() and v.grad is not None:
            torch.testing.assert_close(ins_got[k].grad, v.grad, atol=1e-4, rtol=1e-3)
            checked += 1
    return checked


@pytest.fixture(scope="module")
def bodies():
    graphs = [run_pipeline(g, PRESETS["O2"]) for g in api.check(BODIES)]
    mod, code = _module(graphs, "bodies")
    return graphs, mod, code


@pytest.mark.parametrize("name", NAMES)
def test_per_token_loop_runs_every_trip_in_one_launch(bodies, name):
    graphs, mod, code = bodies
    g = next(g for g in graphs if g.name == name)
    loops = [n for n in g.walk() if n.op is Op.LOOP and recursion_body.matches(n, g)]
    assert len(loops) == 1, "exactly one loop of each body is a kernel (TwoTimescale: the inner one)"
    ks = recursion_body.generate(loops[0], g)
    assert ks.needs_grad and ks.default in ks.configs and f"if {ks.name}_fits(" in code
    calls = _count_calls(mod, ks.name)
    checked = _compare(g, mod, example_inputs(g, {}, batch=3, seq=5, seed=1))
    assert checked >= 2
    # one forward launch per run of the loop, one backward launch: never the per-step code
    runs = 2 if name == "TwoTimescale" else 1           # the outer loop runs the inner one twice...
    assert calls.count(f"{ks.name}_run") == runs and calls.count(f"{ks.name}_grads") == 1   # ...once with grads
    assert f"{ks.name}_torch" not in calls


def test_bodies_at_O1_read_their_weights_inside_the_loop():
    """Without hoisting (-O1) the weights are read in the body: the launcher gets them bound before the call."""
    graphs = [run_pipeline(g, PRESETS["O1"]) for g in api.check(BODIES)]
    g = next(g for g in graphs if g.name == "ResidualMLP")
    loop = next(n for n in g.walk() if n.op is Op.LOOP)
    assert any(m.op is Op.PARAM for m in loop.regions[0].nodes) and recursion_body.matches(loop, g)
    mod, _ = _module([g], "o1")
    calls = _count_calls(mod)
    _compare(g, mod, example_inputs(g, {}, batch=2, seq=3, seed=2))
    assert any(c.endswith("_run") for c in calls) and any(c.endswith("_grads") for c in calls)


def test_generated_source_is_deterministic_and_ruff_clean(bodies, tmp_path):
    graphs, _, code = bodies
    assert generate(graphs).source == code
    (tmp_path / "bodies.py").write_text(code)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout


def test_lstm_pinn_loop_is_the_kernel_and_higher_derivatives_stay_exact():
    """LSTM-PINN's depth recursion is one launch; its PDE residual (second derivatives in x) and the
    residual's parameter gradients (third order) match the interpreter: a backward asked for a graph
    differentiates the torch form of the loop and of every fused region (runtime.torch_backward)."""
    g, = [run_pipeline(g, PRESETS["O2"]) for g in stdlib.graphs("lstm_pinn")]
    mod, code = _module([g], "pinn")
    assert "recursion_body_" in code
    gen = torch.Generator().manual_seed(0)
    p = {k: 0.5 * torch.randn(v.shape, generator=gen) for k, v in GraphModule(g).param_dict().items()}
    x = torch.rand(9, 2, generator=gen)

    def residual(f):
        z = x.clone().requires_grad_(True)
        u = f(z)[:, 0]
        (du,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        lap = sum(torch.autograd.grad(du[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return lap.pow(2).mean()

    ref_p = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    loss_ref = residual(lambda z: run(g, ref_p, {"x": z}, {"depth": 3})["fields"])
    loss_ref.backward()
    m = mod.LSTMPINN(depth=3)
    m.load_state_dict({state_key(k): v for k, v in p.items()})
    calls = _count_calls(mod)
    loss = residual(m)
    loss.backward()
    assert any(c.endswith("_run") for c in calls) and any(c.endswith("_torch") for c in calls)
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-4)
    grads = dict(m.named_parameters())
    for k, v in ref_p.items():
        if v.grad is not None:
            torch.testing.assert_close(grads[state_key(k)].grad, v.grad, atol=1e-4, rtol=1e-3)


def test_weights_past_the_bound_take_the_per_step_code_at_run_time():
    """`hidden` raised past the on-chip bound when the module is built: the guard picks the loop's own code."""
    g, = [run_pipeline(g, PRESETS["O2"]) for g in stdlib.graphs("lstm_pinn")]
    mod, _ = _module([g], "pinn_big")
    calls = _count_calls(mod)
    over = {"hidden": 72, "depth": 2}           # 4 gate tiles of 128 x 128 (padded) > MAX_WEIGHT
    _compare(g, mod, example_inputs(g, over, batch=3, seed=0), overrides=over)
    assert not calls


_SM90 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import archc.api as api
from archc.backends.triton.emit import generate
from archc.backends.triton.families import recursion_body
from archc.ir.interpret import Env
from archc.ir.ops import Op
from archc.passes import PRESETS, run_pipeline

graphs = [run_pipeline(g, PRESETS["O2"]) for g in api.check(sys.argv[1])]
mod = api.exec_module(generate(graphs).source, "<sm90>", "sm90")
for g in graphs:
    env = Env(g.symbol_defaults())
    for loop in [n for n in g.walk() if n.op is Op.LOOP and recursion_body.matches(n, g)]:
        name = recursion_body.generate(loop, g).name
        zs = [env.eval(e) for e, _ in recursion_body.sizes(loop, g)]
        bw = [1 if w == 1 else max(16, triton.next_power_of_2(w)) for w in getattr(mod, name + "_widths")(*zs)]
        for kernel in (getattr(mod, name + "_fwd"), getattr(mod, name + "_bwd")):
            consts = {a: bw[int(a[2:])] for a in kernel.arg_names if a.startswith("BW")}
            consts.update({"BLOCK_R": 16, **({"SAVE": True} if "SAVE" in kernel.arg_names else {})})
            sig = {a: "constexpr" if a in consts else "*fp32" if a.endswith("_ptr") else
                   "fp32" if a[0] == "s" and a[1:].isdigit() else "i32" for a in kernel.arg_names}
            triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
            print("compiled", g.name, kernel.__name__)
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter does not type-check what the GPU compiler does (tl.dot shapes, loop-carried types):
    compile the forward and backward kernels for sm_90 on the CPU (Triton's CUDA backend and its ptxas)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no CUDA backend")
    src = tmp_path / "bodies.arch"
    src.write_text(BODIES.split("arch TwoCarry")[0] + open(stdlib.path("lstm_pinn")).read())
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _SM90, str(src)], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
    if r.returncode and "ptxas" in r.stderr and "No such file" in r.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 6, r.stdout     # ResidualMLP, GatedInjection, LSTMPINN: fwd + bwd


def _loop(src: str):
    (g,) = api.check(src)
    return g, next(n for n in g.walk() if n.op is Op.LOOP)


@pytest.mark.parametrize("body, reason", [
    ("h = h + merge_heads(attend(split_heads(h, 2), split_heads(h, 2), split_heads(h, 2)))",
     "not a per-token op"),
    ("h = h + sum(h, axis = 1, keepdim = true)", "`sum`"),
    ("h = h * float(t)", "loop variable"),
    ("h = concat([h[:, :, 4:8], h[:, :, 0:4]])", "concat"),
])
def test_bodies_that_mix_tokens_keep_the_per_step_path(body, reason):
    g, loop = _loop(f"""
arch Mix(d: int = 8) {{
  input x: f32[B, T, d]
  h = x
  repeat t in 3 {{
    {body}
  }}
  output y = h
}}
""")
    assert not recursion_body.matches(loop, g)
    with pytest.raises(recursion_body.Reject, match=reason):
        recursion_body.Body(loop, g)


def test_grad_last_with_a_pass_through_carry_keeps_the_per_step_path():
    """Found by random programs: a value a no-grad trip passes through unchanged keeps its history in
    the reference (no op runs on it), so the gradient reaches the initial carry; the kernel's backward
    stops at `grad last`, so such loops are not matched (and the module still agrees)."""
    src = """
arch PassThrough(d: int = 4) {
  input x: f32[B, d]
  layer f = Linear(d, d)
  a = x
  b = x * 2.0
  repeat t in 3 grad last 1 {
    n = tanh(f(a))
    a = b
    b = n
  }
  output y = a + b
}
"""
    g, loop = _loop(src)
    with pytest.raises(recursion_body.Reject, match="passes a value through"):
        recursion_body.Body(loop, g)
    g = run_pipeline(g, PRESETS["O2"])
    mod, code = _module([g], "passthrough")
    assert "recursion_body_" not in code
    _compare(g, mod, example_inputs(g, {}, batch=3, seed=0))


def test_depth_recurrent_block_has_attention_and_is_not_a_kernel():
    for g in stdlib.graphs("depth_recurrent") + stdlib.graphs("hrm"):
        g = run_pipeline(g, PRESETS["O2"])
        assert not any(recursion_body.matches(n, g) for n in g.walk() if n.op is Op.LOOP)


BIG = """
arch Big(d: int = @D@, hidden: int = @H@) {
  input x: f32[B, @D@]
  param w1: f32[@D@, @H@] = normal(std = 0.1)
  param w2: f32[@H@, @D@] = normal(std = 0.1)
  h = x
  repeat t in 2 {
    h = h + relu(h @ w1) @ w2
  }
  output y = h
}
"""


def test_weights_over_the_bound_are_refused():
    """Static sizes over the bound: not matched. Symbolic sizes: the launcher's guard refuses them."""
    g, loop = _loop(BIG.replace("@D@", "128").replace("@H@", "512"))
    with pytest.raises(recursion_body.Reject, match="do not fit on chip"):
        recursion_body.Body(loop, g)
    g, loop = _loop(BIG.replace("@D@", "d").replace("@H@", "hidden").replace("d: int = d, hidden: int = hidden",
                                                                               "d: int = 8, hidden: int = 16"))
    assert recursion_body.matches(loop, g)
    ks = recursion_body.generate(loop, g)
    mod = api.exec_module("import torch\nimport triton\nimport triton.language as tl\n"
                          "from archc.backends.triton import autotune as _tune\n\n\n" + ks.source,
                          f"<fits:{ks.name}>", f"fits_{ks.name}")
    fits = getattr(mod, f"{ks.name}_fits")
    sizes = recursion_body.sizes(loop, g)

    def at(**values):
        return fits(*[int(e.subs(values)) for e, _ in sizes])

    # 2 tiles of 64 x 128 = 2^14 elements fit; 2 tiles of 128 x 128 or a 1024-wide axis do not
    assert at(d=64, hidden=128) and not at(d=128, hidden=128) and not at(d=16, hidden=1024)


# -- the fused kernels' size gate ---------------------------------------------------------------------

GATED = """\
graph Gate(d: int = 6) dims(B, T) {
  param @norm.weight : f32[d] init=normal(std=1.0)
  input %x : f32[B, T, d]
  input %y : f32[B, T, d]
  %c = const() {dtype="f32", value=0.5} : f32[]
  %norm_weight = param() {ref="norm.weight"} : f32[d]
  %s = mul(%y, %c) : f32[B, T, d]
  %h = add(%x, %s) : f32[B, T, d]
  %n = rms_norm(%h, %norm_weight) {eps=1e-06} : f32[B, T, d]
  %e = exp(%c) : f32[]
  %m = mul(%n, %e) : f32[B, T, d]
  output %m, %h
}
"""


@pytest.mark.parametrize("threshold", [0, 10 ** 9])
def test_fused_gate_torch_expression_and_kernel_agree(threshold):
    """Below the gate's threshold the launcher runs the region's torch expression, above it the kernels;
    both agree with the interpreter (outputs and gradients)."""
    (g,) = parse_ir(GATED)
    h = PASSES["fuse-elementwise"](g)
    mod, _ = _module([h], f"gate{threshold}")
    (name,) = [k for k in vars(mod) if k.endswith("_TORCH_NUMEL")]
    setattr(mod, name, threshold)
    fn = name[:-len("_TORCH_NUMEL")].lower()
    calls = _count_calls(mod, fn, ("_torch", "_run"))
    _compare(h, mod, example_inputs(h, {"d": 6}, batch=3, seq=5, seed=0))
    assert (f"{fn}_torch" in calls) == bool(threshold) and (f"{fn}_run" in calls) == (not threshold)


def test_gate_default_and_tuned_choice(monkeypatch):
    """No cache entry: the declared threshold decides; inside `archc autotune` both paths are timed and
    the faster is recorded under `<kernel>_path` for the size's bucket."""
    monkeypatch.setattr(tune, "_SESSION", None)
    tune._MEMO.clear()
    tune._SIZES.clear()
    assert tune.path("k", 100, 100, None) == "torch" and tune.path("k", 101, 100, None) == "kernel"
    for times, want in (((2.0, 1.0), "kernel"), ((1.0, 2.0), "torch")):
        timings, ran = iter(times), []

        def bench(fn, timings=timings):
            fn()
            return next(timings)

        with tune.Session(None, bench=bench) as s:
            assert tune.path("k2", 5000, 100, ran.append) == want
        assert [c["path"] for c in ran] == ["torch", "kernel"] and s.best[("k2_path", "n0=8192")][0] == {"path": want}
    monkeypatch.setenv("ARCHC_TRITON_TORCH_NUMEL", "7")
    assert tune.torch_numel(262144) == 7
    monkeypatch.delenv("ARCHC_TRITON_TORCH_NUMEL")
    assert tune.torch_numel(262144) == 262144


def test_fused_backward_with_create_graph_is_differentiable():
    """A fused kernel's backward asked for a graph differentiates the torch expression: second-order
    gradients (of the input gradient's norm, w.r.t. the input and the weight) match the interpreter.
    Before, the kernel's backward returned numbers without a graph and the second order was silently
    wrong (LSTM-PINN's PDE loss through `--target triton` was off by 2x)."""
    (g,) = parse_ir(GATED)
    h = PASSES["fuse-elementwise"](g)
    mod, _ = _module([h], "create_graph")
    calls = _count_calls(mod, "fused_", ("_torch", "_run"))
    gm = GraphModule(h, seed=1)
    m = mod.Gate()
    m.load_state_dict({state_key(k): v.detach() for k, v in gm.param_dict().items()})
    inputs = example_inputs(h, {"d": 6}, batch=2, seq=3, seed=1)

    def second_order(f, params):
        x = inputs["x"].clone().requires_grad_(True)
        out = f(x=x, y=inputs["y"])
        out = out if isinstance(out, dict) else dict(zip(h.output_names, out))
        (gx,) = torch.autograd.grad(sum(o.pow(2).sum() for o in out.values()), x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), [x, *params])

    ref = second_order(gm, list(gm.weights))
    got = second_order(m, [dict(m.named_parameters())[state_key(n)] for n in gm.names])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    assert any(c.endswith("_run") for c in calls) and any(c.endswith("_torch") for c in calls)
