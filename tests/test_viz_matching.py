"""detr_lite.viz matching/training helpers (notebooks 05-06): they draw exactly what they are given."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from detr_lite import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_show_cost_matrix_outlines_the_assigned_cells():
    cost = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # 4 queries x 3 targets
    ax = viz.show_cost_matrix(cost, pred_idx=[0, 2, 3], tgt_idx=[1, 0, 2])
    image = ax.get_images()[0].get_array()
    np.testing.assert_array_equal(np.asarray(image), cost.T.numpy())  # drawn targets x queries
    outlined = sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if isinstance(p, Rectangle))
    assert outlined == [(0.0, 1.0), (2.0, 0.0), (3.0, 2.0)]  # (query, target) of each pair


def test_show_cost_matrix_rejects_wrong_rank():
    with pytest.raises(ValueError, match="num_queries, num_targets"):
        viz.show_cost_matrix(torch.zeros(2, 3, 4))


def test_show_matching_draws_one_gt_and_one_prediction_per_pair():
    image = np.zeros((50, 80, 3), dtype=np.uint8)
    preds = torch.tensor([[0, 0, 10, 10], [5, 5, 20, 30], [40, 10, 70, 40]], dtype=torch.float32)
    gts = torch.tensor([[42, 12, 68, 38], [1, 1, 11, 9]], dtype=torch.float32)
    ax = viz.show_matching(image, preds, gts, pred_idx=[0, 2], tgt_idx=[1, 0])
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 4  # 2 pairs x (gt, prediction); the unmatched prediction 1 is not drawn
    corners = sorted((r.get_x(), r.get_y(), r.get_width(), r.get_height()) for r in rects)
    assert corners == sorted([(1, 1, 10, 8), (0, 0, 10, 10), (42, 12, 26, 26), (40, 10, 30, 30)])
    assert len(ax.lines) == 2  # one centre-to-centre line per pair
    (x0, x1), (y0, y1) = ax.lines[0].get_data()
    assert (x0, y0, x1, y1) == (6.0, 5.0, 5.0, 5.0)  # gt 1 centre -> prediction 0 centre


def test_plot_loss_curves_one_line_per_curve_with_shared_x():
    ax = viz.plot_loss_curves({"a": [3, 2, 1], "b": [1, 1]}, x=[10, 20, 30], logy=True)
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_array_equal(ax.lines[1].get_xdata(), [10, 20])
    assert ax.get_yscale() == "log"
