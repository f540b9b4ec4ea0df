"""`--target triton` (SPEC §19.3): CLI and API, determinism, ruff, kernel-family discovery and dispatch."""
import os
import subprocess
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("triton")

import archc
import archc.stdlib as stdlib
from archc.backends.triton import emit
from archc.backends.triton.kernel import KernelSource
from archc.cli import main
from archc.errors import ArchError
from archc.ir.interpret import init_params, run
from archc.ir.ops import Op
from archc.ir.parser import parse_ir


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_compiles_every_stdlib_model_deterministically_and_ruff_clean(tmp_path):
    for name in stdlib.names():
        r = cli("compile", stdlib.path(name), "--target", "triton", "-O2")
        assert r.exit_code == 0, r.output
        text = r.output
        assert "import triton\nimport triton.language as tl\n" in text and "@triton.jit" in text
        assert "_tune.config(" in text and "torch.autograd.Function" in text
        assert cli("compile", stdlib.path(name), "--target", "triton", "-O2").output == text
        (tmp_path / f"{name}.py").write_text(text)
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--quiet", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_api_compile_and_load_target_triton():
    c = archc.compile(stdlib.path("depth_recurrent"), target="triton")
    assert c.target == "triton" and any(n.op is Op.FUSED for g in c.graphs for n in g.walk())
    cls = archc.load(stdlib.path("depth_recurrent"), target="triton")
    assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
    torch_cls = archc.load(stdlib.path("depth_recurrent"))
    assert torch_cls is not cls
    with pytest.raises(ArchError, match="unknown target"):
        archc.compile(stdlib.path("depth_recurrent"), target="cuda")


SOFTMAX = """\
graph Soft(d: int = 6) dims(B, T) {
  input %x : f32[B, T, d]
  %s = softmax(%x) {axis=-1} : f32[B, T, d]
  %e = exp(%s) : f32[B, T, d]
  %s.1 = softmax(%e) {axis=-1} : f32[B, T, d]
  output %s.1
}
"""


def _softmax_family():
    """A kernel family written against kernel.py, as the families under families/ are."""
    fam = types.ModuleType("fake_softmax_family")
    fam.FAMILY = "softmax_rows"
    fam.matches = lambda node, graph: node.op is Op.SOFTMAX and node.attr("axis") in (-1, 2)

    def generate(node, graph):
        src = '''\
@triton.jit
def softmax_rows_kernel(x_ptr, y_ptr, C, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * C + cols, mask=cols < C, other=float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    tl.store(y_ptr + row * C + cols, e / tl.sum(e, axis=0), mask=cols < C)


def softmax_rows(x):
    x = x.contiguous()
    y = torch.empty_like(x)
    softmax_rows_kernel[(x.numel() // x.shape[-1],)](x, y, x.shape[-1], BLOCK=triton.next_power_of_2(x.shape[-1]))
    return y
'''
        return KernelSource("softmax_rows", "softmax_rows", src, ({"num_warps": 4},), {"num_warps": 4})

    fam.generate = generate
    fam.call = lambda node, ks, args: f"{ks.name}({args[0]})"
    return fam


def test_family_nodes_become_launcher_calls():
    (g,) = parse_ir(SOFTMAX)
    code = emit.generate([g], fams=[_softmax_family()]).source
    assert code.count("def softmax_rows_kernel(") == 1                   # one kernel for both nodes
    assert "s = softmax_rows(x)" in code and "softmax_rows(e)" in code
    assert "torch.softmax" not in code
    mod = archc.api.exec_module(code, "<test-family>", "test_family")
    x = torch.randn(2, 3, 6)
    ref = run(g, init_params(g), {"x": x})["s"]
    torch.testing.assert_close(mod.Soft()(x), ref, atol=1e-6, rtol=1e-5)


def test_no_families_keeps_torch_and_discovery_reads_the_package():
    (g,) = parse_ir(SOFTMAX)
    code = emit.generate([g], fams=[]).source
    assert "torch.softmax(x, dim=-1)" in code
    found = emit.families()
    assert all(hasattr(f, "FAMILY") and callable(f.matches) for f in found)
