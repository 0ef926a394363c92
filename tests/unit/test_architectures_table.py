"""The architecture table against real transformers models, and the context-size rule."""

from __future__ import annotations

import re

import pytest
import torch

from aquin_nb import AquinError
from aquin_nb._architectures import (
    ARCHITECTURES,
    DEFAULT_CONTEXT_SIZE,
    architecture_for,
    architecture_of,
    max_context,
    resolve_context_size,
)
from aquin_nb.simulation import default_param_filter
from tests.tiny_models import tiny_config

N_LAYERS = 3


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def built(request):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param, n_layers=N_LAYERS))
    return ARCHITECTURES[request.param], model


def test_entry_names_real_modules(built):
    from transformers.pytorch_utils import Conv1D

    arch, model = built
    assert architecture_of(model) is arch
    blocks = model.get_submodule(arch.blocks)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == N_LAYERS
    for name in (*arch.attention, *arch.mlp):
        module = model.get_submodule(f"{arch.block(1)}.{name}")
        assert module.weight.ndim == 2, name
        assert isinstance(module, Conv1D) == arch.fan_in_fan_out, name
    assert arch.mlp_out in arch.mlp
    out = model.get_submodule(f"{arch.block(0)}.{arch.mlp_out}")
    assert (getattr(out, "bias", None) is not None) == arch.mlp_out_bias
    leaves = {name.rsplit(".", 1)[-1] for name in (*arch.attention, *arch.mlp)}
    assert set(arch.lora_targets) == leaves
    norms = {type(m).__name__ for m in blocks[0].modules() if "norm" in type(m).__name__.lower()}
    expected = "LayerNorm" if arch.norm == "layernorm" else "RMSNorm"
    assert norms and all(name.endswith(expected) for name in norms), norms
    has_post_norm = any("post_feedforward" in name for name, _ in blocks[0].named_modules())
    assert has_post_norm == arch.post_norms


def test_simulate_moves_attention_and_mlp_matrices_before_the_sae_layer(built):
    arch, model = built
    pattern = default_param_filter(model, 2)
    chosen = {name for name, _ in model.named_parameters() if re.search(pattern, name)}
    expected = {
        f"{arch.block(layer)}.{module}.weight"
        for layer in (0, 1)
        for module in (*arch.attention, *arch.mlp)
    }
    assert chosen == expected
    at_zero = {n for n, _ in model.named_parameters() if re.search(arch.moved_by_simulate(0), n)}
    assert at_zero and all(name.startswith(f"{arch.block(0)}.") for name in at_zero)


def test_an_unknown_architecture_is_refused_with_the_way_around():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(
        OPTConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            ffn_dim=32,
            num_attention_heads=2,
            word_embed_proj_dim=16,
        )
    )
    with pytest.raises(AquinError) as error:
        default_param_filter(model, 1)
    message = str(error.value)
    assert "model_type 'opt'" in message and "params=" in message and "\n" not in message
    assert "gemma2, gpt2, gpt_neox, llama, mistral, qwen2" in message
    with pytest.raises(AquinError, match=r"model_type 'bert'.*known: gemma2, gpt2"):
        architecture_for("bert", model="model m")


def test_max_context_reads_each_configs_name_for_it():
    assert max_context(tiny_config("gpt2", max_positions=256)) == 256  # n_positions
    assert max_context(tiny_config("llama", max_positions=8192)) == 8192
    assert max_context(object()) is None


def test_the_context_size_rule():
    default = resolve_context_size(None, sae_context=None, model_max=8192, label="m")
    assert default == DEFAULT_CONTEXT_SIZE == 1024
    assert resolve_context_size(None, sae_context=None, model_max=128, label="m") == 128
    assert resolve_context_size(None, sae_context=128, model_max=8192, label="m") == 128
    assert resolve_context_size(None, sae_context=4096, model_max=1024, label="m") == 1024
    assert resolve_context_size(2048, sae_context=128, model_max=8192, label="m") == 2048
    assert resolve_context_size(9000, sae_context=None, model_max=None, label="m") == 9000
    with pytest.raises(AquinError, match="context_size 9000 is above m's maximum context of 8192"):
        resolve_context_size(9000, sae_context=None, model_max=8192, label="m")
    for bad in (0, 1, -5, True, 2.5):
        with pytest.raises(AquinError, match="context_size must be a whole number"):
            resolve_context_size(bad, sae_context=None, model_max=8192, label="m")
