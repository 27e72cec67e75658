"""Fixtures shared by the test modules (helpers are in ``tests/helpers.py``).

``pytest -m "not slow" tests`` is the quick inner loop; ``make test`` runs everything.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_coco, write_tiny_config


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny COCO folder (the first 8 train / 4 val images with objects of the bundled data), per module."""
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, tiny_data) -> Path:
    """``tiny_cfg(tiny_data)`` written as a config .json, per module."""
    return write_tiny_config(tmp_path_factory.mktemp("cfg") / "tiny.json", tiny_data)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy shared CPU two threads per process thrash (tiny tensors anyway).
    Modules that train use it for every test: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
