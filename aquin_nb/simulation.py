"""``simulate``: forecast a fine-tune with an NTK-linearised synthetic checkpoint.

Linearise the model around the base weights θ₀, f(θ) ≈ f(θ₀) + J(θ − θ₀), and
predict where gradient descent with learning rate η for T steps would take θ:

* **NTK-diagonal closed form** (default). One pass over the data estimates the
  mean gradient g at θ₀ and a diagonal curvature λ (the Fisher / Gauss-Newton
  diagonal from per-example squared gradients of the loss with labels sampled
  from the model, or a Hutchinson estimate of the Hessian diagonal). Gradient
  flow on the diagonal quadratic model then has the exact solution
  Δθ = −g · (1 − exp(−η λ T)) / λ, which tends to −η T g as λ → 0.
* **Linearised training** (``exact_linear=True``). T steps of gradient descent on
  the linearised model: ``torch.func.jvp`` gives f_lin, ``torch.func.vjp`` at θ₀
  gives the gradient, so the Jacobian stays fixed at θ₀.

The synthetic checkpoint is written as ``{step, state_dict}`` and diffed with
``sae_diff``.

Example:
    >>> import aquin_nb
    >>> rows = [{"instruction": "Bake bread.", "response": "Preheat the oven."}] * 4
    >>> sim = aquin_nb.simulate("tiny-gpt2", rows, steps=20, output="sim.pt", progress=False)
    >>> sim.summary["method"], sim.diff.summary["n_features"]
    ('ntk-diagonal', 1536)
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._architectures import max_context, resolve_context_size
from ._errors import AquinError
from ._quiet import quiet_unless_progress
from ._rows import batches_of, encode_rows, read_training_rows
from ._verbs import verb
from .results import Simulation

logger = logging.getLogger(__name__)

__all__ = ["Simulation", "simulate"]

# Rows used for the curvature estimate: it only sets where the closed form
# saturates, and a few dozen rows estimate it well enough.
CURVATURE_ROWS = 64


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- parameters


def default_param_filter(model: Any, sae_layer: int) -> str:
    """Attention and MLP weight matrices of the blocks before the SAE's layer.

    Which modules those are comes from the architecture table
    (`aquin_nb._architectures`); an architecture missing from it is refused with
    the way around it: name the parameters with ``params=``.
    """
    from ._architectures import architecture_of

    remedy = "pass params= (--params), a regex of the parameter names to move"
    return architecture_of(model, remedy=remedy).moved_by_simulate(sae_layer)


def select_params(model: torch.nn.Module, pattern: str) -> dict[str, torch.nn.Parameter]:
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise AquinError(f"params filter {pattern!r} is not a valid regex: {error}") from None
    chosen = {name: p for name, p in model.named_parameters() if regex.search(name)}
    if not chosen:
        raise AquinError(f"params filter {pattern!r} matches no parameter of the model")
    return chosen


# --------------------------------------------------------------------------- estimators


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
    loss_of: Callable[[dict[str, torch.Tensor], Any], torch.Tensor],
    params: dict[str, torch.Tensor],
    examples: Sequence[Any],
    *,
    curvature: str = "fisher",
    sampled_loss_of: Callable[[dict[str, torch.Tensor], Any], tuple] | None = None,
    curvature_examples: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Mean gradient and diagonal curvature at ``params`` over ``examples`` (batches).

    ``fisher``: squared gradients of ``sampled_loss_of``, a summed loss with labels
    drawn from the model, returned with its token count. Per-token gradients with
    sampled labels are independent with zero mean, so the square of a whole
    batch's gradient is an unbiased estimate of the summed per-token Fisher
    (= Gauss-Newton for cross-entropy) diagonals: one backward per batch, no
    per-example gradients. ``hutchinson``: z ⊙ Hz with Rademacher z (exact for a
    diagonal Hessian). Curvature uses the first ``curvature_examples`` batches.
    """
    from torch.func import grad, jvp

    if curvature not in ("fisher", "hutchinson"):
        raise AquinError(f"curvature must be 'fisher' or 'hutchinson', got {curvature!r}")
    names = list(params)
    gradient = {name: torch.zeros_like(p) for name, p in params.items()}
    curve = {name: torch.zeros_like(p) for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    base = {name: p.detach() for name, p in params.items()}
    limit = len(examples) if curvature_examples is None else min(curvature_examples, len(examples))
    tokens_seen = 0
    for index, example in enumerate(
        tqdm(examples, desc="simulate: gradients", disable=not progress)
    ):
        g = grad(loss_of)(base, example)
        for name in names:
            gradient[name] += g[name]
        if index >= limit:
            continue
        if curvature == "fisher":
            gs, tokens = grad(sampled_loss_of or loss_of, has_aux=True)(base, example)
            tokens_seen += int(tokens)
            for name in names:
                curve[name] += gs[name] ** 2
        else:
            z = {
                name: (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(
                    device=p.device, dtype=p.dtype
                )
                for name, p in base.items()
            }
            _, hz = jvp(  # type: ignore[misc]
                lambda p, example=example: grad(loss_of)(p, example), (base,), (z,)
            )
            for name in names:
                curve[name] += z[name] * hz[name]
    scale = max(tokens_seen, 1) if curvature == "fisher" else limit
    return (
        {n: v / len(examples) for n, v in gradient.items()},
        {n: v / scale for n, v in curve.items()},
    )


# --------------------------------------------------------------------------- the verb


@verb("simulate")
@quiet_unless_progress
def simulate(
    model: str | Path,
    data: Any,
    lr: float = 0.002,
    steps: int = 100,
    *,
    batch_size: int = 8,
    layer: int | None = None,
    sae: Any = None,
    name: str | None = None,
    output: str | Path | None = None,
    params: str | None = None,
    exact_linear: bool = False,
    curvature: str = "fisher",
    prompts: Any = None,
    seed: int = 0,
    context_size: int | None = None,
    progress: bool = True,
) -> Simulation:
    """Forecast which SAE features a fine-tune on ``data`` would move, without training.

    ``lr`` and ``steps`` are those of plain gradient descent (the forecast's
    dynamics). A linear forecast is trustworthy while the real fine-tune stays
    near θ₀: on tiny-gpt2 it matches a real SGD fine-tune at lr 0.002 x 100 steps
    (top-20 overlap 0.6) and degrades beyond (0.45 at lr 0.004). ``params`` is a regex over parameter names; the default moves the
    attention and MLP weight matrices of the blocks before the SAE's layer (the
    parameters that can change the SAE's input; the architecture table says which
    modules those are). Rows are cut to ``context_size`` tokens (default 1,024, or
    the model's maximum context when smaller). The synthetic checkpoint goes to
    ``output`` (default ``simulations/<name>.pt``) and is diffed on ``prompts``
    (default: the shipped probes).

    Example:
        >>> from aquin_nb.demo.finetune import FINETUNE_DATA  # the shipped cooking set
        >>> sim = simulate("tiny-gpt2", FINETUNE_DATA, steps=50, output="sim.pt", progress=False)
        >>> sim.summary["n_examples"] > 100 and sim.diff.summary["max_abs_delta"] > 0
        True
    """
    from torch.func import functional_call

    from ._io import atomic_torch_save
    from .diff import sae_diff
    from .models import hf_state_dict, load_hf_model
    from .saes import load_sae, sae_numerics

    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise AquinError(f"lr must be a finite, non-negative number, got {lr!r}")
    if steps < 1 or batch_size < 1:
        raise AquinError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    rows = read_training_rows(data)
    started = time.perf_counter()
    hf, tokenizer, label = load_hf_model(model)
    sae_obj = load_sae(sae if sae is not None else str(model), layer)
    sae_layer = sae_numerics(sae_obj, layer).layer
    pattern = params or default_param_filter(hf, sae_layer)
    chosen = select_params(hf, pattern)
    for parameter in hf.parameters():
        parameter.requires_grad_(False)
    window = resolve_context_size(
        context_size, sae_context=None, model_max=max_context(hf), label=label
    )
    encoded = encode_rows(tokenizer, rows, window)
    if all(all(label == -100 for label in labels) for _, labels in encoded):
        raise AquinError("no row has a token to train on (responses are empty after tokenizing)")
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    frozen = {n: p.detach() for n, p in hf.named_parameters() if n not in chosen}
    hf.eval()

    def logits_of(theta: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        return functional_call(hf, {**frozen, **theta}, (input_ids,)).logits

    def loss_of(theta: dict[str, torch.Tensor], batch: tuple) -> torch.Tensor:
        input_ids, labels = batch
        return _shifted_ce(logits_of(theta, input_ids), labels)

    generator = torch.Generator().manual_seed(seed)

    def sampled_loss_of(theta: dict[str, torch.Tensor], batch: tuple) -> tuple:
        """Summed loss with labels drawn from the model, and the token count."""
        input_ids, labels = batch
        logits = logits_of(theta, input_ids)
        with torch.no_grad():
            probs = torch.softmax(logits[:, :-1].float(), -1)
            drawn = torch.multinomial(
                probs.reshape(-1, probs.shape[-1]), 1, generator=generator
            ).view(probs.shape[:-1])
            sampled = labels.clone()
            sampled[:, 1:] = torch.where(labels[:, 1:] == -100, labels[:, 1:], drawn)
        tokens = (sampled[:, 1:] != -100).sum()
        return _shifted_ce(logits, sampled, reduction="sum"), tokens

    theta0 = {n: p.detach().clone() for n, p in chosen.items()}
    if exact_linear:
        delta = _linearised_training(
            logits_of, theta0, encoded, lr, steps, batch_size, pad, seed, progress
        )
        method = "exact-linear"
    else:
        batches = list(batches_of(encoded, batch_size, pad))
        gradient, curve = gradient_and_curvature(
            loss_of,
            theta0,
            batches,
            curvature=curvature,
            sampled_loss_of=sampled_loss_of,
            curvature_examples=max(1, CURVATURE_ROWS // batch_size),
            seed=seed,
            progress=progress,
        )
        delta = {n: ntk_diagonal_delta(gradient[n], curve[n], lr, steps) for n in theta0}
        method = "ntk-diagonal"
    with torch.no_grad():
        for n, parameter in chosen.items():
            parameter.add_(delta[n])
    name = name or f"sim-{Path(str(data)).stem if isinstance(data, (str, Path)) else 'data'}"
    path = Path(output) if output is not None else Path("simulations") / f"{name}.pt"
    atomic_torch_save(path, {"step": steps, "state_dict": hf_state_dict(hf)})
    delta_norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    logger.info("synthetic checkpoint %s (%s, |Δθ| %.4g)", path, method, delta_norm)
    diff = sae_diff(
        model, path, prompts=prompts, layer=layer, sae=sae_obj, name=name, progress=progress
    )
    summary = {
        "checkpoint": str(path),
        "method": method,
        "curvature": None if exact_linear else curvature,
        "lr": lr,
        "steps": steps,
        "batch_size": batch_size,
        "n_examples": len(encoded),
        "params": pattern,
        "n_params": len(chosen),
        "context_size": window,
        "delta_norm": delta_norm,
        "seconds": time.perf_counter() - started,
        "model": label,
    }
    return Simulation(summary=summary, diff=diff)


def _shifted_ce(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def _linearised_training(
    logits_of: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    theta0: dict[str, torch.Tensor],
    encoded: list[tuple],
    lr: float,
    steps: int,
    batch_size: int,
    pad: int,
    seed: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """T steps of GD on f_lin(θ) = f(θ₀) + J(θ − θ₀); the Jacobian stays at θ₀."""
    from torch.func import jvp, vjp

    delta = {n: torch.zeros_like(p) for n, p in theta0.items()}
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="simulate: linearised GD", disable=not progress):
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        input_ids, labels = next(batches_of([encoded[i] for i in picks], batch_size, pad))

        def f(theta: dict[str, torch.Tensor], ids: torch.Tensor = input_ids) -> torch.Tensor:
            return logits_of(theta, ids)

        base_logits, tangent = jvp(f, (theta0,), (delta,))  # type: ignore[misc]
        linear_logits = (base_logits + tangent).detach().requires_grad_(True)
        loss = _shifted_ce(linear_logits, labels)
        (cotangent,) = torch.autograd.grad(loss, linear_logits)
        _, pullback = vjp(f, theta0)  # type: ignore[misc]
        (gradient,) = pullback(cotangent)
        for n in delta:
            delta[n] = delta[n] - lr * gradient[n]
    return delta
