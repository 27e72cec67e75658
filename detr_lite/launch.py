"""Helpers for running a long training job from a notebook (notebook 09) or a shell.

A full COCO run takes days, so the notebook never trains inside its own kernel. Instead it:

1. checks the dataset layout (:func:`check_coco_layout`) and, when something is missing, prints
   exactly where to get it (:func:`download_instructions`); an opt-in :func:`download_coco`
   fetches the official archives, verifies their byte size and MD5, and unzips them;
2. builds a ``torchrun`` command line (:func:`torchrun_command`) for one GPU, N GPUs or N nodes;
3. starts it as a *detached* subprocess (:func:`launch_detached`): its own session, stdout to a
   log file, its pid in ``OUTPUT_DIR/train.pid``. Restarting the kernel does not kill it, and
   running the launch cell again neither starts a second copy (:func:`running_pid`) nor starts
   from scratch (:func:`with_resume` adds ``--resume`` once ``checkpoint.pt`` exists);
4. follows progress by re-reading the JSON-lines log the trainer appends to (:func:`read_log`,
   :func:`plot_progress`).

Nothing here imports torch, so it is cheap to import and easy to unit-test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------
# 1. The dataset: layout check, instructions, opt-in download
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoArchive:
    """One official COCO 2017 archive: where it lives and what it must look like."""

    name: str
    url: str
    num_bytes: int
    md5: str
    provides: tuple[str, ...]  # paths (relative to the COCO root) that unzipping it creates

    @property
    def human_size(self) -> str:
        return _human_bytes(self.num_bytes)


# Sizes and MD5 sums of the files served by the COCO website (stable since 2017).
COCO_ARCHIVES: dict[str, CocoArchive] = {
    "annotations": CocoArchive(
        "annotations_trainval2017.zip",
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        252_907_541,
        "f4bbac642086de4f52a3fdda2de5fa2c",
        ("annotations/instances_train2017.json", "annotations/instances_val2017.json"),
    ),
    "val": CocoArchive(
        "val2017.zip",
        "http://images.cocodataset.org/zips/val2017.zip",
        815_585_330,
        "442b8da7639aecaf257c1dceb8ba8c80",
        ("val2017",),
    ),
    "train": CocoArchive(
        "train2017.zip",
        "http://images.cocodataset.org/zips/train2017.zip",
        19_336_861_798,
        "cced6f7f71b7629ddf16f17bbcfab6b2",
        ("train2017",),
    ),
}

# What training + evaluation read, and which archive provides each path.
REQUIRED_PATHS: dict[str, str] = {
    "train2017": "train",
    "val2017": "val",
    "annotations/instances_train2017.json": "annotations",
    "annotations/instances_val2017.json": "annotations",
}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB", "MB") else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_coco_layout(root: str | os.PathLike, need_train: bool = True) -> list[str]:
    """Paths (relative to ``root``) that training/evaluation need but that are missing or empty.

    An empty list means the layout is complete::

        root/train2017/*.jpg   root/val2017/*.jpg
        root/annotations/instances_train2017.json   root/annotations/instances_val2017.json

    ``need_train=False`` checks only what evaluation reads (val images + val annotations).
    """
    root = Path(root)
    missing = []
    for rel in REQUIRED_PATHS:
        if not need_train and "train" in rel:
            continue
        p = root / rel
        if rel.endswith(".json"):
            ok = p.is_file() and p.stat().st_size > 0
        else:
            ok = p.is_dir() and any(p.iterdir())
        if not ok:
            missing.append(rel)
    return missing


def download_instructions(root: str | os.PathLike, missing: list[str] | None = None) -> str:
    """A copy-pasteable recipe for getting the missing parts of COCO 2017 into ``root``."""
    root = Path(root)
    missing = check_coco_layout(root) if missing is None else missing
    if not missing:
        return f"COCO 2017 layout under {root} is complete."
    keys = sorted({REQUIRED_PATHS[m] for m in missing}, key=list(COCO_ARCHIVES).index)
    total = sum(COCO_ARCHIVES[k].num_bytes for k in keys)
    lines = [f"COCO 2017 is incomplete under {root}; missing: {', '.join(missing)}", ""]
    lines.append(f"Download {_human_bytes(total)} (and as much again to unzip), then unzip into {root}:")
    lines.append(f"  mkdir -p {shlex.quote(str(root))} && cd {shlex.quote(str(root))}")
    for k in keys:
        a = COCO_ARCHIVES[k]
        lines.append(f"  wget -c {a.url}   # {a.human_size}, md5 {a.md5}")
    for k in keys:
        a = COCO_ARCHIVES[k]
        lines.append(f"  md5sum {a.name}   # expect {a.md5}")
        lines.append(f"  unzip -q {a.name} && rm {a.name}")
    lines += ["", "or, from Python: detr_lite.launch.download_coco(root)  (same checks, resumable)."]
    return "\n".join(lines)


def require_coco_layout(root: str | os.PathLike, need_train: bool = True) -> None:
    """Raise a one-line ``ValueError`` naming the first missing path (before any long work)."""
    missing = check_coco_layout(root, need_train=need_train)
    if missing:
        first = Path(root) / missing[0]
        archive = COCO_ARCHIVES[REQUIRED_PATHS[missing[0]]]
        raise ValueError(
            f"COCO layout: missing {first} (expected from {archive.name}, {archive.url}); "
            f"{len(missing)} path(s) missing in total, see detr_lite.launch.download_instructions()"
        )


def file_md5(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_file(path: str | os.PathLike, num_bytes: int | None = None, md5: str | None = None) -> None:
    """Raise ``ValueError`` (one line) if ``path`` has the wrong size or MD5 sum."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    size = path.stat().st_size
    if num_bytes is not None and size != num_bytes:
        raise ValueError(f"{path}: size {size} bytes, expected {num_bytes}")
    if md5 is not None:
        got = file_md5(path)
        if got != md5:
            raise ValueError(f"{path}: md5 {got}, expected {md5}")


def download_file(
    url: str,
    dest: str | os.PathLike,
    num_bytes: int | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` (resuming a partial ``dest.part``), then verify size and MD5.

    A file already at ``dest`` with the right size and sum is kept as is.
    """
    dest = Path(dest)
    if dest.is_file() and (num_bytes is None or dest.stat().st_size == num_bytes):
        verify_file(dest, num_bytes, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url)
    if have and url.startswith("http"):
        req.add_header("Range", f"bytes={have}-")
    with urllib.request.urlopen(req) as resp:  # noqa: S310 (official, fixed URLs)
        resumed = getattr(resp, "status", 200) == 206
        mode = "ab" if resumed else "wb"
        done = have if resumed else 0
        last = time.monotonic()
        with open(part, mode) as f:
            while block := resp.read(1 << 20):
                f.write(block)
                done += len(block)
                if progress and time.monotonic() - last > 10:
                    total = f" / {_human_bytes(num_bytes)}" if num_bytes else ""
                    print(f"  {dest.name}: {_human_bytes(done)}{total}", flush=True)
                    last = time.monotonic()
    verify_file(part, num_bytes, md5)
    part.replace(dest)
    return dest


def download_coco(
    root: str | os.PathLike,
    parts: tuple[str, ...] = ("annotations", "val", "train"),
    keep_zips: bool = False,
    archives: dict[str, CocoArchive] | None = None,
) -> list[str]:
    """Opt-in: fetch, verify (size + MD5) and unzip the official COCO 2017 archives into ``root``.

    Parts whose files are already in place are skipped. Before downloading anything, checks that
    the disk has room for the zip plus its contents (about twice the archive size). Returns what
    :func:`check_coco_layout` still reports missing afterwards (an empty list on success).
    ``archives`` lets a test substitute small local archives (``file://`` URLs).
    """
    root = Path(root)
    archives = COCO_ARCHIVES if archives is None else archives
    for p in parts:
        if p not in archives:
            raise ValueError(f"download_coco: unknown part {p!r}; expected some of {sorted(archives)}")
    todo = [archives[p] for p in parts if not all(_present(root / rel) for rel in archives[p].provides)]
    root.mkdir(parents=True, exist_ok=True)
    need = sum(2 * a.num_bytes for a in todo if not (root / a.name).is_file())
    free = shutil.disk_usage(root).free
    if need > free:
        raise ValueError(
            f"{root}: {_human_bytes(free)} free, the download + unzip needs about {_human_bytes(need)}"
        )
    for a in todo:
        print(f"downloading {a.url} ({a.human_size}) ...", flush=True)
        zpath = download_file(a.url, root / a.name, a.num_bytes, a.md5)
        print(f"verified {a.name} (md5 {a.md5}); unzipping ...", flush=True)
        with zipfile.ZipFile(zpath) as zf:
            zf.extractall(root)
        if not keep_zips:
            zpath.unlink()
    return check_coco_layout(root) if archives is COCO_ARCHIVES else []


def _present(p: Path) -> bool:
    return p.is_file() or (p.is_dir() and any(p.iterdir()))


def pretrained_backbone_cache(backbone: str = "resnet50") -> tuple[Path, str]:
    """(cache file, source URL) of torchvision's ImageNet weights for ``backbone``.

    The official DETR/Deformable runs start from torchvision's ``IMAGENET1K_V1`` ResNet weights;
    torch keeps downloaded weights in ``$TORCH_HOME/hub/checkpoints`` (default
    ``~/.cache/torch/hub/checkpoints``), which is where an offline machine needs a copy.
    """
    import torch.hub
    import torchvision

    enum = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101"}
    if backbone not in enum:
        raise ValueError(f"backbone: expected one of {sorted(enum)}, received {backbone!r}")
    weights = torchvision.models.get_weight(f"{enum[backbone]}_Weights.IMAGENET1K_V1")
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name, weights.url


def ensure_pretrained_backbone(backbone: str = "resnet50", download: bool = True) -> Path:
    """Make sure the ImageNet weights are in the torch cache (download them if allowed and online).

    Training a DETR from a random backbone silently wastes days, so unlike the model builder
    (which only warns) this raises a one-line ``ValueError`` naming the cache path when the file
    is missing and cannot be fetched. Call it before launching a long run.
    """
    path, url = pretrained_backbone_cache(backbone)
    if path.is_file():
        return path
    if download:
        import torch.hub

        try:
            torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
        except Exception as err:  # offline: URLError, OSError, ...
            raise ValueError(
                f"ImageNet weights for {backbone} are not at {path} and could not be downloaded "
                f"({type(err).__name__}); copy {Path(url).name} there, or train with --no-pretrained-backbone"
            ) from None
        return path
    raise ValueError(
        f"ImageNet weights for {backbone} are not at {path}; copy {Path(url).name} there "
        "(from a machine with internet), or train with --no-pretrained-backbone"
    )


def arrange_coco_layout(
    images_dir: str | os.PathLike,
    annotation_json: str | os.PathLike,
    out_root: str | os.PathLike,
    val_json: str | os.PathLike | None = None,
    val_images_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, int]:
    """Turn "a folder of images + one COCO JSON" into the COCO 2017 layout the trainer reads.

    ``out_root/{train2017,val2017}/`` get symbolic links to the images (copies where links are not
    supported) and ``out_root/annotations/instances_{train,val}2017.json`` the matching halves of
    the annotations. Without ``val_json`` a random ``val_fraction`` of the images (fixed by
    ``seed``) becomes the validation split. Returns the number of images per split. Every
    ``file_name`` must exist; the first missing one is named in a one-line ``ValueError``.
    """
    import random

    out = Path(out_root)

    def load(path):
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read COCO JSON ({type(e).__name__}: {e})") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(d, dict) or not isinstance(d.get(key), list):
                raise ValueError(f"{path}: expected a COCO JSON with a '{key}' list")
        return d

    train = load(annotation_json)
    if val_json is not None:
        val = load(val_json)
        splits = {
            "train2017": (train, Path(images_dir)),
            "val2017": (val, Path(val_images_dir or images_dir)),
        }
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction: expected a number in (0, 1), received {val_fraction}")
        ids = sorted(im["id"] for im in train["images"])
        random.Random(seed).shuffle(ids)
        n_val = max(1, round(len(ids) * val_fraction))
        val_ids = set(ids[:n_val])

        def subset(keep):
            return {
                **train,
                "images": [im for im in train["images"] if keep(im["id"])],
                "annotations": [a for a in train["annotations"] if keep(a["image_id"])],
            }

        splits = {
            "train2017": (subset(lambda i: i not in val_ids), Path(images_dir)),
            "val2017": (subset(lambda i: i in val_ids), Path(images_dir)),
        }
    counts = {}
    for split, (data, src_dir) in splits.items():
        for im in data["images"]:
            src = src_dir / im["file_name"]
            if not src.is_file():
                raise ValueError(f"{src}: image listed in the annotations ('file_name') not found")
        for im in data["images"]:
            src, dst = (src_dir / im["file_name"]).resolve(), out / split / im["file_name"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                dst.unlink()
            try:
                dst.symlink_to(src)
            except OSError:
                shutil.copy2(src, dst)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        counts[split] = len(data["images"])
    return counts


# ----------------------------------------------------------------------------------------------
# 2. The command line
# ----------------------------------------------------------------------------------------------


def train_args(
    config: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    num_workers: int | None = None,
    pretrained_backbone: bool | None = None,
    finetune: str | os.PathLike | None = None,
    max_iters_per_epoch: int | None = None,
    device: str | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """Arguments for ``python -m detr_lite.train`` (everything after the module name)."""
    args = ["--config", str(config), "--data", str(data), "--output", str(output)]
    if epochs is not None:
        args += ["--epochs", str(epochs)]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    if amp:
        args.append("--amp")
    if channels_last:
        args.append("--channels-last")
    if compile:
        args.append("--compile")
    if num_workers is not None:
        args += ["--num-workers", str(num_workers)]
    if pretrained_backbone is not None:
        args.append("--pretrained-backbone" if pretrained_backbone else "--no-pretrained-backbone")
    if finetune is not None:
        args += ["--finetune", str(finetune)]
    if max_iters_per_epoch is not None:
        args += ["--max-iters-per-epoch", str(max_iters_per_epoch)]
    if device is not None:
        args += ["--device", device]
    return args + list(extra or [])


def with_resume(args: list[str], output: str | os.PathLike) -> list[str]:
    """``args`` plus ``--resume`` when ``output/checkpoint.pt`` exists (re-running continues a run)."""
    if (Path(output) / "checkpoint.pt").is_file() and "--resume" not in args:
        return [*args, "--resume"]
    return list(args)


def torchrun_command(
    module_args: list[str],
    nproc_per_node: int = 1,
    *,
    module: str = "detr_lite.train",
    nnodes: int = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int = 29500,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "detr_lite",
    python: str | None = None,
) -> list[str]:
    """The argv that runs ``python -m <module> <module_args>`` under torchrun.

    * one node (``nnodes=1``): ``--standalone`` picks a free port on localhost by itself;
    * several nodes, static: give ``node_rank`` and ``master_addr`` (run once per node, node 0
      hosts the rendezvous on ``master_port``);
    * several nodes, elastic: give ``rdzv_endpoint="host:port"`` (c10d rendezvous, node ranks
      are assigned on arrival; same command on every node).

    ``python -m torch.distributed.run`` *is* ``torchrun``; calling it through ``python`` makes sure
    the workers use the same interpreter (venv) as the caller.
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"torchrun_command: nproc_per_node={nproc_per_node}, nnodes={nnodes}; expected >= 1")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    elif rdzv_endpoint is not None:
        cmd += [
            "--nnodes",
            str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
    elif master_addr is not None and node_rank is not None:
        if not 0 <= node_rank < nnodes:
            raise ValueError(f"torchrun_command: node_rank={node_rank}, expected 0..{nnodes - 1}")
        cmd += [
            "--nnodes",
            str(nnodes),
            "--node-rank",
            str(node_rank),
            "--master-addr",
            master_addr,
            "--master-port",
            str(master_port),
        ]
    else:
        raise ValueError(
            f"torchrun_command: nnodes={nnodes} needs rdzv_endpoint='host:port' or master_addr + node_rank"
        )
    cmd += ["--nproc-per-node", str(nproc_per_node), "-m", module, *module_args]
    return cmd


def shell_line(cmd: list[str]) -> str:
    """``cmd`` as one shell line, spelling ``python -m torch.distributed.run`` as ``torchrun``."""
    if len(cmd) >= 3 and cmd[1:3] == ["-m", "torch.distributed.run"]:
        cmd = ["torchrun", *cmd[3:]]
    return shlex.join(cmd)


# ----------------------------------------------------------------------------------------------
# 3. Detached launch with a pid file
# ----------------------------------------------------------------------------------------------

PID_FILE = "train.pid"
STDOUT_FILE = "train.out"


def _proc_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (Linux ``/proc``), which tells a reused pid from ours."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19]  # field 22 of proc(5): starttime, counted after "pid (comm)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a finished child that nobody has waited for yet is a zombie: treat it as gone
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return True


def read_pid_file(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(output_dir) / PID_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def running_pid(output_dir: str | os.PathLike) -> int | None:
    """The pid of the training job recorded in ``output_dir`` if it is still running, else None."""
    info = read_pid_file(output_dir)
    if not info or not isinstance(info.get("pid"), int):
        return None
    pid = info["pid"]
    if not _pid_alive(pid):
        return None
    started = info.get("start_time")
    if started is not None and _proc_start_time(pid) not in (None, started):
        return None  # the pid now belongs to another process
    return pid


def launch_detached(
    cmd: list[str],
    output_dir: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> int:
    """Start ``cmd`` in its own session (survives the notebook kernel), unless one is running.

    stdout and stderr go to ``output_dir/train.out`` (appended); ``output_dir/train.pid`` records
    the pid, the command and the process start time. Returns the pid of the (new or running) job.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pid = running_pid(out)
    if pid is not None:
        print(f"already running (pid {pid}); not starting a second copy")
        return pid
    full_env = {**os.environ, **(env or {})}
    with open(out / STDOUT_FILE, "ab") as log:
        log.write(f"\n$ {shell_line(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=full_env,
            cwd=cwd,
        )
    info = {"pid": proc.pid, "start_time": _proc_start_time(proc.pid), "cmd": cmd, "started": time.time()}
    tmp = out / (PID_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(out / PID_FILE)
    _CHILDREN[proc.pid] = proc
    return proc.pid


_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs started by this interpreter (reaped on wait)


def wait(output_dir: str | os.PathLike, timeout: float | None = None, poll: float = 0.5) -> int | None:
    """Block until the job in ``output_dir`` ends; its exit code if this process started it."""
    info = read_pid_file(output_dir) or {}
    pid = info.get("pid")
    if pid in _CHILDREN:
        try:
            return _CHILDREN.pop(pid).wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"training job {pid} still running after {timeout} s") from None
    t0 = time.monotonic()
    while running_pid(output_dir) is not None:
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"training job {pid} still running after {timeout} s")
        time.sleep(poll)
    return None


def stop(output_dir: str | os.PathLike, sig: int = signal.SIGTERM) -> bool:
    """Signal the job's whole process group (torchrun and its workers). True if one was running."""
    pid = running_pid(output_dir)
    if pid is None:
        return False
    os.killpg(pid, sig)  # start_new_session made the job the leader of its own group
    return True


def tail(path: str | os.PathLike, n: int = 20) -> str:
    """The last ``n`` lines of a text file ('' if it does not exist yet)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ----------------------------------------------------------------------------------------------
# 4. Following progress
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete JSON object in a JSON-lines file that another process may still be writing.

    A half-written last line (the writer is mid-``write``) is skipped, not an error.
    """
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    records = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break  # incomplete trailing line
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:60]!r}") from None
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_log(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the trainer's ``log.jsonl`` into (per-iteration records, per-epoch records)."""
    its, eps = [], []
    for rec in read_jsonl(path):
        kind = rec.get("type", rec.get("kind"))
        if kind in ("iter", "iteration", "train_iter") or (kind is None and "iter" in rec):
            its.append(rec)
        elif kind in ("epoch", "train_epoch") or (kind is None and "epoch" in rec):
            eps.append(rec)
    return its, eps


def _series(records: list[dict[str, Any]], *keys: str) -> tuple[list[float], list[float], str | None]:
    """(x, y, key) for the first of ``keys`` present in the records."""
    for key in keys:
        pts = [(i, r[key]) for i, r in enumerate(records) if isinstance(r.get(key), (int, float))]
        if pts:
            return [p[0] for p in pts], [float(p[1]) for p in pts], key
    return [], [], None


def plot_progress(log_path: str | os.PathLike, fig=None):
    """Loss per iteration, AP per epoch, images/s and peak GPU memory per epoch, from ``log.jsonl``."""
    import matplotlib.pyplot as plt

    its, eps = read_log(log_path)
    if fig is None:
        fig = plt.figure(figsize=(10, 2.6), dpi=80)
    fig.clf()
    axes = fig.subplots(1, 4)
    x, y, k = _series(its, "loss")
    axes[0].plot(x, y, lw=0.8)
    axes[0].set_title(f"train {k or 'loss'} / iter", fontsize=9)
    x, y, k = _series(eps, "AP")
    axes[1].plot([eps[i].get("epoch", i) + 1 for i in x], y, "o-")
    axes[1].set_title("val AP (0-1) / epoch", fontsize=9)
    x, y, k = _series(eps, "images_per_s")
    axes[2].plot([eps[i].get("epoch", i) + 1 for i in x], y, "o-")
    axes[2].set_title("images/s / epoch", fontsize=9)
    x, y, k = _series(eps, "max_memory_mb", "max_mem_mb")
    axes[3].plot([eps[i].get("epoch", i) + 1 for i in x], y, "o-")
    axes[3].set_title("peak memory MB / epoch", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# 5. Architectures, recipes and the published numbers to compare against
# ----------------------------------------------------------------------------------------------

# ARCH -> (COCO preset, small CPU preset for smoke runs, ModelConfig flags of the variant)
RUN_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "detr_r50": ("detr-r50-coco", "detr-shapes", {}),
    "deformable_detr_r50": ("deformable-detr-r50-coco", "deformable-shapes", {}),
    "deformable_detr_r50_refine": (
        "deformable-detr-r50-refine-coco",
        "deformable-shapes",
        {"with_box_refine": True},
    ),
    "deformable_detr_r50_two_stage": (
        "deformable-detr-r50-two-stage-coco",
        "deformable-shapes",
        {"with_box_refine": True, "two_stage": True},
    ),
}


@dataclass(frozen=True)
class Recipe:
    """The official optimisation recipe of one model family (COCO 2017, from the papers/code)."""

    lr: float
    lr_backbone: float
    weight_decay: float
    epochs: int
    lr_drop: int
    total_batch: int
    clip_max_norm: float
    v100_hours: int  # total training time reported by the Deformable DETR paper (Table 1)
    notes: str


RECIPES: dict[str, Recipe] = {
    "detr": Recipe(1e-4, 1e-5, 1e-4, 500, 400, 64, 0.1, 2000, "16 V100 x 4 images; dropout 0.1"),
    "deformable_detr": Recipe(
        2e-4,
        2e-5,
        1e-4,
        50,
        40,
        32,
        0.1,
        325,
        "sampling_offsets + reference_points at 0.1 x lr; focal loss; 300 queries",
    ),  # fmt: skip
}

# COCO val2017 box AP (%) published for the official models.
PAPER_AP: dict[str, float] = {
    "detr_r50": 42.0,
    "detr_r50_dc5": 43.3,
    "detr_r101": 43.5,
    "detr_r101_dc5": 44.9,
    "deformable_detr_r50_single_scale": 39.4,
    "deformable_detr_r50": 44.5,
    "deformable_detr_r50_refine": 46.2,
    "deformable_detr_r50_two_stage": 46.9,
}

# Where the official weights are published (model columns of the official READMEs).
OFFICIAL_CHECKPOINTS: dict[str, str] = {
    "detr_r50": "https://dl.fbaipublicfiles.com/detr/detr-r50-e632da11.pth",
    "detr_r50_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r50-dc5-f0fb7ef5.pth",
    "detr_r101": "https://dl.fbaipublicfiles.com/detr/detr-r101-2c7b67e5.pth",
    "detr_r101_dc5": "https://dl.fbaipublicfiles.com/detr/detr-r101-dc5-a2e86def.pth",
    "deformable_detr_r50_single_scale": "https://drive.google.com/file/d/1WEjQ9_FgfI5sw5OZZ4ix-OKk-IJ_-SDU/view",
    "deformable_detr_r50": "https://drive.google.com/file/d/1nDWZWHuRwtwGden77NLM9JoWe-YisJnA/view",
    "deformable_detr_r50_refine": "https://drive.google.com/file/d/1JYKyRYzUH7uo9eVfDaVCiaIGZb5YTCuI/view",
    "deformable_detr_r50_two_stage": "https://drive.google.com/file/d/15I03A7hNTpwuLNdfuEmW9_taZMNVssEp/view",
}


def family(arch: str) -> str:
    """``'detr'`` or ``'deformable_detr'`` for an ARCH name such as ``deformable_detr_r50_refine``."""
    return "deformable_detr" if arch.startswith("deformable") else "detr"


def scaled_lrs(arch: str, total_batch: int) -> tuple[float, float]:
    """(lr, lr_backbone) scaled linearly from the recipe's total batch to ``total_batch``.

    The linear scaling rule (Goyal et al., 2017): the gradient of a k-times larger batch is an
    average over k times more images, so k-times larger steps keep the per-epoch progress about
    the same. It is a starting point, not a law: the recipes were tuned at their own batch
    size, and at very different batches a short warm-up or the gentler square-root rule can be
    more stable for AdamW.
    """
    if total_batch < 1:
        raise ValueError(f"total_batch: expected >= 1, received {total_batch}")
    r = RECIPES[family(arch)]
    k = total_batch / r.total_batch
    return r.lr * k, r.lr_backbone * k


def run_config(arch: str, smoke: bool = False):
    """The :class:`~detr_lite.config.Config` to train ``arch`` with (the small CPU preset if ``smoke``).

    Returned as a config object so the notebook can show it and write it to a ``.json`` that
    ``python -m detr_lite.train --config FILE.json`` reads back.
    """
    from detr_lite.config import get_config

    if arch not in RUN_ARCHS:
        raise ValueError(f"ARCH: expected one of {sorted(RUN_ARCHS)}, received {arch!r}")
    coco_preset, smoke_preset, flags = RUN_ARCHS[arch]
    cfg = get_config(smoke_preset if smoke else coco_preset)
    for k, v in flags.items():  # the COCO presets already carry them; the small CPU one does not
        setattr(cfg.model, k, v)
    if smoke and (not cfg.model.train_backbone or cfg.model.frozen_bn):
        # the toy DETR preset starts from a backbone pretrained by python -m detr_lite.pretrain and keeps
        # parts of it frozen (FrozenBatchNorm2d, conv1, layer1); a smoke run of the COCO workflow has no
        # pretraining step, so its random backbone trains whole (trainable BatchNorm)
        cfg.model.train_backbone, cfg.model.frozen_bn = True, False
        cfg.train.lr_backbone = cfg.train.lr
    if smoke:
        # the COCO recipes keep no moving average of the weights (official DETR / Deformable DETR), and
        # a 2-iteration smoke run could not fill the toy preset's ~500-step window anyway
        cfg.train.ema_decay = 0.0
    cfg.name = arch + ("-smoke" if smoke else "")
    return cfg


def write_run_config(arch: str, path: str | os.PathLike, smoke: bool = False, **train_overrides: Any) -> Path:
    """Write :func:`run_config` (plus ``TrainConfig`` overrides such as ``lr=...``) as JSON."""
    cfg = run_config(arch, smoke=smoke)
    for k, v in train_overrides.items():
        if not hasattr(cfg.train, k):
            raise ValueError(f"write_run_config: TrainConfig has no field {k!r}")
        setattr(cfg.train, k, v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return path


def status_line(
    output_dir: str | os.PathLike, epochs: int | None = None, train_images: int | None = None
) -> str:
    """One line: running or not, where the run is, its last loss/AP, throughput, memory and an ETA."""
    out = Path(output_dir)
    its, eps = read_log(out / "log.jsonl")
    pid = running_pid(out)
    parts = [f"running (pid {pid})" if pid is not None else "not running"]
    if its:
        last = its[-1]
        parts.append(
            f"epoch {last.get('epoch', '?')} iter {last.get('iter', '?')} loss {last.get('loss', float('nan')):.3f}"
        )
    if eps:
        e = eps[-1]
        if "AP" in e:
            parts.append(f"AP {100 * e['AP']:.1f} after epoch {e['epoch'] + 1}")
        if "images_per_s" in e:
            parts.append(f"{e['images_per_s']:.1f} img/s")
        if "max_memory_mb" in e:
            parts.append(f"peak {e['max_memory_mb']:.0f} MB")
        if pid is not None and epochs and train_images and e.get("images_per_s"):
            left = (epochs - e["epoch"] - 1) * train_images / e["images_per_s"] / 3600
            parts.append(f"about {left:.1f} h to go")
    return " | ".join(parts)


def follow(
    output_dir: str | os.PathLike,
    every_s: float = 60.0,
    epochs: int | None = None,
    train_images: int | None = None,
) -> None:
    """Notebook polling loop: redraw :func:`status_line` and :func:`plot_progress` every ``every_s``
    seconds until the job ends. Interrupting the kernel stops the *following*, not the training."""
    import matplotlib.pyplot as plt
    from IPython.display import clear_output, display

    out = Path(output_dir)
    try:
        while True:
            running = running_pid(out) is not None
            clear_output(wait=True)
            print(status_line(out, epochs, train_images))
            fig = plot_progress(out / "log.jsonl")
            display(fig)
            plt.close(fig)
            if not running:
                print(f"last lines of {out / STDOUT_FILE}:\n{tail(out / STDOUT_FILE, 8)}")
                return
            time.sleep(every_s)
    except KeyboardInterrupt:
        print(f"stopped following; the job keeps running (stop it with detr_lite.launch.stop({str(out)!r}))")
