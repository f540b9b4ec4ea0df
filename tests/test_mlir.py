"""MLIR through torch-mlir: the output parses back with torch-mlir's own bindings and holds the
expected ops; models torch.export cannot trace fail with a diagnostic naming the op."""
import re
import sys
from collections import Counter

import archc.stdlib as stdlib
import pytest
from archc.backends import mlir
from click.testing import CliRunner

from archc.cli import main
from archc.errors import ArchError

SMALL = {"d": 16, "heads": 2}


def _parse(text: str):
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    ctx.allow_unregistered_dialects = True         # stablehlo is not registered in torch-mlir's bindings
    return ir.Module.parse(text, ctx)


def _ops(text: str) -> Counter:
    return Counter(re.findall(r'= "?([a-z_]+\.[A-Za-z_.0-9]+)', text))


@pytest.mark.parametrize("name,dialect,bindings,expected", [
    # attention (bmm, exp of the softmax), projections (mm), rms norm (rsqrt), rope (sin, cos)
    ("think", "torch", {"n_layers": 1, "T": 8},
     {"torch.aten.bmm", "torch.aten.mm", "torch.aten.exp", "torch.aten.rsqrt", "torch.aten.sin", "torch.aten.cos"}),
    # the GELU MLP (erf) and the masked attention of the recurrent block, unrolled twice
    ("depth_recurrent", "linalg", {"steps": 2, "T": 6},
     {"linalg.batch_matmul", "linalg.matmul", "linalg.generic", "math.erf", "math.exp", "arith.select"}),
    # Titans' memory as context: the inner step's written-out backward (bmm of the error against each
    # layer's input: dW; erf of the GELU derivative), the forget-gated update, attention over memory
    ("titans", "torch", {"T": 8, "seg": 4},
     {"torch.aten.bmm", "torch.aten.erf", "torch.aten.gelu", "torch.aten.sigmoid", "torch.aten.exp"}),
    # the value-embedding bank gather, per-head sigmoid gates, attention
    ("move", "stablehlo", {"n_layers": 1, "T": 6},
     {"stablehlo.dot_general", "stablehlo.gather", "stablehlo.logistic", "stablehlo.exponential", "stablehlo.reduce"}),
])
def test_mlir_parses_back_and_holds_the_expected_ops(name, dialect, bindings, expected):
    pytest.importorskip("torch_mlir")
    text = mlir.export_mlir(stdlib.path(name), dialect=dialect, bindings={**SMALL, **bindings},
                            generic=dialect == "stablehlo", arch=stdlib.graphs(name)[0].name)
    module = _parse(text)
    assert module.operation.name == "builtin.module"
    found = set(_ops(text))
    assert expected <= found, sorted(found)


@pytest.mark.parametrize("name,op", [("hrm", "halt_loop"), ("mor", "route_mask")])
def test_untraceable_models_fail_naming_the_op(name, op):
    pytest.importorskip("torch_mlir")
    arch = {"mor": "MoRTokenChoice"}.get(name)
    with pytest.raises(ArchError) as err:
        mlir.export_mlir(stdlib.path(name), arch=arch)
    text = err.value.render()
    assert f"op `{op}` cannot be traced by torch.export" in text
    assert str(stdlib.path(name)) in text and "--target onnx" in text


def test_cli_writes_mlir_and_reports_untraceable_ops_without_a_traceback(tmp_path):
    pytest.importorskip("torch_mlir")
    out = tmp_path / "think.mlir"
    res = CliRunner().invoke(main, ["compile", str(stdlib.path("think")), "--target", "mlir", "--dialect", "torch",
                                    "--set", "d=16", "--set", "heads=2", "--set", "n_layers=1", "--set", "T=4",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "func.func @ThinK" in out.read_text()
    res = CliRunner().invoke(main, ["compile", str(stdlib.path("hrm")), "--target", "mlir"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "op `halt_loop` cannot be traced" in res.output


def test_missing_torch_mlir_is_a_diagnostic_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)          # as if it were not installed
    res = CliRunner().invoke(main, ["compile", str(stdlib.path("think")), "--target", "mlir"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--target mlir needs torch-mlir" in res.output
    assert "pip install 'archc[mlir]'" in res.output
