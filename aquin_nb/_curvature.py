"""The estimator behind ``simulate``: mean gradient and diagonal curvature of the moved
parameters, summed as backward produces them.

Memory is what makes this a module of its own: the sums are the only
parameter-sized tensors kept (float32 for half-precision parameters, one flat
buffer each), a batch is backpropagated a piece at a time, and each gradient is
added the moment autograd has it, then dropped.

Example:
    >>> import torch
    >>> from aquin_nb._curvature import Losses, gradient_and_curvature
    >>> theta = torch.tensor([1.0, -2.0])
    >>> def losses_of(_piece, _sample):  # ½ Σ 3 θ²: gradient 3θ, curvature 3
    ...     return Losses(1.5 * (theta**2).sum())
    >>> gradient, curve = gradient_and_curvature(
    ...     losses_of, {"theta": theta}, [[None]], curvature="hutchinson"
    ... )
    >>> gradient["theta"].tolist(), curve["theta"].tolist()
    ([3.0, -6.0], [3.0, 3.0])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ._errors import AquinError


@dataclass(frozen=True)
class Losses:
    """What one forward pass over a piece of a batch gives the estimator.

    ``mean``: the piece's share of the batch's mean training loss. ``sampled``
    (asked for on the Fisher's batches): the piece's summed loss with labels drawn
    from the model, over ``tokens`` tokens.
    """

    mean: torch.Tensor
    sampled: torch.Tensor | None = None
    tokens: int = 0


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters, else the parameters' own dtype."""
    return torch.promote_types(dtype, torch.float32)


def ntk_diagonal_delta(
    gradient: torch.Tensor, curvature: torch.Tensor, lr: float, steps: int
) -> torch.Tensor:
    """Δθ = −g (1 − exp(−η λ T)) / λ, the exact gradient flow on a diagonal quadratic.

    Uses −η T g where η λ T is tiny (the λ → 0 limit, without 0/0).
    """
    exponent = lr * steps * curvature.clamp_min(0)
    small = exponent < 1e-6
    factor = torch.where(
        small, lr * steps * (1 - exponent / 2), -torch.expm1(-exponent) / curvature.clamp_min(1e-30)
    )
    return -gradient * factor


def gradient_and_curvature(
    losses_of: Callable[[Any, bool], Losses],
    params: dict[str, torch.Tensor],
    examples: Sequence[Sequence[Any]],
    *,
    curvature: str = "fisher",
    curvature_examples: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient and diagonal curvature of a loss over ``examples`` (batches), with
    respect to the leaf tensors ``params``.

    Each example is a sequence of pieces (runs of a batch's rows), backpropagated
    one at a time, so only one piece's activations exist at once.
    ``losses_of(piece, sample)`` gives the piece's share of its example's mean
    loss and, with ``sample``, its summed loss with labels drawn from the model;
    an example's gradient is the sum of its pieces'.

    ``fisher``: squared gradients of the sampled-label loss on the first
    ``curvature_examples`` examples. Per-token gradients with sampled labels are
    independent with zero mean, so the square of a whole batch's gradient is an
    unbiased estimate of the summed per-token Fisher (= Gauss-Newton for
    cross-entropy) diagonals: one backward per piece, no per-example gradients.
    ``hutchinson``: z ⊙ Hz with Rademacher z (exact for a diagonal Hessian).

    Parameter-sized tensors: the two sums (`zeros_like_all`: float32 for
    half-precision parameters) and, for the Fisher of a batch in several pieces,
    a third holding that batch's gradient until it is squared. Each
    gradient is added to them as backward produces it and then dropped, so a
    whole set of gradients never exists at once (the Hutchinson estimate, which
    differentiates one again, excepted).
    """
    if curvature not in ("fisher", "hutchinson"):
        raise AquinError(f"curvature must be 'fisher' or 'hutchinson', got {curvature!r}")
    gradient, curve = zeros_like_all(params), zeros_like_all(params)
    batch_gradient: dict[str, torch.Tensor] | None = None  # the Fisher's third

    def add_gradient(name: str, value: torch.Tensor) -> None:
        gradient[name] += value

    generator = torch.Generator().manual_seed(seed)
    limit = len(examples) if curvature_examples is None else min(curvature_examples, len(examples))
    tokens_seen = 0
    was_required = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        for index, pieces in enumerate(
            tqdm(examples, desc="simulate: gradients", disable=not progress)
        ):
            if index < limit and curvature == "fisher":
                if len(pieces) > 1 and batch_gradient is None:
                    batch_gradient = zeros_like_all(params)
                tokens_seen += _add_fisher(
                    losses_of, pieces, params, add_gradient, curve, batch_gradient
                )
            elif index < limit:
                z = {
                    name: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(
                        device=p.device, dtype=p.dtype
                    )
                    for name, p in params.items()
                }
                for piece in pieces:
                    _add_hutchinson(losses_of(piece, False).mean, params, z, gradient, curve)
            else:
                batch_gradient = None
                for piece in pieces:
                    _backward_into(losses_of(piece, False).mean, params, add_gradient)
    finally:
        for n, p in params.items():
            p.requires_grad_(was_required[n])
    scale = max(tokens_seen, 1) if curvature == "fisher" else limit
    for n in params:
        gradient[n] /= len(examples)
        curve[n] /= scale
    return gradient, curve


def zeros_like_all(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zeros shaped like each of ``params`` in its `accumulator_dtype`: views of one flat
    buffer per dtype, so a sum is one allocation, given back whole when it goes,
    rather than hundreds that fragment the heap around a pass's activations."""
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    for p in params.values():
        key = (accumulator_dtype(p.dtype), p.device)
        sizes[key] = sizes.get(key, 0) + p.numel()
    buffers = {key: torch.zeros(size, dtype=key[0], device=key[1]) for key, size in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    views = {}
    for name, p in params.items():
        key = (accumulator_dtype(p.dtype), p.device)
        views[name] = buffers[key][offsets[key] : offsets[key] + p.numel()].view(p.shape)
        offsets[key] += p.numel()
    return views


def _add_fisher(
    losses_of: Callable[[Any, bool], Losses],
    pieces: Sequence[Any],
    params: dict[str, torch.Tensor],
    add_gradient: Callable[[str, torch.Tensor], None],
    curve: dict[str, torch.Tensor],
    batch_gradient: dict[str, torch.Tensor] | None,
) -> int:
    """Add one batch's gradient, and the square of its sampled-label gradient to
    ``curve``; the number of tokens whose labels were drawn.

    A batch in one piece is squared as backward produces it; in several, its
    gradient is summed in ``batch_gradient`` first (then zeroed for the next).
    """

    def add_sampled(name: str, value: torch.Tensor) -> None:
        if len(pieces) == 1:
            curve[name] += value.to(curve[name].dtype) ** 2
        else:
            assert batch_gradient is not None
            batch_gradient[name] += value

    tokens = 0
    for piece in pieces:
        losses = losses_of(piece, True)
        if losses.sampled is None:
            raise AquinError("the Fisher curvature needs the loss with sampled labels")
        _backward_into(losses.mean, params, add_gradient, retain_graph=True)
        _backward_into(losses.sampled, params, add_sampled)
        tokens += losses.tokens
    if len(pieces) > 1:
        assert batch_gradient is not None
        for name, total in batch_gradient.items():
            curve[name] += total**2
            total.zero_()
    return tokens


def _backward_into(
    loss: torch.Tensor,
    params: dict[str, torch.Tensor],
    add: Callable[[str, torch.Tensor], None],
    *,
    retain_graph: bool = False,
) -> None:
    """Backpropagate ``loss`` to ``params``, handing each gradient to ``add(name, grad)``
    the moment autograd has it and dropping it from ``.grad``."""

    def hand_over(name: str, parameter: torch.Tensor) -> None:
        assert parameter.grad is not None
        add(name, parameter.grad)
        parameter.grad = None

    handles = [
        p.register_post_accumulate_grad_hook(functools.partial(hand_over, name))
        for name, p in params.items()
    ]
    try:
        torch.autograd.backward(loss, inputs=list(params.values()), retain_graph=retain_graph)
    finally:
        for handle in handles:
            handle.remove()


def _add_hutchinson(
    loss: torch.Tensor,
    params: dict[str, torch.Tensor],
    z: dict[str, torch.Tensor],
    gradient: dict[str, torch.Tensor],
    curve: dict[str, torch.Tensor],
) -> None:
    """Add ``loss``'s gradient to ``gradient`` and z ⊙ Hz to ``curve``."""
    names, tensors = list(params), list(params.values())
    grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    directional = sum(
        ((g * z[name]).sum() for name, g in zip(names, grads, strict=True) if g is not None),
        torch.zeros((), dtype=loss.dtype, device=loss.device),
    )
    hessian_z: Sequence[torch.Tensor | None] = (
        torch.autograd.grad(directional, tensors, allow_unused=True)
        if directional.requires_grad
        else [None] * len(tensors)
    )
    for name, g, hz in zip(names, grads, hessian_z, strict=True):
        if g is not None:
            gradient[name] += g.detach()
        if hz is not None:
            curve[name] += (z[name] * hz).to(curve[name].dtype)
