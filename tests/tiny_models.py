"""Tiny random-initialised models of every catalog architecture, built locally.

Each is saved with ``save_pretrained`` beside the embedded tokenizer (4,096
tokens), so ``aquin_nb.load_model(directory)`` loads it as it would a user's
local model: no network, no hub name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from aquin_nb.catalog import EMBEDDED_DIR

TOKENIZER_DIR = EMBEDDED_DIR / "tiny-gpt2"
VOCAB = 4096
HIDDEN = 64
HEADS = 4


def tiny_config(
    model_type: str, *, n_layers: int = 2, max_positions: int = 128, vocab: int = VOCAB
) -> Any:
    """A transformers config of ``model_type``: hidden 64, 4 heads, the embedded vocabulary
    (``vocab`` above 4,096 pads the embedding matrix, as Pythia's and Qwen2's are)."""
    from transformers import (
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    shared = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    llama_like = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": n_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": 2,  # grouped-query attention, as in the real ones
        "max_position_embeddings": max_positions,
        **shared,
    }
    if model_type == "gpt2":
        return GPT2Config(
            n_positions=max_positions, n_embd=HIDDEN, n_layer=n_layers, n_head=HEADS, **shared
        )
    if model_type == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=4 * HIDDEN,
            num_hidden_layers=n_layers,
            num_attention_heads=HEADS,
            max_position_embeddings=max_positions,
            rotary_pct=0.25,  # Pythia's partial rotary embedding
            **shared,
        )
    if model_type == "llama":
        return LlamaConfig(**llama_like)
    if model_type == "gemma2":
        # A window shorter than the context, so local and global layers differ.
        return Gemma2Config(
            head_dim=HIDDEN // HEADS, sliding_window=32, pad_token_id=0, **llama_like
        )
    if model_type == "qwen2":
        return Qwen2Config(**llama_like)
    if model_type == "mistral":
        return MistralConfig(sliding_window=32, **llama_like)
    raise ValueError(f"no tiny config for {model_type}")


def build_tiny_model(
    model_type: str,
    directory: Path,
    *,
    n_layers: int = 2,
    max_positions: int = 128,
    seed: int = 0,
    vocab: int = VOCAB,
) -> Path:
    """Save a random-initialised ``model_type`` model and the embedded tokenizer to ``directory``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = tiny_config(model_type, n_layers=n_layers, max_positions=max_positions, vocab=vocab)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)).save_pretrained(str(directory))
    return directory
