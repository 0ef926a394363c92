"""`model_diff`: SAE-free signals with known answers (copies, planted biases, LoRA, unembedding rows)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from aquin_nb import AquinError, load_model, model_diff
from aquin_nb.cli import main
from aquin_nb.results import ModelDiff


@pytest.fixture(scope="module")
def base_bridge():
    return load_model("tiny-gpt2")


def test_a_copy_changes_nothing(base_bridge, copy_pt):
    diff = model_diff(base_bridge, copy_pt, progress=False)
    assert diff.prompts["max_kl"].max() < 1e-6 and diff.summary["max_kl"] < 1e-6
    assert (diff.layers["rel_drift"] == 0).all() and (diff.layers["cosine"] > 1 - 1e-6).all()
    assert diff.summary["n_modules_changed"] == 0 and diff.changed_modules().empty
    assert diff.summary["suggested_layer"] is None and diff.promoted.empty


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_a_bias_planted_in_block_l_moves_layers_from_l_on_only(
    layer, base_bridge, base_state, tmp_path
):
    planted = {k: v.clone() for k, v in base_state.items()}
    generator = torch.Generator().manual_seed(layer)
    planted[f"transformer.h.{layer}.mlp.c_proj.bias"] += 0.5 * torch.randn(192, generator=generator)
    path = tmp_path / "bias.pt"
    torch.save(planted, path)
    diff = model_diff(base_bridge, path, progress=False)
    drift = diff.layers.set_index("layer")["rel_drift"]
    assert (drift[drift.index < layer] == 0).all()
    assert (drift[drift.index >= layer] > 0).all()
    assert diff.changed_modules()["module"].tolist() == [f"transformer.h.{layer}.mlp.c_proj.bias"]
    assert diff.summary["suggested_layer"] == layer and diff.summary["max_kl"] > 0


def test_a_lora_on_the_last_blocks_changes_only_those_modules(tiny_hf, tmp_path, base_bridge):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny_hf[0])
    torch.manual_seed(0)
    config = LoraConfig(
        r=2, target_modules=["c_attn", "c_fc"], layers_to_transform=[2, 3],
        fan_in_fan_out=True, init_lora_weights=False,
    )  # fmt: skip
    merged = get_peft_model(model, config).merge_and_unload()
    path = tmp_path / "lora.pt"
    torch.save({"step": 1, "state_dict": merged.state_dict()}, path)
    diff = model_diff(base_bridge, path, progress=False)
    changed = diff.changed_modules()
    assert sorted(changed["module"]) == sorted(
        f"transformer.h.{layer}.{part}.weight"
        for layer in (2, 3)
        for part in ("attn.c_attn", "mlp.c_fc")
    )
    assert (changed["stable_rank"] <= 2.0 + 1e-6).all()  # a rank-2 update
    drift = diff.layers.set_index("layer")["rel_drift"]
    assert (drift[[0, 1]] == 0).all() and (drift[[2, 3]] > 0).all()


def test_a_planted_unembedding_row_is_the_top_promoted_token(base_bridge, base_state, tmp_path):
    """Tokens drawn at random from the whole vocabulary, none filtered out."""
    unembed = base_state["lm_head.weight"] if "lm_head.weight" in base_state else None
    unembed = base_state["transformer.wte.weight"] if unembed is None else unembed
    tokens = random.Random(7).sample(range(unembed.shape[0]), 12)
    found = []
    for token in tokens:
        planted = {k: v.clone() for k, v in base_state.items()}
        planted["transformer.h.3.mlp.c_proj.bias"] += 3.0 * unembed[token] / unembed[token].norm()
        path = tmp_path / "row.pt"
        torch.save(planted, path)
        diff = model_diff(base_bridge, path, progress=False)
        rows = diff.promoted.query("layer == 3 and direction == 'promoted'").sort_values("rank")
        found.append(int(rows["token_id"].iloc[0]))
    assert found == tokens


def test_round_trip_and_card(base_bridge, planted_pt, tmp_path):
    from aquin_nb.cards import card_spec, render_html, render_text

    diff = model_diff(base_bridge, planted_pt, name="planted", progress=False)
    again = ModelDiff.from_json(diff.to_json(tmp_path / "md.json"))
    assert again.summary == diff.summary
    assert again.tokens["context"].tolist() == diff.tokens["context"].tolist()
    spec = card_spec(again)
    assert spec["headline"][1].startswith("drift first reaches 5% at layer 1")
    line = next(s for s in spec["sections"] if s["type"] == "line")
    assert line["x"] == [0, 1, 2, 3] and line["y"][0] == 0
    assert 'data-kind="model_diff"' in render_html(again)
    assert "look at layer 1" in render_text(spec)
    top = diff.tokens.iloc[0]
    assert top["kl"] == diff.summary["max_kl"] and "⟦" in top["context"]


def test_bad_input(base_bridge, tmp_path, copy_pt):
    with pytest.raises(AquinError, match="prompt 1 .* is shorter than 2 tokens"):
        model_diff(base_bridge, copy_pt, prompts=["Preheat the oven.", "."], progress=False)


def test_the_cli_writes_json_and_refuses_another_architecture(capsys, tmp_path, copy_pt):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    output = tmp_path / "md.json"
    code = main(["model", "diff", "--model", "tiny-gpt2", "--checkpoint", str(copy_pt),
                 "-q", "--output", str(output)])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("[model diff] tiny-gpt2 vs copy") and output.is_file()
    other = GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64)
    )  # fmt: skip
    path = tmp_path / "neox.pt"
    torch.save(other.state_dict(), path)
    refused = tmp_path / "refused.json"
    code = main(["model", "diff", "--model", "tiny-gpt2", "--checkpoint", str(path),
                 "-q", "--output", str(refused)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "neox.pt" in err and not refused.exists()


def test_an_adapter_of_another_base_is_refused(tmp_path, base_bridge):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=64, n_layer=4, n_head=4))
    adapter = get_peft_model(other, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(AquinError, match=r"has shape \(2, 64\) in PEFT adapter"):
        model_diff(base_bridge, tmp_path / "adapter", progress=False)


def test_an_adapter_directory_is_read_as_b_a_on_one_model(tiny_hf, tmp_path):
    """A PEFT adapter diffed from its directory (one model, the adapter switched, ΔW from
    the factors) gives what its merged copy gives: same tensors, norms, ranks, KL, drift."""
    from peft import LoraConfig, get_peft_model

    from aquin_nb._switch import SwitchedBridge

    model = copy.deepcopy(tiny_hf[0])
    torch.manual_seed(1)
    config = LoraConfig(
        r=3, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False, lora_alpha=6,
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    merged_pt = tmp_path / "merged.pt"
    torch.save(merged.state_dict(), merged_pt)

    from aquin_nb._diff_core import load_pair

    pair = load_pair("tiny-gpt2", adapter_dir, None, switch_adapter=True)
    assert isinstance(pair.base, SwitchedBridge)  # one model, the adapter switched
    switched = model_diff(pair.base, pair.checkpoint, progress=False)
    reference = model_diff("tiny-gpt2", merged_pt, progress=False)
    assert (
        switched.changed_modules()["module"].tolist()
        == reference.changed_modules()["module"].tolist()
    )
    for column, tolerance in (("abs_change", 1e-4), ("rel_change", 1e-4), ("stable_rank", 1e-3)):
        left = switched.changed_modules()[column].to_numpy(dtype=float)
        right = reference.changed_modules()[column].to_numpy(dtype=float)
        assert left == pytest.approx(right, rel=tolerance), column
    assert switched.layers["rel_drift"].to_numpy() == pytest.approx(
        reference.layers["rel_drift"].to_numpy(), rel=1e-3, abs=1e-6
    )
    assert switched.summary["mean_kl"] == pytest.approx(reference.summary["mean_kl"], rel=1e-3)
    from_paths = model_diff("tiny-gpt2", adapter_dir, progress=False)
    assert from_paths.summary["mean_kl"] == pytest.approx(switched.summary["mean_kl"], rel=1e-6)


def test_singular_values_from_lora_factors_match_the_dense_update():
    """Several active adapters on one layer: ΔW = Σ s·B_i·A_i, read from the stacked factors."""
    from aquin_nb.modeldiff import _factor_singular_values

    generator = torch.Generator().manual_seed(3)
    factors = [
        (torch.randn(40, rank, generator=generator, dtype=torch.float64) * scale,
         torch.randn(rank, 24, generator=generator, dtype=torch.float64))
        for rank, scale in ((3, 2.0), (2, 0.5))
    ]  # fmt: skip
    dense = sum(b @ a for b, a in factors)
    expected = torch.linalg.svdvals(dense)[:5]
    assert torch.allclose(_factor_singular_values(factors), expected, rtol=1e-10, atol=1e-12)


def test_logits_are_gathered_after_when_the_unembedding_cannot_be_hooked(monkeypatch):
    """Without an output embedding to hand the real positions to, every position's
    logits are computed and gathered after: the same logits and residuals."""
    from aquin_nb._activations import token_batches, tokenize_prompts
    from aquin_nb.modeldiff import _residuals_and_logits
    from aquin_nb.probes import load_prompts

    bridge = load_model("tiny-gpt2")
    token_lists = tokenize_prompts(
        bridge.tokenizer, load_prompts(None)[:12], prepend_bos=True, max_length=64
    )
    batch = next(token_batches(token_lists, batch_size=12, skip_first=True))
    hooks = [block.hook_out for block in bridge.blocks]
    with torch.no_grad():
        hooked = _residuals_and_logits(bridge, batch.tokens, batch.mask, hooks)
        monkeypatch.setattr(bridge.original_model, "get_output_embeddings", lambda: None)
        gathered = _residuals_and_logits(bridge, batch.tokens, batch.mask, hooks)
    assert hooked[0].shape == (int(batch.mask.sum()), bridge.cfg.d_vocab)
    torch.testing.assert_close(gathered[0], hooked[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(gathered[1], hooked[1], strict=True):
        torch.testing.assert_close(a, b)


def test_an_adapter_switched_inside_model_diff_leaves_no_inference_tensors(tiny_hf, tmp_path):
    """model_diff runs its forwards in inference mode; switching a DoRA adapter there
    writes new weight tensors. They must be ordinary tensors: a later switch outside
    inference mode (unmerging in place) and a gradient through the model still work."""
    from peft import LoraConfig, get_peft_model

    from aquin_nb._diff_core import load_pair

    model = copy.deepcopy(tiny_hf[0])
    torch.manual_seed(2)
    config = LoraConfig(
        r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False, use_dora=True,
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(tmp_path / "dora")
    pair = load_pair("tiny-gpt2", tmp_path / "dora", None, switch_adapter=True)
    model_diff(pair.base, pair.checkpoint, progress=False)
    parameters = list(pair.base.original_model.parameters())
    assert not any(parameter.is_inference() for parameter in parameters)
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.enable_grad():
        for side in (pair.checkpoint, pair.base, pair.checkpoint):
            side(tokens, return_type="logits").sum().backward()


def test_batches_by_length_give_each_prompt_what_it_gets_alone(base_bridge, planted_pt):
    """Prompts are batched in order of length; every per-prompt figure, the top tokens
    and the drift equal those of a diff that runs each prompt in a batch of its own."""
    together = model_diff(base_bridge, planted_pt, batch_size=16, progress=False)
    alone = model_diff(base_bridge, planted_pt, batch_size=1, progress=False)
    for column in ("mean_kl", "max_kl"):
        assert together.prompts[column].to_numpy() == pytest.approx(
            alone.prompts[column].to_numpy(), rel=1e-4, abs=1e-7
        )
    assert together.prompts["n_tokens"].tolist() == alone.prompts["n_tokens"].tolist()
    top = ["prompt", "position", "token", "base_next", "checkpoint_next"]
    assert together.tokens[top].head(10).equals(alone.tokens[top].head(10))
    assert together.layers["rel_drift"].to_numpy() == pytest.approx(
        alone.layers["rel_drift"].to_numpy(), rel=1e-5
    )
