"""COCO 2017 on disk: the layout the trainer reads, and how to get there.

* :func:`check_coco_layout` lists what is missing, :func:`download_instructions` says where to get
  it, and the opt-in :func:`download_coco` fetches the official archives (resumable), checks their
  size and MD5 and unzips them;
* :func:`arrange_coco_layout` turns "a folder of images + one COCO JSON" (your own data) into the
  same layout.

Nothing here imports torch at module level, so it is cheap to import.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


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
        "annotations_trainval2017.zip", "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        252_907_541, "f4bbac642086de4f52a3fdda2de5fa2c",
        ("annotations/instances_train2017.json", "annotations/instances_val2017.json"),
    ),  # fmt: skip
    "val": CocoArchive(
        "val2017.zip", "http://images.cocodataset.org/zips/val2017.zip", 815_585_330,
        "442b8da7639aecaf257c1dceb8ba8c80", ("val2017",),
    ),  # fmt: skip
    "train": CocoArchive(
        "train2017.zip", "http://images.cocodataset.org/zips/train2017.zip", 19_336_861_798,
        "cced6f7f71b7629ddf16f17bbcfab6b2", ("train2017",),
    ),  # fmt: skip
}

# What training + evaluation read, and which archive provides each path.
REQUIRED_PATHS: dict[str, str] = {
    "train2017": "train",
    "val2017": "val",
    "annotations/instances_train2017.json": "annotations",
    "annotations/instances_val2017.json": "annotations",
}


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit != "GB" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _present(p: Path) -> bool:
    """A non-empty file, or a folder with something in it."""
    return (p.is_file() and p.stat().st_size > 0) or (p.is_dir() and any(p.iterdir()))


def check_coco_layout(root: str | os.PathLike, need_train: bool = True) -> list[str]:
    """Paths (relative to ``root``) that training/evaluation need but that are missing or empty.

    An empty list means the layout is complete::

        root/train2017/*.jpg   root/val2017/*.jpg
        root/annotations/instances_train2017.json   root/annotations/instances_val2017.json

    ``need_train=False`` checks only what evaluation reads (val images + val annotations).
    """
    return [rel for rel in REQUIRED_PATHS if (need_train or "train" not in rel) and not _present(Path(root) / rel)]


def download_instructions(root: str | os.PathLike, missing: list[str] | None = None) -> str:
    """A copy-pasteable recipe for getting the missing parts of COCO 2017 into ``root``."""
    root = Path(root)
    missing = check_coco_layout(root) if missing is None else missing
    if not missing:
        return f"COCO 2017 layout under {root} is complete."
    archives = [COCO_ARCHIVES[k] for k in COCO_ARCHIVES if k in {REQUIRED_PATHS[m] for m in missing}]
    total = sum(a.num_bytes for a in archives)
    lines = [f"COCO 2017 is incomplete under {root}; missing: {', '.join(missing)}", ""]
    lines.append(f"Download {_human_bytes(total)} (and as much again to unzip), then unzip into {root}:")
    lines.append(f"  mkdir -p {shlex.quote(str(root))} && cd {shlex.quote(str(root))}")
    lines += [f"  wget -c {a.url}   # {a.human_size}, md5 {a.md5}" for a in archives]
    for a in archives:
        lines += [f"  md5sum {a.name}   # expect {a.md5}", f"  unzip -q {a.name} && rm {a.name}"]
    lines += ["", "or, from Python: detr_lite.coco_download.download_coco(root)  (same checks, resumable)."]
    return "\n".join(lines)


def require_coco_layout(root: str | os.PathLike, need_train: bool = True) -> None:
    """Raise a one-line ``ValueError`` naming the first missing path (before any long work)."""
    missing = check_coco_layout(root, need_train=need_train)
    if missing:
        archive = COCO_ARCHIVES[REQUIRED_PATHS[missing[0]]]
        raise ValueError(
            f"COCO layout: missing {Path(root) / missing[0]} (expected from {archive.name}, {archive.url}); "
            f"{len(missing)} path(s) missing in total, see detr_lite.coco_download.download_instructions()"
        )


def verify_file(path: str | os.PathLike, num_bytes: int | None = None, md5: str | None = None) -> None:
    """Raise ``ValueError`` (one line) if ``path`` has the wrong size or MD5 sum."""
    from torchvision.datasets.utils import calculate_md5

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    size = path.stat().st_size
    if num_bytes is not None and size != num_bytes:
        raise ValueError(f"{path}: size {size} bytes, expected {num_bytes}")
    if md5 is not None and (got := calculate_md5(str(path))) != md5:
        raise ValueError(f"{path}: md5 {got}, expected {md5}")


def download_file(url: str, dest: str | os.PathLike, num_bytes: int | None = None, md5: str | None = None,
                  progress: bool = True) -> Path:  # fmt: skip
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` (HTTP range request), then
    verify size and MD5. A file already at ``dest`` with the right size and sum is kept as is.
    (torchvision's ``download_url`` starts a broken 19 GB download from zero again.)"""
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
        done, last = (have if resumed else 0), time.monotonic()
        with open(part, "ab" if resumed else "wb") as f:
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


def download_coco(root: str | os.PathLike, parts: tuple[str, ...] = ("annotations", "val", "train"),
                  keep_zips: bool = False, archives: dict[str, CocoArchive] | None = None) -> list[str]:  # fmt: skip
    """Opt-in: fetch, verify (size + MD5) and unzip the official COCO 2017 archives into ``root``.

    Parts whose files are already in place are skipped. Before downloading anything, checks that
    the disk has room for the zip plus its contents (about twice the archive size). Returns what
    :func:`check_coco_layout` still reports missing afterwards (an empty list on success).
    ``archives`` lets a test substitute small local archives (``file://`` URLs).
    """
    from torchvision.datasets.utils import extract_archive

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
        raise ValueError(f"{root}: {_human_bytes(free)} free, the download + unzip needs about {_human_bytes(need)}")
    for a in todo:
        print(f"downloading {a.url} ({a.human_size}) ...", flush=True)
        zpath = download_file(a.url, root / a.name, a.num_bytes, a.md5)
        print(f"verified {a.name} (md5 {a.md5}); unzipping ...", flush=True)
        extract_archive(str(zpath), str(root), remove_finished=not keep_zips)
    return check_coco_layout(root) if archives is COCO_ARCHIVES else []


def arrange_coco_layout(
    images_dir: str | os.PathLike, annotation_json: str | os.PathLike, out_root: str | os.PathLike,
    val_json: str | os.PathLike | None = None, val_images_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.2, seed: int = 0,
) -> dict[str, int]:  # fmt: skip
    """Turn "a folder of images + one COCO JSON" into the COCO 2017 layout the trainer reads.

    ``out_root/{train2017,val2017}/`` get symbolic links to the images (copies where links are not
    supported) and ``out_root/annotations/instances_{train,val}2017.json`` the matching halves of
    the annotations. Without ``val_json`` a random ``val_fraction`` of the images (fixed by
    ``seed``) becomes the validation split. Returns the number of images per split. Every
    ``file_name`` must exist; the first missing one is named in a one-line ``ValueError``.
    """
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
        splits = {"train2017": (train, Path(images_dir)), "val2017": (load(val_json), Path(val_images_dir or images_dir))}
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction: expected a number in (0, 1), received {val_fraction}")
        ids = sorted(im["id"] for im in train["images"])
        random.Random(seed).shuffle(ids)
        val_ids = set(ids[: max(1, round(len(ids) * val_fraction))])

        def subset(in_val: bool) -> dict:
            return {
                **train,
                "images": [im for im in train["images"] if (im["id"] in val_ids) == in_val],
                "annotations": [a for a in train["annotations"] if (a["image_id"] in val_ids) == in_val],
            }

        splits = {"train2017": (subset(False), Path(images_dir)), "val2017": (subset(True), Path(images_dir))}
    for data, src_dir in splits.values():  # every image is there before anything is written
        for im in data["images"]:
            if not (src_dir / im["file_name"]).is_file():
                raise ValueError(f"{src_dir / im['file_name']}: image listed in the annotations ('file_name') not found")
    counts = {}
    for split, (data, src_dir) in splits.items():
        for im in data["images"]:
            src, dst = (src_dir / im["file_name"]).resolve(), out / split / im["file_name"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.unlink(missing_ok=True)
            try:
                dst.symlink_to(src)
            except OSError:
                shutil.copy2(src, dst)
        (out / "annotations").mkdir(parents=True, exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        counts[split] = len(data["images"])
    return counts
