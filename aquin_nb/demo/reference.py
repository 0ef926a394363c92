"""Models as a (HookedSAETransformer) HookedTransformer, for reference checks.

SAELens's training runner loads models as ``HookedTransformer`` with
``from_pretrained_no_processing(**model_from_pretrained_kwargs)``. That loader
only takes TransformerLens's own model names, so this builds the same object
from a local Hugging Face model. Tests use it to show the bridge reproduces those
numerics on every catalog architecture; the diff benchmark uses it for the naive
``run_with_cache_with_saes`` route.

How the config is built differs by architecture (``HOOKED_CONFIGS``):

* GPT-NeoX, Llama, Qwen2, Mistral: TransformerLens's own converter of a Hugging
  Face config, fed the model's ``config.json`` from a temporary directory (its
  converter guesses the architecture from the directory's name when that
  contains "llama" or "gemma", which a user's directory may well do).
* GPT-2: written out here, since TransformerLens 3's converter reads
  ``config.n_ctx``, which transformers 5 no longer sets.
* Gemma 2: written out here from TransformerLens's Gemma 2 entries, since its
  converter knows Gemma 2 only by the official model names.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..catalog import get_entry

_NO_PROCESSING = {
    "fold_ln": False,
    "center_writing_weights": False,
    "center_unembed": False,
    "fold_value_biases": False,
}


def _gpt2_config(config: Any, fold_ln: bool) -> dict[str, Any]:
    return {
        "n_layers": config.n_layer,
        "d_model": config.n_embd,
        "d_head": config.n_embd // config.n_head,
        "n_heads": config.n_head,
        "d_mlp": config.n_inner or 4 * config.n_embd,
        "d_vocab": config.vocab_size,
        "n_ctx": config.n_positions,
        "act_fn": config.activation_function,
        "normalization_type": "LNPre" if fold_ln else "LN",
        "eps": config.layer_norm_epsilon,
        "original_architecture": "GPT2LMHeadModel",
    }


def _gemma2_config(config: Any, fold_ln: bool) -> dict[str, Any]:
    rope = getattr(config, "rope_parameters", None) or {}
    return {
        "n_layers": config.num_hidden_layers,
        "d_model": config.hidden_size,
        "d_head": config.head_dim,
        "n_heads": config.num_attention_heads,
        "n_key_value_heads": config.num_key_value_heads,
        "d_mlp": config.intermediate_size,
        "d_vocab": config.vocab_size,
        "n_ctx": config.max_position_embeddings,
        "eps": config.rms_norm_eps,
        "act_fn": config.hidden_activation,
        "normalization_type": "RMSPre" if fold_ln else "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": config.head_dim,
        "rotary_base": rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
        "use_attn_scale": True,
        "attn_scale": config.query_pre_attn_scalar**0.5,
        "use_local_attn": True,
        "window_size": config.sliding_window,
        "attn_types": [
            "local" if kind == "sliding_attention" else "global" for kind in config.layer_types
        ],
        "attn_scores_soft_cap": config.attn_logit_softcapping,
        "output_logits_soft_cap": config.final_logit_softcapping,
        "gated_mlp": True,
        "final_rms": True,
        "use_normalization_before_and_after": True,
        "original_architecture": "Gemma2ForCausalLM",
    }


# model_type -> a HookedTransformerConfig's fields, for those TransformerLens's
# converter cannot read from a local directory (see the module docstring).
HOOKED_CONFIGS: dict[str, Callable[[Any, bool], dict[str, Any]]] = {
    "gpt2": _gpt2_config,
    "gemma2": _gemma2_config,
}
# Read by TransformerLens's own converter from the model's config.json.
CONVERTED_BY_TRANSFORMER_LENS = ("gpt_neox", "llama", "qwen2", "mistral")


def hooked_reference(
    hf_model: Any,
    processing: Mapping[str, bool] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``HookedSAETransformer`` with ``hf_model``'s weights, processed as SAELens would.

    ``processing`` maps ``fold_ln``, ``center_writing_weights``, ``center_unembed``
    and ``fold_value_biases`` to on/off (an SAE's `aquin_nb.saes.SaeNumerics`
    ``processing``); all default to off, as in SAELens.

    Example:
        >>> from aquin_nb.models import load_hf_model
        >>> hf_model = load_hf_model("tiny-gpt2")[0]
        >>> hooked = hooked_reference(hf_model, {"center_writing_weights": True})
        >>> hooked.cfg.n_layers, hooked.cfg.original_architecture
        (4, 'GPT2LMHeadModel')
    """
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    from .._errors import AquinError

    flags = {**_NO_PROCESSING, **(processing or {})}
    config = hf_model.config
    model_type = str(getattr(config, "model_type", ""))
    known = sorted([*HOOKED_CONFIGS, *CONVERTED_BY_TRANSFORMER_LENS])
    if model_type not in known:
        raise AquinError(
            f"no HookedTransformer reference for model_type {model_type!r} "
            f"(known: {', '.join(known)})"
        )
    # TransformerLens's loaders want a path that exists: a neutral directory with the config.
    with tempfile.TemporaryDirectory(prefix="aquin-reference-") as tmp:
        config.to_json_file(str(Path(tmp) / "config.json"))
        if model_type in HOOKED_CONFIGS:
            fields = HOOKED_CONFIGS[model_type](config, flags["fold_ln"])
            cfg = HookedTransformerConfig(
                **fields, default_prepend_bos=True, device=str(device), dtype=dtype
            )
        else:
            cfg = loading.get_pretrained_model_config(
                tmp, fold_ln=flags["fold_ln"], device=str(device), dtype=dtype
            )
            cfg.tokenizer_name = None  # tokens are given; no tokenizer to load
        state = loading.get_pretrained_state_dict(tmp, cfg, hf_model, dtype=dtype)
    model = HookedSAETransformer(cfg)  # built on cfg.device (its .to() would print)
    model.load_and_process_state_dict(state, **flags)
    return model.eval()


def hooked_tiny_gpt2(hf_model: Any = None, **processing: bool) -> Any:
    """A ``HookedSAETransformer`` of tiny-gpt2 (or of ``hf_model``, a GPT-2 of the same shape).

    ``processing`` takes ``fold_ln``, ``center_writing_weights``, ``center_unembed``
    and ``fold_value_biases``; all default to False, as in SAELens.
    """
    from ..models import load_hf_model

    if hf_model is None:
        hf_model, _, _ = load_hf_model(get_entry("tiny-gpt2").slug)
    return hooked_reference(hf_model, processing)
