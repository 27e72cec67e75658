"""The runner trains the toy presets bit for bit as the recorded baseline did (losses, evaluations,
weights, optimiser state): ``tests/bit_identity.py`` runs the same short trainings and compares."""

from __future__ import annotations

import json

import pytest

from tests.bit_identity import PINNED, differences, environment, record

pytestmark = pytest.mark.slow


def test_toy_trainings_are_bit_identical_to_the_baseline(tmp_path):
    baseline = json.loads((PINNED / "baseline.json").read_text())
    here = environment()
    if {k: baseline["env"][k] for k in here} != here:
        pytest.skip(
            f"baseline recorded with {baseline['env']}, this machine is {here}; compare two revisions "
            f"here instead: python tests/bit_identity.py against {baseline['env']['revision']}"
        )
    from tests.bit_identity import REPO

    diffs = differences(baseline, record(REPO, tmp_path))
    assert not diffs, "\n".join(diffs[:20])
