"""Fixtures shared by the unit, data and model tests."""
from __future__ import annotations

import pytest
import torch

from tidal.data import materialize


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
