"""Corpus passes on a model with an 8,192-token context use windows of the training default.

Packing the shipped corpus into the model's full context made ``sae_train`` on a
real 135M Llama-architecture model ask for 77 GB (issue 14): eager attention
holds batch x heads x context² scores. This model is tiny otherwise, so the
scores are what would dominate its memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aquin_nb import AquinError, capture_activations, sae_train
from aquin_nb._architectures import DEFAULT_CONTEXT_SIZE
from aquin_nb.cli import main
from tests.tiny_models import build_tiny_model

LONG = 8192
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    return build_tiny_model(
        "llama", tmp_path_factory.mktemp("long") / "long-llama", max_positions=LONG
    )


def _record_widths(monkeypatch, module: str) -> list[int]:
    """The width of every token batch the named module builds."""
    import importlib

    from aquin_nb import _activations

    widths: list[int] = []
    original = _activations.token_batches

    def recording(token_lists, **kwargs):
        for batch in original(token_lists, **kwargs):
            widths.append(int(batch.tokens.shape[1]))
            yield batch

    monkeypatch.setattr(importlib.import_module(module), "token_batches", recording)
    return widths


def test_sae_train_packs_the_corpus_into_default_windows(long_model, tmp_path, monkeypatch):
    widths = _record_widths(monkeypatch, "aquin_nb._train_data")
    trained = sae_train(
        long_model,
        1,
        init_from="scratch",
        d_sae=128,
        steps=5,
        batch_size=1024,
        output=tmp_path / "sae",
        progress=False,
    )
    assert widths and set(widths) == {DEFAULT_CONTEXT_SIZE}
    assert trained.summary["context_size"] == DEFAULT_CONTEXT_SIZE
    assert trained.load().cfg.metadata.context_size == DEFAULT_CONTEXT_SIZE
    assert (tmp_path / "sae" / f"_acts_layer1_ctx{DEFAULT_CONTEXT_SIZE}").is_dir()


def test_capture_records_and_applies_its_context_size(long_model, tmp_path, monkeypatch):
    widths = _record_widths(monkeypatch, "aquin_nb.capture")
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 400)  # ~3,600 tokens
    default = capture_activations(
        long_model,
        prompts=[long_prompt, "short"],
        output=tmp_path / "a",
        layers=[1],
        progress=False,
    )
    assert default.summary["context_size"] == DEFAULT_CONTEXT_SIZE
    assert max(widths) == DEFAULT_CONTEXT_SIZE
    chosen = capture_activations(
        long_model,
        prompts=[long_prompt, "short"],
        output=tmp_path / "b",
        layers=[1],
        context_size=2048,
        progress=False,
    )
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["context_size"] == chosen.summary["context_size"] == 2048
    assert max(widths) == 2048
    shard = torch.load(tmp_path / "b" / "layers" / "layer_1.pt", weights_only=True)
    assert int((shard["prompt_index"] == 0).sum()) == 2048 - 1  # BOS is not a row


def test_a_context_above_the_models_maximum_is_refused(long_model, tmp_path, capsys):
    with pytest.raises(
        AquinError, match=r"context_size 9000 is above long-llama's maximum context of 8192"
    ):
        capture_activations(
            long_model,
            prompts=["a b c"],
            output=tmp_path / "cap",
            context_size=9000,
            progress=False,
        )
    assert not (tmp_path / "cap").exists()
    code = main(
        [
            "sae",
            "train",
            "--model",
            str(long_model),
            "--layer",
            "1",
            "--init-from",
            "scratch",
            "--context-size",
            "9000",
            "--out-dir",
            str(tmp_path / "sae"),
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "context_size 9000 is above long-llama's maximum context of 8192 tokens" in err
    assert not (tmp_path / "sae").exists()


PEAK = r"""
import resource, sys
import aquin_nb.train
def train(output, **kwargs):
    aquin_nb.train.sae_train(sys.argv[1], 1, init_from="scratch", d_sae=128, steps=2,
                             batch_size=4096, output=output, progress=False, **kwargs)
train(sys.argv[2] + "-warm", context_size=64)  # lazy imports and allocators paid for first
def status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))
before = status_kb("VmRSS:")
try:  # reset the high-water mark so the warm-up's own peak does not count
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    peak_of = lambda: status_kb("VmHWM:")
except OSError:
    peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train(sys.argv[2], **({"context_size": int(sys.argv[3])} if len(sys.argv) > 3 else {}))
print((peak_of() - before) / 1024)
"""


def test_peak_memory_of_a_corpus_pass_stays_bounded(long_model, tmp_path):
    """The pass over the shipped corpus adds little to the process's resident memory.

    Measured: the peak RSS during ``sae_train`` above the RSS just before it. At the
    model's own 8,192-token windows the attention scores alone would be rows x 4
    heads x 8,192² floats, 1 GB per row (32 rows per batch before issue 14; about
    2.4 GB of growth even at one row per batch, measured with context_size=8192).
    """
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(long_model), str(tmp_path / "sae")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    growth_mb = float(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth of sae_train's corpus pass at an 8,192-token model: {growth_mb:.0f} MB")
    assert growth_mb < 600  # measured: about 200 MB (100 MB at 128 tokens, 2,400 MB at 8,192)
    assert (
        torch.load(
            next((tmp_path / "sae").glob("_acts_layer1_ctx*/chunk_00000.pt")), weights_only=True
        )["activations"].shape[1]
        == 64
    )


def test_training_from_a_capture_keeps_the_captures_context(long_model, tmp_path):
    capture_activations(
        long_model, output=tmp_path / "cap", layers=[1], context_size=256, progress=False
    )
    trained = sae_train(
        long_model,
        1,
        activations=tmp_path / "cap",
        init_from="scratch",
        d_sae=64,
        steps=3,
        batch_size=64,
        output=tmp_path / "sae",
        progress=False,
    )
    assert trained.load().cfg.metadata.context_size == trained.summary["context_size"] == 256
    with pytest.raises(AquinError, match=r"context_size 512 does not match the capture in .*256"):
        sae_train(
            long_model,
            1,
            activations=tmp_path / "cap",
            init_from="scratch",
            context_size=512,
            output=tmp_path / "other",
            progress=False,
        )
    assert not (tmp_path / "other").exists()
