"""HungarianMatcher: costs against an independent formula, optimality against brute force."""

import itertools

import pytest
import torch

from detr_lite.config import get_config
from detr_lite.matcher import HungarianMatcher, build_matcher


# ---------------------------------------------------------------- independent reference costs
def _xyxy(b):
    return torch.stack(
        [b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1
    )


def _giou(a, b):
    """Pairwise GIoU written out from its definition (no torchvision)."""
    a, b = _xyxy(a)[:, None], _xyxy(b)[None]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = iw * ih
    union = area_a + area_b - inter
    ew = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    eh = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    enclose = ew * eh
    return inter / union - (enclose - union) / enclose


def _reference_cost(logits, boxes, labels, tboxes, wc, wb, wg, focal=False):
    """Cost [Q, T] for one image, from the formulas in the paper / official code."""
    if focal:
        p = logits.sigmoid()[:, labels]
        pos = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8)
        neg = 0.75 * p**2 * -torch.log(1 - p + 1e-8)
        c_cls = pos - neg
    else:
        c_cls = -logits.softmax(-1)[:, labels]
    c_l1 = (boxes[:, None, :] - tboxes[None, :, :]).abs().sum(-1)
    return wc * c_cls + wb * c_l1 + wg * -_giou(boxes, tboxes)


def _random_case(g, b, q, sizes, num_logits):
    out = {
        "pred_logits": torch.randn(b, q, num_logits, generator=g) * 2,
        "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1]),
    }
    targets = []
    for n in sizes:
        boxes = torch.cat(
            [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1
        )
        targets.append({"labels": torch.randint(0, num_logits - 1, (n,), generator=g), "boxes": boxes})
    return out, targets


def _brute_force_min(cost):
    """Minimum total cost over all injective maps targets -> queries (T <= Q)."""
    q, t = cost.shape
    return min(sum(cost[p[j], j].item() for j in range(t)) for p in itertools.permutations(range(q), t))


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("focal", [False, True])
def test_cost_matrix_matches_independent_formula(focal):
    g = torch.Generator().manual_seed(0)
    out, targets = _random_case(g, 3, 6, [2, 0, 4], 5)
    m = HungarianMatcher(2.0 if focal else 1.0, 5.0, 2.0, focal=focal)
    c = m.cost_matrix(out, targets)
    assert c.shape == (3, 6, 6)
    col = 0
    for b, t in enumerate(targets):
        n = len(t["labels"])
        ref = _reference_cost(
            out["pred_logits"][b],
            out["pred_boxes"][b],
            t["labels"],
            t["boxes"],
            m.cost_class,
            5.0,
            2.0,
            focal,
        )
        torch.testing.assert_close(c[b, :, col : col + n], ref, rtol=1e-5, atol=1e-5)
        col += n


@pytest.mark.parametrize("layout", ["padded", "flat"])
@pytest.mark.parametrize("focal", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_assignment_is_optimal_vs_brute_force(focal, seed, layout):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 3, 5, 0]
    out, targets = _random_case(g, 4, 6, sizes, 4)
    m = HungarianMatcher(1.0, 5.0, 2.0, focal=focal, layout=layout)
    indices = m(out, targets)
    assert len(indices) == 4
    for b, (i, j) in enumerate(indices):
        n = sizes[b]
        assert i.dtype == torch.int64 and j.dtype == torch.int64
        assert len(i) == len(j) == n
        if n == 0:
            continue
        assert torch.equal(i, i.sort().values)  # predictions in ascending order
        assert sorted(j.tolist()) == list(range(n))  # every target matched exactly once
        assert len(set(i.tolist())) == n  # to distinct predictions
        cost = _reference_cost(
            out["pred_logits"][b],
            out["pred_boxes"][b],
            targets[b]["labels"],
            targets[b]["boxes"],
            1.0,
            5.0,
            2.0,
            focal,
        )
        got = cost[i, j].sum().item()
        assert got == pytest.approx(_brute_force_min(cost), abs=1e-5)


def test_more_targets_than_queries():
    g = torch.Generator().manual_seed(3)
    out, targets = _random_case(g, 1, 3, [5], 4)
    i, j = HungarianMatcher()(out, targets)[0]
    assert len(i) == len(j) == 3 and sorted(i.tolist()) == [0, 1, 2]
    cost = _reference_cost(
        out["pred_logits"][0], out["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"], 1, 5, 2
    )
    # brute force from the query side: choose which target each query takes
    best = min(sum(cost[k, p[k]].item() for k in range(3)) for p in itertools.permutations(range(5), 3))
    assert cost[i, j].sum().item() == pytest.approx(best, abs=1e-5)


def test_zero_target_images():
    g = torch.Generator().manual_seed(1)
    out, targets = _random_case(g, 3, 5, [0, 0, 0], 4)
    for i, j in HungarianMatcher()(out, targets):
        assert i.shape == (0,) and j.shape == (0,) and i.dtype == torch.int64
    out, targets = _random_case(g, 3, 5, [0, 2, 0], 4)
    res = HungarianMatcher()(out, targets)
    assert [len(i) for i, _ in res] == [0, 2, 0]


@pytest.mark.parametrize("focal", [False, True])
def test_padded_costs_equal_the_official_flat_blocks(focal):
    g = torch.Generator().manual_seed(4)
    sizes = [3, 0, 7, 1]
    out, targets = _random_case(g, 4, 9, sizes, 6)
    m = HungarianMatcher(focal=focal)
    flat = m.cost_matrix(out, targets).split(sizes, -1)
    padded = m.padded_cost(out, targets)
    assert padded.shape == (4, 9, 7)
    for b, n in enumerate(sizes):
        torch.testing.assert_close(padded[b, :, :n], flat[b][b], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(padded).all()  # padding columns hold a valid dummy box
    flat_idx = HungarianMatcher(focal=focal, layout="flat")(out, targets)
    for (i1, j1), (i2, j2) in zip(m(out, targets), flat_idx):
        assert torch.equal(i1, i2) and torch.equal(j1, j2)


def test_batched_equals_per_image():
    g = torch.Generator().manual_seed(5)
    out, targets = _random_case(g, 4, 10, [3, 1, 0, 6], 6)
    m = HungarianMatcher()
    batched = m(out, targets)
    for b in range(4):
        single = m({k: v[b : b + 1] for k, v in out.items()}, [targets[b]])[0]
        assert torch.equal(single[0], batched[b][0]) and torch.equal(single[1], batched[b][1])


def test_obvious_match_is_found():
    """Each target has an exactly matching prediction with the right class: it must be chosen."""
    tboxes = torch.tensor([[0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.3]])
    pboxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.7, 0.6, 0.3, 0.3], [0.2, 0.3, 0.1, 0.2]])
    logits = torch.full((3, 4), -5.0)
    logits[1, 3] = logits[2, 1] = 5.0
    out = {"pred_logits": logits[None], "pred_boxes": pboxes[None]}
    i, j = HungarianMatcher()(out, [{"labels": torch.tensor([1, 3]), "boxes": tboxes}])[0]
    assert dict(zip(i.tolist(), j.tolist())) == {1: 1, 2: 0}


