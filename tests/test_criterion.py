"""SetCriterion: against numbers from the official implementations and an independent formula."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from detr_lite.config import get_config
from detr_lite.criterion import SetCriterion, build_criterion, build_weight_dict, num_boxes_for_normalisation
from detr_lite.matcher import HungarianMatcher


def example(seed, num_logits, b=3, q=7, aux=2, enc=False):
    """A fixed random batch (image 1 has no targets); the official numbers below use exactly this."""
    g = torch.Generator().manual_seed(seed)

    def out():
        return {
            "pred_logits": torch.randn(b, q, num_logits, generator=g) * 2,
            "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.25,
        }

    o = out()
    o["aux_outputs"] = [out() for _ in range(aux)]
    if enc:
        o["enc_outputs"] = out()
    targets = []
    for n in [3, 0, 5]:
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        labels = torch.randint(1, num_logits - 1 if num_logits > 6 else 5, (n,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], 1)})
    return o, targets


# Printed by running facebookresearch/detr's SetCriterion(6, HungarianMatcher(1, 5, 2), eos_coef=0.1)
# and fundamentalvision/Deformable-DETR's SetCriterion(6, HungarianMatcher(2, 5, 2), focal_alpha=0.25)
# on example(0, 7) and example(1, 6, enc=True) (torch 2.14 CPU), outside this repository.
OFFICIAL_DETR = {
    "loss_ce": 2.029910087585449, "loss_bbox": 0.7701868414878845, "loss_giou": 0.9309355020523071,
    "loss_ce_0": 3.6061575412750244, "loss_bbox_0": 0.6852249503135681, "loss_giou_0": 0.9154519438743591,
    "loss_ce_1": 2.307023763656616, "loss_bbox_1": 0.7104838490486145, "loss_giou_1": 0.900372326374054,
    "class_error": 75.0, "cardinality_error": 3.3333332538604736,
    "cardinality_error_0": 2.6666667461395264, "cardinality_error_1": 4.0,
}  # fmt: skip
OFFICIAL_DETR_INDICES = [([0, 2, 5], [1, 0, 2]), ([], []), ([1, 2, 4, 5, 6], [4, 1, 0, 3, 2])]
OFFICIAL_DEFORMABLE = {
    "loss_ce": 6.11721658706665, "loss_bbox": 0.7733871936798096, "loss_giou": 0.9694477319717407,
    "loss_ce_0": 6.614543437957764, "loss_bbox_0": 0.7840536832809448, "loss_giou_0": 0.9087783098220825,
    "loss_ce_1": 6.349308490753174, "loss_bbox_1": 0.5833806395530701, "loss_giou_1": 0.9451751708984375,
    "loss_ce_enc": 7.427375316619873, "loss_bbox_enc": 0.7215310335159302, "loss_giou_enc": 0.8215333223342896,
    "class_error": 62.5,
}  # fmt: skip
OFFICIAL_DEFORMABLE_INDICES = [([0, 4, 6], [2, 0, 1]), ([], []), ([0, 1, 2, 3, 6], [2, 1, 0, 3, 4])]


def _as_lists(indices):
    return [(i.tolist(), j.tolist()) for i, j in indices]


def test_detr_losses_match_official():
    o, t = example(0, 7)
    crit = SetCriterion(6, HungarianMatcher(1, 5, 2), {}, eos_coef=0.1)
    assert _as_lists(crit.matcher(o, t)) == OFFICIAL_DETR_INDICES
    losses = crit(o, t)
    assert set(losses) == set(OFFICIAL_DETR)
    for k, v in OFFICIAL_DETR.items():
        # GIoU uses torchvision's eps-guarded loss (eps=1e-7): differences ~1e-7
        assert losses[k].item() == pytest.approx(v, rel=1e-6, abs=1e-6), k


def test_deformable_focal_losses_match_official():
    o, t = example(1, 6, enc=True)
    crit = SetCriterion(6, HungarianMatcher(2, 5, 2, focal=True), {}, focal=True, focal_alpha=0.25)
    assert _as_lists(crit.matcher(o, t)) == OFFICIAL_DEFORMABLE_INDICES
    losses = crit(o, t)
    for k, v in OFFICIAL_DEFORMABLE.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-6, abs=1e-6), k
    # cardinality for focal models deliberately differs from the official (documented): count
    # queries whose best class probability exceeds 0.5
    n_pred = (o["pred_logits"].sigmoid().max(-1).values > 0.5).sum(1).float()
    expected = (n_pred - torch.tensor([3.0, 0.0, 5.0])).abs().mean()
    assert losses["cardinality_error"].item() == pytest.approx(expected.item())


def _independent_losses(o, t, indices, num_classes, eos_coef=0.1, focal=False):
    """The loss definitions written out with explicit loops (no SetCriterion code)."""
    logits, boxes = o["pred_logits"], o["pred_boxes"]
    b, q, _ = logits.shape
    num_boxes = max(sum(len(x["labels"]) for x in t), 1)
    target_cls = torch.full((b, q), num_classes)
    for bi, (i, j) in enumerate(indices):
        target_cls[bi, i] = t[bi]["labels"][j]
    if focal:
        total = 0.0
        for bi in range(b):
            for qi in range(q):
                for k in range(num_classes):
                    y = 1.0 if target_cls[bi, qi] == k else 0.0
                    p = torch.sigmoid(logits[bi, qi, k]).item()
                    pt = p if y else 1 - p
                    at = 0.25 if y else 0.75
                    total += at * (1 - pt) ** 2 * -math.log(pt)  # .mean(1) over Q, then x Q: a plain sum
        loss_ce = total / num_boxes
    else:
        num, den = 0.0, 0.0
        for bi in range(b):
            for qi in range(q):
                c = target_cls[bi, qi].item()
                w = eos_coef if c == num_classes else 1.0
                num += -w * torch.log_softmax(logits[bi, qi], -1)[c].item()
                den += w
        loss_ce = num / den
    l1, giou = 0.0, 0.0
    for bi, (i, j) in enumerate(indices):
        for qi, ti in zip(i.tolist(), j.tolist()):
            p, g = boxes[bi, qi], t[bi]["boxes"][ti]
            l1 += (p - g).abs().sum().item()
            px0, py0, px1, py1 = p[0] - p[2] / 2, p[1] - p[3] / 2, p[0] + p[2] / 2, p[1] + p[3] / 2
            gx0, gy0, gx1, gy1 = g[0] - g[2] / 2, g[1] - g[3] / 2, g[0] + g[2] / 2, g[1] + g[3] / 2
            inter = max(0, min(px1, gx1) - max(px0, gx0)) * max(0, min(py1, gy1) - max(py0, gy0))
            union = p[2] * p[3] + g[2] * g[3] - inter
            hull = (max(px1, gx1) - min(px0, gx0)) * (max(py1, gy1) - min(py0, gy0))
            giou += 1 - (inter / union - (hull - union) / hull).item()
    return {"loss_ce": loss_ce, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


@pytest.mark.parametrize("focal", [False, True])
def test_losses_match_independent_formula(focal):
    o, t = example(2, 6 if focal else 7, aux=0)
    crit = SetCriterion(6, HungarianMatcher(focal=focal), {}, focal=focal)
    losses = crit(o, t)
    ref = _independent_losses(o, t, crit.matcher(o, t), 6, focal=focal)
    for k, v in ref.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-5), k


def test_eos_coef_weights_no_object_class():
    o, t = example(0, 7, aux=0)
    hi = SetCriterion(6, HungarianMatcher(), {}, eos_coef=1.0)(o, t)["loss_ce"]
    lo = SetCriterion(6, HungarianMatcher(), {}, eos_coef=0.1)(o, t)["loss_ce"]
    ref = _independent_losses(o, t, HungarianMatcher()(o, t), 6, eos_coef=1.0)["loss_ce"]
    assert hi.item() == pytest.approx(ref, rel=1e-5) and hi.item() != pytest.approx(lo.item())


def test_aux_keys_weight_dict_and_total():
    cfg = get_config("detr-shapes").model  # 3 decoder layers -> 2 aux outputs
    crit = build_criterion(cfg)
    assert crit.weight_dict == {
        **{f"loss_ce{s}": 1.0 for s in ("", "_0", "_1")},
        **{f"loss_bbox{s}": 5.0 for s in ("", "_0", "_1")},
        **{f"loss_giou{s}": 2.0 for s in ("", "_0", "_1")},
    }
    o, t = example(0, 7, aux=2)
    losses = crit(o, t)
    for k in crit.weight_dict:
        assert k in losses
    assert "class_error" in losses and "class_error_0" not in losses  # logged for the last layer only
    assert all(not k.startswith(("class_error", "cardinality")) for k in crit.weight_dict)
    total = sum(losses[k] * w for k, w in crit.weight_dict.items())
    assert torch.isfinite(total)


def test_weight_dict_deformable_two_stage():
    cfg = get_config("deformable-shapes").model
    cfg.two_stage = True
    w = build_weight_dict(cfg)
    assert (
        w["loss_ce"] == 2.0 and w["loss_ce_enc"] == 2.0 and w["loss_giou_1"] == 2.0 and "loss_bbox_2" not in w
    )
    cfg.aux_loss = False
    assert set(build_weight_dict(cfg)) == {
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "loss_ce_enc",
        "loss_bbox_enc",
        "loss_giou_enc",
    }
    crit = build_criterion(get_config("deformable-shapes").model)
    assert crit.focal and crit.num_classes == 6


def test_no_targets_num_boxes_clamped_and_gradients_flow():
    o, _ = example(0, 7, aux=1)
    o = {
        "pred_logits": o["pred_logits"].requires_grad_(),
        "pred_boxes": o["pred_boxes"].requires_grad_(),
        "aux_outputs": o["aux_outputs"],
    }
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)} for _ in range(3)]
    assert num_boxes_for_normalisation(empty, torch.device("cpu")) == 1.0
    losses = SetCriterion(6, HungarianMatcher(), {})(o, empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # every query is trained towards no-object: CE = mean of -log p(no-object)
    ref = -torch.log_softmax(o["pred_logits"], -1)[..., 6].mean()
    assert losses["loss_ce"].item() == pytest.approx(ref.item(), rel=1e-6)
    assert losses["class_error"].item() == 0
    (losses["loss_ce"] + losses["loss_bbox"] + losses["loss_giou"]).backward()
    assert o["pred_logits"].grad.abs().sum() > 0 and torch.isfinite(o["pred_boxes"].grad).all()


def test_degenerate_predicted_boxes_are_safe():
    o, t = example(0, 7, aux=0)
    boxes = o["pred_boxes"].clone()
    boxes[..., 2:] = 0.0  # sigmoid underflow: zero width and height
    boxes.requires_grad_()
    losses = SetCriterion(6, HungarianMatcher(), {})(
        {"pred_logits": o["pred_logits"], "pred_boxes": boxes}, t
    )
    (losses["loss_bbox"] + losses["loss_giou"]).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and torch.isfinite(boxes.grad).all()
    assert losses["loss_giou"].item() > 1.0  # zero IoU, non-trivial enclosing box: GIoU < 0


def test_bad_num_classes_or_labels_raise():
    o, t = example(0, 7, aux=0)
    with pytest.raises(ValueError, match="last dim expected 11"):
        SetCriterion(10, HungarianMatcher(), {})(o, t)
    bad = [dict(t[0], labels=torch.tensor([1, 2, 6])), t[1], t[2]]
    with pytest.raises(ValueError, match=r"labels'\] expected ids in \[0, 5\]"):
        SetCriterion(6, HungarianMatcher(), {})(o, bad)
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(6, HungarianMatcher(), {}, losses=("labels", "masks"))


# ---------------------------------------------------------------- num_boxes under torch.distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        n = 3 if rank == 0 else 5
        targets = [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": torch.zeros(n, 4)}]
        value = num_boxes_for_normalisation(targets, torch.device("cpu"))
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(repr(value))
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_across_processes(tmp_path):
    # fork: the children reuse this process's imports (spawn would re-import torch, ~10x slower)
    mp.start_processes(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    got = [float((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert got == [4.0, 4.0]  # (3 + 5) / 2 on both ranks
