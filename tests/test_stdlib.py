"""Every stdlib model checks, matches its golden IR, round-trips, and runs forward and backward."""
import time
from pathlib import Path

import pytest
import torch

import archc.stdlib as stdlib
from archc.ir.interpret import GraphModule
from archc.ir.parser import parse_ir
from archc.ir.printer import print_module
from archc.ir.verify import verify
from archc.testing import example_inputs

GOLDEN = Path(__file__).parent / "golden" / "stdlib"
NAMES = stdlib.names()
FIRST_EIGHT = ["mor", "depth_recurrent", "hrm", "titans", "hmt", "memory_caching", "think", "move"]


def test_first_eight_present():
    assert set(FIRST_EIGHT) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_index_names_every_file(name):
    index = (Path(stdlib.__file__).parent / "README.md").read_text()
    assert f"`{name}.arch`" in index, f"add {name}.arch to stdlib/README.md"


@pytest.mark.parametrize("name", NAMES)
def test_file_starts_with_paper_title(name):
    lines = stdlib.source(name).splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 10
    assert any("Implemented" in line for line in lines[:12])


@pytest.mark.parametrize("name", NAMES)
def test_golden_ir(name, update_golden):
    text = print_module(stdlib.graphs(name))
    golden = GOLDEN / f"{name}.ir"
    if update_golden or not golden.exists():
        golden.write_text(text)
    assert text == golden.read_text(), f"IR of {name} changed; run pytest --update-golden if intended"


@pytest.mark.parametrize("name", NAMES)
def test_print_parse_print(name):
    text = print_module(stdlib.graphs(name))
    graphs = parse_ir(text, f"{name}.ir")
    for g in graphs:
        verify(g)
    assert print_module(graphs) == text


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_lowering(name):
    assert print_module(stdlib.graphs(name)) == print_module(stdlib.graphs(name))


def _graphs():
    return [(n, g) for n in NAMES for g in stdlib.graphs(n)]


@pytest.mark.parametrize("name,graph", _graphs(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_forward_backward_fast(name, graph):
    torch.manual_seed(0)
    m = GraphModule(graph, seed=1)
    inputs = example_inputs(graph, seed=int(time.time()) % 1000)   # fresh inputs each run
    out = m(**inputs)
    for k, v in out.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"{graph.name}.{k} has non-finite values"
    if not graph.params:        # e.g. Sparsey's single-trial Hebbian memory: nothing to differentiate
        assert not any(v.requires_grad for v in out.values())
        return
    loss = sum(v.float().pow(2).mean() for v in out.values() if v.is_floating_point())
    loss.backward()
    grads = [p.grad for p in m.weights if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # speed (< 2 s per model) is measured by bench/interpreter.py, not asserted here
