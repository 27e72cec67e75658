"""Execute a notebook with some of its parameters overridden, as papermill does, without papermill.

The cell tagged ``parameters`` keeps its defaults; a cell tagged ``injected-parameters`` with the
overrides is inserted right after it. The executed notebook (outputs and figures) is written to
``--output``; every cell's printed text is echoed to stdout, so a log shows what ran. Any error in a
cell stops the run with a non-zero exit status.

Used by ``benchmarks/gpu/run_checks.sh`` to run ``notebooks/09_coco_training.ipynb`` for real
(``SMOKE = False``) on a GPU machine::

    python benchmarks/gpu/run_notebook.py notebooks/09_coco_training.ipynb out.ipynb \
        -p SMOKE=False -p 'ARCH="deformable_detr_r50"' -p NUM_GPUS=1 --prelude 'import x'

``-p NAME=EXPR`` takes a Python expression. ``--prelude CODE`` is prepended to the injected cell
(for instance to shorten a polling interval in a check run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def inject(nb, overrides: list[str], prelude: str | None) -> None:
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
    if idx is None:
        raise SystemExit("run_notebook: the notebook has no cell tagged 'parameters'")
    lines = ["# Injected parameters"]
    if prelude:
        lines.append(prelude)
    for item in overrides:
        name, sep, expr = item.partition("=")
        name, expr = name.strip(), expr.strip()
        if not sep or not name.isidentifier():
            raise SystemExit(f"run_notebook: -p {item!r}: expected NAME=EXPRESSION")
        compile(expr, f"-p {name}", "eval")  # a bad expression fails here, not after minutes of work
        lines.append(f"{name} = {expr}")
    cell = nbformat.v4.new_code_cell("\n".join(lines))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, cell)


def echo(nb) -> None:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        text = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                text.append(o.text)
            elif o.output_type in ("execute_result", "display_data") and "text/plain" in o.get("data", {}):
                if "image/png" not in o.data:
                    text.append(o.data["text/plain"] + "\n")
            elif o.output_type == "error":
                text.append(f"{o.ename}: {o.evalue}\n")
        if text:
            print(f"--- cell {i}\n" + "".join(text).rstrip()[-4000:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebook", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("-p", dest="params", action="append", default=[], metavar="NAME=EXPR")
    p.add_argument("--prelude", help="code placed before the overrides in the injected cell")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    p.add_argument("--kernel", default="python3")
    args = p.parse_args(argv)
    nb = nbformat.read(args.notebook, as_version=4)
    inject(nb, args.params, args.prelude)
    client = NotebookClient(
        nb, timeout=args.timeout, kernel_name=args.kernel, resources={"metadata": {"path": str(Path.cwd())}}
    )
    t0 = time.perf_counter()
    failed = None
    try:
        client.execute()
    except CellExecutionError as e:
        failed = e
    args.output.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, args.output)
    echo(nb)
    print(
        f"{args.notebook}: {'FAILED' if failed else 'ok'} in {time.perf_counter() - t0:.1f} s -> {args.output}"
    )
    if failed:
        print(str(failed)[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
