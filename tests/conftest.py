"""Test set-up: 8 simulated CPU devices, before JAX initialises its backend; caches in a
temporary root, never the user's home."""
import atexit
import gc
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# Converted weights and compiled programs ($ARCTIC_JAX_CACHE, also for the servers the tests
# start) go to one temporary root for the whole run: made by the first process (pytest-xdist's
# workers inherit it) and removed when that process exits. Set ARCTIC_JAX_TEST_CACHE_ROOT to
# keep one between runs.
_ROOT = "ARCTIC_JAX_TEST_CACHE_ROOT"
if _ROOT not in os.environ:
    os.environ[_ROOT] = tempfile.mkdtemp(prefix="arctic-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ[_ROOT], True)
os.environ["ARCTIC_JAX_CACHE"] = os.environ[_ROOT]

import jax

jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache in the test processes themselves ("auto" leaves it off), so
# tests that count compilations see every one; child processes (servers) use the cache.
jax.config.update("jax_enable_compilation_cache", False)



@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs_after_each_module():
    """Drop JAX's in-memory caches of traced and compiled programs (and the module's garbage)
    once a test module is done: a worker runs many modules, and without this their programs
    and the arrays they pin pile up (a worker reached 12 GB on the 24 GB CI machine)."""
    yield
    jax.clear_caches()
    gc.collect()


# The longest modules first: pytest-xdist hands whole files to its workers in collection order,
# so a run that ends on short files keeps both workers busy to the end.
_LONG_MODULES = (
    "test_readme_commands.py", "test_notebook_training.py", "test_notebook.py",
    "test_speculative_engine.py", "test_server_schemathesis.py", "test_compilation_cache.py",
    "test_replicas.py", "test_train_speculator.py", "test_arctic_speculation.py",
    "test_smollm2_generation.py", "test_server.py", "test_server_replicas.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order
