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


# The longest test files, longest first (summed durations of a `--durations=100` run of the whole
# suite). `make test` gives each of its two xdist workers whole files (`--dist loadfile`) in
# collection order (`--no-loadscope-reorder`), so starting these first keeps both workers busy to
# the end instead of leaving one to finish a long file alone.
LONGEST_FIRST = [
    "tests/integration/test_kill_points.py", "tests/integration/test_dvc.py",
    "tests/integration/test_labelstudio.py", "tests/integration/test_crash_resume.py",
    "tests/integration/test_ui.py", "tests/integration/test_tracking_resume.py",
    "tests/integration/test_stack.py", "tests/integration/test_human_loop.py",
    "tests/integration/test_ddp.py", "tests/integration/test_deployment.py",
]


def pytest_collection_modifyitems(config, items):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = [path for path in LONGEST_FIRST if not (root / path).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names files that do not exist: {missing}")
    rank = {path: n for n, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


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


@pytest.fixture(scope="session")
def benchmark_script():
    """Import a script of benchmarks/ (not a package) by its name, e.g. benchmark_script("overhead");
    each call executes the script afresh, so one loader serves every scope."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load

