"""``simulate``: forecast a fine-tune with an NTK-linearised synthetic checkpoint.

Linearise the model around the base weights θ₀, f(θ) ≈ f(θ₀) + J(θ − θ₀), and
predict where gradient descent with learning rate η for T steps would take θ:

* **NTK-diagonal closed form** (default). One pass over the data estimates the
  mean gradient g at θ₀ and a diagonal curvature λ (the Fisher / Gauss-Newton
  diagonal from squared batch gradients of the loss with labels sampled from
  the model, or a Hutchinson estimate of the Hessian diagonal). Gradient
  flow on the diagonal quadratic model then has the exact solution
  Δθ = −g · (1 − exp(−η λ T)) / λ, which tends to −η T g as λ → 0.
* **Linearised training** (``exact_linear=True``). T steps of gradient descent on
  the linearised model: ``torch.func.jvp`` gives f_lin, ``torch.func.vjp`` at θ₀
  gives the gradient, so the Jacobian stays fixed at θ₀.

The estimate is summed into float32 buffers the size of the moved parameters
only, a few rows at a time (`aquin_nb._curvature`). The synthetic checkpoint is
written as ``{step, state_dict}`` and diffed with ``sae_diff``.

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
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._architectures import max_context, resolve_context_size
from ._curvature import Losses, gradient_and_curvature, ntk_diagonal_delta, zeros_like_all
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
# Tokens per forward-backward pass: a batch is cut into runs of rows this long
# (one row at least), so its activations are never held for more at once.
PIECE_TOKENS = 128


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
    dtype: str | torch.dtype | None = None,
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

    The forecast runs on the CPU in ``dtype`` (float32, bfloat16 or float16;
    default float32), with the gradient and curvature sums in float32 whatever it
    is. The checkpoint is the float32 base plus Δθ (Δθ added to half-precision
    weights would round away), and the diff runs in float32. Memory: the model,
    two sums the size of the moved parameters (a third while the Fisher's first
    64 rows are read, if a batch is more than `PIECE_TOKENS` tokens), and the
    activations of `PIECE_TOKENS` tokens (one row at least); the diff then holds
    the base and the checkpoint.

    Example:
        >>> from aquin_nb.demo.finetune import FINETUNE_DATA  # the shipped cooking set
        >>> sim = simulate("tiny-gpt2", FINETUNE_DATA, steps=50, output="sim.pt", progress=False)
        >>> sim.summary["n_examples"] > 100 and sim.diff.summary["max_abs_delta"] > 0
        True
    """
    from ._dtypes import dtype_name, resolve_dtype
    from ._io import atomic_torch_save
    from .diff import sae_diff
    from .models import hf_state_dict, load_hf_model
    from .saes import load_sae, sae_numerics

    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise AquinError(f"lr must be a finite, non-negative number, got {lr!r}")
    if steps < 1 or batch_size < 1:
        raise AquinError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    if curvature not in ("fisher", "hutchinson"):
        raise AquinError(f"curvature must be 'fisher' or 'hutchinson', got {curvature!r}")
    run_dtype = resolve_dtype(dtype, "cpu")
    rows = read_training_rows(data)
    started = time.perf_counter()
    hf, tokenizer, label = load_hf_model(model, dtype=run_dtype)
    sae_obj = load_sae(sae if sae is not None else str(model), layer)
    sae_layer = sae_numerics(sae_obj, layer).layer
    pattern = params or default_param_filter(hf, sae_layer)
    chosen = select_params(hf, pattern)
    window = resolve_context_size(
        context_size, sae_context=None, model_max=max_context(hf), label=label
    )
    encoded = encode_rows(tokenizer, rows, window)
    if all(all(label == -100 for label in labels) for _, labels in encoded):
        raise AquinError("no row has a token to train on (responses are empty after tokenizing)")
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    if exact_linear:
        delta = _linearised_training(
            hf, chosen, encoded, lr, steps, batch_size, pad, seed, progress
        )
    else:
        delta = _ntk_diagonal_forecast(
            hf, chosen, encoded, lr, steps, batch_size, pad, curvature, seed, progress
        )
    if run_dtype != torch.float32:
        del chosen, hf  # before the float32 copy is loaded
        hf = load_hf_model(model)[0]
        chosen = select_params(hf, pattern)
    _add_to(chosen, delta)
    name = name or f"sim-{Path(str(data)).stem if isinstance(data, (str, Path)) else 'data'}"
    path = Path(output) if output is not None else Path("simulations") / f"{name}.pt"
    atomic_torch_save(path, {"step": steps, "state_dict": hf_state_dict(hf)})
    n_params = len(chosen)
    delta_norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    del chosen, hf, delta  # sae_diff loads the base and the checkpoint itself
    method = "exact-linear" if exact_linear else "ntk-diagonal"
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
        "n_params": n_params,
        "context_size": window,
        "dtype": dtype_name(run_dtype),
        "delta_norm": delta_norm,
        "seconds": time.perf_counter() - started,
        "model": label,
    }
    return Simulation(summary=summary, diff=diff)


