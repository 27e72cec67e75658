"""engine.py: parameter groups, the training step, the NaN stop, and COCO evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from detr_lite.config import TrainConfig
from detr_lite.data.coco import build_dataset, collate_fn
from detr_lite.detr import PostProcess
from detr_lite.engine import (
    NonFiniteLossError,
    amp_dtype_for,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    evaluate,
    train_one_epoch,
)
from detr_lite.models import build_criterion, build_model
from tests.helpers import make_tiny_coco, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))
    return tiny_cfg(root)


class Named(nn.Module):
    """Parameters named like the ones the official recipes treat specially."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.sampling_offsets = nn.Linear(2, 2)
        self.decoder = nn.ModuleDict({"reference_points": nn.Linear(2, 2), "ffn": nn.Linear(2, 2)})
        self.class_embed = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_follow_the_official_keywords():
    model = Named()
    cfg = TrainConfig(lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4)
    groups = {g["name"]: g for g in build_param_groups(model, cfg)}
    names = {id(p): n for n, p in model.named_parameters()}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert got["backbone"] == ["backbone.bias", "backbone.weight"]
    assert got["linear_proj"] == sorted(
        [
            "sampling_offsets.weight",
            "sampling_offsets.bias",
            "decoder.reference_points.weight",
            "decoder.reference_points.bias",
        ]
    )
    assert got["main"] == sorted(
        ["decoder.ffn.weight", "decoder.ffn.bias", "class_embed.weight", "class_embed.bias"]
    )
    assert groups["backbone"]["lr"] == 2e-5 and groups["main"]["lr"] == 2e-4
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    opt = build_optimizer(model, cfg)
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    sched = build_lr_scheduler(opt, TrainConfig(lr=2e-4, lr_drop=3))
    main = next(g for g in opt.param_groups if g["name"] == "main")
    lrs = []
    for _ in range(5):
        lrs.append(main["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([2e-4, 2e-4, 2e-4, 2e-5, 2e-5])


@pytest.mark.slow
def test_optimizer_is_multi_tensor_and_bit_identical_to_the_per_tensor_loop(tiny):
    """build_optimizer asks for AdamW's multi-tensor path (on CPU torch would pick the per-parameter
    Python loop); both give the same weights, bit for bit, so shipped runs stay reproducible."""
    torch.manual_seed(0)
    model = build_model(tiny.model)
    twin = build_model(tiny.model)
    twin.load_state_dict(model.state_dict())
    fast = build_optimizer(model, tiny.train)
    assert all(g["foreach"] for g in fast.param_groups)
    slow = torch.optim.AdamW(
        build_param_groups(twin, tiny.train), lr=tiny.train.lr, weight_decay=tiny.train.weight_decay, foreach=False
    )
    start = [q.detach().clone() for q in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(model.parameters(), twin.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=gen) * 1e-2
                b.grad = a.grad.clone()
        fast.step()
        slow.step()
    moved = sum(not torch.equal(a, a0) for a, a0 in zip(model.parameters(), start))
    assert moved == sum(len(g["params"]) for g in fast.param_groups)  # every trainable tensor moved
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_detr_groups_cover_every_trainable_parameter_once(tiny):
    model = build_model(tiny.model)
    groups = build_param_groups(model, tiny.train)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    assert {g["name"] for g in groups} == {"backbone", "main"}  # DETR has no sampling offsets


def test_amp_is_cuda_only():
    assert amp_dtype_for(torch.device("cpu"), True) is None
    assert amp_dtype_for(torch.device("cpu"), False) is None


def _loader(cfg, split="train2017", train=True, batch_size=2):
    ds = build_dataset(cfg.data.root, split, cfg.data, train=train)
    return ds, DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


@pytest.mark.slow
def test_train_one_epoch_logs_and_learns(tiny):
    torch.manual_seed(0)
    model, criterion = build_model(tiny.model), build_criterion(tiny.model)
    _, loader = _loader(tiny, train=False, batch_size=4)
    one_batch = [next(iter(loader))] * 12  # overfit a single batch: the loss must fall
    opt = build_optimizer(model, TrainConfig(lr=1e-3, lr_backbone=1e-3))
    records = []
    stats = train_one_epoch(
        model,
        criterion,
        one_batch,
        opt,
        torch.device("cpu"),
        epoch=5,
        clip_max_norm=0.1,
        log=records.append,
        progress=False,
    )
    assert [r["iter"] for r in records] == list(range(12)) and all(r["epoch"] == 5 for r in records)
    for key in (
        "loss",
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_ce_0",
        "class_error",
        "lr",
        "time_per_iter",
        "images_per_s",
    ):
        assert key in records[0], key
    w = criterion.weight_dict
    r0 = records[0]
    assert r0["loss"] == pytest.approx(sum(r0[k] for k in w if k in r0))
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]
    assert stats["iters"] == 12 and stats["images"] == 48
    assert stats["loss"] == pytest.approx(sum(r["loss"] for r in records) / 12)


def test_non_finite_loss_raises_before_the_step(tiny):
    torch.manual_seed(0)
    model, criterion = build_model(tiny.model), build_criterion(tiny.model)
    _, loader = _loader(tiny)
    batches = list(loader)[:3]
    real = criterion.forward
    calls = {"n": 0}

    def forward(outputs, targets):
        out = real(outputs, targets)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss_bbox"] = out["loss_bbox"] + float("inf")
        return out

    criterion.forward = forward
    opt = build_optimizer(model, tiny.train)
    snapshots = []
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(model, criterion, batches, opt, torch.device("cpu"), epoch=3, log=lambda r: snapshots.append(
            {k: v.detach().clone() for k, v in model.named_parameters()}), progress=False)  # fmt: skip
    msg = str(err.value)
    assert (
        "non-finite loss inf at epoch 3 iteration 1" in msg and "loss_bbox=inf" in msg and "loss_ce=" in msg
    )
    # the bad iteration never reached optimizer.step(): weights are those after iteration 0
    # (BatchNorm running statistics did see its forward pass; they are buffers, not weights)
    (after_first,) = snapshots
    assert all(torch.equal(v, after_first[k]) for k, v in model.named_parameters())


@pytest.mark.parametrize("clip", [0.1, 0.0])
def test_non_finite_gradients_from_a_finite_loss_raise_before_the_step(tiny, clip):
    """E.g. a broken attention kernel under bf16 autocast: NaN gradients, finite loss. The run stops
    before the optimiser step (clipping on or off), naming where the non-finite gradients start."""
    torch.manual_seed(0)
    model, criterion = build_model(tiny.model), build_criterion(tiny.model)
    _, loader = _loader(tiny)
    batches = list(loader)[:3]
    calls = {"n": 0}

    def poison(grad):  # NaN gradients for one weight of the last decoder layer, at the 2nd iteration
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 2 else grad

    param = model.transformer.decoder.layers[-1].linear2.weight
    param.register_hook(poison)
    opt = build_optimizer(model, tiny.train)
    snapshots = []
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(model, criterion, batches, opt, torch.device("cpu"), epoch=3, clip_max_norm=clip,
                        log=lambda r: snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()}),
                        progress=False)  # fmt: skip
    msg = str(err.value)
    assert "non-finite gradients at epoch 3 iteration 1 (loss " in msg and "was finite)" in msg, msg
    assert "nearest the output transformer.decoder.layers.1.linear2.weight; the step was not taken" in msg, (
        msg
    )
    (after_first,) = snapshots
    assert all(torch.equal(v, after_first[k]) for k, v in model.named_parameters())


class Oracle(nn.Module):
    """Replays the ground truth of each batch as DETR outputs (probability ~1 on the true class)."""

    def __init__(self, batches, num_classes: int, num_queries: int = 10, shift: float = 0.0):
        super().__init__()
        self.targets = [t for _, _, t in batches]
        self.k, self.q, self.shift, self.i = num_classes, num_queries, shift, 0

    def forward(self, images, mask):
        targets = self.targets[self.i]
        self.i += 1
        b = len(targets)
        logits = torch.full((b, self.q, self.k + 1), -10.0)
        logits[..., -1] = 10.0  # no-object everywhere...
        boxes = torch.full((b, self.q, 4), 0.5)
        for j, t in enumerate(targets):
            n = len(t["labels"])
            logits[j, :n, -1] = -10.0  # ...except one query per object
            logits[j, torch.arange(n), t["labels"]] = 10.0
            boxes[j, :n] = t["boxes"]
            boxes[j, :n, 0] += self.shift
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_evaluate_oracle_scores_perfect_ap_at_original_size(tiny):
    # val transform resizes to 64 px; predictions must be mapped back to the original ~128-192 px
    ds, loader = _loader(tiny, "val2017", train=False)
    batches = list(loader)
    assert any(t["size"].tolist() != t["orig_size"].tolist() for _, _, ts in batches for t in ts)
    crit = build_criterion(tiny.model)
    m = evaluate(Oracle(batches, 6), PostProcess(), batches, ds.coco, torch.device("cpu"), criterion=crit)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["AP"] > 0.97  # resize rounding only
    assert m["num_images"] == 4 and len(m["stats"]) == 12 and m["loss"] < 1.0
    shifted = evaluate(Oracle(batches, 6, shift=0.6), PostProcess(), batches, ds.coco, torch.device("cpu"))
    assert shifted["AP50"] < 0.05


def test_evaluate_with_no_detections(tiny):
    ds, loader = _loader(tiny, "val2017", train=False)
    batches = list(loader)

    def nothing(outputs, sizes):
        return [
            {
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
                "boxes": torch.zeros(0, 4),
            }
        ] * len(sizes)

    m = evaluate(Oracle(batches, 6), nothing, batches, ds.coco, torch.device("cpu"))
    assert m["num_detections"] == 0 and all(m[k] == 0.0 for k in ("AP", "AP50", "AP75"))
