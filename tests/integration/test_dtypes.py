"""``dtype=`` on every verb that runs a model: bfloat16 and float16 give float32's answers
to within their precision, and a dtype or device the machine cannot run is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aquin_nb
from aquin_nb import (
    AquinError,
    capture_activations,
    feature_dashboards,
    model_diff,
    sae_diff,
    sae_train,
    sae_trajectory,
)


@pytest.fixture(scope="module")
def float32_diff(planted_pt):
    return sae_diff("tiny-gpt2", planted_pt, fit="off", progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sae_diff_in_half_precision_finds_the_plant(
    planted_pt, planted_feature, float32_diff, dtype
):
    diff = sae_diff("tiny-gpt2", planted_pt, fit="off", dtype=dtype, progress=False)
    assert int(diff.top(1)["feature"][0]) == planted_feature
    half = diff.features.set_index("feature").sort_index()["delta"].to_numpy()
    full = float32_diff.features.set_index("feature").sort_index()["delta"].to_numpy()
    assert np.corrcoef(half, full)[0, 1] > 0.98
    assert abs(diff.summary["n_changed"] - float32_diff.summary["n_changed"]) <= max(
        5, 0.1 * float32_diff.summary["n_changed"]
    )


def test_a_half_precision_sae_finds_the_plant(planted_pt, planted_feature, float32_diff):
    """A bfloat16 SAE on the CPU: its features are kept sparse for the statistics and
    decoded dense (torch has no sparse bfloat16 product there)."""
    sae = aquin_nb.load_sae("tiny-gpt2").to(torch.bfloat16)
    diff = sae_diff("tiny-gpt2", planted_pt, sae=sae, fit="off", progress=False)
    assert int(diff.top(1)["feature"][0]) == planted_feature
    ours = diff.features.set_index("feature").sort_index()["delta"].to_numpy()
    full = float32_diff.features.set_index("feature").sort_index()["delta"].to_numpy()
    assert np.corrcoef(ours, full)[0, 1] > 0.98
    assert 0 < diff.summary["fit"]["base"]["explained_variance"] <= 1


def test_a_half_precision_adapter_switch_matches_its_merged_copy(tmp_path, tiny_hf):
    """The adapter is switched on one bfloat16 model (merged deltas rounded to bfloat16)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                        init_lora_weights=False)  # fmt: skip
    peft_model = get_peft_model(copy.deepcopy(tiny_hf[0]), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    torch.save(peft_model.merge_and_unload().state_dict(), tmp_path / "merged.pt")
    switched = sae_diff("tiny-gpt2", tmp_path / "adapter", fit="off", dtype="bf16", progress=False)
    merged = sae_diff("tiny-gpt2", tmp_path / "merged.pt", fit="off", dtype="bf16", progress=False)
    left = switched.features.set_index("feature").sort_index()["delta"].to_numpy()
    right = merged.features.set_index("feature").sort_index()["delta"].to_numpy()
    assert np.abs(right).max() > 1e-2
    assert np.corrcoef(left, right)[0, 1] > 0.98


def test_model_diff_capture_and_dashboards_run_in_bfloat16(planted_pt, tmp_path):
    md = model_diff("tiny-gpt2", planted_pt, dtype="bfloat16", progress=False)
    full = model_diff("tiny-gpt2", planted_pt, progress=False)
    assert md.summary["suggested_layer"] == full.summary["suggested_layer"]
    assert md.modules.iloc[0]["module"] == full.modules.iloc[0]["module"]

    capture = capture_activations(
        "tiny-gpt2", output=tmp_path / "acts", layers="2", count=4, dtype="bf16", progress=False
    )
    reference = capture_activations(
        "tiny-gpt2", output=tmp_path / "ref", layers="2", count=4, progress=False
    )
    assert capture.summary["model_dtype"] == "bfloat16"
    assert reference.summary["model_dtype"] == "float32"
    half = torch.load(tmp_path / "acts" / "layers" / "layer_2.pt", weights_only=True)
    full32 = torch.load(tmp_path / "ref" / "layers" / "layer_2.pt", weights_only=True)
    assert half["activations"].dtype == torch.float32  # written as float32 either way
    scale = full32["activations"].abs().max()
    assert (half["activations"] - full32["activations"]).abs().max() < 0.05 * scale

    corpus = ["def f(x):\n    return x", "Close the file.", "Read the list of items."]
    boards = feature_dashboards("tiny-gpt2", corpus=corpus, dtype="bf16", progress=False)
    reference_boards = feature_dashboards("tiny-gpt2", corpus=corpus, progress=False)
    half_max = boards.features.sort_values("feature")["max_activation"].to_numpy()
    full_max = reference_boards.features.sort_values("feature")["max_activation"].to_numpy()
    assert full_max.max() > 0
    assert np.corrcoef(half_max, full_max)[0, 1] > 0.98
    strongest = int(np.argmax(full_max))
    assert len(boards.feature(strongest)["base"]["contexts"]) > 0


def test_trajectory_and_training_run_in_bfloat16(planted_pt, planted_feature, tmp_path):
    trajectory = sae_trajectory(
        "tiny-gpt2", {5: planted_pt}, fit="off", dtype="bfloat16", progress=False
    )
    assert trajectory.top(1) == [planted_feature]
    trained = sae_train(
        "tiny-gpt2", 2, steps=5, batch_size=64, output=tmp_path / "sae", dtype="bfloat16",
        progress=False,
    )  # fmt: skip
    assert trained.summary["steps"] == 5
    assert [p.name for p in (tmp_path / "sae").glob("_acts_*")] == ["_acts_layer2_ctx128_bfloat16"]


def test_a_loaded_model_is_not_silently_converted():
    bridge = aquin_nb.load_model("tiny-gpt2", device="cpu")
    with pytest.raises(AquinError, match=r"loaded in float32, but dtype bfloat16 was asked for"):
        sae_diff(bridge, bridge, dtype="bf16", progress=False)


def test_load_model_runs_in_the_asked_dtype():
    bridge = aquin_nb.load_model("tiny-gpt2", device="cpu", dtype="bf16")
    assert next(bridge.original_model.parameters()).dtype == torch.bfloat16


def test_a_dtype_the_device_cannot_run_is_refused(monkeypatch, copy_pt):
    from aquin_nb import _dtypes

    monkeypatch.setattr(_dtypes, "_probe", lambda device, dtype: "no float16 kernels")
    with pytest.raises(AquinError, match=r"device cpu cannot run dtype float16 \(no float16"):
        sae_diff("tiny-gpt2", copy_pt, dtype="float16", device="cpu", progress=False)
    with pytest.raises(AquinError, match=r"unknown dtype 'float64'"):
        model_diff("tiny-gpt2", copy_pt, dtype="float64", progress=False)
