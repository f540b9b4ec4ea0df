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
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from current output")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
