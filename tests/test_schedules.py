"""Schedules: training-time functions of one variable that set parameters and define loss weights."""
import pytest
import torch

import archc.api as api
from archc.errors import ArchError
from archc.ir.interpret import GraphModule, schedule_values
from archc.ir.parser import parse_ir
from archc.ir.printer import print_module

SRC = """
arch S(d: int = 8, steps: int = 2, lam: float = 0.7, n_sup: int = 4) {
  input x: f32[B, d]
  layer lin = Linear(d, d)
  h = x
  repeat i in steps {
    h = tanh(lin(h))
  }
  output y = h
  schedule curriculum(progress: float) {
    steps = where(progress < 0.3, 1, where(progress < 0.6, 2, 3))
    depth = steps * (steps + 1)
  }
  schedule supervision(step: int) {
    z = (1 - lam ** n_sup) / (1 - lam)
    weight = lam ** step / z
  }
}
"""


def graph():
    (g,) = api.lower(SRC)
    return g


def test_schedule_values_are_piecewise_and_weights_sum_to_one():
    g = graph()
    assert [schedule_values(g, "curriculum", p) for p in (0.0, 0.45, 0.99)] == [
        {"steps": 1, "depth": 2}, {"steps": 2, "depth": 6}, {"steps": 3, "depth": 12}]
    w = [schedule_values(g, "supervision", t)["weight"] for t in range(4)]
    assert sum(w) == pytest.approx(1.0) and w == sorted(w, reverse=True)
    # a value defined earlier in the schedule is inlined into the later ones
    assert {s.name for s in dict(g.schedules[1].values)["weight"].free_symbols} == {"lam", "n_sup", "step"}
    assert schedule_values(g, "supervision", 0, {"lam": 0.5, "n_sup": 2})["weight"] == pytest.approx(2 / 3)


def test_schedule_ir_round_trips_and_verifies():
    g = graph()
    text = print_module([g])
    assert "schedule curriculum(progress: float) {steps=<Piecewise((1, progress < 0.3), (2, progress < 0.6), " \
           "(3, True))>" in text
    (back,) = parse_ir(text)
    assert print_module([back]) == text and back.schedules == g.schedules


def test_apply_schedule_changes_the_model_as_the_parameter_does():
    g = graph()
    m = GraphModule(g, seed=0)
    x = torch.randn(2, 8)
    assert m.apply_schedule("curriculum", 0.95)["steps"] == 3
    deep = m(x=x)["y"]
    ref = GraphModule(g, {"steps": 3}, seed=0)(x=x)["y"]
    assert torch.equal(deep, ref)
    m.apply_schedule("curriculum", 0.1)
    w = m.param_dict()["lin.weight"]
    assert torch.allclose(m(x=x)["y"], torch.tanh(x @ w.T))


def test_generated_module_exposes_the_same_schedules():
    g = graph()
    m = api.load(SRC, arch="S")()
    for p in (0.0, 0.3, 0.59, 0.6, 1.0):
        assert m.schedule_curriculum(p) == schedule_values(g, "curriculum", p)
        assert m.steps == schedule_values(g, "curriculum", p)["steps"]
    for t in range(4):
        assert m.schedule_supervision(t)["weight"] == pytest.approx(schedule_values(g, "supervision", t)["weight"])


BAD = [
    ("schedule s(p: float) {\n    steps = p * 2\n  }", "int parameter"),
    ("schedule s(p: float) {\n    h = p\n  }", "not an architecture parameter"),
    ("schedule s(p: float) {\n    w = p * B\n  }", "not `B`"),
    ("schedule s(p: str) {\n    w = p\n  }", "`int` or `float`"),
    ("schedule s(d: float) {\n    w = d\n  }", "shadows"),
    ("schedule s(p: float) {\n    w = p\n    w = 2 * p\n  }", "assigned twice"),
    ("schedule s(p: float) {\n    output z = x\n  }", "assignments"),
    ("schedule s(p: float) {\n    w = where(p, 1, 2)\n  }", "comparison"),
]


@pytest.mark.parametrize("body,msg", BAD, ids=[m for _, m in BAD])
def test_schedule_diagnostics(body, msg):
    src = SRC.replace("  schedule curriculum", "  " + body + "\n  schedule curriculum")
    with pytest.raises(ArchError, match=msg):
        api.lower(src)


def test_schedule_only_at_the_top_level():
    src = SRC.replace("    h = tanh(lin(h))", "    h = tanh(lin(h))\n    schedule s(p: float) {\n      w = p\n    }")
    with pytest.raises(ArchError, match="top level"):
        api.lower(src)


def test_floor_is_a_compile_time_int():
    src = SRC.replace("    depth = steps * (steps + 1)", "    depth = floor(progress * 10) // 3")
    (g,) = api.lower(src)
    assert schedule_values(g, "curriculum", 0.95)["depth"] == 3
    with pytest.raises(ArchError, match="compile-time number"):
        api.lower(SRC.replace("  output y = h", "  output y = h\n  output z = floor(h)"))
