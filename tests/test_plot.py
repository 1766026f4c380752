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


# --------------------------------------------------------------------------- issue 18: figure defects

def _no_math(fn, *args, **kwargs):
    """Draw as ``qkprobe report`` does: math parsing off, so file text is drawn as it is."""
    import matplotlib
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig = fn(*args, **kwargs)
        fig.canvas.draw()
    return fig


def _ablation_fig(title="what removing each mode does — " + "timm:vit_small_patch14_dinov2.lvd142m " * 3):
    rng = np.random.default_rng(0)
    M = 30
    cos, share, eff = rng.uniform(-0.3, 0.3, M), rng.uniform(0, 0.2, M), 10 ** rng.uniform(-4, -1, M)
    cos[:4], share[:4], eff[:4] = 0.1, 0.1, [0.5, 0.49, 0.51, 0.5]   # four biggest effects on one spot
    return _no_math(plot.ablation_effects, cos, share, eff, labels=[f"L{i}H0M{i}" for i in range(M)],
                    layers=np.arange(M) % 6, n_labels=4, title=title)


def test_ablation_log_ticks_are_plain_text_without_math_parsing():
    fig = _ablation_fig()
    for ax in fig.axes[:2]:
        labels = [t.get_text() for t in ax.get_yticklabels(which="both") if t.get_visible() and t.get_text()]
        assert labels or ax is fig.axes[1], "no y tick labels"   # the right panel shares the left's y axis
        assert not [t for t in labels if "$" in t or "mathdefault" in t], labels
    assert {"10⁻¹", "10⁻²", "10⁻³"} <= {t.get_text() for t in fig.axes[0].get_yticklabels()}


def test_ablation_title_axis_label_and_mode_labels_are_inside_and_apart():
    fig = _ablation_fig()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    title = fig._suptitle
    texts = [title, fig.axes[0].yaxis.label, fig.axes[0].xaxis.label, fig.axes[1].xaxis.label]
    for t in texts:
        box = t.get_window_extent(renderer)
        assert t.get_text() and page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1, t.get_text()
        assert page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, t.get_text()
    for ax in fig.axes[:2]:
        boxes = [a.get_window_extent(renderer) for a in ax.texts]
        assert len(boxes) == 4
        assert not [(i, j) for i in range(4) for j in range(i) if boxes[i].overlaps(boxes[j])]


def test_shared_map_scale_and_colour_bars_per_row():
    q1, q2 = np.array([[2.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, -3.0]])
    assert plot.shared_scale([q1, q2]) == 2.0 and plot.shared_scale([-q1]) == 0.0
    np.testing.assert_allclose(plot.normalize_map(q2, vmax=2.0), [[0.5, 0], [0, 0]])   # not its own max
    img = np.full((8, 8, 3), 0.5)
    rows = [{"label": "L0 H0 M0 +", "cosine": 0.1, "scale": {"query": 2.0, "key": 0.25},
             "items": [{"image": img, "overlay": img, "score": 1.0, "name": "a.png"}]}]
    fig = plot.optimal_images_grid(rows, tile=40)
    mosaic = fig.axes[0].images[0].get_array()
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "2" in texts and "0.25" in texts and texts.count("0") == 2
    right = mosaic[:, -96:]   # the colour bars: full red and full cyan at the top, grey at the bottom
    reds = np.argwhere((right[..., 0] > 0.99) & (right[..., 1] < 0.01))
    cyans = np.argwhere((right[..., 0] < 0.01) & (right[..., 1] > 0.99) & (right[..., 2] > 0.99))
    assert len(reds) and len(cyans)
    ys = np.argwhere(np.abs(right[..., 0] - 0.25) < 0.02)
    assert len(ys) and ys[:, 0].max() > reds[:, 0].max()   # the bar fades to grey downwards


def test_layer_curves_of_a_bases_file_are_labelled_by_spec_or_name(tmp_path):
    from qkprobe.sinks.bases_file import write_bases
    import qkprobe
    import timm
    model = timm.create_model("test_vit", pretrained=False).eval()
    path = tmp_path / "tmpabc123" / "b.h5"
    path.parent.mkdir()
    write_bases(str(path), qkprobe.compute_bases(model), {"model_spec": "timm:test_vit", "random_init": True})
    labels = [t.get_text() for t in plot.layer_curves(path).axes[0].get_legend().get_texts()]
    assert labels == ["timm:test_vit (random init)"]
    labels = [t.get_text() for t in plot.layer_curves(path, name="tv").axes[0].get_legend().get_texts()]
    assert labels == ["tv"]


def test_positional_share_of_variance():
    from qkprobe.report.positional import MIN_IMAGES, POSITIONAL_R2, is_positional, position_r2
    rng = np.random.default_rng(0)
    grid = np.add.outer(np.arange(6.0), np.arange(6.0))          # a pure function of position
    same = [grid + 0.01 * rng.standard_normal(grid.shape) for _ in range(8)]
    assert position_r2(same) > 0.99
    noise = [rng.standard_normal((6, 6)) for _ in range(8)]
    assert position_r2(noise) == pytest.approx(1 / 8, abs=0.08)   # chance level 1/n
    A = np.stack([m.ravel() for m in noise])
    between = 8 * ((A.mean(0) - A.mean()) ** 2).sum()
    assert position_r2(noise) == pytest.approx(between / ((A - A.mean()) ** 2).sum())
    assert position_r2(same[:MIN_IMAGES - 1]) is None
    assert is_positional(0.9, POSITIONAL_R2) and not is_positional(0.9, 0.3) and not is_positional(None, 0.9)
