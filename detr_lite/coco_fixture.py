"""Moved to ``tests/coco_fixture.py``: a test fixture is no part of the package.

Notebook 09's CPU smoke run still imports it from here; until it imports ``tests.coco_fixture``,
this loads that file from the checkout (the package holds no copy).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "tests.coco_fixture", Path(__file__).resolve().parents[1] / "tests" / "coco_fixture.py"
)
_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixture)
FIXTURE_CATEGORIES, make_coco_fixture = _fixture.FIXTURE_CATEGORIES, _fixture.make_coco_fixture

if __name__ == "__main__":
    raise SystemExit("python -m detr_lite.coco_fixture moved: python -m tests.coco_fixture --out DIR (from the repository root)")
