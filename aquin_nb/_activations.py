"""Residual-stream activations, produced the way the SAE expects them.

The forward pass stops right after the SAE's hook, BOS and padding are masked
out of every statistic, and weights are processed (compatibility mode) exactly
as the SAE's metadata records (DESIGN.md decision 2).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ._errors import AquinError
from ._switch import centred
from .saes import SaeNumerics, parse_hook

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded tokens and a mask of the positions that count in statistics."""

    tokens: torch.Tensor  # [batch, pos] int64
    mask: torch.Tensor  # [batch, pos] bool: real, non-BOS tokens
    prompt_index: torch.Tensor  # [batch] position of each row in the prompt list


def prepare_bridge(bridge: TransformerBridge, numerics: SaeNumerics) -> None:
    """Process the bridge's weights the way the SAE's training model was processed."""
    from ._switch import SwitchedBridge, processed_view

    current = getattr(bridge, "aquin_processing", None)
    if current is None and isinstance(bridge, SwitchedBridge):
        processed_view(bridge, numerics.processing)  # never rewrite a switched model's weights
        return
    if current is None and bridge.compatibility_mode:
        current = {"unknown": True}
    if current is None:
        if numerics.needs_processing:
            bridge.enable_compatibility_mode(disable_warnings=True, **numerics.processing)
        bridge.aquin_processing = dict(numerics.processing)  # type: ignore[attr-defined]
        return
    if current != numerics.processing:
        raise AquinError(
            f"the model was already prepared with weight processing {current}, but the SAE "
            f"expects {numerics.processing}; load a fresh model for this SAE"
        )


def context_length(
    bridge: TransformerBridge, numerics: SaeNumerics, requested: int | None = None
) -> int:
    """Tokens per window: ``requested``, else the SAE's context size, else the training
    default (`aquin_nb._architectures.DEFAULT_CONTEXT_SIZE`), never the model's maximum
    context unless it is smaller; a ``requested`` size above the maximum is refused."""
    from ._architectures import resolve_context_size

    return resolve_context_size(
        requested,
        sae_context=numerics.context_size,
        model_max=int(bridge.cfg.n_ctx),
        label=str(getattr(bridge, "aquin_label", None) or "the model"),
    )


def tokenize_prompts(
    tokenizer: Any, prompts: Sequence[str], *, prepend_bos: bool, max_length: int
) -> list[list[int]]:
    """Token ids per prompt, BOS first when the SAE was trained with it, truncated to context.

    Only a prefix of each prompt is tokenised (see `encode_prefixes`), so a
    50 MB one-line prompt costs what its first ``max_length`` tokens cost.
    """
    encoded = encode_prefixes(tokenizer, prompts, max_length)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise AquinError("the SAE expects a BOS token but the tokenizer has neither BOS nor EOS")
    token_lists: list[list[int]] = []
    truncated = 0
    for index, ids in enumerate(encoded):
        if not ids:
            raise AquinError(f"prompt {index} is empty after tokenization")
        ids = ([bos] if prepend_bos else []) + list(ids)
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        token_lists.append(ids)
    if truncated:
        logger.warning(
            "%d prompt(s) longer than the context (%d tokens) were truncated", truncated, max_length
        )
    return token_lists


# A token rarely spans more than a few characters; the longest vocabulary entries
# (runs of spaces or dashes) reach 32-128. The first cut keeps this many characters
# per wanted token and grows only for prompts where that was not enough.
CHARS_PER_TOKEN = 32
# Never more than this many characters per wanted token, however few tokens a
# prompt yields (text a tokenizer drops, e.g. control characters): the rest is cut.
MAX_CHARS_PER_TOKEN = 4096
# Tokens kept beyond max_length before a cut prefix counts as long enough: the
# last few tokens of a cut prefix may differ from the uncut text's (a word split
# at the cut), and the margin keeps those out of the first max_length.
_CUT_MARGIN_TOKENS = 16


