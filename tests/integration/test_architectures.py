"""Every verb on every catalog architecture: tiny random-initialised models, built locally.

GPT-2, GPT-NeoX (Pythia), Llama, Gemma 2, Qwen2 and Mistral, two blocks of width 64
each with the embedded tokenizer, saved as a user's local Hugging Face directory.
Each gets a random SAE on ``blocks.1.hook_resid_pre`` (tied, unit decoder rows,
``b_dec`` the mean activation so about half the features fire on a token),
recorded with the numerics a SAELens SAE carries: BOS, a 64-token context,
``center_writing_weights``.

What is asserted, architecture by architecture:

* the bridge's activations, and ``sae_diff``'s per-feature means on both sides,
  equal those of TransformerLens's ``HookedTransformer`` (how SAELens trains);
* a planted change is found: the decoder direction of a firing feature drawn at
  random is added to the residual stream at the SAE's hook, by block 0's MLP
  output bias where there is one (GPT-2, GPT-NeoX), else by rewiring one hidden
  unit of block 0's gated MLP (a rank-one change to each of its three matrices,
  the unit's gate and up rows equal so it is ``x * act(x) >= 0`` on every token,
  and its down column the direction). The planted feature ranks first by |Δ|;
  an identity copy changes nothing. (With a random dictionary most features
  share some cosine with the direction, so ``changed`` counts many features: the
  rank is the known answer, not the count.)
* ``model_diff`` names exactly the planted tensors and the first block;
* ``capture_activations`` writes the bridge's activations and the SAE's features;
* ``sae_train`` from scratch and warm-started from the SAE, with the SAE's hook and
  context size in the trained SAE's metadata; ``sae_align`` matches the warm
  start back to its initial SAE feature for feature;
* ``simulate`` moves exactly the architecture table's attention and MLP matrices
  of block 0;
* the LoRA recipe adapts exactly the table's modules in every block, and the diff
  of its checkpoint sees features move.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import aquin_nb
from aquin_nb import (
    AquinError,
    capture_activations,
    model_diff,
    sae_align,
    sae_diff,
    sae_train,
    simulate,
)
from aquin_nb._activations import prepare_bridge, residual, token_batches, tokenize_prompts
from aquin_nb._architectures import Architecture, architecture_for
from aquin_nb.demo.finetune import FINETUNE_DATA, finetune_lora
from aquin_nb.demo.reference import hooked_reference
from aquin_nb.models import apply_checkpoint, load_hf_model
from aquin_nb.probes import load_prompts
from aquin_nb.saes import sae_from_cfg_and_state, sae_numerics
from tests.tiny_models import HIDDEN, build_tiny_model

ARCHITECTURES = ["gpt2", "gpt_neox", "llama", "gemma2", "qwen2", "mistral"]
HOOK = "blocks.1.hook_resid_pre"
D_SAE = 256
SAE_CONTEXT = 64
PROMPTS = load_prompts(None)
ROWS = [json.loads(line) for line in FINETUNE_DATA.read_text().splitlines()][:16]


@dataclass
class Zoo:
    """One architecture's model directory, SAE, and checkpoints with known changes."""

    arch: Architecture
    model_dir: Path
    sae_dir: Path
    base_state: dict[str, torch.Tensor]
    planted_feature: int
    planted_keys: set[str]
    planted_pt: Path
    copy_pt: Path


def _sae(decoder: torch.Tensor, b_dec: torch.Tensor):
    cfg = {
        "architecture": "standard",
        "d_in": decoder.shape[1],
        "d_sae": decoder.shape[0],
        "metadata": {
            "hook_name": HOOK,
            "prepend_bos": True,
            "context_size": SAE_CONTEXT,
            "model_from_pretrained_kwargs": {"center_writing_weights": True},
        },
    }
    state = {
        "W_dec": decoder.clone(),
        "W_enc": decoder.T.clone(),
        "b_enc": torch.zeros(decoder.shape[0]),
        "b_dec": b_dec.clone(),
    }
    return sae_from_cfg_and_state(cfg, state, source="test")


