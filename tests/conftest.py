import os

import pytest

# The Triton kernels the tests generate run on the CPU under Triton's interpreter. Triton reads this
# when `triton.language` is first imported (its own jit functions, e.g. tl.sum, are made then), so
# it is set here, before any test module imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from current output")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")
