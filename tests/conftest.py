"""Fixtures shared by the unit, data and model tests."""
from __future__ import annotations

import os
import tempfile

# One compute thread per process: `make test` runs two xdist workers on two cores, and each
# starts `tidal` subprocesses and servers; with torch's default of a thread per core they would
# fight for the same cores. Set before torch is imported, and inherited by every subprocess.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tidal.data import materialize

# Decoded-image caches and data-version md5 memos of the tests' temporary data folders go to one
# temporary folder per run (subprocesses inherit it), not to the checkout's .cache/tidal.
os.environ.setdefault("TIDAL_CACHE_DIR", tempfile.mkdtemp(prefix="tidal-test-cache-"))


@pytest.fixture(autouse=True)
def _restore_determinism_flag():
    # train_step switches on deterministic algorithms globally; keep other tests unaffected.
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The embedded digits written once per test module (read-only for the tests)."""
    root = tmp_path_factory.mktemp("data")
    materialize(root, "digits")
    return root


@pytest.fixture
def benchmark_script():
    """Import a script of benchmarks/ (not a package) by its name, e.g. benchmark_script("overhead")."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

