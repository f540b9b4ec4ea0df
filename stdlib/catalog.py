"""The catalog of seed papers and each entry's status, computed from test results.

`stdlib/catalog.toml` holds what a person writes about an entry (title, category, files, the card,
which tests check its mechanism). What an entry's *status* is comes from running those tests:
`pytest --record-stdlib-status` (or `archc stdlib list --run`) records, per paper, how many of its
tests passed, failed or were skipped, and `status()` turns the card and that record into one of

- ``implemented``: it has .arch files, mechanism tests, every recorded test passed, and its card
  names no simplification;
- ``partial``: as above but the card states a simplification, or it has no mechanism test;
- ``failing``: a recorded test of it failed;
- ``unverified``: it has .arch files but no recorded results;
- ``card only``: no .arch file (a survey, or out of scope; the card says why).
"""
from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from archc.errors import ArchError

#: the results of the last recorded test run (committed, like the golden files)
STATUS_FILE = "status.json"


@dataclass(frozen=True)
class Paper:
    n: int
    keys: tuple[str, ...]
    title: str
    category: str
    files: tuple[str, ...]
    card: str
    tests: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.keys[0]

    def owns(self, nodeid: str) -> str | None:
        """Whether the test `nodeid` (`tests/test_x.py::test_y[param]`) checks this paper: "mechanism"
        (one of its listed tests), "model" (a test parametrized by one of its files), or None."""
        name = nodeid.split("tests/", 1)[-1]
        if any(name.startswith(prefix) for prefix in self.tests):
            return "mechanism"
        param = re.search(r"\[([^\]]*)\]$", name)
        if param and any(re.match(rf"{re.escape(f)}(-|$)", param.group(1)) for f in self.files):
            return "model"
        return None


def papers() -> list[Paper]:
    """Every seed paper, in the catalog's order."""
    data = tomllib.loads(resources.files(__package__).joinpath("catalog.toml").read_text())
    return [Paper(p["n"], tuple(p["keys"]), p["title"], p["category"], tuple(p["files"]), p["card"],
                  tuple(p["tests"])) for p in data["paper"]]


def find(key: str) -> Paper:
    """A paper by its number, one of its keys, or one of its files."""
    for p in papers():
        if key in p.keys or key in p.files or key == str(p.n):
            return p
    raise ArchError(f"no seed paper `{key}`", hint="`archc stdlib list` prints every paper's key")


def results_path() -> Path:
    return Path(str(resources.files(__package__).joinpath(STATUS_FILE)))


def load_results(path: Path | None = None) -> dict[str, dict]:
    """Per paper key: {"mechanism": passed mechanism tests, "passed", "failed", "skipped"}."""
    p = path or results_path()
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())["papers"]
    except (ValueError, KeyError) as err:
        raise ArchError(f"{p} is not a stdlib status file ({err})",
                        hint="re-create it with `python -m pytest --record-stdlib-status`") from None


def status(paper: Paper, results: dict[str, dict]) -> tuple[str, str]:
    """(status, reason) from the card and the recorded results."""
    if not paper.files:
        return "card only", paper.card.split(":", 1)[-1].strip()
    r = results.get(paper.key)
    if r is None:
        return "unverified", "no recorded test results (`archc stdlib list --run`)"
    if r["failed"]:
        return "failing", f"{r['failed']} of {r['passed'] + r['failed']} tests failed"
    if not r["mechanism"]:
        return "partial", "no test of its distinctive mechanism"
    simplified = re.search(r"simplified[^:]*:\s*(.*)", paper.card)
    if simplified:
        return "partial", "simplified: " + simplified.group(1)
    return "implemented", f"{r['mechanism']} mechanism tests, {r['passed']} tests in all"


def variants(paper: Paper) -> list[str]:
    """The architectures of the paper's files (`file:Arch`)."""
    from archc.stdlib import path

    from archc.api import lower
    return [g.name for f in paper.files for g in lower(path(f))]


class Recorder:
    """Counts test outcomes per paper (the pytest plugin in tests/conftest.py feeds it)."""

    def __init__(self):
        self.catalog = papers()
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, nodeid: str, outcome: str) -> None:
        for p in self.catalog:
            kind = p.owns(nodeid)
            if kind is None:
                continue
            c = self.counts.setdefault(p.key, {"mechanism": 0, "passed": 0, "failed": 0, "skipped": 0})
            c[outcome] += 1
            if kind == "mechanism" and outcome == "passed":
                c["mechanism"] += 1

    def write(self, path: Path) -> None:
        """Merge this run's counts into `path` (papers this run did not test keep their record)."""
        old = load_results(path) if path.is_file() else {}
        old.update(self.counts)
        merged = {p.key: old[p.key] for p in self.catalog if p.key in old}
        path.write_text(json.dumps({"papers": merged}, indent=1, sort_keys=True) + "\n")


def markdown(results: dict[str, dict]) -> str:
    """The index table of stdlib/README.md."""
    rows = ["| N | key | title | category | files | status | card | mechanism tests |",
            "|---|---|---|---|---|---|---|---|"]
    for p in papers():
        st, _ = status(p, results)
        keys = ", ".join(f"`{k}`" for k in p.keys)
        files = ", ".join(f"`{f}.arch`" for f in p.files)
        tests = "; ".join(f"`{t}*`" for t in p.tests)
        rows.append(f"| {p.n} | {keys} | {p.title} | {p.category} | {files} | {st} | {p.card} | {tests} |")
    return "\n".join(rows) + "\n"
