"""``train.cached_views``: a fixed pool of augmented views whose frozen-backbone features are cached."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from detr_lite.config import get_config
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.feature_cache import CachedViews, check_cacheable
from detr_lite.models import build_model
from detr_lite.utils import read_jsonl
from tests.test_train_cli import _iter_losses, make_tiny_coco, one_thread, tiny_cfg, train_main  # noqa: F401


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco_cache"))


def frozen_cfg(root, **train):
    cfg = tiny_cfg(root, lr_backbone=0.0, **train)
    cfg.model.frozen_bn = True
    cfg.model.train_backbone = False
    cfg.model.dropout = 0.0
    return cfg


@pytest.fixture(scope="module")
def setup(tiny_data):
    torch.manual_seed(0)
    cfg = frozen_cfg(tiny_data, cached_views=3)
    model = build_model(cfg.model).eval()
    ds = build_dataset(cfg.data.root, cfg.data.train_split, cfg.data, train=True)
    return cfg, model, ds


def test_cached_feature_is_the_backbone_output_of_that_view(setup):
    cfg, model, ds = setup
    cache = CachedViews(ds, model.backbone, views=3, seed=5)
    feat, target = cache.features(2, 1)
    image, target2 = cache.view(2, 1)
    with torch.no_grad():
        ref, ref_mask = model.backbone(image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool))[-1]
    assert feat.shape == ref.shape[1:] and feat.dtype == torch.float32
    assert torch.equal(feat, ref[0]) and not ref_mask.any()
    assert torch.equal(target["boxes"], target2["boxes"]) and torch.equal(target["labels"], target2["labels"])
    # cached once: the second call returns the stored tensor, no new backbone forward
    assert cache.features(2, 1)[0] is feat and cache.computed == 1


def test_views_are_deterministic_distinct_and_leave_global_rngs_alone(setup):
    cfg, model, ds = setup
    a, b = CachedViews(ds, model.backbone, 3, seed=5), CachedViews(ds, model.backbone, 3, seed=5)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    va = [a.view(0, v) for v in range(3)]
    assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
    assert np.array_equal(states[2], np.random.get_state()[1])
    for v in range(3):
        assert torch.equal(va[v][0], b.view(0, v)[0])
    # the views of one image are different augmentations (size or flip or crop), not copies
    distinct = {(tuple(x[0].shape), float(x[0].sum())) for x in va}
    assert len(distinct) == 3
    other_seed = CachedViews(ds, model.backbone, 3, seed=6).view(0, 0)[0]
    assert other_seed.shape != va[0][0].shape or not torch.equal(other_seed, va[0][0])


def test_epoch_choice_of_views(setup):
    cfg, model, ds = setup
    cache = CachedViews(ds, model.backbone, 3, seed=5)
    cache.set_epoch(4)
    first = cache._epoch_views.clone()
    assert first.shape == (len(ds),) and int(first.min()) >= 0 and int(first.max()) < 3
    cache.set_epoch(5)
    cache.set_epoch(4)
    assert torch.equal(first, cache._epoch_views)  # a function of (seed, epoch) only


def test_model_from_cached_features_equals_model_from_images(setup):
    cfg, model, ds = setup
    cache = CachedViews(ds, model.backbone, 3, seed=5)
    cache.set_epoch(0)
    items = [cache[i] for i in range(2)]
    feats, fmask, _ = collate_fn(items)  # padded exactly as images are
    with torch.no_grad():
        out_f = model(None, features=(feats, fmask))
        assert out_f["pred_boxes"].shape == (2, cfg.model.num_queries, 4)
        for i in range(2):  # one image: the cached-feature path = the full model on that view
            image, _ = cache.view(i, int(cache._epoch_views[i]))
            out_i = model(image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool))
            f1, m1, _ = collate_fn([items[i]])
            out_1 = model(None, features=(f1, m1))
            torch.testing.assert_close(out_1["pred_boxes"], out_i["pred_boxes"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out_1["pred_logits"], out_i["pred_logits"], rtol=1e-5, atol=1e-5)
            assert len(out_1["aux_outputs"]) == cfg.model.dec_layers - 1
    with pytest.raises(ValueError, match="features must be"):
        model(None, features=(feats[:, :5], fmask))
    with pytest.raises(ValueError, match="not both"):
        model(feats, features=(feats, fmask))


def test_check_cacheable_errors(tiny_data):
    cfg = frozen_cfg(tiny_data, cached_views=2)
    check_cacheable(cfg)  # frozen backbone: fine
    cfg.model.train_backbone = True
    with pytest.raises(ValueError, match="needs a frozen backbone"):
        check_cacheable(cfg)
    cfg = frozen_cfg(tiny_data, cached_views=-1)
    with pytest.raises(ValueError, match="integer >= 0"):
        check_cacheable(cfg)
    d = get_config("deformable-shapes")
    d.train.cached_views = 2
    with pytest.raises(ValueError, match="arch 'detr' only"):
        check_cacheable(d)


def test_cli_rejects_cached_views_with_trainable_backbone(tmp_path, tiny_data, capsys):
    cfg_path = tmp_path / "c.json"

    cfg = tiny_cfg(tiny_data, cached_views=2)  # trainable backbone
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    assert train_main("--config", str(cfg_path), "--output", str(tmp_path / "run"), "--no-progress") != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "train.cached_views 2 needs a frozen backbone" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cached_training_resumes_exactly_and_reuses_views(tmp_path, tiny_data):
    cfg_path = tmp_path / "frozen.json"
    cfg = frozen_cfg(tiny_data, cached_views=2, epochs=4)
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    weights = tmp_path / "bb.pt"
    torch.save({"model": build_model(cfg.model).state_dict()}, weights)
    common = ("--config", str(cfg_path), "--no-progress", "--device", "cpu", "--backbone-weights", str(weights))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_main(*common, "--epochs", "4", "--output", str(straight)) == 0
    assert train_main(*common, "--epochs", "2", "--output", str(resumed)) == 0
    torch.manual_seed(999)
    assert train_main(*common, "--epochs", "4", "--output", str(resumed), "--resume") == 0
    assert _iter_losses(straight) == _iter_losses(resumed)  # bit-identical, cache rebuilt after resume
    epochs = [r for r in read_jsonl(straight / "log.jsonl") if r["type"] == "epoch"]
    computed = [r["cached_views"] for r in epochs]
    # 8 images x 2 views: never more than 16 backbone forwards however many epochs, and the count only grows
    assert computed == sorted(computed) and 8 <= computed[0] and computed[-1] <= 16
    assert all(r["cached_mb"] > 0 for r in epochs)


def test_eval_batch_size_sets_the_validation_loader(tiny_data):
    from detr_lite.config import Config
    from detr_lite.train import build_loaders

    cfg = frozen_cfg(tiny_data, cached_views=2, batch_size=2)
    assert cfg.train.val_batch_size == 2  # 0: same as the training batch
    cfg.train.eval_batch_size = 1
    assert build_loaders(cfg)[3].batch_size == 1
    # older checkpoints' configs have neither key: both default to off
    d = cfg.to_dict()
    del d["train"]["eval_batch_size"], d["train"]["cached_views"]
    old = Config.from_dict(d)
    assert old.train.cached_views == 0 and old.train.val_batch_size == 2
    preset = get_config("detr-shapes").train  # the shipped recipe: fresh augmentation, batched evaluation
    assert preset.cached_views == 0 and preset.val_batch_size == preset.batch_size
