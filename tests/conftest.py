import os

# The suite is bound by XLA compilation (small arrays, many configurations): LLVM at -O0 compiles
# 15–20 % faster. Set before JAX creates its backend; subprocesses (notebook kernels, CLI runs)
# inherit it. Benchmarks and the library itself keep XLA's defaults.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit the controller's
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in float64 (numerical accuracy checks)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


LONGEST_FIRST = ("test_notebooks.py", "test_readme.py", "test_benchmarks.py", "test_cli.py")


def pytest_collection_modifyitems(config, items):
    """Run the longest modules (30–80 s per test) first, so that pytest-xdist's workers do not end
    with one of them alone on one core while the other core idles."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: order kept within groups
