"""Unchanged leading blocks run once for base and checkpoint (`aquin_nb._prefix`).

On every catalog architecture (4-block tiny models), the first changed block ``k``
is drawn at random, the blocks from ``k`` on get random noise, and the shared run
must give exactly the two plain forwards' activations at every hook kind of every
layer, without calling the checkpoint's first ``k`` blocks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import aquin_nb
from aquin_nb import AquinError, sae_diff
from aquin_nb._activations import residual
from aquin_nb._prefix import SharedPrefix, block_list_name, unchanged_prefix
from aquin_nb.models import load_hf_model, wrap_bridge
from tests.tiny_models import build_tiny_model

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "mistral"]
KINDS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]
N_LAYERS = 4


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_the_shared_prefix_gives_the_plain_forwards_activations(model_type, tmp_path):
    generator = torch.Generator().manual_seed(ARCHITECTURES.index(model_type))
    directory = build_tiny_model(model_type, tmp_path / model_type, n_layers=N_LAYERS)
    hf, tokenizer, _ = load_hf_model(directory)
    tuned = copy.deepcopy(hf)
    k = int(torch.randint(1, N_LAYERS, (1,), generator=generator))
    blocks = tuned.get_submodule(block_list_name(tuned))
    with torch.no_grad():
        for block in list(blocks)[k:]:
            for parameter in block.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    assert unchanged_prefix(hf, tuned) == k
    base = wrap_bridge(hf, tokenizer, "base", device="cpu")
    checkpoint = wrap_bridge(tuned, tokenizer, "checkpoint", device="cpu")
    calls = []
    for i in range(k):
        checkpoint.blocks[i].original_component.register_forward_hook(
            lambda *_, i=i: calls.append(i)
        )
    tokens = torch.randint(1, 4000, (3, 11), generator=generator)
    shared = SharedPrefix(base, checkpoint, k)
    for layer in range(N_LAYERS):
        for kind in KINDS:
            hook = f"blocks.{layer}.{kind}"
            try:
                x_base_alone = residual(base, tokens, hook)
            except AquinError:  # GPT-NeoX's parallel blocks have no hook_resid_mid
                with pytest.raises(AquinError):
                    shared.residuals(tokens, hook)
                continue
            x_base, x_checkpoint = shared.residuals(tokens, hook)
            assert torch.equal(x_base, x_base_alone), hook
            x_checkpoint_alone = residual(checkpoint, tokens, hook)
            assert torch.equal(x_checkpoint, x_checkpoint_alone), hook
            changed = not torch.equal(x_checkpoint, x_base)
            assert changed == (layer >= k and (kind != "hook_resid_pre" or layer > k)), hook
    calls.clear()
    shared.residuals(tokens, f"blocks.{N_LAYERS - 1}.hook_resid_post")
    assert calls == []  # the checkpoint's own first k blocks never ran


def test_a_changed_embedding_or_first_block_shares_nothing(tiny_hf):
    """Embeddings (tied to GPT-2's head) and block 0 share nothing; the final norm,
    which runs after every block, leaves the prefix shared."""
    model, _ = tiny_hf
    for name, expected in [
        ("transformer.wte.weight", 0),
        ("transformer.wpe.weight", 0),
        ("transformer.h.0.ln_1.bias", 0),
        ("transformer.ln_f.weight", 4),
        ("transformer.h.3.mlp.c_fc.weight", 3),
        ("transformer.h.2.attn.c_proj.bias transformer.wte.weight", 0),
        ("transformer.h.3.ln_2.weight transformer.ln_f.bias", 3),
    ]:
        tuned = copy.deepcopy(model)
        with torch.no_grad():
            for changed in name.split():
                tuned.get_parameter(changed).add_(1e-3)
        assert unchanged_prefix(model, tuned) == expected, name
    assert unchanged_prefix(model, copy.deepcopy(model)) == 4


def test_the_probe_of_what_runs_first_runs_only_when_a_tensor_outside_the_blocks_differs(
    tiny_hf, monkeypatch
):
    from aquin_nb import _prefix

    model, _ = tiny_hf
    probes = []
    probe = _prefix._parameters_before_blocks
    monkeypatch.setattr(
        _prefix, "_parameters_before_blocks", lambda *a: probes.append(1) or probe(*a)
    )
    for name, runs in [
        ("transformer.h.0.ln_1.bias transformer.wte.weight", False),  # block 0: nothing shared
        ("transformer.h.2.mlp.c_fc.weight", False),
        ("transformer.h.2.mlp.c_fc.weight transformer.ln_f.weight", True),
    ]:
        tuned = copy.deepcopy(model)
        with torch.no_grad():
            for changed in name.split():
                tuned.get_parameter(changed).add_(1e-3)
        probes.clear()
        unchanged_prefix(model, tuned)
        assert bool(probes) == runs, name


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_only_the_embeddings_count_as_before_the_blocks(model_type, tmp_path):
    from aquin_nb._prefix import _parameters_before_blocks

    hf, _, _ = load_hf_model(build_tiny_model(model_type, tmp_path / model_type))
    before = _parameters_before_blocks(hf, block_list_name(hf))
    embeddings = {
        name for name, p in hf.named_parameters()
        if any(p is q for q in hf.get_input_embeddings().parameters())
    }  # fmt: skip
    assert embeddings and embeddings <= before
    assert all("embed" in name or "wte" in name or "wpe" in name for name in before), before


def test_sae_diff_with_a_shared_prefix_equals_the_two_full_forwards(
    tmp_path, base_state, monkeypatch
):
    """Block 1 changed, block 0 shared; the SAE reads blocks.2.hook_resid_pre. From
    paths, from two loaded bridges (shared too, and again once the first diff has
    processed them) and with sharing switched off, the features are the same."""
    from aquin_nb import _diff_core
    from aquin_nb._diff_core import load_pair

    torch.manual_seed(11)
    tuned = {key: value.clone() for key, value in base_state.items()}
    for key in tuned:
        if key.startswith("transformer.h.1."):
            tuned[key] += 0.02 * torch.randn_like(tuned[key])
    path = tmp_path / "tuned.pt"
    torch.save(tuned, path)
    shared = sae_diff("tiny-gpt2", path, fit="off", progress=False)
    from_paths = load_pair("tiny-gpt2", path, None, count_shared=True)
    assert from_paths.shared_blocks == 1
    # the checkpoint's bridge takes the base bridge's BOS tokenizer (not read again)
    assert from_paths.checkpoint.tokenizer is from_paths.base.tokenizer
    loaded = (aquin_nb.load_model("tiny-gpt2"), aquin_nb.load_model("tiny-gpt2", path))
    assert load_pair(*loaded, None, count_shared=True).shared_blocks == 1
    shared_loaded = sae_diff(*loaded, fit="off", progress=False)
    # processed alike by that diff: still shared
    assert load_pair(*loaded, None, count_shared=True).shared_blocks == 1
    other = aquin_nb.load_model("tiny-gpt2")
    other.enable_compatibility_mode(disable_warnings=True)  # processed outside aquin_nb
    assert load_pair(other, loaded[1], None, count_shared=True).shared_blocks == 0
    monkeypatch.setattr(_diff_core, "loaded_prefix", lambda *_: 0)
    plain = sae_diff(
        aquin_nb.load_model("tiny-gpt2"),
        aquin_nb.load_model("tiny-gpt2", path),
        fit="off",
        progress=False,
    )
    columns = ["feature", "base", "checkpoint", "delta"]
    expected = plain.features.sort_values("feature")[columns].to_numpy()
    for diff in (shared, shared_loaded):
        np.testing.assert_array_equal(
            diff.features.sort_values("feature")[columns].to_numpy(), expected
        )
        assert diff.summary["n_changed"] == plain.summary["n_changed"] > 0


def test_a_trajectory_replays_the_base_blocks_a_checkpoint_left_unchanged(
    tmp_path, base_state, monkeypatch
):
    """Checkpoints with block 1 changed (block 0 shared), block 0 changed (nothing
    shared) and only block 3 changed (everything before the SAE's hook at
    blocks.2.hook_resid_pre shared): the trajectory replays the base's block 0 for
    the first and the last, in every batch, and its steps equal those of a
    trajectory that keeps nothing (a budget of 0 bytes) and runs every block."""
    import pandas as pd

    from aquin_nb import _prefix
    from aquin_nb.probes import load_prompts

    torch.manual_seed(13)
    paths = []
    for step, block in enumerate((1, 0, 3), start=1):  # step 3 changes block 3 only
        tuned = {key: value.clone() for key, value in base_state.items()}
        for key in tuned:
            if key.startswith(f"transformer.h.{block}."):
                tuned[key] += 0.02 * torch.randn_like(tuned[key])
        paths.append(tmp_path / f"step_{step}.pt")
        torch.save(tuned, paths[-1])
    replays: list[int] = []
    real_replaying = _prefix._replaying
    monkeypatch.setattr(
        _prefix,
        "_replaying",
        lambda bridge, k, output: replays.append(k) or real_replaying(bridge, k, output),
    )
    shared = aquin_nb.sae_trajectory("tiny-gpt2", paths, fit="off", progress=False)
    n_batches = (len(load_prompts(None)) + 15) // 16
    assert replays == [1] * (2 * n_batches)  # steps 1 and 3, never step 2
    monkeypatch.setattr(_prefix, "PREFIX_BYTES", 0)
    replays.clear()
    whole = aquin_nb.sae_trajectory("tiny-gpt2", paths, fit="off", progress=False)
    assert replays == []
    pd.testing.assert_frame_equal(shared.steps, whole.steps, rtol=1e-5, atol=1e-6)
    three = shared.steps[shared.steps["step"] == shared.steps["step"].max()]
    assert float(three["delta"].abs().max()) == 0.0  # the hook reads before block 3


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_kept_base_blocks_replay_batch_by_batch(model_type, tmp_path):
    """`KeptPrefix` on every architecture: the base's block outputs kept over two
    batches of different shapes replay, twice over, into a checkpoint sharing k
    blocks drawn at random, which then reads exactly what it reads alone, without
    running its own first k blocks; over budget, nothing is kept and nothing replays."""
    from aquin_nb._prefix import KeptPrefix

    generator = torch.Generator().manual_seed(20 + ARCHITECTURES.index(model_type))
    directory = build_tiny_model(model_type, tmp_path / model_type, n_layers=N_LAYERS)
    hf, tokenizer, _ = load_hf_model(directory)
    tuned = copy.deepcopy(hf)
    k = int(torch.randint(1, N_LAYERS, (1,), generator=generator))
    with torch.no_grad():
        for block in list(tuned.get_submodule(block_list_name(tuned)))[k:]:
            for parameter in block.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    base = wrap_bridge(hf, tokenizer, "base", device="cpu")
    checkpoint = wrap_bridge(tuned, tokenizer, "checkpoint", device="cpu")
    hook = f"blocks.{N_LAYERS - 1}.hook_resid_post"
    batches = [torch.randint(1, 4000, shape, generator=generator) for shape in ((3, 11), (2, 7))]
    kept = KeptPrefix(base, hook)
    for tokens in batches:
        with kept.keeping():
            residual(base, tokens, hook)
    assert kept.usable and len(kept.batches) == 2 and len(kept.blocks) == N_LAYERS - 1
    calls: list[int] = []
    for i in range(k):
        checkpoint.blocks[i].original_component.register_forward_hook(
            lambda *_, i=i: calls.append(i)
        )
    for _ in range(2):  # kept outputs serve every checkpoint: a replay must not alter them
        for number, tokens in enumerate(batches):
            with kept.replaying(checkpoint, k, number):
                replayed = residual(checkpoint, tokens, hook)
            assert calls == []  # the checkpoint's first k blocks never ran
            alone = residual(checkpoint, tokens, hook)
            calls.clear()
            assert torch.equal(replayed, alone)
    small = KeptPrefix(base, hook, budget=1)
    with small.keeping():
        residual(base, batches[0], hook)
    assert not small.usable and small.batches == []
    with small.replaying(checkpoint, k, 0):
        residual(checkpoint, batches[0], hook)
    assert len(calls) == k  # nothing replayed: the checkpoint ran its own blocks
