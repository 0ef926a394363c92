"""sae_diff end to end on the embedded zoo, with planted changes of known answer."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pandas as pd
import pytest
import torch

from aquin_nb import AquinError, SaeDiff, load_model, sae_diff
from aquin_nb.cli import main

from ..conftest import plant, self_selective_features


@pytest.fixture(scope="module")
def planted_diff(planted_pt):
    return sae_diff("tiny-gpt2", planted_pt, progress=False)


def test_planted_feature_ranks_first(planted_diff, planted_feature):
    top = planted_diff.top(3)
    assert int(top.loc[0, "feature"]) == planted_feature
    assert bool(top.loc[0, "changed"])
    assert top.loc[0, "checkpoint"] > top.loc[0, "base"]
    assert planted_diff.summary["n_changed"] >= 1


def test_a_self_selective_plant_ranks_first_by_abs_delta(tmp_path, base_state, tiny_sae):
    """About encoder selectivity itself: a feature whose encoder answers its own decoder
    direction most (about 90% of the embedded SAE's) rises most when that direction is
    planted. For the others |Δ| need not, which is why `shift` exists (next test)."""
    features = random.Random(0).sample(self_selective_features(tiny_sae), 3)
    for feature in features:
        path = tmp_path / f"planted_{feature}.pt"
        torch.save({"step": 1, "state_dict": plant(base_state, tiny_sae, feature)}, path)
        diff = sae_diff("tiny-gpt2", path, progress=False)
        assert int(diff.top(1).loc[0, "feature"]) == feature


PLANT_ALPHA = 8.0  # about 30% of the mean residual norm at blocks.2.hook_resid_pre (27.5)


def test_a_planted_direction_ranks_first_by_shift(tmp_path, base_state, tiny_sae, copy_pt):
    """20 features drawn at random from every feature that fires on the probes, none
    filtered: α·d_f (d_f the unit decoder row, centred as the SAE's numerics centre
    writing weights) added to block 1's MLP output bias moves the hook by exactly that."""
    base = load_model("tiny-gpt2")
    firing = sae_diff(base, copy_pt, fit="off", progress=False).features
    population = sorted(int(f) for f in firing.loc[firing["base_freq"] > 0, "feature"])
    drawn = random.Random(12).sample(population, 20)
    first = []
    for feature in drawn:
        direction = tiny_sae.W_dec[feature].detach().clone()
        direction -= direction.mean()
        planted = {k: v.clone() for k, v in base_state.items()}
        planted["transformer.h.1.mlp.c_proj.bias"] += PLANT_ALPHA * direction / direction.norm()
        path = tmp_path / "planted_direction.pt"
        torch.save(planted, path)
        diff = sae_diff(base, path, fit="off", progress=False)
        top = diff.top(1, by="shift")
        first.append(int(top.loc[0, "feature"]) == feature)
        assert diff.summary["shift"]["norm"] == pytest.approx(PLANT_ALPHA, rel=1e-3)
    print(f"planted direction first by shift in {sum(first)} of 20 draws")
    assert sum(first) >= 19, [f for f, ok in zip(drawn, first, strict=True) if not ok]


def test_untouched_copy_changes_nothing(copy_pt):
    diff = sae_diff("tiny-gpt2", copy_pt, progress=False)
    assert diff.summary["n_changed"] == 0
    assert diff.summary["max_abs_delta"] == 0.0
    assert (diff.features["shift"] == 0).all() and (diff.features["shift_q"] == 1).all()
    assert diff.summary["shift"]["norm"] == 0.0 and diff.summary["shift"]["directions"] == []
    fit = diff.summary["fit"]
    assert fit["base"] == fit["checkpoint"] and fit["warning"] is None


def test_summary_and_columns(planted_diff):
    s = planted_diff.summary
    for key in (
        "n_features",
        "n_changed",
        "mean_abs_delta",
        "max_abs_delta",
        "n_prompts",
        "n_tokens",
        "layer",
        "hook",
        "model",
        "checkpoint",
        "name",
        "fit",
    ):
        assert key in s
    assert s["n_features"] == 1536 and s["layer"] == 2 and s["hook"] == "blocks.2.hook_resid_pre"
    assert s["name"] == "planted" and s["model"] == "tiny-gpt2"
    assert s["n_prompts"] == 32 and s["n_tokens"] > 200
    assert 0.5 < s["fit"]["base"]["explained_variance"] <= 1.0
    frame = planted_diff.features
    assert list(frame.columns) == [
        "feature",
        "label",
        "base",
        "checkpoint",
        "delta",
        "abs_delta",
        "shift",
        "shift_q",
        "base_freq",
        "checkpoint_freq",
        "p_value",
        "q_value",
        "changed",
    ]
    assert frame["abs_delta"].is_monotonic_decreasing
    np.testing.assert_allclose(frame["delta"], frame["checkpoint"] - frame["base"])
    assert s["max_abs_delta"] == pytest.approx(frame["abs_delta"].max())
    assert s["n_changed"] == int(frame["changed"].sum())


def test_json_round_trip(planted_diff, tmp_path):
    path = planted_diff.to_json(tmp_path / "diff.json")
    again = SaeDiff.from_json(path)
    assert again.summary == planted_diff.summary
    pd.testing.assert_frame_equal(again.features, planted_diff.features)
    assert '"schema_version": 1' in path.read_text()


def test_mimebundle_has_plain_text(planted_diff):
    bundle = planted_diff._repr_mimebundle_()
    assert "features changed" in bundle["text/plain"]


def _same_diff(left: SaeDiff, right: SaeDiff) -> None:
    columns = ["feature", "base", "checkpoint", "delta"]
    np.testing.assert_allclose(
        left.features.sort_values("feature")[columns].to_numpy(),
        right.features.sort_values("feature")[columns].to_numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
    assert left.summary["n_changed"] == right.summary["n_changed"]


def test_every_checkpoint_format_gives_the_same_diff(
    tmp_path, planted_state, planted_diff, tiny_hf
):
    from safetensors.torch import save_file

    wrapped = tmp_path / "wrapped.pt"
    torch.save(
        {"step": 3, "state_dict": {"model." + k: v for k, v in planted_state.items()}}, wrapped
    )
    bare = tmp_path / "bare.pt"
    torch.save({"_orig_mod." + k: v for k, v in planted_state.items()}, bare)
    tensors = tmp_path / "weights.safetensors"
    save_file(
        {k: v.clone().contiguous() for k, v in planted_state.items() if k != "lm_head.weight"},
        tensors,
    )
    pretrained = tmp_path / "pretrained"
    model, tokenizer = tiny_hf
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(planted_state)
    clone.save_pretrained(pretrained)
    for checkpoint in (wrapped, bare, tensors, pretrained):
        _same_diff(sae_diff("tiny-gpt2", checkpoint, progress=False), planted_diff)


def test_peft_adapter_directory_is_merged_on_load(tmp_path, tiny_hf):
    import copy

    from peft import LoraConfig, get_peft_model

    model, _ = tiny_hf
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, target_modules=["c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )  # random B, so the adapter changes something
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    torch.save({"step": 1, "state_dict": merged.state_dict()}, tmp_path / "merged.pt")
    from_adapter = sae_diff("tiny-gpt2", tmp_path / "adapter", progress=False)
    from_merged = sae_diff("tiny-gpt2", tmp_path / "merged.pt", progress=False)
    _same_diff(from_adapter, from_merged)
    assert from_adapter.summary["max_abs_delta"] > 0


def test_loaded_bridges_and_models_are_accepted(planted_state, planted_diff, tiny_hf):
    import copy

    from aquin_nb import load_model

    model, _ = tiny_hf
    finetuned = copy.deepcopy(model)
    finetuned.load_state_dict(planted_state)
    diff = sae_diff(load_model("tiny-gpt2"), finetuned, progress=False)
    _same_diff(diff, planted_diff)


def test_long_prompt_is_truncated_with_a_warning(copy_pt, caplog):
    long_prompt = "Return the list of items. " * 200
    diff = sae_diff("tiny-gpt2", copy_pt, prompts=[long_prompt, "Close the file."], progress=False)
    assert "truncated" in caplog.text
    assert diff.summary["n_tokens"] == 127 + 4 or diff.summary["n_tokens"] > 127


def test_layer_out_of_range(copy_pt):
    with pytest.raises(
        AquinError, match=r"layer 9 is out of range: tiny-gpt2 has 4 layers \(0-3\)"
    ):
        sae_diff("tiny-gpt2", copy_pt, layer=9, progress=False)


def test_fit_warning_when_the_checkpoint_leaves_the_dictionary(tmp_path, base_state):
    torch.manual_seed(0)
    scrambled = {k: v.clone() for k, v in base_state.items()}
    scrambled["transformer.h.1.mlp.c_proj.bias"] += 4.0 * torch.randn(192)
    path = tmp_path / "scrambled.pt"
    torch.save(scrambled, path)
    diff = sae_diff("tiny-gpt2", path, progress=False)
    fit = diff.summary["fit"]
    assert fit["checkpoint"]["explained_variance"] < fit["base"]["explained_variance"] - 0.1
    assert "no longer fit" in fit["warning"]


# ------------------------------------------------------------- the CLI: aquin-nb sae diff


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sae_diff_prints_and_writes_json(capsys, tmp_path, planted_pt, planted_feature):
    output = tmp_path / "out" / "diff.json"
    code, out, err = run_cli(
        capsys,
        "sae",
        "diff",
        "--model",
        "tiny-gpt2",
        "--checkpoint",
        str(planted_pt),
        "--output",
        str(output),
        "-q",
        "--top",
        "5",
    )
    assert code == 0, err
    assert "nChanged=" in out and "feature" in out
    payload = json.loads(output.read_text())
    assert payload["schema_version"] == 1
    assert payload["features"]["feature"][0] == planted_feature


def test_html_flag_writes_the_card(capsys, tmp_path, copy_pt):
    page = tmp_path / "card.html"
    code, out, err = run_cli(
        capsys,
        "sae",
        "diff",
        "--model",
        "tiny-gpt2",
        "--checkpoint",
        str(copy_pt),
        "--html",
        str(page),
        "-q",
    )
    assert code == 0, err
    html = page.read_text()
    assert html.startswith("<!doctype html>") and 'data-kind="sae_diff"' in html
    assert "<th>p_value</th>" in html


def _bad_inputs(tmp_path, copy_pt):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(copy_pt.read_bytes()[:5000])
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    other = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    other_path = tmp_path / "neox.pt"
    torch.save({"step": 1, "state_dict": other.state_dict()}, other_path)
    sae_path = tmp_path / "narrow_sae.pt"
    torch.save(
        {
            "cfg": {
                "architecture": "standard",
                "d_in": 64,
                "d_sae": 128,
                "metadata": {"hook_name": "blocks.2.hook_resid_pre"},
            },
            "state_dict": {
                "W_enc": torch.zeros(64, 128),
                "W_dec": torch.zeros(128, 64),
                "b_enc": torch.zeros(128),
                "b_dec": torch.zeros(64),
            },
        },
        sae_path,
    )
    empty = tmp_path / "empty.json"
    empty.write_text("   \n")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('"ok"\n{"instruction": \n')
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('["caf\xe9 au lait"]'.encode("latin-1"))
    good = ["--checkpoint", str(copy_pt)]
    return {
        "truncated": (["--checkpoint", str(truncated)], r"truncated\.pt: the file is truncated"),
        "architecture": (
            ["--checkpoint", str(other_path)],
            r"neox\.pt does not fit .*another architecture",
        ),
        "sae_width": (
            good + ["--sae", str(sae_path)],
            r"SAE d_in 64 does not match tiny-gpt2's d_model 192",
        ),
        "layer": (
            good + ["--layer", "7"],
            r"layer 7 is out of range: tiny-gpt2 has 4 layers \(0-3\)",
        ),
        "empty_prompts": (good + ["--prompts", str(empty)], r"empty\.json is empty"),
        "malformed_prompts": (
            good + ["--prompts", str(malformed)],
            r"malformed\.jsonl line 2 is not valid JSON",
        ),
        "non_utf8": (good + ["--prompts", str(latin1)], r"latin1\.json is not UTF-8"),
        "missing": (["--checkpoint", str(tmp_path / "nope.pt")], r"nope\.pt does not exist"),
    }


CASES = [
    "truncated",
    "architecture",
    "sae_width",
    "layer",
    "empty_prompts",
    "malformed_prompts",
    "non_utf8",
    "missing",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_no_output(capsys, tmp_path, copy_pt, case):
    flags, pattern = _bad_inputs(tmp_path, copy_pt)[case]
    output = tmp_path / "result.json"
    code, out, err = run_cli(
        capsys, "sae", "diff", "--model", "tiny-gpt2", "-q", "--output", str(output), *flags
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("aquin-nb: error: ")
    assert "Traceback" not in err
    assert re.search(pattern, err), err
    assert not output.exists()
    assert not list(tmp_path.glob(".result.json.*"))


def test_unwritable_output_is_a_clear_error(capsys, tmp_path, copy_pt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(
        capsys,
        "sae",
        "diff",
        "--model",
        "tiny-gpt2",
        "-q",
        "--checkpoint",
        str(copy_pt),
        "--output",
        str(blocker / "diff.json"),
    )
    assert code == 2 and "cannot write" in err
