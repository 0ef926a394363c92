"""DESIGN.md decision 2: activations are produced the way the SAE was trained on them."""

from __future__ import annotations

import pytest
import torch

from aquin_nb import AquinError, load_model
from aquin_nb._activations import (
    prepare_bridge,
    read_hook_plan,
    residual,
    token_batches,
    tokenize_prompts,
)
from aquin_nb.saes import SaeNumerics, sae_numerics


def test_embedded_sae_records_its_numerics(tiny_sae):
    numerics = sae_numerics(tiny_sae)
    assert numerics.hook_name == "blocks.2.hook_resid_pre" and numerics.layer == 2
    assert numerics.prepend_bos is True and numerics.context_size == 128
    assert numerics.processing["center_writing_weights"] is True
    assert numerics.processing["fold_ln"] is False


def test_registry_style_metadata_turns_processing_on():
    class Meta:
        hook_name = "blocks.6.hook_resid_pre"
        prepend_bos = True
        context_size = 128
        model_from_pretrained_kwargs = {"center_writing_weights": True}

    class Cfg:
        metadata = Meta()

    class Fake:
        cfg = Cfg()

    numerics = sae_numerics(Fake())
    assert numerics.needs_processing and numerics.processing["center_writing_weights"]


def test_centred_writing_weights_centre_the_residual_stream(tiny_sae):
    bridge = load_model("tiny-gpt2")
    prepare_bridge(bridge, sae_numerics(tiny_sae))
    tokens = torch.tensor([[0, 5, 9, 200, 31]])
    x = residual(bridge, tokens, "blocks.2.hook_resid_pre")
    assert x.mean(-1).abs().max() < 1e-4


def test_a_bridge_prepared_for_other_numerics_is_refused(tiny_sae):
    bridge = load_model("tiny-gpt2")
    numerics = sae_numerics(tiny_sae)
    prepare_bridge(
        bridge,
        SaeNumerics(numerics.hook_name, 2, True, 128, {key: False for key in numerics.processing}),
    )
    with pytest.raises(AquinError, match="already prepared"):
        prepare_bridge(bridge, numerics)


def test_truncated_forward_reads_the_same_activations_as_the_hook_itself():
    bridge = load_model("tiny-gpt2")
    tokens = torch.tensor([[0, 17, 42, 99, 7, 3]])
    read_name, stop_at = read_hook_plan("blocks.2.hook_resid_pre")
    assert (read_name, stop_at) == ("blocks.1.hook_resid_post", 2)
    _, cache = bridge.run_with_cache(tokens, names_filter=["blocks.2.hook_resid_pre"])
    torch.testing.assert_close(
        residual(bridge, tokens, "blocks.2.hook_resid_pre"), cache["blocks.2.hook_resid_pre"]
    )
    torch.testing.assert_close(
        residual(bridge, tokens, "blocks.0.hook_resid_pre"),
        bridge.run_with_cache(tokens)[1]["blocks.0.hook_resid_pre"],
    )


def test_read_hooks_equals_run_with_cache_and_leaves_no_hook_behind():
    """Several hook points in one stopped forward (capture's read), aliases included,
    unprocessed and in compatibility mode: the tensors TransformerLens caches."""
    from aquin_nb._activations import read_hooks

    bridge = load_model("tiny-gpt2")
    tokens = torch.tensor([[0, 17, 42, 99, 7, 3], [0, 5, 6, 7, 8, 9]])
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
    for processed in (False, True):
        if processed:
            bridge.enable_compatibility_mode(disable_warnings=True)
        ours = read_hooks(bridge, tokens, names)
        _, cache = bridge.run_with_cache(tokens, names_filter=names)
        assert sorted(ours) == sorted(names)
        for name in names:
            torch.testing.assert_close(ours[name], cache[name], rtol=0, atol=0)
        points = [bridge.hook_dict[name] for name in names]
        assert not any(point.fwd_hooks for point in points)  # ours were removed
    with pytest.raises(AquinError, match="no activations at blocks.9.hook_resid_post"):
        read_hooks(bridge, tokens, ["blocks.9.hook_resid_post"])


def test_bos_is_prepended_and_excluded_from_statistics(tiny_hf):
    _, tokenizer = tiny_hf
    [ids] = tokenize_prompts(tokenizer, ["Close the file."], prepend_bos=True, max_length=128)
    assert ids[0] == tokenizer.bos_token_id
    [batch] = token_batches([ids, ids[:3]], batch_size=2, skip_first=True)
    assert batch.mask[0].tolist() == [False] + [True] * (len(ids) - 1)
    assert batch.mask[1].sum() == 2  # padding is masked too


def test_bridge_matches_the_hooked_transformer_sae_lens_trains_on(tiny_sae, tiny_hf):
    from aquin_nb.demo.reference import hooked_tiny_gpt2

    numerics = sae_numerics(tiny_sae)
    reference = hooked_tiny_gpt2(tiny_hf[0], **numerics.processing)
    bridge = load_model("tiny-gpt2")
    prepare_bridge(bridge, numerics)
    tokens = torch.tensor([[0, 17, 42, 99, 7, 3, 250, 1000]])
    _, cache = reference.run_with_cache(tokens, names_filter=[numerics.hook_name])
    torch.testing.assert_close(
        residual(bridge, tokens, numerics.hook_name),
        cache[numerics.hook_name],
        rtol=1e-4,
        atol=1e-4,
    )