def _add_to(params: dict[str, torch.nn.Parameter], delta: dict[str, torch.Tensor]) -> None:
    # A helper, so no loop variable outlives it: one parameter left referenced keeps
    # the whole memory-mapped weights file of its model alive through the diff.
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.add_(delta[name].to(parameter.dtype))


def _ntk_diagonal_forecast(
    model: torch.nn.Module,
    chosen: dict[str, torch.nn.Parameter],
    encoded: list[tuple],
    lr: float,
    steps: int,
    batch_size: int,
    pad: int,
    curvature: str,
    seed: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """Δθ of the closed form, from the gradient and curvature of the moved parameters."""
    generator = torch.Generator().manual_seed(seed)

    def losses_of(piece: tuple, sample: bool) -> Losses:
        return _token_losses(model, piece, sample, generator)

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    gradient, curve = gradient_and_curvature(
        losses_of,
        chosen,  # type: ignore[arg-type]  # Parameters are tensors
        [_pieces(batch, PIECE_TOKENS) for batch in batches_of(encoded, batch_size, pad)],
        curvature=curvature,
        curvature_examples=max(1, CURVATURE_ROWS // batch_size),
        seed=seed,
        progress=progress,
    )
    with torch.no_grad():
        for n in chosen:  # Δθ in the gradient's place: no third parameter-sized tensor
            gradient[n].copy_(ntk_diagonal_delta(gradient[n], curve[n], lr, steps))
    return gradient


def _pieces(batch: tuple, max_tokens: int) -> list[tuple]:
    """``batch`` cut into runs of rows of at most ``max_tokens`` tokens (one row at
    least), each with the batch's number of labelled tokens. The runs keep the
    batch's width, so the labels drawn for them are those drawn for the batch."""
    input_ids, labels = batch
    rows = max(1, max_tokens // input_ids.shape[1])
    labelled = int((labels[:, 1:] != -100).sum())
    return [
        (input_ids[start : start + rows], labels[start : start + rows], labelled)
        for start in range(0, len(input_ids), rows)
    ]


def _token_losses(
    model: torch.nn.Module, piece: tuple, sample: bool, generator: torch.Generator
) -> Losses:
    """Next-token losses on a piece's labelled tokens, from one forward pass: its share
    of its batch's mean loss and, with ``sample``, its summed loss with labels
    drawn from the model.

    One log-softmax serves both losses and only it outlives the pass: at a large
    vocabulary the vocabulary-sized tensors are much of what a piece costs.
    """
    input_ids, labels, labelled = piece
    logits = model(input_ids=input_ids, use_cache=False).logits
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    del logits
    log_probs = torch.log_softmax(shifted, -1)
    targets = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.nll_loss(log_probs, targets, ignore_index=-100, reduction="sum")
    if not sample:
        return Losses(total / labelled)
    with torch.no_grad():
        drawn = torch.multinomial(torch.softmax(shifted, -1), 1, generator=generator)
    del shifted
    sampled_targets = torch.where(targets == -100, targets, drawn.view(-1))
    sampled = torch.nn.functional.nll_loss(
        log_probs, sampled_targets, ignore_index=-100, reduction="sum"
    )
    return Losses(total / labelled, sampled, int((targets != -100).sum()))


def _linearised_training(
    model: torch.nn.Module,
    chosen: dict[str, torch.nn.Parameter],
    encoded: list[tuple],
    lr: float,
    steps: int,
    batch_size: int,
    pad: int,
    seed: int,
    progress: bool,
) -> dict[str, torch.Tensor]:
    """T steps of GD on f_lin(θ) = f(θ₀) + J(θ − θ₀); the Jacobian stays at θ₀.

    Δθ accumulates in float32 for a half-precision model; the tangent the
    Jacobian is applied to is Δθ in the model's dtype.
    """
    from torch.func import functional_call, jvp, vjp

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    theta0 = {n: p.detach() for n, p in chosen.items()}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}

    def logits_of(theta: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {**frozen, **theta}, (input_ids,)).logits

    delta = zeros_like_all(theta0)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="simulate: linearised GD", disable=not progress):
        picks = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        input_ids, labels = next(batches_of([encoded[i] for i in picks], batch_size, pad))

        def f(theta: dict[str, torch.Tensor], ids: torch.Tensor = input_ids) -> torch.Tensor:
            return logits_of(theta, ids)

        tangent_in = {n: d.to(theta0[n].dtype) for n, d in delta.items()}
        base_logits, tangent = jvp(f, (theta0,), (tangent_in,))  # type: ignore[misc]
        linear_logits = (base_logits + tangent).detach().requires_grad_(True)
        loss = _shifted_ce(linear_logits, labels)
        (cotangent,) = torch.autograd.grad(loss, linear_logits)
        _, pullback = vjp(f, theta0)  # type: ignore[misc]
        (gradient,) = pullback(cotangent)
        for n in delta:
            delta[n] -= lr * gradient[n].to(delta[n].dtype)
    return delta


def _shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )
