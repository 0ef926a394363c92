"""The downstream fit in `sae_diff`: SAELens's own figures, and verdicts with known answers."""

from __future__ import annotations

import copy

import pytest
import torch

from aquin_nb import load_model, load_sae, sae_diff
from aquin_nb._activations import prepare_bridge, tokenize_prompts
from aquin_nb._fit import DownstreamStats, fit_verdict, side_verdict
from aquin_nb.probes import load_prompts
from aquin_nb.saes import sae_numerics


def _sae_lens_figures(bridge, sae, tokens, bos):
    """SAELens's own `get_recons_loss`, masked and averaged as its downstream metrics do."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    metrics = get_recons_loss(
        sae, bridge, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True,
        ignore_tokens=[bos],
    )  # fmt: skip
    keep = tokens != bos
    means = {}
    for name, values in metrics.items():
        mask = keep if values.shape[1] == keep.shape[1] else keep[:, :-1]
        means[name] = float(values[mask].mean())
    means["ce_loss_score"] = (means["ce_loss_with_ablation"] - means["ce_loss_with_sae"]) / (
        means["ce_loss_with_ablation"] - means["ce_loss_without_sae"]
    )
    return means


@pytest.mark.parametrize("which", ["base", "checkpoint"])
def test_downstream_figures_agree_with_sae_lens_on_the_same_tokens(which, planted_pt):
    bridge = load_model("tiny-gpt2", planted_pt if which == "checkpoint" else None)
    sae = load_sae("tiny-gpt2")
    numerics = sae_numerics(sae, None)
    prepare_bridge(bridge, numerics)
    token_lists = tokenize_prompts(
        bridge.tokenizer, load_prompts(None, bridge.tokenizer), prepend_bos=True, max_length=128
    )
    width = 12  # equal lengths: no padding, so both definitions count the same tokens
    tokens = torch.tensor([ids[:width] for ids in token_lists if len(ids) >= width][:16])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    ours = DownstreamStats()
    ours.update(bridge, sae, numerics.hook_name, tokens, mask)
    figures = ours.figures()
    theirs = _sae_lens_figures(bridge, sae, tokens, int(tokens[0, 0]))
    assert figures["ce_loss_recovered"] == pytest.approx(theirs["ce_loss_score"], abs=0.005)
    assert figures["kl_spliced"] == pytest.approx(theirs["kl_div_with_sae"], abs=0.005)
    assert figures["kl_ablated"] == pytest.approx(theirs["kl_div_with_ablation"], abs=0.005)
    assert figures["ce_clean"] == pytest.approx(theirs["ce_loss_without_sae"], abs=0.005)
    assert figures["ce_spliced"] == pytest.approx(theirs["ce_loss_with_sae"], abs=0.005)


def test_the_embedded_sae_passes_on_the_base_and_a_copy(copy_pt):
    diff = sae_diff("tiny-gpt2", copy_pt, progress=False)
    fit = diff.summary["fit"]
    assert fit["verdict"] == "pass" and fit["mode"] == "fast" and fit["n_prompts_downstream"] == 8
    assert fit["base"]["ce_loss_recovered"] > 0.9 and fit["base"] == fit["checkpoint"]
    assert diff.summary["fit"]["warning"] is None


def _shuffled(sae, seed=0):
    wrong = copy.deepcopy(sae)
    order = torch.randperm(wrong.W_dec.shape[0], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        wrong.W_dec.copy_(wrong.W_dec[order])
    return wrong


def _another_layers(sae):
    wrong = copy.deepcopy(sae)
    wrong.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"  # a dictionary read elsewhere
    return wrong


@pytest.mark.parametrize("make_wrong", [_shuffled, _another_layers], ids=["shuffled", "layer0"])
def test_a_wrong_dictionary_fails_and_names_the_remedy(make_wrong, copy_pt, tiny_sae, capsys):
    diff = sae_diff("tiny-gpt2", copy_pt, sae=make_wrong(tiny_sae), progress=False)
    fit = diff.summary["fit"]
    assert fit["verdict"] == "fail", fit
    assert "aquin-nb sae train" in fit["warning"]
    chips = diff.to_dict()["summary"]["fit"]
    assert chips["verdict"] == "fail"


def test_fit_off_and_full_and_a_bad_mode(copy_pt):
    off = sae_diff("tiny-gpt2", copy_pt, fit="off", progress=False).summary["fit"]
    assert off["base"]["ce_loss_recovered"] is None and off["n_prompts_downstream"] == 0
    assert off["verdict"] == "pass"  # explained variance alone still judges
    full = sae_diff("tiny-gpt2", copy_pt, fit="full", progress=False).summary
    assert full["fit"]["n_prompts_downstream"] == full["n_prompts"]
    with pytest.raises(Exception, match="fit must be one of fast, full, off"):
        sae_diff("tiny-gpt2", copy_pt, fit="quick", progress=False)


@pytest.mark.parametrize(
    "explained_variance,recovered,verdict",
    [
        (-15.0, 0.25, "fail"),  # Gemma v1 2B, base SAE on the chat model (Kissane et al.)
        (-0.17, None, "fail"),  # the 135M Llama-architecture case: EV alone
        (0.8, 0.976, "pass"),  # Qwen-0.5B transfer
        (0.8, 0.989, "pass"),  # Mistral-7B transfer
        (0.8, 0.85, "warn"),
        (0.3, 0.99, "warn"),
        (0.8, 0.69, "fail"),
    ],
)
def test_verdict_thresholds(explained_variance, recovered, verdict):
    side = {"explained_variance": explained_variance, "ce_loss_recovered": recovered}
    assert side_verdict(side)[0] == verdict
    assert fit_verdict(side, side)[0] == verdict


def test_a_checkpoint_that_fits_clearly_worse_than_the_base_warns():
    base = {"explained_variance": 0.9, "ce_loss_recovered": 0.99}
    worse = {"explained_variance": 0.85, "ce_loss_recovered": 0.92}
    verdict, reasons = fit_verdict(base, worse)
    assert verdict == "warn" and "recovers 0.070 less CE loss" in reasons[0]


def test_the_cli_prints_one_warning_line_naming_the_remedy_on_fail(
    copy_pt, tiny_sae, tmp_path, capsys
):
    from aquin_nb.cli import main

    wrong = _shuffled(tiny_sae)
    path = tmp_path / "shuffled_sae.pt"
    torch.save({"cfg": wrong.cfg.to_dict(), "state_dict": wrong.state_dict()}, path)
    code = main(["sae", "diff", "--model", "tiny-gpt2", "--checkpoint", str(copy_pt),
                 "--sae", str(path), "-q", "--top", "3"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aquin-nb: warning: the SAE does not fit")
    assert "aquin-nb sae train --model tiny-gpt2 --layer 2" in lines[0]
    assert captured.out.splitlines()[2].lstrip().startswith("fit fail · CE recovered")