def encode_prefixes(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt's first ``max_length`` tokens (or more), never the whole text.

    Each prompt is cut to ``max_length * CHARS_PER_TOKEN`` characters before it is
    tokenised; a cut prompt that yields fewer than ``max_length`` plus a margin of
    tokens is tokenised again from a prefix twice as long, up to the whole text
    or ``max_length * MAX_CHARS_PER_TOKEN`` characters. Within that bound the
    first ``max_length`` ids equal those of the uncut prompt.
    """
    if not prompts:
        return []  # Hugging Face tokenizers fail on an empty batch
    wanted = max_length + _CUT_MARGIN_TOKENS
    limit = max(1, max_length) * CHARS_PER_TOKEN
    ceiling = max(1, max_length) * MAX_CHARS_PER_TOKEN
    texts = [str(text)[:ceiling] for text in prompts]
    encoded = [
        list(ids)
        for ids in tokenizer([t[:limit] for t in texts], add_special_tokens=False)["input_ids"]
    ]
    pending = [i for i, text in enumerate(texts) if len(text) > limit and len(encoded[i]) < wanted]
    while pending:
        limit *= 2
        again = tokenizer([texts[i][:limit] for i in pending], add_special_tokens=False)
        for index, ids in zip(pending, again["input_ids"], strict=True):
            encoded[index] = list(ids)
        pending = [i for i in pending if len(texts[i]) > limit and len(encoded[i]) < wanted]
    return encoded


def token_batches(
    token_lists: Sequence[Any],
    *,
    batch_size: int,
    skip_first: bool,
    pad_id: int = 0,
    by_length: bool = False,
    first: int = 0,
) -> Iterator[TokenBatch]:
    """Right-padded batches of ``token_lists`` (id lists, or int arrays as `pack_windows`
    makes); causal attention means padding never touches real tokens.

    With ``by_length``, batches take the prompts in order of length (ties in list
    order), so prompts of like length share a batch and less of it is padding;
    each batch's ``prompt_index`` still gives the rows' places in ``token_lists``.
    The first ``first`` prompts are ordered among themselves and come before the
    rest, so a subset that gets more work (the downstream fit's) fills the fewest
    batches.

    Example:
        >>> lists = [[5, 6, 7], [8], [9, 10]]
        >>> batches = token_batches(lists, batch_size=2, skip_first=False, by_length=True)
        >>> [(batch.prompt_index.tolist(), batch.tokens.shape[1]) for batch in batches]
        [([1, 2], 2), ([0], 3)]
    """
    order: Sequence[int] = range(len(token_lists))
    if by_length:
        lead = max(0, min(first, len(token_lists)))
        order = [
            index
            for part in (range(lead), range(lead, len(token_lists)))
            for index in sorted(part, key=lambda index: len(token_lists[index]))
        ]
    for start in range(0, len(token_lists), batch_size):
        chosen = order[start : start + batch_size]
        chunk = [token_lists[index] for index in chosen]
        width = max(len(ids) for ids in chunk)
        tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = torch.as_tensor(ids)
            mask[row, int(skip_first) : len(ids)] = True
        yield TokenBatch(tokens, mask, torch.as_tensor(list(chosen), dtype=torch.long))


def read_hook_plan(hook_name: str) -> tuple[str, int]:
    """Which hook to read and where to stop so the forward computes nothing past the SAE.

    ``blocks.L.hook_resid_pre`` equals ``blocks.(L-1).hook_resid_post``, which is
    reachable without running block L at all.
    """
    layer, kind = parse_hook(hook_name)
    if kind == "hook_resid_pre" and layer > 0:
        return f"blocks.{layer - 1}.hook_resid_post", layer
    return hook_name, layer + 1


class _Captured(Exception):
    """Raised by `residual`'s hook once it has the activations: nothing after it runs."""


@torch.no_grad()
def residual(bridge: TransformerBridge, tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
    """Activations at ``hook_name`` for ``tokens``: ``[batch, pos, d_model]``, as the
    SAE's numerics want them (`centred`), the forward stopped right after the hook."""
    read_name, _ = read_hook_plan(hook_name)
    return centred(bridge, read_hooks(bridge, tokens, [read_name])[read_name])


@torch.no_grad()
def read_hooks(bridge: Any, tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """What each hook point in ``names`` sees for ``tokens``, the forward stopped once
    the last of them has fired.

    What ``run_with_cache(names_filter=names, stop_at_layer=...)`` returns, read by
    one hook on each hook point; the hook that completes the set stops the forward.
    TransformerLens's ``run_with_cache`` rebuilds the bridge's hook and alias maps on
    every call, 3 ms a call on tiny-gpt2 (a fifth of a batch's forward); the hook
    points are looked up once per bridge here (`_hook_point`).
    """
    points = {name: _hook_point(bridge, name) for name in names}
    captured: dict[str, torch.Tensor] = {}

    def capture_as(name: str) -> Any:
        def capture(tensor: torch.Tensor, *, hook: Any) -> None:
            captured[name] = tensor.detach()
            if len(captured) == len(points):
                raise _Captured

        return capture

    hooks = [(point, capture_as(name)) for name, point in points.items()]
    device = next(bridge.original_model.parameters()).device
    for point, hook in hooks:
        point.add_hook(hook)
    try:
        bridge(tokens.to(device))
    except _Captured:
        pass
    finally:
        for point, hook in hooks:
            for handle in list(point.fwd_hooks):
                if handle.user_hook is hook:
                    handle.hook.remove()
                    point.fwd_hooks.remove(handle)
    for name in points:
        if name not in captured:
            raise AquinError(f"the model produced no activations at {name}")
    return captured


def _hook_point(bridge: Any, name: str) -> Any:
    """The hook point ``name`` (or an alias of it) of ``bridge``, cached on the bridge
    per compatibility mode (which changes the aliases)."""
    cache = getattr(bridge, "aquin_hook_points", None)
    if cache is None:
        cache = {}
        bridge.aquin_hook_points = cache
    key = (name, bool(getattr(bridge, "compatibility_mode", False)))
    if key not in cache:
        point = bridge.hook_dict.get(name)
        if point is None:
            raise AquinError(f"the model produced no activations at {name}")
        cache[key] = point
    return cache[key]