def _hook_activations(model_dir: Path, sae) -> torch.Tensor:
    bridge = aquin_nb.load_model(model_dir, device="cpu")
    numerics = sae_numerics(sae)
    prepare_bridge(bridge, numerics)
    tokens = tokenize_prompts(bridge.tokenizer, PROMPTS, prepend_bos=True, max_length=SAE_CONTEXT)
    return torch.cat(
        [
            residual(bridge, batch.tokens, HOOK)[batch.mask]
            for batch in token_batches(tokens, batch_size=16, skip_first=True)
        ]
    )


def plant(
    arch: Architecture,
    state: dict[str, torch.Tensor],
    direction: torch.Tensor,
    shift: float,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Make block 0 add about ``shift * direction`` to every token's residual stream.

    With an MLP output bias, exactly that; otherwise hidden unit 0 of the gated MLP
    is rewired: gate and up rows both ``v`` make it ``(v·x) act(v·x) >= 0`` (mean
    about 2 here), and its down column writes ``direction``.
    """
    planted = {key: value.clone() for key, value in state.items()}
    block = arch.block(0)
    if arch.mlp_out_bias:
        key = f"{block}.{arch.mlp_out}.bias"
        planted[key] += shift * direction
        return planted, {key}
    v = torch.randn(HIDDEN, generator=generator)
    v = 2.0 * v / v.norm()
    keys = set()
    for module in arch.mlp:
        key = f"{block}.{module}.weight"
        if module == arch.mlp_out:
            planted[key][:, 0] = shift / 2.0 * direction
        else:
            planted[key][0] = v
        keys.add(key)
    return planted, keys


@pytest.fixture(scope="module", params=ARCHITECTURES)
def zoo(request, tmp_path_factory) -> Zoo:
    model_type = request.param
    arch = architecture_for(model_type)
    root = tmp_path_factory.mktemp(model_type)
    model_dir = build_tiny_model(model_type, root / f"tiny-{model_type}")
    generator = torch.Generator().manual_seed(ARCHITECTURES.index(model_type))
    decoder = torch.nn.functional.normalize(torch.randn(D_SAE, HIDDEN, generator=generator), dim=1)
    activations = _hook_activations(model_dir, _sae(decoder, torch.zeros(HIDDEN)))
    sae = _sae(decoder, activations.mean(0))
    sae_dir = root / "sae"
    sae.save_model(str(sae_dir))

    pre = (activations - activations.mean(0)) @ decoder.T
    frequency = (pre > 0).float().mean(0)
    firing = torch.nonzero((frequency > 0.1) & (frequency < 0.9)).flatten()
    feature = int(firing[torch.randint(len(firing), (1,), generator=generator)])
    direction = decoder[feature].clone()
    if arch.centres_residual:  # the SAE's numerics centre what blocks write
        direction -= direction.mean()
    shift = 4.0 * float(pre[:, feature].std()) / float(direction @ decoder[feature])

    hf, _, _ = load_hf_model(model_dir)
    base_state = {key: value.detach().clone() for key, value in hf.state_dict().items()}
    planted, keys = plant(arch, base_state, direction, shift, generator)
    planted_pt, copy_pt = root / "planted.pt", root / "copy.pt"
    torch.save({"step": 1, "state_dict": planted}, planted_pt)
    torch.save({"step": 0, "state_dict": base_state}, copy_pt)
    return Zoo(arch, model_dir, sae_dir, base_state, feature, keys, planted_pt, copy_pt)


def _hooked_feature_means(hf_model, tokenizer, sae) -> torch.Tensor:
    """Per-feature token means the SAELens way: HookedTransformer, BOS and padding left out."""
    hooked = hooked_reference(hf_model, sae_numerics(sae).processing)
    token_lists = tokenize_prompts(tokenizer, PROMPTS, prepend_bos=True, max_length=SAE_CONTEXT)
    total, count = torch.zeros(D_SAE, dtype=torch.float64), 0
    for ids in token_lists:
        _, cache = hooked.run_with_cache(torch.tensor([ids]), names_filter=[HOOK])
        features = sae.encode(cache[HOOK][0, 1:]).detach()
        total += features.double().sum(0)
        count += len(features)
    return total / count


def test_sae_diff_matches_the_hooked_transformer_and_finds_the_plant(zoo):
    diff = sae_diff(zoo.model_dir, zoo.planted_pt, sae=zoo.sae_dir, progress=False)
    features = diff.features.sort_values("feature")
    top = diff.top(1)
    print(
        f"{zoo.arch.model_type}: planted feature {zoo.planted_feature}, top {int(top['feature'][0])}"
        f" (|Δ| {float(top['abs_delta'][0]):.3f}, next {float(diff.features['abs_delta'][1]):.3f}),"
        f" {diff.summary['n_changed']} changed, fit {diff.summary['fit']['verdict']}"
    )
    assert int(top["feature"][0]) == zoo.planted_feature and bool(top["changed"][0])

    base_hf, tokenizer, _ = load_hf_model(zoo.model_dir)
    planted_hf = apply_checkpoint(load_hf_model(zoo.model_dir)[0], zoo.planted_pt)
    sae = aquin_nb.load_sae(zoo.sae_dir)
    for column, hf_model in (("base", base_hf), ("checkpoint", planted_hf)):
        torch.testing.assert_close(
            torch.tensor(features[column].to_numpy()),
            _hooked_feature_means(hf_model, tokenizer, sae),
            rtol=1e-4,
            atol=1e-5,
        )


def test_the_identity_copy_changes_nothing(zoo):
    diff = sae_diff(zoo.model_dir, zoo.copy_pt, sae=zoo.sae_dir, fit="off", progress=False)
    assert diff.summary["n_changed"] == 0 and diff.summary["max_abs_delta"] == 0.0


def test_bridge_reads_the_hook_as_the_hooked_transformer_does(zoo):
    sae = aquin_nb.load_sae(zoo.sae_dir)
    numerics = sae_numerics(sae)
    bridge = aquin_nb.load_model(zoo.model_dir, device="cpu")
    prepare_bridge(bridge, numerics)
    hooked = hooked_reference(load_hf_model(zoo.model_dir)[0], numerics.processing)
    tokens = torch.tensor([[0, *range(40, 100)]])  # past the 32-token sliding windows
    _, cache = hooked.run_with_cache(tokens, names_filter=[HOOK])
    ours = residual(bridge, tokens, HOOK)
    torch.testing.assert_close(ours, cache[HOOK], rtol=1e-4, atol=1e-5)
    # Centring the writing weights centres the residual stream of LayerNorm models only;
    # for RMSNorm both TransformerLens routes leave it as it is (the mean is not removed).
    centred = bool(ours.mean(-1).abs().max() < 1e-5)
    assert centred == zoo.arch.centres_residual


def test_model_diff_names_the_planted_tensors_and_block(zoo):
    result = model_diff(zoo.model_dir, zoo.planted_pt, progress=False)
    changed = set(result.modules.loc[result.modules["changed"], "module"])
    assert changed == zoo.planted_keys
    assert result.summary["suggested_layer"] == 0 and result.summary["mean_kl"] > 0
    same = model_diff(zoo.model_dir, zoo.copy_pt, progress=False)
    assert same.summary["n_modules_changed"] == 0 and same.summary["mean_kl"] == 0.0


def test_model_diff_reads_the_full_forwards_logits_at_the_real_positions(zoo):
    """model_diff hands the unembedding only the real positions; the logits it gets
    are the full forward's there, with what the model applies after the
    unembedding (Gemma 2's soft-capping, made strong here so that it shows), and
    the residuals are the hook points' own."""
    from aquin_nb.modeldiff import _residuals_and_logits

    bridge = aquin_nb.load_model(zoo.model_dir, device="cpu")
    config = bridge.original_model.config
    if getattr(config, "final_logit_softcapping", None):
        config.final_logit_softcapping = 0.05
    token_lists = tokenize_prompts(
        bridge.tokenizer, PROMPTS[:24], prepend_bos=True, max_length=SAE_CONTEXT
    )
    batch = next(token_batches(token_lists, batch_size=8, skip_first=True))
    assert not batch.mask[:, 1:].all()  # padding to leave out
    hooks = [block.hook_out for block in bridge.blocks]
    with torch.no_grad():
        logits, residuals = _residuals_and_logits(bridge, batch.tokens, batch.mask, hooks)
        full, cache = bridge.run_with_cache(batch.tokens)
    assert logits.shape == (int(batch.mask.sum()), full.shape[-1])
    torch.testing.assert_close(logits, full[batch.mask], rtol=1e-5, atol=1e-5)
    if zoo.arch.model_type == "gemma2":
        assert float(full.abs().max()) <= 0.05 + 1e-6
    for layer, stream in enumerate(residuals):
        torch.testing.assert_close(stream, cache[f"blocks.{layer}.hook_resid_post"][batch.mask])


def test_capture_writes_the_bridge_activations_and_sae_features(zoo, tmp_path):
    capture = capture_activations(
        zoo.model_dir,
        output=tmp_path / "cap",
        layers=[0, 1],
        encode_sae=True,
        sae=zoo.sae_dir,
        sae_layer=1,
        count=8,
        progress=False,
    )
    assert capture.summary["context_size"] == SAE_CONTEXT  # the SAE's, from its metadata
    assert capture.summary["hooks"] == {"0": "blocks.0.hook_resid_pre", "1": HOOK}
    sae = aquin_nb.load_sae(zoo.sae_dir)
    bridge = aquin_nb.load_model(zoo.model_dir, device="cpu")
    prepare_bridge(bridge, sae_numerics(sae))
    from aquin_nb.capture import shipped_probe_sample

    tokens = tokenize_prompts(
        bridge.tokenizer, shipped_probe_sample(8), prepend_bos=True, max_length=SAE_CONTEXT
    )
    expected = torch.cat(
        [
            residual(bridge, batch.tokens, HOOK)[batch.mask]
            for batch in token_batches(tokens, batch_size=16, skip_first=True)
        ]
    )
    torch.testing.assert_close(capture.load_layer(1), expected)
    stored = torch.load(tmp_path / "cap" / "sae" / "sae_layer_1.pt", weights_only=True)
    dense = torch.zeros(tuple(stored["shape"].tolist()))
    dense[stored["indices"][:, 0], stored["indices"][:, 1]] = stored["values"]
    torch.testing.assert_close(dense, sae.encode(expected).detach(), atol=1e-5, rtol=1e-5)


def test_sae_train_scratch_and_warm_then_align(zoo, tmp_path):
    scratch = sae_train(
        zoo.model_dir,
        1,
        sae=zoo.sae_dir,
        init_from="scratch",
        d_sae=128,
        steps=60,
        batch_size=256,
        output=tmp_path / "scratch",
        progress=False,
    )
    warm = sae_train(
        zoo.model_dir,
        1,
        checkpoint=zoo.planted_pt,
        sae=zoo.sae_dir,
        steps=20,
        batch_size=256,
        lr=1e-4,
        output=tmp_path / "warm",
        progress=False,
    )
    for trained in (scratch, warm):
        metadata = trained.load().cfg.metadata
        assert metadata.hook_name == HOOK and metadata.context_size == SAE_CONTEXT
        assert trained.summary["context_size"] == SAE_CONTEXT
    assert scratch.load().cfg.d_sae == 128 and len(scratch.features) == 0
    # A random model's residual stream is nearly Gaussian: 60 steps explain 9-19% of
    # it (the random dictionary: about -200%), and the loss falls.
    metrics = scratch.summary["metrics"]
    assert metrics["trained"]["explained_variance"] > 0.05 > metrics["public"]["explained_variance"]
    curve = scratch.loss_curve["loss"]
    assert curve.iloc[-5:].mean() < curve.iloc[:5].mean()
    assert len(warm.features) == D_SAE and warm.summary["init_from"] == "public"

    align = sae_align(warm.summary["path"], zoo.sae_dir, progress=False)
    kept = float((align.pairs["a"] == align.pairs["b"]).mean())
    print(f"{zoo.arch.model_type}: warm start vs its SAE, {kept:.0%} of features matched to self")
    assert align.summary["optimal"] and kept > 0.95
    assert align.summary["mean_cosine"] > align.summary["baseline_mean_cosine"] + 0.3


def test_simulate_moves_the_tables_weights_of_block_zero(zoo, tmp_path):
    sim = simulate(
        zoo.model_dir,
        ROWS,
        lr=0.05,
        steps=20,
        sae=zoo.sae_dir,
        output=tmp_path / "sim.pt",
        progress=False,
    )
    state = torch.load(tmp_path / "sim.pt", weights_only=True)["state_dict"]
    moved = {key for key, value in zoo.base_state.items() if not torch.equal(state[key], value)}
    block = zoo.arch.block(0)
    expected = {f"{block}.{module}.weight" for module in (*zoo.arch.attention, *zoo.arch.mlp)}
    assert moved == expected
    assert re.search(sim.summary["params"], f"{block}.{zoo.arch.mlp_out}.weight")
    assert sim.diff.summary["max_abs_delta"] > 0


def test_lora_recipe_adapts_the_tables_modules_in_every_block(zoo, tmp_path):
    path = finetune_lora(
        zoo.model_dir, run_dir=tmp_path / "run", steps=3, batch_size=4, rank=2, progress=False
    )
    state = torch.load(path, weights_only=True)["state_dict"]
    assert set(state) == set(zoo.base_state)
    moved = {key for key, value in zoo.base_state.items() if not torch.equal(state[key], value)}
    expected = {
        f"{zoo.arch.block(layer)}.{module}.weight"
        for layer in range(2)
        for module in (*zoo.arch.attention, *zoo.arch.mlp)
    }
    assert moved == expected
    diff = sae_diff(zoo.model_dir, path, sae=zoo.sae_dir, fit="off", progress=False)
    assert diff.summary["max_abs_delta"] > 0


def test_lora_recipe_refuses_target_modules_the_model_lacks(tmp_path):
    with pytest.raises(
        AquinError, match=r"cannot put LoRA on tiny-gpt2 with target_modules \['q_proj'\]"
    ):
        finetune_lora(
            "tiny-gpt2", run_dir=tmp_path / "run", target_modules=["q_proj"], progress=False
        )
    assert not (tmp_path / "run").exists()


def _random_adapter(zoo: Zoo, directory: Path, seed: int, **extra) -> Path:
    """A LoRA adapter on every module of the table's recipe, A and B both random."""
    from peft import LoraConfig, get_peft_model

    hf, _, _ = load_hf_model(zoo.model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(zoo.arch.lora_targets),
        fan_in_fan_out=zoo.arch.fan_in_fan_out,
        init_lora_weights=False,
        **extra,
    )
    get_peft_model(hf, config).save_pretrained(directory)
    return directory


def _merged_pt(zoo: Zoo, adapter: Path, path: Path) -> Path:
    hf, _, _ = load_hf_model(zoo.model_dir)
    merged = apply_checkpoint(hf, adapter)  # merges a copy's LoRA, as before the switch
    torch.save({"step": 1, "state_dict": merged.state_dict()}, path)
    return path


def test_an_adapter_is_diffed_on_one_model_switched_off_and_on(zoo, tmp_path):
    """The switched diff equals the diff of the merged checkpoint on two models, on every
    architecture (GPT-2's and GPT-NeoX's fused qkv included), and the base weights come
    back to within float rounding after many switches."""
    from aquin_nb._diff_core import load_pair
    from aquin_nb._switch import SwitchedBridge

    adapter = _random_adapter(zoo, tmp_path / "adapter", seed=7)
    switched = sae_diff(zoo.model_dir, adapter, sae=zoo.sae_dir, fit="full", progress=False)
    merged = sae_diff(
        zoo.model_dir,
        _merged_pt(zoo, adapter, tmp_path / "merged.pt"),
        sae=zoo.sae_dir,
        fit="full",
        progress=False,
    )
    columns = ["feature", "base", "checkpoint", "delta"]
    left = switched.features.sort_values("feature")[columns].to_numpy()
    right = merged.features.sort_values("feature")[columns].to_numpy()
    assert float(abs(right[:, 3]).max()) > 1e-3  # the adapter moves features
    torch.testing.assert_close(torch.tensor(left), torch.tensor(right), rtol=1e-4, atol=1e-5)
    for side in ("base", "checkpoint"):
        for key in ("explained_variance", "ce_loss_recovered"):
            assert switched.summary["fit"][side][key] == pytest.approx(
                merged.summary["fit"][side][key], rel=1e-4, abs=1e-5
            )

    base, checkpoint, _, _ = load_pair(zoo.model_dir, adapter, "cpu", switch_adapter=True)
    assert isinstance(base, SwitchedBridge) and isinstance(checkpoint, SwitchedBridge)
    assert base._bridge is checkpoint._bridge  # one model in memory, not two
    tokens = torch.tensor([[1, 2, 3, 4]])
    before = residual(base, tokens, HOOK)
    for _ in range(20):
        residual(checkpoint, tokens, HOOK)
        after = residual(base, tokens, HOOK)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(residual(checkpoint, tokens, HOOK), before, atol=1e-3)


def test_model_diff_reads_an_adapter_as_b_a_on_one_model(zoo, tmp_path):
    """On every architecture, an adapter directory's weight diff (from its factors, the
    adapter switched on one model) equals its merged checkpoint's, as do KL and drift."""
    adapter = _random_adapter(zoo, tmp_path / "adapter", seed=9)
    switched = model_diff(zoo.model_dir, adapter, progress=False)
    merged = model_diff(
        zoo.model_dir, _merged_pt(zoo, adapter, tmp_path / "merged.pt"), progress=False
    )
    left, right = switched.changed_modules(), merged.changed_modules()
    assert left["module"].tolist() == right["module"].tolist() and len(left)
    for column in ("abs_change", "rel_change", "stable_rank"):
        assert left[column].to_numpy(dtype=float) == pytest.approx(
            right[column].to_numpy(dtype=float), rel=1e-3
        ), column
    assert switched.summary["mean_kl"] == pytest.approx(merged.summary["mean_kl"], rel=1e-3)
    assert switched.layers["rel_drift"].to_numpy() == pytest.approx(
        merged.layers["rel_drift"].to_numpy(), rel=1e-3, abs=1e-6
    )


def test_an_adapter_that_trains_biases_falls_back_to_a_merged_copy(zoo, tmp_path, caplog):
    """Switching off a LoRA with bias="all" would keep its bias changes: it is merged
    into a second copy instead, and still gives the merged checkpoint's diff."""
    if zoo.arch.model_type != "gpt2":
        pytest.skip("one architecture is enough for the fallback")
    adapter = _random_adapter(zoo, tmp_path / "adapter", seed=8, bias="all")
    with caplog.at_level("INFO", logger="aquin_nb._diff_core"):
        switched = sae_diff(zoo.model_dir, adapter, sae=zoo.sae_dir, fit="off", progress=False)
    assert "second copy" in caplog.text and "bias" in caplog.text
    merged = sae_diff(
        zoo.model_dir,
        _merged_pt(zoo, adapter, tmp_path / "merged.pt"),
        sae=zoo.sae_dir,
        fit="off",
        progress=False,
    )
    assert switched.summary["n_changed"] == merged.summary["n_changed"]
    torch.testing.assert_close(
        torch.tensor(switched.features.sort_values("feature")["delta"].to_numpy()),
        torch.tensor(merged.features.sort_values("feature")["delta"].to_numpy()),
    )


@pytest.mark.parametrize("from_bridge", [False, True], ids=["hf", "bridge"])
def test_the_checkpoint_twin_equals_the_checkpoint_loaded_into_a_copy(zoo, from_bridge):
    """Built around the checkpoint's own tensors, it holds what `apply_checkpoint` gives a
    copy of the base: every tensor, buffer, tie and output, with the base untouched; also
    when the base is already wrapped in a bridge (as a trajectory's is)."""
    import copy

    from aquin_nb.models import (
        bridge_checkpoint_twin,
        checkpoint_twin,
        hf_state_dict,
        wrap_bridge,
    )

    base, tokenizer, _ = load_hf_model(zoo.model_dir)
    pristine = copy.deepcopy(base)
    before = {key: value.clone() for key, value in base.state_dict().items()}
    if from_bridge:
        bridge = wrap_bridge(base, tokenizer, "base")
        twin = bridge_checkpoint_twin(bridge, zoo.planted_pt)
        assert twin is not None
        wrapped = hf_state_dict(bridge)  # plain names, read through the bridge
        assert wrapped.keys() == before.keys()
        for key, value in wrapped.items():
            assert torch.equal(value, before[key]), key  # the wrapped base untouched
        base = pristine  # the wrapped model's state-dict names are the bridge's
    else:
        twin = checkpoint_twin(base, zoo.planted_pt)
    reference = apply_checkpoint(copy.deepcopy(base), zoo.planted_pt)
    twin_state, reference_state = twin.state_dict(), reference.state_dict()
    assert twin_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(twin_state[key], value), key
    for (name, buffer), (_, expected) in zip(
        twin.named_buffers(), reference.named_buffers(), strict=True
    ):
        assert torch.equal(buffer, expected), name
    head, embedding = twin.get_output_embeddings(), twin.get_input_embeddings()
    tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    assert (head.weight is embedding.weight) == tied
    tokens = torch.tensor([[1, 5, 9, 2]])
    torch.testing.assert_close(twin(tokens).logits, reference(tokens).logits, rtol=0, atol=0)
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_padded_vocabulary_never_names_a_padding_row(zoo, tmp_path):
    """Real models pad the unembedding past the tokenizer (Pythia: 50,304 rows for 50,277
    tokens). Padding rows made to match the SAE's decoder rows exactly never come out
    of the lens: dashboards, labels and model_diff's promoted tokens stay in the vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aquin_nb import feature_dashboards
    from aquin_nb.results.dashboards import _load_arrays
    from tests.tiny_models import TOKENIZER_DIR, VOCAB, tiny_config

    extra = 32
    torch.manual_seed(0)
    config = tiny_config(zoo.arch.model_type, vocab=VOCAB + extra)
    hf = AutoModelForCausalLM.from_config(config)
    decoder = aquin_nb.load_sae(zoo.sae_dir).W_dec.detach()
    with torch.no_grad():  # the padding rows: the decoder's first rows, scaled up
        hf.get_output_embeddings().weight[VOCAB:] = 5.0 * decoder[:extra]
    model_dir = tmp_path / "padded"
    hf.save_pretrained(str(model_dir))
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(model_dir))

    boards = feature_dashboards(
        model_dir, sae=zoo.sae_dir, corpus=PROMPTS[:8], progress=False, cache=False
    )
    arrays = _load_arrays(boards.summary["cache"])
    assert int(arrays["base_lens_top"].max()) < VOCAB
    assert int(arrays["base_lens_bottom"].max()) < VOCAB
    assert isinstance(boards.label(0), str)

    state = {key: value.detach().clone() for key, value in hf.state_dict().items()}
    moved = next(key for key in state if key.endswith("weight") and ".1." in key)
    state[moved] += 0.1 * torch.randn(state[moved].shape)
    checkpoint = tmp_path / "moved.pt"
    torch.save(state, checkpoint)
    diff = model_diff(model_dir, checkpoint, progress=False)
    assert len(diff.promoted) and int(diff.promoted["token_id"].max()) < VOCAB
    assert (
        sae_diff(model_dir, checkpoint, sae=zoo.sae_dir, fit="off", progress=False)
        .features["label"]
        .notna()
        .any()
    )


def test_the_booted_bridge_computes_the_hugging_face_logits(zoo, monkeypatch):
    """The boot skips the random init of the Linears it builds to split fused qkv
    weights (they are assigned the fused weights). Here a skipped init poisons the
    weights with NaN instead: a Linear the boot left unassigned would show."""
    from aquin_nb import _switch
    from aquin_nb.models import wrap_bridge

    poisoned: list[torch.nn.Linear] = []

    def poison(linear: torch.nn.Linear) -> None:
        poisoned.append(linear)
        with torch.no_grad():
            linear.weight.fill_(float("nan"))
            if linear.bias is not None:
                linear.bias.fill_(float("nan"))

    monkeypatch.setattr(_switch, "_leave_unset", poison)
    hf, tokenizer, _ = load_hf_model(zoo.model_dir)
    tokens = torch.tensor([[0, *range(40, 80)]])
    with torch.no_grad():
        expected = hf(tokens).logits
        bridge = wrap_bridge(hf, tokenizer, "tiny", device="cpu")
        logits = bridge(tokens, return_type="logits")
    if zoo.arch.model_type in ("gpt2", "gpt_neox"):  # fused qkv: the boot splits it
        assert poisoned
    assert all(not torch.isnan(linear.weight).any() for linear in poisoned)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
