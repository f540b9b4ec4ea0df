import os

import pytest

# The Triton kernels the tests generate run on the CPU under Triton's interpreter. Triton reads this
# when `triton.language` is first imported (its own jit functions, e.g. tl.sum, are made then), so
# it is set here, before any test module imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Generated launchers run their torch expression below a size gate (SPEC §19.2); the tests' tiny
# shapes would never reach the kernels, so the gate is off unless a test turns it on.
os.environ.setdefault("ARCHC_TRITON_TORCH_NUMEL", "0")


def pytest_configure(config):
    """Under pytest-xdist (`-n auto`), one torch thread per worker: the workers already use every core,
    and the tests' tiny tensors gain nothing from intra-op threads they would fight over."""
    path = config.getoption("--record-stdlib-status")
    worker = hasattr(config, "workerinput")           # an xdist worker (not this process's env: a test's
    if path is not None and not worker:               # subprocess pytest inherits PYTEST_XDIST_WORKER)
        config.pluginmanager.register(_StatusRecorder(path), "archc-stdlib-status")
    if worker:
        import torch
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from current output")
    parser.addoption("--paper", action="append", default=[], metavar="KEY",
                     help="run only the tests of this seed paper (its mechanism tests and the tests parametrized by "
                          "its stdlib files); repeatable")
    parser.addoption("--record-stdlib-status", nargs="?", const="", default=None, metavar="PATH",
                     help="record each seed paper's test outcomes for `archc stdlib list` (default: stdlib/status.json)")


def pytest_collection_modifyitems(config, items):
    keys = config.getoption("--paper")
    if not keys:
        return
    from archc.stdlib.catalog import find
    chosen = [find(k) for k in keys]
    keep = [it for it in items if any(p.owns(it.nodeid) for p in chosen)]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep


class _StatusRecorder:
    """Feeds every test's outcome to archc.stdlib.catalog.Recorder; writes the record at the end."""

    def __init__(self, path: str):
        from archc.stdlib.catalog import Recorder, results_path
        self.path = path or str(results_path())
        self.rec = Recorder()

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":      # a setup error or skip counts too
            self.rec.add(report.nodeid, report.outcome)

    def pytest_sessionfinish(self, session):           # (under xdist: the controller, which sees every report)
        from pathlib import Path
        self.rec.write(Path(self.path))


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
