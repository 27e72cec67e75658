"""Fixtures shared by the test modules (helpers live in tests/test_train_cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny COCO folder (the first 8 train / 4 val images with objects of the bundled data), per module."""
    from tests.test_train_cli import make_tiny_coco

    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))
