"""Do two versions of the runner train the toy presets bit for bit alike?

Runs, in a code tree (default: this checkout), on a small generated shapes dataset with one CPU
thread: the backbone pretext (2 epochs), ``detr-shapes`` (2 epochs, from that backbone, EMA on),
``detr-shapes`` again as 1 epoch + ``--resume`` to 2, ``deformable-shapes`` from a config pinned
in ``tests/fixtures/bit_identity/`` (2 epochs) and ``detr-shapes`` with progressive resizing from
epoch 1. It records every logged loss, every evaluation and a SHA-256 of every checkpoint's
weights and optimiser state::

    python tests/bit_identity.py record OUT.json [--code DIR]    # DIR: another code tree
    python tests/bit_identity.py compare BASELINE.json           # exit 1 and a diff on any difference
    python tests/bit_identity.py against REV                     # `git archive REV` vs this checkout

Floating-point results can differ between CPU kinds and torch versions, so a stored baseline
(``tests/fixtures/bit_identity/baseline.json``, checked by ``tests/test_bit_identity.py``) holds
where it was recorded; ``against`` compares two revisions on any machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / "tests" / "fixtures" / "bit_identity"
TIMING_KEYS = {"time_per_iter", "images_per_s", "train_time_s", "epoch_time_s", "max_memory_mb"}
COMMON = ["--threads", "1", "--no-progress"]


def _sha(tensors: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for key in sorted(tensors, key=str):
        t = tensors[key]
        h.update(str(key).encode())
        if torch.is_tensor(t):
            h.update(str(t.dtype).encode())
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(t, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _optimizer_sha(state: dict[str, Any]) -> str:
    flat = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            flat[f"{idx}.{name}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    flat["param_groups"] = groups
    return _sha(flat)


def summarise_run(out: Path) -> dict[str, Any]:
    """Losses and evaluations from ``out/log.jsonl``, hashes of ``out/checkpoint.pt``."""
    import torch

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    logged = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    hashes = {"model": _sha(ckpt["model"])}
    if "model_train" in ckpt:
        hashes["model_train"] = _sha(ckpt["model_train"])
    if "optimizer" in ckpt:
        hashes["optimizer"] = _optimizer_sha(ckpt["optimizer"])
    return {"log": logged, "sha256": hashes, "epoch": ckpt.get("epoch")}


def record(code: Path, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

    def run(*args: str) -> None:
        cmd = [sys.executable, "-m", *args]
        proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    data, runs = work / "data", work / "runs"
    run("detr_lite.data.shapes", "--out", str(data), "--seed", "3", "--num-train", "48", "--num-val", "12")
    run("detr_lite.pretrain", "--config", "detr-shapes", "--data", str(data), "--output",
        str(runs / "backbone.pt"), "--epochs", "2", "--val-every", "1", *COMMON)  # fmt: skip
    backbone = ["--backbone-weights", str(runs / "backbone.pt")]
    detr = ["detr_lite.train", "--config", "detr-shapes", "--data", str(data), "--eval-every", "1", *backbone]
    run(*detr, "--output", str(runs / "detr"), "--epochs", "2", *COMMON)
    run(*detr, "--output", str(runs / "detr_resumed"), "--epochs", "1", *COMMON)
    run("detr_lite.train", "--config", "detr-shapes", "--data", str(data), "--output", str(runs / "detr_resumed"),
        "--resume", "--epochs", "2", *COMMON)  # fmt: skip
    run("detr_lite.train", "--config", str(PINNED / "deformable_shapes.json"), "--data", str(data),
        "--output", str(runs / "deformable"), "--epochs", "2", "--eval-every", "1", *COMMON)  # fmt: skip
    late = json.loads((PINNED / "detr_shapes.json").read_text())
    late["data"]["late_scale_after"] = 1
    (work / "detr_late.json").write_text(json.dumps(late))
    run("detr_lite.train", "--config", str(work / "detr_late.json"), "--data", str(data), "--output",
        str(runs / "detr_late"), "--epochs", "2", "--eval-every", "2", "--ema-decay", "0", *backbone, *COMMON)  # fmt: skip

    import torch

    backbone_ckpt = torch.load(runs / "backbone.pt", map_location="cpu", weights_only=True)
    ann = (data / "annotations" / "instances_train2017.json").read_bytes()
    return {
        "env": environment(),
        "data_sha256": hashlib.sha256(ann).hexdigest(),
        "pretrain": {"sha256": _sha(backbone_ckpt["model"]), "history": backbone_ckpt["meta"]["history"]},
        **{name: summarise_run(runs / name) for name in ("detr", "detr_resumed", "deformable", "detr_late")},
    }


def environment() -> dict[str, str]:
    """What the bits depend on besides the code: the torch version and the CPU model."""
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu": cpu}


def _strip_times(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_times(v) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [_strip_times(v) for v in x]
    return x


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two records differ (timings ignored)."""
    a, b = _strip_times(a), _strip_times(b)
    if where == "" and isinstance(a, dict) and isinstance(b, dict):
        a, b = {k: v for k, v in a.items() if k != "env"}, {k: v for k, v in b.items() if k != "env"}
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'baseline' if k in a else 'this run'}")
            else:
                out += differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["record", "compare", "against"])
    p.add_argument("target", help="record: the file to write; compare: the baseline file; against: a git revision")
    p.add_argument("--code", default=str(REPO), help="the code tree to run (default: this checkout)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bit_identity_") as tmp:
        if args.action == "against":
            old = Path(tmp) / "old"
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.target], cwd=REPO, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            baseline = record(old, Path(tmp) / "old_run")
        got = record(Path(args.code).resolve(), Path(tmp) / "run")
    if args.action == "record":
        Path(args.target).write_text(json.dumps(got, indent=1) + "\n")
        print(f"wrote {args.target}")
        return 0
    if args.action == "compare":
        baseline = json.loads(Path(args.target).read_text())
    diffs = differences(baseline, got)
    print("\n".join(diffs[:40]) if diffs else f"bit-identical to {args.target}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
