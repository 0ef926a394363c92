"""What differs between the decoder architectures aquin_nb knows, in one table.

The verbs that read activations (``sae_diff``, ``model_diff``, capture, training,
alignment) need nothing from here: TransformerLens's ``TransformerBridge`` names
every architecture's hooks the same way (``blocks.L.hook_resid_pre``). What the
bridge cannot say is which Hugging Face modules a recipe should touch: the LoRA
recipe's target modules and ``simulate``'s default parameters. Those live here,
keyed by the Hugging Face config's ``model_type``, and nowhere else (DESIGN.md
decision 1).

An architecture missing from the table is refused where the table is needed, with
the way around it (``params=`` for simulate, ``target_modules=`` for the LoRA
recipe), rather than guessed: a wrong guess would move or adapt the wrong weights
without a sign.

Example:
    >>> from aquin_nb._architectures import architecture_for
    >>> arch = architecture_for("llama")
    >>> arch.blocks, arch.lora_targets[:2], arch.norm
    ('model.layers', ('q_proj', 'k_proj'), 'rmsnorm')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ._errors import AquinError

# When neither the SAE's metadata nor the caller gives a context size, corpus passes
# cut windows of this many tokens (or the model's maximum, if smaller). SAELens trains
# most public SAEs at 128-1,024 tokens (gpt2-small-res-jb at 128, Gemma Scope and Llama
# Scope at 1,024); the upper end covers every position those dictionaries saw, and
# it is model_diff's default too. Never the model's own maximum: eager attention
# memory grows with the square of the window.
DEFAULT_CONTEXT_SIZE = 1024


@dataclass(frozen=True)
class Architecture:
    """One decoder family's Hugging Face module layout.

    Module names are relative to a block (``{blocks}.{i}``) and name the module,
    not its ``.weight``.
    """

    model_type: str  # the Hugging Face config's model_type
    family: str  # what users call it
    blocks: str  # module path of the list of transformer blocks
    attention: tuple[str, ...]  # the attention's weight matrices
    mlp: tuple[str, ...]  # the MLP's weight matrices
    mlp_out: str  # the MLP projection that writes into the residual stream
    mlp_out_bias: bool  # whether that projection has a bias
    norm: str  # "layernorm" (mean-centring) or "rmsnorm"
    post_norms: bool  # sublayer outputs are normalised before the residual add (Gemma 2)
    lora_targets: tuple[str, ...]  # PEFT target_modules of the LoRA recipe
    fan_in_fan_out: bool  # weights stored [in, out] (GPT-2's Conv1D), for PEFT

    @property
    def centres_residual(self) -> bool:
        """Whether ``center_writing_weights`` centres the residual stream: only under
        LayerNorm, which ignores the mean; TransformerLens skips it for RMSNorm."""
        return self.norm == "layernorm"

    def block(self, layer: int) -> str:
        """Module path of block ``layer``, e.g. ``model.layers.3``."""
        return f"{self.blocks}.{layer}"

    def moved_by_simulate(self, sae_layer: int) -> str:
        """A regex of the attention and MLP weight matrices of the blocks before ``sae_layer``:
        the parameters that can change what the SAE reads (block 0 when ``sae_layer`` is 0).

        Example:
            >>> import re
            >>> pattern = architecture_for("gpt2").moved_by_simulate(2)
            >>> [bool(re.search(pattern, f"transformer.h.{i}.mlp.c_fc.weight")) for i in range(3)]
            [True, True, False]
        """
        layers = "|".join(str(i) for i in range(max(sae_layer, 1)))
        modules = "|".join(re.escape(name) for name in (*self.attention, *self.mlp))
        return rf"^{re.escape(self.blocks)}\.({layers})\.({modules})\.weight$"


_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_like(model_type: str, family: str, *, post_norms: bool = False) -> Architecture:
    return Architecture(
        model_type=model_type,
        family=family,
        blocks="model.layers",
        attention=_LLAMA_ATTENTION,
        mlp=_GATED_MLP,
        mlp_out="mlp.down_proj",
        mlp_out_bias=False,
        norm="rmsnorm",
        post_norms=post_norms,
        lora_targets=_LLAMA_TARGETS,
        fan_in_fan_out=False,
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture(
            model_type="gpt2",
            family="GPT-2",
            blocks="transformer.h",
            attention=("attn.c_attn", "attn.c_proj"),
            mlp=("mlp.c_fc", "mlp.c_proj"),
            mlp_out="mlp.c_proj",
            mlp_out_bias=True,
            norm="layernorm",
            post_norms=False,
            lora_targets=("c_attn", "c_proj", "c_fc"),
            fan_in_fan_out=True,  # Conv1D stores weights transposed
        ),
        Architecture(
            model_type="gpt_neox",
            family="GPT-NeoX (Pythia)",
            blocks="gpt_neox.layers",
            attention=("attention.query_key_value", "attention.dense"),
            mlp=("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
            mlp_out="mlp.dense_4h_to_h",
            mlp_out_bias=True,
            norm="layernorm",
            post_norms=False,
            lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            fan_in_fan_out=False,
        ),
        _llama_like("llama", "Llama"),
        _llama_like("gemma2", "Gemma 2", post_norms=True),
        _llama_like("qwen2", "Qwen2"),
        _llama_like("mistral", "Mistral"),
    )
}


def architecture_for(
    model_type: str, *, model: str = "the model", remedy: str = ""
) -> Architecture:
    """The table's entry for ``model_type``; an `AquinError` naming the known ones otherwise.

    ``remedy`` says how the caller can go on without an entry.
    """
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        known = ", ".join(sorted(ARCHITECTURES))
        hint = f"; {remedy}" if remedy else ""
        raise AquinError(
            f"{model} has model_type {model_type!r}, which aquin_nb has no architecture entry "
            f"for (known: {known}){hint}"
        )
    return arch


def architecture_of(model: Any, *, remedy: str = "") -> Architecture:
    """The entry for a Hugging Face model, PEFT model, config or ``TransformerBridge``."""
    config = hf_config(model)
    model_type = str(getattr(config, "model_type", "") or "")
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    return architecture_for(model_type, model=f"model {name}", remedy=remedy)


def hf_config(model: Any) -> Any:
    """The Hugging Face config behind a model, PEFT model, bridge, or the config itself."""
    for attribute in ("original_model", "base_model"):
        inner = getattr(model, attribute, None)
        if inner is not None and hasattr(inner, "config"):
            return inner.config
    return getattr(model, "config", model)


def max_context(model: Any) -> int | None:
    """The model's maximum context in tokens (``max_position_embeddings``, GPT-2's
    ``n_positions``), or ``None`` when its config sets none."""
    config = hf_config(model)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_context_size(
    requested: int | None,
    *,
    sae_context: int | None,
    model_max: int | None,
    label: str,
) -> int:
    """The window of a corpus pass: ``requested``, else the SAE's, else `DEFAULT_CONTEXT_SIZE`.

    Never above the model's maximum: a ``requested`` size above it is refused, the
    others are capped to it.

    Example:
        >>> resolve_context_size(None, sae_context=None, model_max=8192, label="m")
        1024
        >>> resolve_context_size(None, sae_context=128, model_max=8192, label="m")
        128
    """
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
            raise AquinError(
                f"context_size must be a whole number of tokens, at least 2, got {requested!r}"
            )
        if model_max is not None and requested > model_max:
            raise AquinError(
                f"context_size {requested} is above {label}'s maximum context of {model_max} tokens"
            )
        return requested
    chosen = int(sae_context) if sae_context else DEFAULT_CONTEXT_SIZE
    return min(chosen, model_max) if model_max is not None else chosen
