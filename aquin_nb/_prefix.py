"""Blocks a fine-tune left untouched are run once, for base and checkpoint together.

LoRA on the upper layers, or a fine-tune with its first blocks frozen, leaves
the embeddings and the first ``k`` blocks bit-for-bit equal to the base's. Their
output is then the same on both sides, so `SharedPrefix.residuals` runs the
base as usual, keeps what block ``k - 1`` returned, and runs the checkpoint with
its first ``k`` blocks replaced by a replay of that output: one prefix and two
suffixes instead of two full forwards. The bridge has no ``start_at_layer``
(TransformerLens's ``TransformerBridge`` runs the Hugging Face model's own
loop), hence the replay.

`unchanged_prefix` finds ``k`` by comparing the two models' weights tensor by
tensor on load; any difference outside the blocks, other than an untied output
head, gives ``k = 0`` and nothing is shared.

Example:
    >>> import copy, torch
    >>> from aquin_nb.models import load_hf_model
    >>> base, _, _ = load_hf_model("tiny-gpt2")
    >>> tuned = copy.deepcopy(base)
    >>> with torch.no_grad():
    ...     _ = tuned.transformer.h[2].mlp.c_fc.weight.add_(0.01)
    >>> unchanged_prefix(base, tuned)
    2
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ._activations import read_hook_plan, residual


def block_list_name(model: Any) -> str | None:
    """The module path of the model's list of transformer blocks (``model.layers``)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name:
            return name
    return None


@torch.no_grad()
def unchanged_prefix(base: Any, checkpoint: Any) -> int:
    """How many leading blocks (with the embeddings) ``checkpoint`` shares with ``base``."""
    blocks = block_list_name(base)
    if blocks is None:
        return 0
    n_layers = int(base.config.num_hidden_layers)
    head = base.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    input_ids = {id(p) for p in base.get_input_embeddings().parameters()}
    changed = n_layers
    checkpoint_parameters = dict(checkpoint.named_parameters())
    for name, parameter in base.named_parameters():
        other = checkpoint_parameters.get(name)
        if other is not None and other.shape == parameter.shape and torch.equal(other, parameter):
            continue
        if name.startswith(f"{blocks}."):
            changed = min(changed, int(name[len(blocks) + 1 :].split(".", 1)[0]))
        elif id(parameter) in head_ids and id(parameter) not in input_ids:
            continue  # an untied output head runs after every block
        else:
            return 0  # the embeddings (or something unknown) changed
    return changed


_WRAPPED = "_original_component"


class _Replay(torch.nn.Module):
    """Stands in for a block: returns what the base's block ``k - 1`` returned."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


class SharedPrefix:
    """Residuals at the SAE's hook for base and checkpoint, sharing ``k`` unchanged blocks."""

    def __init__(self, base: Any, checkpoint: Any, k: int) -> None:
        if k < 1:
            raise ValueError(f"a shared prefix needs at least one block, got {k}")
        self.base, self.checkpoint, self.k = base, checkpoint, k

    def residuals(self, tokens: torch.Tensor, hook_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, checkpoint)`` activations at ``hook_name``, ``[batch, pos, d_model]``."""
        _, stop_at = read_hook_plan(hook_name)
        if stop_at <= self.k:  # the hook is inside the shared blocks: the sides are equal
            shared = residual(self.base, tokens, hook_name)
            return shared, shared
        captured: list[Any] = []
        last = self.base.blocks[self.k - 1].original_component
        handle = last.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            x_base = residual(self.base, tokens, hook_name)
        finally:
            handle.remove()
        with _replaying(self.checkpoint, self.k, captured[-1]):
            x_checkpoint = residual(self.checkpoint, tokens, hook_name)
        return x_base, x_checkpoint


@contextmanager
def _replaying(bridge: Any, k: int, output: Any) -> Iterator[None]:
    """``bridge``'s first ``k`` blocks replay ``output`` instead of computing."""
    # A bridge component keeps what it wraps in _modules["_original_component"]
    # (its original_component property reads it there).
    blocks = [bridge.blocks[i] for i in range(k)]
    originals = [block._modules[_WRAPPED] for block in blocks]
    replay = _Replay(output)
    try:
        for block in blocks:
            block._modules[_WRAPPED] = replay
        yield
    finally:
        for block, original in zip(blocks, originals, strict=True):
            block._modules[_WRAPPED] = original
