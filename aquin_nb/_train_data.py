"""Activation data for sae_train: the shipped corpus, a model's residuals, a capture."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._activations import (
    prepare_bridge,
    residual,
    token_batches,
    tokenize_prompts,
)
from ._errors import AquinError
from ._io import atomic_torch_save
from .capture import Capture, read_shard
from .probes import load_prompts

logger = logging.getLogger(__name__)


# Tokens per forward pass of a corpus collection: rows per batch shrink as windows grow,
# so a pass at 1,024 tokens holds no more activations than one at 128 (and the
# attention scores grow with the window, not its square times a fixed row count).
TOKENS_PER_BATCH = 4096


def rows_per_batch(context_size: int) -> int:
    """Windows per forward pass so that a batch holds about `TOKENS_PER_BATCH` tokens."""
    return max(1, TOKENS_PER_BATCH // context_size)


def cache_dir_for(out_dir: Path, layer: int, context_size: int, dtype: str = "float32") -> Path:
    """Where corpus activations are cached: one directory per layer, context size and
    model dtype (float32 runs keep the name they always had)."""
    suffix = "" if dtype == "float32" else f"_{dtype}"
    return out_dir / f"_acts_layer{layer}_ctx{context_size}{suffix}"


def corpus_windows(tokenizer: Any, prepend_bos: bool, max_length: int) -> list[np.ndarray]:
    """The shipped corpus as a token stream cut into full context-sized windows."""
    from ._corpus import pack_windows, shipped_texts

    windows = pack_windows(
        tokenizer, shipped_texts(), prepend_bos=prepend_bos, max_length=max_length
    )
    return [window for window in windows if len(window) == max_length]  # no short tail


def collect_from_model(
    model: str,
    checkpoint: Any,
    layer: int,
    prompts: Any,
    numerics: Any,
    cache_dir: Path,
    max_tokens: int,
    d_model: int,
    progress: bool,
    context_size: int,
    device: str | None = None,
    dtype: Any = None,
) -> torch.Tensor:
    """Residual activations at the SAE's hook, cached in ``cache_dir`` chunk by chunk.

    Windows (corpus) or prompts (cut) are ``context_size`` tokens long, BOS included.
    """
    from tqdm.auto import tqdm

    from .models import load_model

    done = sorted(cache_dir.glob("chunk_*.pt")) if cache_dir.is_dir() else []
    if done:
        cached = torch.cat([read_shard(path, d_model)["activations"] for path in done])
        if len(cached) >= max_tokens:
            logger.info("reusing %d cached activations from %s", len(cached), cache_dir)
            return cached[:max_tokens]
    bridge = load_model(model, checkpoint, device=device, dtype=dtype)
    prepare_bridge(bridge, numerics)
    max_length = context_size
    token_lists: list[Any]  # prompts' id lists, or the corpus's int32 windows
    if prompts is not None:
        texts = load_prompts(prompts, bridge.tokenizer)
        token_lists = tokenize_prompts(
            bridge.tokenizer, texts, prepend_bos=numerics.prepend_bos, max_length=max_length
        )
    else:
        token_lists = corpus_windows(bridge.tokenizer, numerics.prepend_bos, max_length)
    chunks, collected, index = [], 0, 0
    bar = tqdm(total=max_tokens, desc=f"collect layer {layer}", disable=not progress, unit="tok")
    model_device = next(bridge.original_model.parameters()).device
    batches = token_batches(
        token_lists, batch_size=rows_per_batch(max_length), skip_first=numerics.prepend_bos
    )
    with torch.no_grad():
        for batch in batches:
            acts = (
                residual(bridge, batch.tokens, numerics.hook_name)[batch.mask.to(model_device)]
                .float()
                .cpu()
            )
            atomic_torch_save(cache_dir / f"chunk_{index:05d}.pt", {"activations": acts})
            chunks.append(acts)
            index += 1
            collected += len(acts)
            bar.update(len(acts))
            if collected >= max_tokens:
                break
    bar.close()
    return torch.cat(chunks)[:max_tokens]


def collect_from_capture(directory: Path, layer: int, d_model: int) -> torch.Tensor:
    capture = Capture.open(directory)
    if capture.summary["d_model"] != d_model:
        raise AquinError(
            f"activations in {directory} are {capture.summary['d_model']} wide, "
            f"but the model's d_model is {d_model}"
        )
    if capture.summary["position"] != "all":
        logger.warning(
            "training on %s-pooled activations from %s", capture.summary["position"], directory
        )
    return capture.load_layer(layer)


class Batches:
    """An endless, seeded, shuffled stream of activation batches for SAETrainer."""

    def __init__(self, activations: torch.Tensor, batch_size: int, seed: int) -> None:
        self.activations = activations
        self.batch_size = min(batch_size, len(activations))
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        index = torch.randint(len(self.activations), (self.batch_size,), generator=self.generator)
        return self.activations[index]
