"""The seed-paper catalog (`archc stdlib list/show`): complete, consistent with the files and tests,
and its status computed from recorded test results, never typed."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import archc.stdlib as stdlib
import pytest
from archc.stdlib import catalog
from click.testing import CliRunner

from archc.cli import main
from archc.errors import ArchError

ROOT = Path(__file__).resolve().parent.parent


def _test_functions() -> set[str]:
    out = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.add(f"{f.name}::{node.name}")
    return out


def test_every_seed_paper_once_and_every_stdlib_file_in_an_entry():
    ps = catalog.papers()
    assert [p.n for p in ps] == list(range(1, 51))
    keys = [k for p in ps for k in p.keys]
    assert len(keys) == len(set(keys))
    files = {f for p in ps for f in p.files}
    assert files == set(stdlib.names())
    assert all(p.title and p.category and p.card for p in ps)


def test_every_listed_mechanism_test_exists():
    fns = _test_functions()
    for p in catalog.papers():
        for prefix in p.tests:
            assert any(fn.startswith(prefix) for fn in fns), f"paper {p.n}: no test matches {prefix}"


def test_a_test_belongs_to_a_paper_by_prefix_or_by_its_stdlib_parameter():
    mor, titans, cola = catalog.find("mor"), catalog.find("titans_mac"), catalog.find("50")
    assert mor.owns("tests/test_semantics.py::test_mor_capacity_schedule_and_hierarchical_filter") == "mechanism"
    assert mor.owns("tests/test_onnx.py::test_onnx_matches_interpreter[mor-MoRKVShare]") == "model"
    assert mor.owns("tests/test_triton_kernels.py::test_every_stdlib_model_forward[mor]") == "model"
    assert mor.owns("tests/test_onnx.py::test_onnx_matches_interpreter[move-MoVE]") is None
    assert titans.owns("tests/test_parity.py::test_titans_memory_matches_titans_pytorch") == "mechanism"
    assert cola.owns("tests/test_examples_cli.py::test_example_checks_and_runs[cola_program]") is None
    with pytest.raises(ArchError, match="no seed paper"):
        catalog.find("gpt5")


def test_status_is_computed_from_the_card_and_the_results():
    p = catalog.find("think")              # card: implemented, no simplification
    s = catalog.find("hcam")               # card names a simplification
    ok = {"mechanism": 2, "passed": 9, "failed": 0, "skipped": 0}
    assert catalog.status(p, {"think": ok})[0] == "implemented"
    assert catalog.status(p, {})[0] == "unverified"
    assert catalog.status(p, {"think": dict(ok, failed=1)})[0] == "failing"
    assert catalog.status(p, {"think": dict(ok, mechanism=0)}) == ("partial", "no test of its distinctive mechanism")
    assert catalog.status(s, {"hcam": ok})[0] == "partial"
    assert catalog.status(catalog.find("survey_agent_memory"), {})[0] == "card only"


def test_recorder_counts_outcomes_per_paper_and_merges_into_the_record(tmp_path):
    out = tmp_path / "status.json"
    out.write_text(json.dumps({"papers": {"cola": {"mechanism": 1, "passed": 1, "failed": 0, "skipped": 0}}}))
    rec = catalog.Recorder()
    rec.add("tests/test_decode.py::test_think_pruning_shrinks_the_key_cache", "passed")
    rec.add("tests/test_onnx.py::test_onnx_matches_interpreter[think-ThinK]", "passed")
    rec.add("tests/test_stdlib.py::test_golden_ir[think]", "failed")
    rec.add("tests/test_ir_parser.py::test_round_trip", "passed")
    rec.write(out)
    data = json.loads(out.read_text())["papers"]
    assert data["think"] == {"mechanism": 1, "passed": 2, "failed": 1, "skipped": 0}
    assert data["cola"]["passed"] == 1                     # kept: this run did not test it
    assert list(data) == ["think", "cola"] or set(data) == {"think", "cola"}


def test_pytest_paper_option_runs_only_that_papers_tests_and_records_them(tmp_path):
    out = tmp_path / "status.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_parity.py",
                        "--paper", "hcam", f"--record-stdlib-status={out}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "deselected" in r.stdout
    data = json.loads(out.read_text())["papers"]
    assert set(data) == {"hcam"} and data["hcam"]["mechanism"] >= 1 and data["hcam"]["failed"] == 0


def test_cli_lists_every_paper_with_its_status_and_shows_a_card():
    r = CliRunner().invoke(main, ["stdlib", "list"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 52 and lines[0].split()[:2] == ["N", "key"]
    assert lines[-1].startswith("50 papers:")
    assert any(line.split()[:2] == ["16", "survey_agent_memory"] and "card only" in line for line in lines)
    r = CliRunner().invoke(main, ["stdlib", "show", "hrm"])
    assert r.exit_code == 0
    assert "20. HRM" in r.output and "status:" in r.output and stdlib.source("hrm") in r.output
    r = CliRunner().invoke(main, ["stdlib", "show", "nope"])
    assert r.exit_code == 1 and "no seed paper `nope`" in r.output


def test_stdlib_readme_table_is_the_generated_one():
    """stdlib/README.md's table is `archc stdlib list --markdown` (regenerate it after recording)."""
    readme = (ROOT / "stdlib" / "README.md").read_text()
    assert catalog.markdown(catalog.load_results()) in readme
