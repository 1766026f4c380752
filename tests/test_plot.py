"""qkprobe.plot: figures return matplotlib figures whose drawn data are the inputs, exact band."""

import numpy as np
import pytest

from qkprobe import plot


def test_band_is_exact_beta_quantile():
    # D = 3: cos of two random unit vectors is uniform on [-1, 1], so the 99% band is 0.99 exactly.
    assert plot.random_cosine_band(3) == pytest.approx(0.99, abs=1e-12)
    # D = 2: angle uniform, |cos| ≤ c with probability 1 - 2 acos(c)/π.
    assert plot.random_cosine_band(2) == pytest.approx(np.cos(np.pi * 0.005), abs=1e-9)
    # Large D: seeded Monte Carlo agrees.
    rng = np.random.default_rng(0)
    D = 64
    x = rng.standard_normal((200000, D))
    y = rng.standard_normal((200000, D))
    c = np.abs((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1))
    assert plot.random_cosine_band(D) == pytest.approx(np.quantile(c, 0.99), abs=0.004)
    assert plot.random_cosine_band(384) < plot.random_cosine_band(64) < plot.random_cosine_band(8)


def test_layer_summaries_and_layer_curve_draw_the_numbers():
    rng = np.random.default_rng(1)
    layers = [{"S": rng.random((3, 5)) + 0.1, "cosine": rng.uniform(-1, 1, (3, 5))} for _ in range(4)]
    rows = plot.layer_summaries(layers)
    for lay, row in zip(layers, rows):
        w = lay["S"] / lay["S"].sum(1, keepdims=True)
        assert row["weighted_cosine"] == pytest.approx((w * lay["cosine"]).sum(1).mean())
        assert row["mean_cosine"] == pytest.approx(lay["cosine"].mean())
    fig = plot.layer_curve({"a": rows})
    solid = fig.axes[0].lines[0]
    np.testing.assert_allclose(solid.get_xdata(), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(solid.get_ydata(), [r["weighted_cosine"] for r in rows])


def test_spectrum_panel_bars_and_dots_are_S_and_cosine():
    rng = np.random.default_rng(2)
    S = np.sort(rng.random((7, 6)), axis=1)[:, ::-1]
    cos = rng.uniform(-1, 1, (7, 6))
    fig = plot.spectrum_panel(S, cos, band=0.3, max_cols=4)
    axes = np.array(fig.axes).reshape(4, 4)  # 2 rows of heads × (S row, cos row)
    for h in range(7):
        top, bot = axes[2 * (h // 4), h % 4], axes[2 * (h // 4) + 1, h % 4]
        np.testing.assert_allclose([p.get_height() for p in top.patches], S[h])
        np.testing.assert_allclose(bot.collections[-1].get_offsets()[:, 1], cos[h])
    assert not axes[2, 3].axison  # the 8th slot is empty


def test_overlay_colours():
    img = np.full((2, 2, 3), 0.8)
    q = np.array([[1.0, 0.0], [1.0, 0.0]])
    k = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = plot.overlay(img, q, k, dim=0.5)
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])      # query only: red
    np.testing.assert_allclose(out[0, 1], [0, 1, 1])      # key only: cyan
    np.testing.assert_allclose(out[1, 0], [1, 1, 1])      # both: white
    np.testing.assert_allclose(out[1, 1], [0.4, 0.4, 0.4])  # neither: dimmed grey image
    m = plot.normalize_map(np.array([[-1.0, 2.0], [1.0, 0.0]]))
    np.testing.assert_allclose(m, [[0, 1], [0.5, 0]])
    assert plot.normalize_map(-np.ones((2, 2))).max() == 0
    assert plot.normalize_map(np.eye(2), size=(8, 6)).shape == (8, 6)


def test_mode_importance_and_share_summary():
    cos = np.array([[0.5, -0.5, 0.0], [0.9, 0.05, -0.9]])
    share = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    s = plot.share_summary(cos, share, band=0.1)
    assert s["similar"] == pytest.approx((0.6 + 0.2) / 2)
    assert s["dissimilar"] == pytest.approx((0.3 + 0.3) / 2)
    assert s["neutral"] == pytest.approx((0.1 + 0.5) / 2)
    assert s["share_weighted_cosine"] == pytest.approx(((cos * share).sum(1)).mean())
    fig = plot.mode_importance(cos, share, band=0.1)
    for h in range(2):
        np.testing.assert_allclose(fig.axes[0].collections[h].get_offsets(), np.c_[cos[h], share[h]])
    fig = plot.share_by_sign([s, s])
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [s["similar"]] * 2)
    fig = plot.mode_importance_layers([cos, cos, cos], [share] * 3, band=0.1, max_cols=2)
    assert len(fig.axes) == 4 and not fig.axes[3].axison


def test_optimal_images_grid_and_training_curves():
    img = np.random.default_rng(3).random((8, 8, 3))
    rows = [{"label": "L0 H1 M0 +", "cosine": 0.2,
             "items": [{"image": img, "overlay": img, "score": 1.5, "name": "a.png"},
                       {"image": None, "overlay": None, "score": 1.0, "name": "gone.png"}]},
            {"label": "L0 H1 M0 −", "cosine": 0.2, "items": [{"image": img, "overlay": None, "score": 2.0,
                                                              "name": "b.png"}]}]
    fig = plot.optimal_images_grid(rows, tile=8)
    mosaic = fig.axes[0].images[0].get_array()
    found = [(y, x) for y in range(mosaic.shape[0] - 7) for x in range(mosaic.shape[1] - 7)
             if np.allclose(mosaic[y:y + 8, x:x + 8], img)]
    assert len(found) == 3  # image and overlay of a.png, image of b.png
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "missing" in texts and "no map" in texts and "score 1.5" in texts and "L0 H1 M0 −\ncos +0.20" in texts
    steps = np.array([0, 10, 20])
    wc = np.arange(12.0).reshape(3, 4)
    fig = plot.training_curves(steps, wc - 1, wc, drift=wc / 10)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), wc[0])
    np.testing.assert_allclose(fig.axes[1].lines[2].get_ydata(), wc[:, 2] / 10)
    fig = plot.training_curves(np.array([-1, 10, 20]), wc - 1, wc, drift={"query": wc / 10, "key": wc / 5})
    np.testing.assert_allclose(fig.axes[1].lines[4 + 1].get_ydata(), wc[:, 1] / 5)  # key side, layer 1
    assert fig.axes[0].lines[0].get_label() == "start"
