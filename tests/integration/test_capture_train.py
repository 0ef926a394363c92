"""capture_activations and sae_train on the embedded zoo: known answers and the acceptance facts."""

from __future__ import annotations

import json

import pytest
import torch

from aquin_nb import AquinError, Capture, capture_activations, load_model, sae_align, sae_train
from aquin_nb._activations import prepare_bridge, residual, token_batches, tokenize_prompts
from aquin_nb.probes import load_prompts
from aquin_nb.saes import sae_numerics


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    from aquin_nb.demo.finetune import finetune_lora

    return finetune_lora(
        "tiny-gpt2", run_dir=tmp_path_factory.mktemp("ft"), steps=60, progress=False
    )


def test_capture_writes_manifest_and_the_right_activations(tmp_path, tiny_sae):
    capture = capture_activations(
        "tiny-gpt2",
        output=tmp_path / "all",
        layers="1,2",
        encode_sae=True,
        sae_layer=2,
        progress=False,
    )
    s = capture.summary
    assert s["layers"] == [1, 2] and s["position"] == "all" and s["n_prompts"] == 32
    assert s["hooks"] == {"1": "blocks.1.hook_resid_pre", "2": "blocks.2.hook_resid_pre"}
    reopened = Capture.open(tmp_path / "all")
    assert reopened.summary == json.loads((tmp_path / "all" / "manifest.json").read_text())

    bridge = load_model("tiny-gpt2")
    prepare_bridge(bridge, sae_numerics(tiny_sae))
    prompts = load_prompts(None)
    tokens = tokenize_prompts(bridge.tokenizer, prompts, prepend_bos=True, max_length=128)
    expected = torch.cat(
        [
            residual(bridge, b.tokens, "blocks.2.hook_resid_pre")[b.mask]
            for b in token_batches(tokens, batch_size=16, skip_first=True)
        ]
    )
    torch.testing.assert_close(capture.load_layer(2), expected)

    features = torch.load(tmp_path / "all" / "sae" / "sae_layer_2.pt", weights_only=True)
    dense = torch.zeros(tuple(features["shape"].tolist()))
    dense[features["indices"][:, 0], features["indices"][:, 1]] = features["values"]
    torch.testing.assert_close(dense, tiny_sae.encode(expected).detach(), atol=1e-5, rtol=1e-5)

    last = capture_activations(
        "tiny-gpt2", output=tmp_path / "last", layers=[2], position="last", progress=False
    )
    first_prompt = residual(bridge, torch.tensor([tokens[0]]), "blocks.2.hook_resid_pre")[0, -1]
    torch.testing.assert_close(last.load_layer(2)[0], first_prompt)
    mean = capture_activations(
        "tiny-gpt2", output=tmp_path / "mean", layers=[2], position="mean", count=5, progress=False
    )
    assert mean.load_layer(2).shape == (5, 192)


