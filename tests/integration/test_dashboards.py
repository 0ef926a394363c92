"""Feature dashboards and labels: a synthetic feature with a known answer, Neuronpedia, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import aquin_nb
from aquin_nb import AquinError, feature_dashboards, import_explanations, load_model
from aquin_nb._activations import prepare_bridge, residual, token_batches
from aquin_nb._corpus import pack_windows
from aquin_nb.cli import main
from aquin_nb.labels import cache_dir, feature_url
from aquin_nb.saes import sae_numerics

from ..unit.test_align import make_sae

CORPUS = [
    "Preheat the oven to a moderate heat and bake the bread until golden.",
    "Return a new list with the keys of the mapping, sorted.",
    "Whisk the eggs, then fold them into the batter and bake for an hour.",
    "Raise ValueError if the argument is not a valid file name.",
    "Let the dough rise in the oven with the light on.",
    "Close the file and return the number of bytes written.",
] * 3
HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def bridge():
    return load_model("tiny-gpt2")


def _corpus_tokens(tokenizer) -> list[int]:
    """Every distinct token of the corpus: the population the test draws from."""
    ids = {token for text in CORPUS for token in tokenizer.encode(text)}
    return sorted(ids)


def synthetic_sae(bridge, token: int, d_sae: int = 8):
    """Feature 0 reads `token`'s direction at the hook and writes its unembedding row;
    its threshold lets it fire on that token only (set from the corpus's activations)."""
    generator = torch.Generator().manual_seed(token)
    unembed = bridge.original_model.get_output_embeddings().weight.detach()
    decoder = torch.nn.functional.normalize(
        torch.randn(d_sae, unembed.shape[1], generator=generator), dim=1
    )
    decoder[0] = unembed[token] / unembed[token].norm()
    sae = make_sae(decoder, hook=HOOK)
    numerics = sae_numerics(sae)
    prepare_bridge(bridge, numerics)
    windows = pack_windows(
        bridge.tokenizer, CORPUS, prepend_bos=numerics.prepend_bos, max_length=128
    )
    on, off = [], []
    for batch in token_batches(windows, batch_size=8, skip_first=numerics.prepend_bos):
        acts = residual(bridge, batch.tokens, HOOK)[batch.mask]
        reading = acts @ decoder[0]
        hit = batch.tokens[batch.mask] == token
        on.append(reading[hit])
        off.append(reading[~hit])
    low, high = torch.cat(on).min(), torch.cat(off).max()
    assert low > high, "the token's direction does not separate it at this hook"
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = decoder[0]
        sae.b_enc.fill_(-1e6)
        sae.b_enc[0] = -float(high + low) / 2
    return sae


def test_a_synthetic_token_feature_shows_its_token_everywhere():
    """Tokens drawn at random among every token of the corpus."""
    bridge = load_model("tiny-gpt2")  # prepared for the synthetic SAE's numerics, not shared
    tokens = random.Random(3).sample(_corpus_tokens(bridge.tokenizer), 5)
    for token in tokens:
        sae = synthetic_sae(bridge, token)
        boards = feature_dashboards(bridge, sae=sae, corpus=CORPUS, k=4, progress=False)
        board = boards.feature(0)
        text = bridge.tokenizer.decode([token])
        contexts = board["base"]["contexts"]
        assert contexts and all(c["tokens"][c["peak"]] == text for c in contexts)
        assert board["base"]["promoted"][0]["token"] == text
        assert boards.features.loc[0, "density"] > 0
        assert boards.features.loc[1:, "density"].eq(0).all()
        assert text.strip() in board["label"]


def test_dashboards_are_cached_and_reused(bridge, tiny_sae):
    first = feature_dashboards(bridge, sae=tiny_sae, corpus=CORPUS, k=3, progress=False)
    stamp = Path(first.summary["cache"]).stat().st_mtime_ns
    again = feature_dashboards(bridge, sae=tiny_sae, corpus=CORPUS, k=3, progress=False)
    assert again.summary["cache"] == first.summary["cache"]
    assert Path(again.summary["cache"]).stat().st_mtime_ns == stamp  # read, not recomputed
    other = feature_dashboards(bridge, sae=tiny_sae, corpus=CORPUS[:4], k=3, progress=False)
    assert other.summary["cache"] != first.summary["cache"]  # the corpus is part of the key
    board = first.feature(5)
    assert len(board["base"]["contexts"]) <= 3 and board["checkpoint"] is None
    assert len(board["base"]["histogram"]) == len(first.summary["histogram_edges"]) - 1


def test_lens_labels_are_read_back_until_a_weight_they_come_from_changes(tiny_sae, monkeypatch):
    """A second read of the same SAE through the same model runs no lens; editing the
    unembedding or the decoder in place, or another model object, reads afresh, and
    the labels then follow the edit: a feature whose decoder row is planted on a
    token's unembedding row is labelled with that token."""
    import copy

    from aquin_nb import _lens, labels

    bridge = load_model("tiny-gpt2")
    sae = copy.deepcopy(tiny_sae)
    lenses: list[int] = []
    real_lens = _lens.logit_lens
    monkeypatch.setattr(
        _lens, "logit_lens", lambda b, d, k: lenses.append(len(d)) or real_lens(b, d, k)
    )
    features = random.Random(3).sample(range(int(sae.cfg.d_sae)), 12)
    first = labels.lens_labels(bridge, sae, features)
    again = labels.lens_labels(bridge, sae, [*features[:5], features[0]])
    assert lenses == [12] and again == {f: first[f] for f in features[:5]}
    more = labels.lens_labels(bridge, sae, [*features, 0, 1])  # only the new ones run
    new = {0, 1} - set(features)
    assert lenses == ([12, len(new)] if new else [12]) and set(more) == {*features, 0, 1}

    unembed = bridge.original_model.get_output_embeddings().weight
    draw = random.Random(4)
    token = draw.randrange(len(bridge.tokenizer))
    while not bridge.tokenizer.decode([token]).strip():
        token = draw.randrange(len(bridge.tokenizer))
    with torch.no_grad():  # plant: the feature's direction is the token's unembedding row
        sae.W_dec[features[0]] = unembed[token] / unembed[token].norm()
    planted = labels.lens_labels(bridge, sae, features[:1])
    assert planted[features[0]].split(" · ")[0] == bridge.tokenizer.decode([token]).strip()
    assert planted != {features[0]: more[features[0]]}
    runs = len(lenses)
    with torch.no_grad():
        unembed[token] *= 1.0  # an in-place write, even one that changes nothing
    labels.lens_labels(bridge, sae, features[:3])
    assert len(lenses) == runs + 1
    labels.lens_labels(load_model("tiny-gpt2"), sae, features[:3])  # another model object
    assert len(lenses) == runs + 2


def test_with_dashboards_shows_base_beside_checkpoint(planted_pt, planted_feature):
    from aquin_nb.cards import card_spec, render_html

    diff = aquin_nb.sae_diff("tiny-gpt2", planted_pt, progress=False)
    shown = diff.with_dashboards(corpus=CORPUS, k=3, progress=False)
    board = shown.dashboards[planted_feature]
    assert board["checkpoint"]["density"] > board["base"]["density"]
    assert shown.features["label"].notna().all()  # every feature labelled
    spec = card_spec(shown)
    assert str(planted_feature) in spec["dashboards"]
    assert any(line.startswith("gained: ") for line in spec["headline"])
    assert f'data-dashboard="{planted_feature}"' in render_html(shown)


def _sae_with_neuronpedia(tiny_sae, name="tiny-gpt2/2-res-test"):
    import copy

    sae = copy.deepcopy(tiny_sae)
    sae.cfg.metadata.neuronpedia_id = name
    return sae


def test_imported_explanations_label_the_card(copy_pt, tiny_sae, tmp_path):
    from aquin_nb.cards import render_html

    sae = _sae_with_neuronpedia(tiny_sae)
    rows = [
        {
            "modelId": "tiny-gpt2",
            "layer": "2-res-test",
            "index": str(f),
            "description": f"topic {f}",
        }
        for f in range(1536)
    ]
    export = tmp_path / "explanations.jsonl"
    export.write_text("\n".join(json.dumps(row) for row in rows))
    assert import_explanations(export, sae) == 1536
    diff = aquin_nb.sae_diff("tiny-gpt2", copy_pt, sae=sae, progress=False)
    top = diff.top(3)
    assert top["label"].tolist() == [f"topic {f}" for f in top["feature"]]
    assert "topic " in render_html(diff)


def test_feature_urls_equal_sae_lens_for_every_catalog_entry(monkeypatch):
    from sae_lens.analysis import neuronpedia_integration
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from aquin_nb.catalog import CATALOG

    opened = []
    monkeypatch.setattr(neuronpedia_integration.webbrowser, "open", opened.append)
    directory = get_pretrained_saes_directory()
    checked = 0
    for entry in CATALOG:
        release = directory.get(entry.sae_release)
        if release is None:
            continue
        neuronpedia = release.neuronpedia_id.get(entry.sae_id_for(entry.default_layer))
        if not neuronpedia:
            continue
        fake = type("Sae", (), {})()
        fake.cfg = type(
            "Cfg", (), {"metadata": type("Meta", (), {"neuronpedia_id": neuronpedia})()}
        )()
        neuronpedia_integration.open_neuronpedia_feature_dashboard(fake, 1234)
        assert feature_url(neuronpedia, 1234) == opened[-1]
        checked += 1
    assert checked >= 3, "the catalog lists SAEs with Neuronpedia ids"


@pytest.mark.parametrize(
    "case,message",
    [
        ("empty", r"corpus .*empty\.txt is empty"),
        ("latin1", r"corpus .*latin1\.txt is not UTF-8"),
        ("k", r"k must be a positive integer, got 0"),
    ],
)
def test_bad_corpus_and_k_are_clear(case, message, tmp_path, bridge, tiny_sae):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    before = (
        set((cache_dir() / "dashboards").glob("*"))
        if (cache_dir() / "dashboards").exists()
        else set()
    )
    corpus = {"empty": tmp_path / "empty.txt", "latin1": tmp_path / "latin1.txt"}.get(case, CORPUS)
    with pytest.raises(AquinError, match=message):
        feature_dashboards(
            bridge, sae=tiny_sae, corpus=corpus, k=0 if case == "k" else 3, progress=False
        )
    after = (
        set((cache_dir() / "dashboards").glob("*"))
        if (cache_dir() / "dashboards").exists()
        else set()
    )
    assert after == before  # no partial cache entry


def test_a_feature_out_of_range_is_clear(bridge, tiny_sae):
    boards = feature_dashboards(bridge, sae=tiny_sae, corpus=CORPUS, k=2, progress=False)
    with pytest.raises(
        AquinError, match=r"feature 1536 is out of range: the SAE has 1536 features"
    ):
        boards.feature(1536)


@pytest.mark.parametrize(
    "rows,message",
    [
        ("{not json", r"line 1 is not valid JSON"),
        (json.dumps({"modelId": "x"}), r"row 1 needs string modelId, layer and description"),
        (
            json.dumps(
                {"modelId": "gpt2-small", "layer": "6-res-jb", "index": "1", "description": "d"}
            ),
            r"is for gpt2-small/6-res-jb; the SAE is tiny-gpt2/2-res-test",
        ),
        (
            json.dumps(
                {"modelId": "tiny-gpt2", "layer": "2-res-test", "index": "9999", "description": "d"}
            ),
            r"has feature 9999, but the SAE has 1536 features",
        ),
    ],
)
def test_bad_explanations_exit_2_and_change_nothing(rows, message, tmp_path, tiny_sae, capsys):
    sae = _sae_with_neuronpedia(tiny_sae)
    path = tmp_path / "explanations.jsonl"
    path.write_text(rows)
    with pytest.raises(AquinError, match=message):
        import_explanations(path, sae)
    sae_dir = tmp_path / "sae.pt"
    torch.save({"cfg": sae.cfg.to_dict(), "state_dict": sae.state_dict()}, sae_dir)
    code = main(["sae", "import-explanations", str(path), "--sae", str(sae_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("aquin-nb: error:")


def test_the_cli_prints_a_features_dashboard(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS))
    code = main(["sae", "dashboards", "--model", "tiny-gpt2", "--corpus", str(corpus), "--k", "2",
                 "--feature", "101", "-q", "--top", "3", "--output", str(tmp_path / "d.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("[dashboards] tiny-gpt2 · blocks.2.hook_resid_pre")
    assert "[feature 101]" in out and "promotes" in out
    assert (tmp_path / "d.json").is_file()
    code = main(["sae", "dashboards", "--model", "tiny-gpt2", "--corpus", str(corpus), "--k", "0"])
    assert code == 2 and "k must be a positive integer" in capsys.readouterr().err
