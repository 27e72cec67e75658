"""Check that every notebook's reviewed source (``NN_name.py``) and executed twin (``NN_name.ipynb``) agree.

The ``.py`` files (jupytext ``py:percent``) are what reviewers read; the ``.ipynb`` files are what
readers open, with outputs. This script catches the usual ways the two drift apart:

* a ``.py`` without its ``.ipynb`` (or an ``.ipynb`` without its ``.py``);
* a cell edited in one file but not the other (cell types and sources are compared; outputs and
  metadata are ignored);
* an ``.ipynb`` that was never executed (a non-empty code cell without ``execution_count``) or that
  was saved with an error output;
* executed notebooks that together exceed the size budget (10 MB).

Usage: ``python tests/check_notebook_sync.py [notebooks_dir_or_files ...]`` (default ``notebooks``).
Prints one line per problem and exits 1 if there is any. ``tests/test_repo_hygiene.py`` runs the same
``check_notebooks`` function under pytest.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MAX_TOTAL_NOTEBOOK_BYTES = 10 * 1024 * 1024
NOTEBOOK_NAME = re.compile(r"^\d\d_.+$")  # NN_name


def _cells(path: Path) -> list[tuple[str, str]]:
    """(cell_type, source) for every cell, read through jupytext so both formats parse alike."""
    import jupytext

    nb = jupytext.read(path)
    return [(cell.cell_type, cell.source.strip()) for cell in nb.cells]


def _compare_cells(py: Path, ipynb: Path) -> list[str]:
    py_cells, nb_cells = _cells(py), _cells(ipynb)
    if len(py_cells) != len(nb_cells):
        return [f"{ipynb}: {len(nb_cells)} cells but {py.name} has {len(py_cells)} (re-run `make notebooks`)"]
    for i, ((py_type, py_src), (nb_type, nb_src)) in enumerate(zip(py_cells, nb_cells)):
        if py_type != nb_type:
            return [f"{ipynb}: cell {i} is {nb_type} but {py_type} in {py.name} (re-run `make notebooks`)"]
        if py_src != nb_src:
            first = py_src.splitlines()[0] if py_src else "<empty>"
            return [
                f"{ipynb}: cell {i} source differs from {py.name} (starts {first[:60]!r}; re-run `make notebooks`)"
            ]
    return []


# calls that draw a figure; a notebook using them must store at least one image output
FIGURE_CALL = re.compile(r"\b(plt\.(subplots|figure|imshow|plot)|viz\.(show|plot|sampling_points)\w*)\(")


def _check_executed(ipynb: Path) -> list[str]:
    nb = json.loads(ipynb.read_text(encoding="utf-8"))
    problems = []
    code = "\n".join(
        "".join(c.get("source", [])) for c in nb.get("cells", []) if c.get("cell_type") == "code"
    )
    has_image = any(
        "image/png" in o.get("data", {}) or "image/svg+xml" in o.get("data", {})
        for c in nb.get("cells", [])
        for o in c.get("outputs", [])
    )
    if FIGURE_CALL.search(code) and not has_image:
        problems.append(
            f"{ipynb}: draws figures but stores no image output (executed with MPLBACKEND=Agg? "
            "use `make notebooks` or `# %matplotlib inline`)"
        )
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", []))
        if not source.strip():  # nbclient skips empty code cells
            continue
        if cell.get("execution_count") is None:
            problems.append(f"{ipynb}: code cell {i} has no execution_count (notebook not executed)")
            break
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            problems.append(
                f"{ipynb}: code cell {i} was saved with an error output ({errors[0].get('ename')})"
            )
    return problems


def _collect(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """Split the arguments into notebook ``.py`` sources and the directories to scan for orphans."""
    sources: list[Path] = []
    dirs: list[Path] = []
    for p in paths:
        if p.is_dir():
            dirs.append(p)
            sources.extend(q for q in sorted(p.glob("*.py")) if NOTEBOOK_NAME.match(q.stem))
        else:
            sources.append(p)
            if p.parent not in dirs:
                dirs.append(p.parent)
    return sources, dirs


def check_notebooks(paths: list[str | Path] | None = None) -> list[str]:
    """Return one message per problem (empty list = all notebooks are paired, in sync and executed)."""
    if not paths:  # default: the repository's notebooks/ (absent in a repo without notebooks yet)
        default = Path(__file__).resolve().parent.parent / "notebooks"
        paths = [default] if default.exists() else []
    paths = [Path(p) for p in paths]
    problems: list[str] = []
    for p in paths:
        if not p.exists():
            problems.append(f"{p}: does not exist")
    if problems:
        return problems
    sources, dirs = _collect(paths)
    for py in sources:
        ipynb = py.with_suffix(".ipynb")
        if not ipynb.exists():
            problems.append(f"{py}: paired notebook {ipynb.name} is missing (run `make notebooks`)")
            continue
        problems += _compare_cells(py, ipynb)
        problems += _check_executed(ipynb)
    total = 0
    for d in dirs:
        for ipynb in sorted(d.glob("*.ipynb")):
            total += ipynb.stat().st_size
            if not ipynb.with_suffix(".py").exists():
                problems.append(f"{ipynb}: has no paired {ipynb.with_suffix('.py').name} source")
    if total > MAX_TOTAL_NOTEBOOK_BYTES:
        problems.append(
            f"notebooks: executed .ipynb files total {total / 2**20:.1f} MB, budget is "
            f"{MAX_TOTAL_NOTEBOOK_BYTES / 2**20:.0f} MB (shrink figures: smaller figsize/dpi)"
        )
    return problems


def main(argv: list[str]) -> int:
    problems = check_notebooks(argv or None)
    for line in problems:
        print(line)
    if not problems:
        print("notebook sync check: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