def test_degenerate_boxes_do_not_crash():
    out = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.0, 0.0]] * 3])}
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.2, 0.1, 0.1]])}
    ]
    i, j = HungarianMatcher()(out, targets)[0]
    assert len(i) == 2


def test_bad_inputs_raise_one_line_errors():
    g = torch.Generator().manual_seed(0)
    out, targets = _random_case(g, 2, 4, [1, 2], 4)
    with pytest.raises(ValueError, match="labels"):
        HungarianMatcher()(out, [targets[0], {"labels": torch.tensor([9, 0]), "boxes": targets[1]["boxes"]}])
    with pytest.raises(ValueError, match="expected 2 targets"):
        HungarianMatcher()(out, targets[:1])
    bad = dict(out, pred_boxes=out["pred_boxes"].clone())
    bad["pred_boxes"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        HungarianMatcher()(bad, targets)
    with pytest.raises(ValueError, match="cannot all be 0"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match="layout"):
        HungarianMatcher(layout="diagonal")


def test_build_matcher_from_config():
    m = build_matcher(get_config("detr-shapes").model)
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.focal) == (1.0, 5.0, 2.0, False)
    m = build_matcher(get_config("deformable-shapes").model)
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.focal, m.focal_alpha) == (2.0, 5.0, 2.0, True, 0.25)


def test_runs_without_grad():
    g = torch.Generator().manual_seed(0)
    out, targets = _random_case(g, 2, 4, [1, 2], 4)
    out = {k: v.requires_grad_() for k, v in out.items()}
    assert not HungarianMatcher().cost_matrix(out, targets).requires_grad
