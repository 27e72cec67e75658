"""Repository hygiene: notebook pairs in sync, size budgets kept, no package-index host names.

These checks guard the promises the README makes about the repository itself: the executed notebooks
match their reviewed ``.py`` sources, the clone stays small (< 48 MB, checkpoints <= 12 MB each,
bundled data <= 8 MB, notebooks <= 10 MB), and installation goes through the user's own pip
configuration (no hard-coded package-index URLs anywhere in the repo).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_notebook_sync import check_notebooks  # noqa: E402

MB = 1024 * 1024
MAX_REPO_BYTES = 48 * MB
MAX_CHECKPOINT_BYTES = 12 * MB
MAX_BUNDLED_DATA_BYTES = 8 * MB
# Directories that are never part of the repository (used only when git is unavailable).
_NOT_IN_REPO = {".git", ".venv", "runs", "outputs", "build", "__pycache__", ".pytest_cache", ".ruff_cache"}

# Well-known package-index host names, assembled from parts so this file does not contain them.
_DOT = "."
FORBIDDEN_HOSTS = [
    "py" + "pi" + _DOT + "org",
    "pythonhosted" + _DOT + "org",
    "py" + "pi" + _DOT + "python" + _DOT + "org",
    "download" + _DOT + "pytorch" + _DOT + "org",
    "anaconda" + _DOT + "org",
    "repo" + _DOT + "anaconda" + _DOT + "com",
    "conda" + _DOT + "anaconda" + _DOT + "org",
]


def repo_files() -> list[Path]:
    """Files that are (or would be, on the next ``git add``) in the repository: tracked + untracked,
    minus what .gitignore excludes. Falls back to a directory walk when git is unavailable."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        names = sorted({n for n in out.decode("utf-8", "surrogateescape").split("\0") if n})
        return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not (set(p.relative_to(ROOT).parts) & _NOT_IN_REPO) and p.suffix != ".pyc"
        ]


def test_notebooks_paired_in_sync_and_executed():
    problems = check_notebooks()  # the repository's notebooks/
    assert not problems, "\n".join(problems)


def test_repository_total_size():
    files = repo_files()
    assert files, "no repository files found"
    total = sum(p.stat().st_size for p in files)
    biggest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:5]
    detail = ", ".join(f"{p.relative_to(ROOT)} {p.stat().st_size / MB:.1f} MB" for p in biggest)
    assert total < MAX_REPO_BYTES, f"repository files total {total / MB:.1f} MB >= 48 MB (largest: {detail})"


def test_checkpoint_sizes():
    for ckpt in sorted((ROOT / "data" / "checkpoints").glob("*.pt")):
        size = ckpt.stat().st_size
        assert size <= MAX_CHECKPOINT_BYTES, f"{ckpt.relative_to(ROOT)} is {size / MB:.1f} MB > 12 MB"


def test_bundled_data_size():
    shapes = ROOT / "data" / "shapes"
    total = sum(p.stat().st_size for p in shapes.rglob("*") if p.is_file()) if shapes.exists() else 0
    assert total <= MAX_BUNDLED_DATA_BYTES, f"data/shapes totals {total / MB:.1f} MB > 8 MB"


def test_forbidden_hosts_are_real_host_names():
    # guard the guard: the assembled strings must look like host names
    assert all(h.count(".") >= 1 and " " not in h for h in FORBIDDEN_HOSTS)


@pytest.mark.parametrize("host", FORBIDDEN_HOSTS)
def test_no_package_index_host_names(host):
    offenders = []
    for path in repo_files():
        try:
            data = path.read_bytes().lower()
        except OSError:
            continue
        if host.encode() in data:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"package-index host {host!r} written in: {', '.join(offenders)}"
