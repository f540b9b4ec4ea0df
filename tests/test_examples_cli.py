"""examples/ check and run; the CLI's ir/graph/cost commands produce what the README shows."""
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from archc.api import check
from archc.cli import main
from archc.ir.interpret import GraphModule, init_params, run
from archc.testing import example_inputs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.arch"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_checks_and_runs(path):
    for g in check(path):
        m = GraphModule(g, seed=0)
        out = m(**example_inputs(g, seq=8))
        sum(v.float().sum() for v in out.values()).backward()
        assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_cola_program_runs_the_chosen_layers():
    (g,) = check(ROOT / "examples" / "cola_program.arch")
    p = init_params(g, seed=0)
    tokens = torch.randint(0, 64, (2, 5))
    straight = torch.tensor([[0, 1, 2, 3, -1, -1]] * 2)
    looped = torch.tensor([[0, 1, 1, 2, 3, -1], [0, 1, 2, 3, -1, -1]])
    a = run(g, p, {"tokens": tokens, "program": straight})["logits"]
    b = run(g, p, {"tokens": tokens, "program": looped})["logits"]
    assert torch.allclose(a[1], b[1], atol=1e-5)          # same program, same result
    assert not torch.allclose(a[0], b[0], atol=1e-3)      # looping layer 1 changes sample 0


def test_linear_scan_matches_the_recurrence():
    g = check(ROOT / "examples" / "gated_recurrences.arch")[0]
    from archc.ir.ops import Op
    assert any(n.op is Op.LINEAR_SCAN for n in g.walk())
    src = """
arch S(d: int = 3) {
  input a: f32[B, T, d]
  input b: f32[B, T, d]
  output h = linear_scan(a, b, zeros([B, d]))
}
"""
    (s,) = check(src)
    a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    h, ref = torch.zeros(2, 3), []
    for t in range(5):
        h = a[:, t] * h + b[:, t]
        ref.append(h)
    assert torch.allclose(run(s, {}, {"a": a, "b": b})["h"], torch.stack(ref, 1), atol=1e-6)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_ir_prints_the_golden_text():
    r = cli("ir", ROOT / "stdlib" / "think.arch")
    assert r.exit_code == 0
    assert r.output == (ROOT / "tests" / "golden" / "stdlib" / "think.ir").read_text()


def test_cli_cost_mor_kv_formula_in_T_and_recursions(tmp_path):
    r = cli("cost", ROOT / "stdlib" / "mor.arch", "--arch", "MoR", "--set", "T=4096", "--set", "B=1")
    assert r.exit_code == 0, r.output
    kv = next(line for line in r.output.splitlines() if line.startswith("kv_cache_bytes"))
    assert "MiB" in kv and "T" in kv.split("=", 1)[1] and "n_r" in kv
    shared = cli("cost", ROOT / "stdlib" / "mor.arch", "--arch", "MoRKVShare", "--set", "T=4096", "--set", "B=1")
    assert "8*B*T*d*(block_layers + 2)" in shared.output


def test_cli_cost_rejects_unknown_symbol():
    r = cli("cost", ROOT / "stdlib" / "mor.arch", "--set", "Q=3")
    assert r.exit_code == 1 and "has no symbol Q" in r.output


def test_cli_graph_writes_dot(tmp_path):
    out = tmp_path / "hrm.dot"
    r = cli("graph", ROOT / "stdlib" / "hrm.arch", "-o", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("digraph archc {") and "cluster_" in text and "halt_loop" in text
    again = tmp_path / "again.dot"
    cli("graph", ROOT / "stdlib" / "hrm.arch", "-o", again)
    assert again.read_text() == text                         # deterministic


def test_cli_check_many_files():
    r = cli("check", *sorted((ROOT / "stdlib").glob("*.arch")))
    assert r.exit_code == 0 and r.output.count(": ok (") == len(list((ROOT / "stdlib").glob("*.arch")))
