"""Differential tests: every generated PyTorch module agrees with the IR interpreter."""
import ast
import socket
import subprocess
import sys
import time

import pytest
import torch

import archc
import archc.api as api
import archc.stdlib as stdlib
from archc.backends.torch import state_key
from archc.ir.interpret import init_params, run
from archc.testing import example_inputs

ATOL, RTOL = 1e-5, 1e-4          # fp32, same op order: differences are reassociation only


def _cases():
    return [(n, g) for n in stdlib.names() for g in stdlib.graphs(n)]


def _module(name, g):
    cls = api.load(stdlib.path(name), arch=g.name)
    m = cls().eval()        # as the interpreter runs by default (training-mode routing is random)
    params = init_params(g, seed=3)
    m.load_state_dict({state_key(k): v for k, v in params.items()}, strict=True)
    return m, params


def _as_dict(g, out):
    return out if isinstance(out, dict) else {g.output_names[0]: out}


@pytest.mark.parametrize("name,g", _cases(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_generated_runs_under_inference_mode(name, g):
    """Deployments serve under torch.inference_mode: memory writes (an inner autograd step) included."""
    m, params = _module(name, g)
    inputs = example_inputs(g, seed=5)
    ref = run(g, params, inputs)
    with torch.inference_mode():
        out = _as_dict(g, m(**inputs))
    for k in ref:
        if ref[k].is_floating_point():
            torch.testing.assert_close(out[k], ref[k], atol=ATOL, rtol=RTOL)
        else:
            assert torch.equal(out[k], ref[k]), k


@pytest.mark.parametrize("name,g", _cases(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_generated_matches_interpreter_outputs_and_gradients(name, g):
    m, params = _module(name, g)
    inputs = example_inputs(g, seed=int(time.time() * 1000) % 10_000)     # fresh inputs each run
    ref_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = run(g, ref_params, inputs)
    out = _as_dict(g, m(**inputs))
    assert set(out) == set(ref)
    loss_ref, loss = 0.0, 0.0
    for k in ref:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        if ref[k].is_floating_point():
            torch.testing.assert_close(out[k], ref[k], atol=ATOL, rtol=RTOL)
            loss_ref = loss_ref + ref[k].pow(2).mean()
            loss = loss + out[k].pow(2).mean()
        else:
            assert torch.equal(out[k], ref[k]), k
    if not params:              # a model without parameters (Sparsey) has no gradients to compare
        return
    loss_ref.backward()
    loss.backward()
    got = dict(m.named_parameters())
    for k, p in ref_params.items():
        g_ref, g_out = p.grad, got[state_key(k)].grad
        if g_ref is None:
            assert g_out is None or g_out.abs().max() == 0, k
        else:
            torch.testing.assert_close(g_out, g_ref, atol=1e-4, rtol=1e-3, msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("name", stdlib.names())
def test_generated_source_is_deterministic_and_standalone(name):
    a = api.compile(stdlib.path(name)).source
    b = api.compile(stdlib.path(name)).source
    assert a == b
    # the module's import statements (a docstring line may start with "from" or "import")
    tree = ast.parse(a)
    imports = [alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names]
    imports += [n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imports and all(m.split(".")[0] in ("math", "torch") for m in imports), imports


def test_state_dict_keys_follow_arch_names_and_sharing_is_one_parameter():
    g = stdlib.graphs("mor")[0]
    m = api.load(stdlib.path("mor"), arch="MoR")()
    keys = set(m.state_dict())
    assert {p.name for p in g.params} == keys
    assert m.state_dict()["core.attn.q.weight"].shape == (2, 64, 64)   # two copies, cycled over recursions
    hrm = api.load(stdlib.path("hrm"))()
    assert sum(1 for k in hrm.state_dict() if k.startswith("low.layer0.attn.q")) == 1


def test_generated_module_runs_as_a_file(tmp_path):
    src = api.compile(stdlib.path("think")).source
    f = tmp_path / "think_model.py"
    f.write_text(src)
    code = ("import sys, torch; sys.path.insert(0, %r); import think_model as t; m = t.ThinK(d=32, heads=2); "
            "print(m(torch.randint(0, 256, (1, 5))).shape)") % str(tmp_path)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 5, 256])" in r.stdout


def test_load_caches_on_content_and_accepts_overrides():
    a = api.load_module(stdlib.path("move"))
    b = api.load_module(stdlib.path("move"))
    assert a is b
    m = archc.api.load(stdlib.path("move"), d=32, heads=2)
    assert m.d == 32 and m.value_bank.shape == (256, 4, 32)


def test_runtime_parameter_override_changes_recursion_depth():
    cls = api.load(stdlib.path("depth_recurrent"))
    m = cls(d=16, heads=2)
    tokens = torch.randint(0, 32, (1, 4))
    adj = torch.ones(1, 4, 4, dtype=torch.bool)
    y8 = m(tokens, adj)
    m.steps = 2
    assert not torch.allclose(m(tokens, adj), y8)


@pytest.mark.parametrize("name,g", _cases(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_torch_compile_traces_and_agrees(name, g):
    """Dynamo + AOTAutograd (aot_eager) on every model; Inductor itself is exercised below."""
    torch._dynamo.reset()
    m, _ = _module(name, g)
    inputs = example_inputs(g, seed=1)
    ref = _as_dict(g, m(**inputs))
    out = _as_dict(g, torch.compile(m, backend="aot_eager")(**inputs))
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], atol=1e-5, rtol=1e-4)
    from archc.ir.ops import Op
    if any(n.op is Op.MEM_WRITE for n in g.walk()):
        # a test-time-trained memory's inner step is written-out backpropagation (no autograd.grad in
        # forward), so AOTAutograd differentiates through it: the compiled module trains
        def grads(fn):
            m.zero_grad()
            outs = _as_dict(g, fn(**inputs))
            sum(v.float().sum() for v in outs.values() if v.is_floating_point()).backward()
            return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        want, got = grads(m), grads(torch.compile(m, backend="aot_eager"))
        assert want and set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3)


def test_torch_compile_inductor_on_a_recurrent_model():
    torch._dynamo.reset()
    m = stdlib.load("depth_recurrent", d=16, heads=2, steps=3)
    tokens = torch.randint(0, 32, (2, 6))
    adj = torch.ones(2, 6, 6, dtype=torch.bool)
    torch.testing.assert_close(torch.compile(m)(tokens, adj), m(tokens, adj), atol=1e-4, rtol=1e-4)


DDP_SCRIPT = r'''
import os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import archc.stdlib as stdlib

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = stdlib.load("depth_recurrent", d=16, heads=2, steps=2)
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
gen = torch.Generator().manual_seed(rank)
losses = []
for step in range(4):
    tokens = torch.randint(0, 32, (4, 6), generator=gen)
    adj = torch.ones(4, 6, 6, dtype=torch.bool)
    loss = torch.nn.functional.cross_entropy(ddp(tokens, adj).flatten(0, 1), (tokens % 2).flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
w = model.head.weight.detach().clone()
ws = [torch.zeros_like(w) for _ in range(2)]
dist.all_gather(ws, w)
assert torch.equal(ws[0], ws[1]), "replicas diverged"
if rank == 0:
    print("DDP OK", losses)
sys.stdout.flush()
dist.barrier()
dist.destroy_process_group()
os._exit(0)    # gloo's threads have aborted the interpreter's teardown once on CI ("terminate called ...")
'''


def test_ddp_training_under_torchrun(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as s:         # a free port: a fixed one can be taken on a shared machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "DDP OK" in r.stdout


def test_generated_code_passes_ruff(tmp_path):
    ruff = pytest.importorskip("ruff")
    del ruff
    for name in stdlib.names():
        f = tmp_path / f"{name}.py"
        f.write_text(api.compile(stdlib.path(name)).source)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_unread_outputs_of_a_multi_output_op_are_named_underscore(tmp_path):
    """A LinearMemory stepped once: its final state (linear_attn's second result) is never read, so the
    generated line binds it to `_` (ruff RUF059 rejects an unused unpacked name)."""
    src = tmp_path / "step.arch"
    src.write_text("arch Step(d: int = 8) {\n  input x: f32[B, T, d]\n  memory mem = LinearMemory(d, d)\n"
                   "  output y = mem.step(x, x, x)\n}\n")
    code = api.compile(src).source
    assert "y, _ = linear_attn(x, x, x, mem_S)" in code
    (tmp_path / "step.py").write_text(code)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path / "step.py")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    x = torch.randn(2, 4, 8)
    g = api.check(src)[0]
    torch.testing.assert_close(api.load(src, arch="Step")()(x), run(g, {}, {"x": x})["y"], atol=ATOL, rtol=RTOL)
