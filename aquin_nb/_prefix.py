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
tensor on load. A difference in what runs before the blocks (the embeddings,
found by running one token up to the first block) gives ``k = 0``; one in what
runs after them (the final norm, an untied output head) does not matter.

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
from contextlib import contextmanager, nullcontext
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
    """How many leading blocks ``checkpoint`` shares with ``base``, with what runs before
    them (the embeddings): 0 when any of that differs.

    Blocks are compared first, each only while it could still lower the count, so a
    checkpoint whose first block changed costs one tensor comparison. Only when some
    tensor outside the blocks differs is it found out which modules run before them
    (a one-token forward stopped at the first block).
    """
    blocks = block_list_name(base)
    if blocks is None:
        return 0
    checkpoint_parameters = dict(checkpoint.named_parameters())

    def same(name: str, parameter: torch.Tensor) -> bool:
        other = checkpoint_parameters.get(name)
        return (
            other is not None and other.shape == parameter.shape and torch.equal(other, parameter)
        )

    changed = int(base.config.num_hidden_layers)
    outside: list[tuple[str, torch.Tensor]] = []
    for name, parameter in base.named_parameters():
        if not name.startswith(f"{blocks}."):
            outside.append((name, parameter))
            continue
        block = int(name[len(blocks) + 1 :].split(".", 1)[0])
        if block < changed and not same(name, parameter):
            changed = block  # a block at or past the first changed one cannot lower it
            if changed == 0:
                return 0
    differing = [name for name, parameter in outside if not same(name, parameter)]
    if differing:
        before_blocks = _parameters_before_blocks(base, blocks)
        if before_blocks is None or any(name in before_blocks for name in differing):
            return 0  # the embeddings changed (or it is unknown what runs first)
        # else: modules that run after the blocks (the final norm, an untied head)
    return changed


class _BlocksReached(Exception):
    pass


def _parameters_before_blocks(model: Any, blocks: str) -> set[str] | None:
    """Names of the parameters of every module that runs before the first block, found
    by running one token until the first block starts (None if that fails)."""
    ran: list[torch.nn.Module] = []
    handles = [
        module.register_forward_hook(lambda module, *_: ran.append(module))
        for name, module in model.named_modules()
        if name and not name.startswith(f"{blocks}.") and name != blocks
    ]

    def stop(*_: Any) -> None:
        raise _BlocksReached

    handles.append(model.get_submodule(f"{blocks}.0").register_forward_pre_hook(stop))
    device = next(model.parameters()).device
    try:
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    except _BlocksReached:
        pass
    except Exception:  # an architecture this probe cannot run: share nothing
        return None
    finally:
        for handle in handles:
            handle.remove()
    owners = {id(module) for module in ran}
    return {
        f"{name}.{parameter_name}" if name else parameter_name
        for name, module in model.named_modules()
        if id(module) in owners
        for parameter_name, _ in module.named_parameters(recurse=False)
    }


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


PREFIX_BYTES = 256 * 2**20  # a trajectory's kept block outputs, at most


class KeptPrefix:
    """What the base's leading blocks returned, batch by batch: a trajectory keeps them
    from its base pass so that each checkpoint sharing ``k`` unchanged blocks replays
    the base's block ``k - 1`` instead of computing its first ``k`` blocks.

    Kept: the outputs of every block before the one the SAE's hook needs last
    (``read_hook_plan``), while their tensors stay within `PREFIX_BYTES` in all;
    past that nothing is kept (``usable`` is False) and checkpoints run whole.
    """

    def __init__(self, bridge: Any, hook_name: str, budget: int | None = None) -> None:
        _, stop_at = read_hook_plan(hook_name)
        self.blocks = [bridge.blocks[i].original_component for i in range(stop_at - 1)]
        self.budget = PREFIX_BYTES if budget is None else budget
        self.batches: list[list[Any]] = []
        self.bytes = 0
        self.usable = bool(self.blocks)

    @contextmanager
    def keeping(self) -> Iterator[None]:
        """Keep what each block returns during one batch's base forward."""
        if not self.usable:
            yield
            return
        outputs: list[Any] = [None] * len(self.blocks)

        def keep(index: int) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                outputs[index] = output

            return hook

        handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        self.bytes += sum(_tensor_bytes(output) for output in outputs)
        if self.bytes > self.budget or any(output is None for output in outputs):
            self.usable, self.batches = False, []  # over budget: keep nothing
        else:
            self.batches.append(outputs)

    def replaying(self, bridge: Any, k: int, batch: int) -> Any:
        """``bridge``'s first ``k`` blocks replay the base's for batch number ``batch``
        (``k`` capped at the blocks kept; nothing replayed for ``k = 0``)."""
        k = min(k, len(self.blocks))
        if k < 1 or not self.usable:
            return nullcontext()
        return _replaying(bridge, k, self.batches[batch][k - 1])


def _tensor_bytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, (tuple, list)):
        return sum(_tensor_bytes(item) for item in output)
    return 0


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