def test_capture_refuses_a_non_empty_directory_and_bad_layers(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(AquinError, match="not empty.*overwrite"):
        capture_activations("tiny-gpt2", output=tmp_path / "out", layers=[1], progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    with pytest.raises(AquinError, match=r"layer 4 is out of range: tiny-gpt2 has 4 layers"):
        capture_activations("tiny-gpt2", output=tmp_path / "x", layers="1,4", progress=False)
    assert not (tmp_path / "x").exists()


def test_warm_started_sae_beats_the_public_one_on_checkpoint_activations(tmp_path, finetuned):
    trained = sae_train(
        "tiny-gpt2", 2, checkpoint=finetuned, quick=True, output=tmp_path / "warm", progress=False
    )
    metrics = trained.summary["metrics"]
    print(
        f"checkpoint activations: temporary EV {metrics['trained']['explained_variance']:.4f}, "
        f"public EV {metrics['public']['explained_variance']:.4f}"
    )
    assert metrics["trained"]["explained_variance"] > metrics["public"]["explained_variance"]
    assert len(trained.features) == 1536 and trained.features["rotation"].is_monotonic_decreasing
    assert len(trained.loss_curve) == trained.summary["steps"]
    assert (tmp_path / "warm" / "sae_layer2.pt").is_file()
    assert (tmp_path / "warm" / "sae_layer2" / "cfg.json").is_file()
    assert trained.load().cfg.d_sae == 1536


def test_scratch_sae_on_base_activations_aligns_to_the_public_one(tmp_path, tiny_sae):
    trained = sae_train(
        "tiny-gpt2",
        2,
        init_from="scratch",
        d_sae=384,
        steps=400,
        batch_size=1024,
        output=tmp_path / "scratch",
        progress=False,
    )
    align = sae_align(trained.summary["path"], tiny_sae, progress=False)
    s = align.summary
    print(
        f"scratch vs public: mean cosine {s['mean_cosine']:.3f}, "
        f"unrelated baseline {s['baseline_mean_cosine']:.3f}"
    )
    assert s["mean_cosine"] > s["baseline_mean_cosine"] + 0.25
    assert len(trained.features) == 0


def test_corpus_activations_are_cached_for_the_next_run(tmp_path, monkeypatch):
    sae_train("tiny-gpt2", 2, steps=3, batch_size=256, tokens=None, output=tmp_path, progress=False)
    assert list((tmp_path / "_acts_layer2_ctx128").glob("chunk_*.pt"))

    def no_model(*args, **kwargs):
        raise AssertionError("the cached activations should have been reused")

    monkeypatch.setattr("aquin_nb.models.load_model", no_model)
    again = sae_train("tiny-gpt2", 2, steps=3, batch_size=256, output=tmp_path, progress=False)
    assert again.summary["steps"] == 3


def test_interrupted_training_still_leaves_a_usable_sae(tmp_path, monkeypatch):
    from aquin_nb import _train_data

    calls = {"n": 0}
    original = _train_data.Batches.__next__

    def interrupt_after_five(self):
        calls["n"] += 1
        if calls["n"] > 5 + 10:  # 10 batches go to the norm estimate (not for a warm start)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(_train_data.Batches, "__next__", interrupt_after_five)
    trained = sae_train("tiny-gpt2", 2, steps=50, batch_size=256, output=tmp_path, progress=False)
    assert trained.summary["interrupted"] is True
    assert 0 < trained.summary["steps"] < 50
    assert trained.load().cfg.d_sae == 1536


def test_training_from_a_capture_directory(tmp_path):
    capture_activations("tiny-gpt2", output=tmp_path / "cap", layers=[2], progress=False)
    trained = sae_train(
        "tiny-gpt2",
        2,
        activations=tmp_path / "cap",
        steps=5,
        batch_size=128,
        output=tmp_path / "out",
        progress=False,
    )
    assert trained.summary["data"] == str(tmp_path / "cap")


def test_bad_training_inputs_are_refused_and_write_nothing(tmp_path):
    with pytest.raises(AquinError, match=r"layer 6 is out of range: tiny-gpt2 has 4 layers"):
        sae_train("tiny-gpt2", 6, output=tmp_path / "a", progress=False)
    with pytest.raises(AquinError, match="d_sae must be a positive integer, got 0"):
        sae_train(
            "tiny-gpt2", 2, d_sae=0, init_from="scratch", output=tmp_path / "b", progress=False
        )
    bad = tmp_path / "bad_manifest"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(AquinError, match="manifest.json is not a valid manifest"):
        sae_train("tiny-gpt2", 2, activations=bad, output=tmp_path / "c", progress=False)
    wrong = tmp_path / "wrong_width"
    capture_activations("tiny-gpt2", output=wrong, layers=[2], position="last", progress=False)
    torch.save({"activations": torch.zeros(10, 64)}, wrong / "layers" / "layer_2.pt")
    with pytest.raises(
        AquinError, match=r"layer_2\.pt has shape \(10, 64\), expected \(rows, 192\)"
    ):
        sae_train("tiny-gpt2", 2, activations=wrong, output=tmp_path / "d", progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(AquinError, match="cannot write to output"):
        sae_train("tiny-gpt2", 2, output=blocker / "sub", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    for name in "cd":
        assert not [path for path in (tmp_path / name).rglob("*") if path.is_file()]
