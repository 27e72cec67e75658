"""detr_lite.coco_download and detr_lite.imagenet: layout check, download verification, your own
data in COCO layout, the ImageNet weights cache."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from detr_lite import coco_download as cd
from detr_lite import imagenet

# ---------------------------------------------------------------------------------------------
# layout check + instructions
# ---------------------------------------------------------------------------------------------


def _make_layout(root: Path, skip: tuple[str, ...] = ()) -> None:
    for rel in cd.REQUIRED_PATHS:
        if rel in skip:
            continue
        p = root / rel
        if rel.endswith(".json"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("{}")
        else:
            p.mkdir(parents=True, exist_ok=True)
            (p / "000000000139.jpg").write_bytes(b"x")


def test_complete_layout_reports_nothing_missing(tmp_path):
    _make_layout(tmp_path)
    assert cd.check_coco_layout(tmp_path) == []
    cd.require_coco_layout(tmp_path)  # no error
    assert "complete" in cd.download_instructions(tmp_path)


@pytest.mark.parametrize("gone", list(cd.REQUIRED_PATHS))
def test_missing_path_is_named(tmp_path, gone):
    _make_layout(tmp_path, skip=(gone,))
    assert cd.check_coco_layout(tmp_path) == [gone]
    with pytest.raises(ValueError) as e:
        cd.require_coco_layout(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / gone) in msg
    archive = cd.COCO_ARCHIVES[cd.REQUIRED_PATHS[gone]]
    assert archive.url in msg
    text = cd.download_instructions(tmp_path)
    assert gone in text and archive.url in text and archive.md5 in text
    # only the archive that provides the missing path is suggested
    others = [a for a in cd.COCO_ARCHIVES.values() if a is not archive]
    assert all(a.url not in text for a in others)


def test_empty_image_folder_counts_as_missing(tmp_path):
    _make_layout(tmp_path)
    for f in (tmp_path / "val2017").iterdir():
        f.unlink()
    assert cd.check_coco_layout(tmp_path) == ["val2017"]
    assert cd.check_coco_layout(tmp_path / "nowhere") == list(cd.REQUIRED_PATHS)


def test_eval_only_check_ignores_train(tmp_path):
    _make_layout(tmp_path, skip=("train2017", "annotations/instances_train2017.json"))
    assert cd.check_coco_layout(tmp_path, need_train=False) == []
    assert len(cd.check_coco_layout(tmp_path)) == 2


def test_instructions_use_the_official_archives():
    text = cd.download_instructions("/data/coco", missing=list(cd.REQUIRED_PATHS))
    for url in (
        "http://images.cocodataset.org/zips/train2017.zip",
        "http://images.cocodataset.org/zips/val2017.zip",
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    ):
        assert url in text
    assert "18.0 GB" in text and "778 MB" in text and "241 MB" in text


# ---------------------------------------------------------------------------------------------
# verification + (local, file://) download
# ---------------------------------------------------------------------------------------------


def test_verify_file_checks_size_and_md5(tmp_path):
    f = tmp_path / "a.zip"
    f.write_bytes(b"hello coco")
    md5 = hashlib.md5(b"hello coco").hexdigest()
    cd.verify_file(f, 10, md5)
    with pytest.raises(ValueError, match="size 10 bytes, expected 11"):
        cd.verify_file(f, 11, md5)
    with pytest.raises(ValueError, match=f"expected {'0' * 32}"):
        cd.verify_file(f, 10, "0" * 32)
    with pytest.raises(ValueError, match="file not found"):
        cd.verify_file(tmp_path / "nope.zip", 10)


def _local_archive(tmp_path: Path) -> cd.CocoArchive:
    src = tmp_path / "src" / "val2017.zip"
    src.parent.mkdir()
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("val2017/000000000139.jpg", b"jpeg bytes")
    data = src.read_bytes()
    return cd.CocoArchive(
        "val2017.zip", src.as_uri(), len(data), hashlib.md5(data).hexdigest(), ("val2017",)
    )


def test_download_verifies_and_unzips(tmp_path):
    archive = _local_archive(tmp_path)
    root = tmp_path / "coco"
    cd.download_coco(root, parts=("val",), archives={"val": archive})
    assert (root / "val2017" / "000000000139.jpg").read_bytes() == b"jpeg bytes"
    assert not (root / "val2017.zip").exists()  # zip removed after unzipping
    # a second call finds the part in place and downloads nothing
    cd.download_coco(root, parts=("val",), archives={"val": archive})


def test_download_rejects_a_corrupt_archive(tmp_path):
    good = _local_archive(tmp_path)
    bad = cd.CocoArchive(good.name, good.url, good.num_bytes, "f" * 32, good.provides)
    root = tmp_path / "coco"
    with pytest.raises(ValueError, match="md5"):
        cd.download_coco(root, parts=("val",), archives={"val": bad})
    assert not (root / "val2017").exists()  # nothing unzipped from an unverified file
    with pytest.raises(ValueError, match="unknown part 'test'"):
        cd.download_coco(root, parts=("test",))


def test_download_refuses_without_disk_space(tmp_path):
    good = _local_archive(tmp_path)
    huge = cd.CocoArchive(good.name, good.url, 1 << 60, good.md5, good.provides)
    with pytest.raises(ValueError, match="free"):
        cd.download_coco(tmp_path / "coco", parts=("val",), archives={"val": huge})


# ---------------------------------------------------------------------------------------------
# "a folder + a JSON" -> COCO layout
# ---------------------------------------------------------------------------------------------


def _flat_dataset(tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    images = tmp_path / "my_images"
    (images / "sub").mkdir(parents=True)
    ims, anns = [], []
    for i in range(n):
        name = f"sub/img_{i}.png" if i % 3 == 0 else f"img_{i}.png"
        (images / name).write_bytes(b"png")
        ims.append({"id": 100 + i, "file_name": name, "height": 8, "width": 8})
        anns.append({"id": i, "image_id": 100 + i, "category_id": 7, "bbox": [0, 0, 2, 2], "iscrowd": 0})
    ann = tmp_path / "labels.json"
    ann.write_text(json.dumps({"images": ims, "annotations": anns, "categories": [{"id": 7, "name": "cat"}]}))
    return images, ann


def test_arrange_coco_layout_splits_and_links(tmp_path):
    images, ann = _flat_dataset(tmp_path)
    out = tmp_path / "coco"
    counts = cd.arrange_coco_layout(images, ann, out, val_fraction=0.3, seed=1)
    assert counts == {"train2017": 7, "val2017": 3}
    assert cd.check_coco_layout(out) == []
    tr = json.loads((out / "annotations/instances_train2017.json").read_text())
    va = json.loads((out / "annotations/instances_val2017.json").read_text())
    tr_ids, va_ids = {im["id"] for im in tr["images"]}, {im["id"] for im in va["images"]}
    assert not tr_ids & va_ids and len(tr_ids | va_ids) == 10
    assert {a["image_id"] for a in va["annotations"]} == va_ids  # annotations follow their images
    assert tr["categories"] == va["categories"] == [{"id": 7, "name": "cat"}]
    for split, d in (("train2017", tr), ("val2017", va)):
        for im in d["images"]:
            assert (out / split / im["file_name"]).read_bytes() == b"png"
    # deterministic for a seed, and a second call over the same folder works
    assert cd.arrange_coco_layout(images, ann, out, val_fraction=0.3, seed=1) == counts
    assert json.loads((out / "annotations/instances_val2017.json").read_text()) == va


def test_arrange_coco_layout_names_a_missing_image(tmp_path):
    images, ann = _flat_dataset(tmp_path)
    (images / "img_4.png").unlink()
    with pytest.raises(ValueError, match="img_4.png"):
        cd.arrange_coco_layout(images, ann, tmp_path / "coco")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="'annotations' list"):
        cd.arrange_coco_layout(images, tmp_path / "bad.json", tmp_path / "coco")


# ---------------------------------------------------------------------------------------------
# pretrained backbone cache
# ---------------------------------------------------------------------------------------------


def test_pretrained_backbone_cache_path_and_offline_error(tmp_path, monkeypatch):
    import torch.hub

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path, url = imagenet.pretrained_backbone_cache("resnet50")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    assert url.endswith("/resnet50-0676ba61.pth")
    with pytest.raises(ValueError) as e:
        imagenet.ensure_pretrained_backbone("resnet50", download=False)
    assert str(path) in str(e.value) and "--no-pretrained-backbone" in str(e.value)

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError, match="could not be downloaded"):
        imagenet.ensure_pretrained_backbone("resnet50")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"cached")
    assert imagenet.ensure_pretrained_backbone("resnet50", download=False) == path
    with pytest.raises(ValueError, match="resnet152"):
        imagenet.pretrained_backbone_cache("resnet152")
