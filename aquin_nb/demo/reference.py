"""The embedded model as a (HookedSAETransformer) HookedTransformer, for reference checks.

SAELens's training runner loads models as ``HookedTransformer`` with
``from_pretrained_no_processing(**model_from_pretrained_kwargs)``. The embedded
model has no hub name, so this builds the same object from its local weights.
Tests use it to show the bridge reproduces those numerics; the diff benchmark
uses it for the naive ``run_with_cache_with_saes`` route.
"""

from __future__ import annotations

from typing import Any

from ..catalog import get_entry


def hooked_tiny_gpt2(hf_model: Any = None, **processing: bool) -> Any:
    """A ``HookedSAETransformer`` of tiny-gpt2 (or of ``hf_model``, a GPT-2 of the same shape).

    ``processing`` takes ``fold_ln``, ``center_writing_weights``, ``center_unembed``
    and ``fold_value_biases``; all default to False, as in SAELens.
    """
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    from ..models import load_hf_model

    if hf_model is None:
        hf_model, _, _ = load_hf_model(get_entry("tiny-gpt2").slug)
    config = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=config.n_layer,
        d_model=config.n_embd,
        d_head=config.n_embd // config.n_head,
        n_heads=config.n_head,
        d_mlp=config.n_inner or 4 * config.n_embd,
        d_vocab=config.vocab_size,
        n_ctx=config.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=config.layer_norm_epsilon,
        default_prepend_bos=True,
    )
    model = HookedSAETransformer(cfg)
    flags = {
        "fold_ln": False,
        "center_writing_weights": False,
        "center_unembed": False,
        "fold_value_biases": False,
    }
    flags.update(processing)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg), **flags)
    return model.eval()
