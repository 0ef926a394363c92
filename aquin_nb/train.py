"""``sae_train``: a temporary SAE trained on a checkpoint's own activations.

Training is SAELens's own ``SAETrainer`` fed by an iterator of activation
batches; aquin_nb only collects the activations, picks the configuration, and
evaluates the result beside the public SAE.

Example:
    >>> import aquin_nb
    >>> trained = aquin_nb.sae_train(
    ...     "tiny-gpt2", 2, checkpoint=checkpoint, steps=20, output="temp_sae", progress=False
    ... )
    >>> trained.summary["init_from"], trained.summary["d_sae"], trained.load().cfg.d_in
    ('public', 1536, 192)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import __version__
from ._architectures import resolve_context_size
from ._errors import AquinError
from ._io import atomic_torch_save
from ._quiet import quiet_unless_progress
from ._train_data import Batches, cache_dir_for, collect_from_capture, collect_from_model
from ._verbs import verb
from .capture import default_numerics
from .catalog import find_entry
from .results import LOSS_COLUMNS, ROTATION_COLUMNS, TrainedSae
from .saes import load_sae

logger = logging.getLogger(__name__)

__all__ = ["LOSS_COLUMNS", "TrainedSae", "sae_train"]

ARCHITECTURES = ("standard", "topk")
QUICK_TOKENS = 120_000


def default_output_dir(model: str, name: str) -> Path:
    home = Path(os.environ.get("AQUIN_NB_HOME", Path.home() / ".aquin_nb"))
    return home / "sae" / "user" / Path(model).name / name


def _training_sae(
    architecture: str,
    d_in: int,
    d_sae: int,
    public: Any,
    init_from: str,
    metadata: Any,
    l1: float,
    k: int,
) -> Any:
    from sae_lens import (
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    from .saes import _quiet_processing_hint

    # A warm start keeps the public SAE's (already folded) scale; a fresh SAE
    # learns one with SAELens's activation normalisation.
    normalize = "none" if init_from == "public" else "expected_average_only_in"
    with _quiet_processing_hint():
        if architecture == "standard":
            cfg: Any = StandardTrainingSAEConfig(
                d_in=d_in,
                d_sae=d_sae,
                l1_coefficient=l1,
                normalize_activations=normalize,
                metadata=metadata,
            )
            sae: Any = StandardTrainingSAE(cfg)
        else:
            cfg = TopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=k, normalize_activations=normalize, metadata=metadata
            )
            sae = TopKTrainingSAE(cfg)
        if init_from == "public":
            if public.cfg.architecture() != architecture:
                raise AquinError(
                    f"cannot warm-start a {architecture} SAE from the public "
                    f"{public.cfg.architecture()} SAE; use architecture={public.cfg.architecture()!r} "
                    f"or init_from='scratch'"
                )
            state = public.state_dict()
            own = sae.state_dict()
            sae.load_state_dict({key: state[key] if key in state else own[key] for key in own})
        return sae


@torch.no_grad()
def _metrics(sae: Any, activations: torch.Tensor) -> dict[str, float]:
    feats = sae.encode(activations)
    reconstruction = sae.decode(feats)
    error = float(((activations - reconstruction) ** 2).sum())
    variance = float(((activations - activations.mean(0)) ** 2).sum())
    return {
        "explained_variance": 1.0 - error / variance if variance > 0 else 0.0,
        "l0": float((feats > 0).float().sum(1).mean()),
        "dead_fraction": float((~(feats > 0).any(0)).float().mean()),
    }


@verb("sae_train")
@quiet_unless_progress
def sae_train(
    model: str | Path,
    layer: int,
    *,
    checkpoint: str | Path | None = None,
    activations: str | Path | None = None,
    prompts: Any = None,
    sae: Any = None,
    init_from: str = "public",
    architecture: str = "standard",
    d_sae: int | None = None,
    steps: int | None = None,
    tokens: int | None = None,
    quick: bool = False,
    name: str | None = None,
    output: str | Path | None = None,
    batch_size: int = 2048,
    lr: float = 4e-4,
    l1_coefficient: float = 3.0,
    k: int = 32,
    seed: int = 0,
    context_size: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> TrainedSae:
    """Train a temporary SAE on ``layer`` of the model or checkpoint, with SAELens's trainer.

    Data: a capture directory (``activations``), or a corpus (``prompts``, else the
    shipped corpus), collected from the checkpoint in windows of ``context_size``
    tokens and cached in ``_acts_layer<N>_ctx<C>/`` beside the output so a second
    run reuses it. ``context_size`` defaults to the public SAE's context size, else
    1,024 (`aquin_nb._architectures.DEFAULT_CONTEXT_SIZE`), capped at the model's
    maximum context; a larger one is refused. The trained SAE's metadata records it.

    ``init_from="public"`` (the default) warm-starts from the public SAE (``sae``:
    anything `load_sae` takes; by default the catalog's for the model): feature
    identities are kept, so each feature's decoder rotation is a finding (the
    stage-wise model-diffing approach), and far fewer tokens are needed.
    ``quick`` trains on 120k tokens for a smoke run. The model runs, and the SAE
    trains, on ``device`` (default: CUDA when available, as `load_model`); the model
    runs in ``dtype`` (float32, bfloat16 or float16) and the SAE trains in float32
    on float32 copies of its activations. Ctrl-C
    stops training and still writes what was trained so far (``summary["interrupted"]``).

    Output: ``~/.aquin_nb/sae/user/<model>/<name>/sae_layer<N>.pt`` (``{cfg,
    state_dict}``) and a SAELens directory ``sae_layer<N>/`` beside it; ``output``
    (or ``$AQUIN_NB_HOME``) moves it.

    Example:
        >>> trained = sae_train("tiny-gpt2", 2, checkpoint=checkpoint, steps=20, output="sae")
        >>> list(trained.rotated(5).columns), len(trained.rotated(5))
        (['feature', 'decoder_cosine', 'rotation'], 5)
    """
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    if architecture not in ARCHITECTURES:
        raise AquinError(
            f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}"
        )
    if init_from not in ("public", "scratch"):
        raise AquinError(f"init_from must be 'public' or 'scratch', got {init_from!r}")
    if d_sae is not None and d_sae <= 0:
        raise AquinError(f"d_sae must be a positive integer, got {d_sae}")
    for label, value in (("steps", steps), ("tokens", tokens), ("batch_size", batch_size)):
        if value is not None and value <= 0:
            raise AquinError(f"{label} must be positive, got {value}")
    from ._architectures import max_context
    from ._dtypes import dtype_name, resolve_dtype
    from .models import load_hf_model
    from .saes import check_sae_fits

    model_dtype = resolve_dtype(dtype, device)
    model_text = str(model)
    hf, _, label = load_hf_model(model_text)
    n_layers, d_model = int(hf.config.num_hidden_layers), int(hf.config.hidden_size)
    model_max = max_context(hf)
    del hf
    if not 0 <= layer < n_layers:
        raise AquinError(
            f"layer {layer} is out of range: {label} has {n_layers} layers (0-{n_layers - 1})"
        )
    entry = find_entry(model_text)
    public = None
    if sae is not None:
        public = load_sae(sae, layer)
        check_sae_fits(public, d_model, n_layers, layer, label)
    else:
        try:
            public = load_sae(entry.slug if entry is not None else model_text, layer)
        except AquinError as error:
            if init_from == "public":
                raise AquinError(
                    f"cannot warm-start: no public SAE for {label} layer {layer} ({error}); "
                    f"pass sae= (--sae) or init_from='scratch'"
                ) from None
    if public is not None and init_from == "public":
        d_sae = int(public.cfg.d_sae) if d_sae is None else d_sae
        if d_sae != int(public.cfg.d_sae):
            raise AquinError(
                f"a warm start keeps the public width: d_sae must be "
                f"{public.cfg.d_sae}, got {d_sae}"
            )
    d_sae = d_sae or 8 * d_model
    numerics = default_numerics(model_text, layer, public)
    corpus_context = resolve_context_size(
        context_size, sae_context=numerics.context_size, model_max=model_max, label=label
    )
    window = (
        _capture_context(Path(activations), context_size)
        if activations is not None
        else corpus_context
    )
    name = name or ("temp" if checkpoint is None else Path(checkpoint).stem)
    out_dir = Path(output) if output is not None else default_output_dir(label, name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AquinError(f"cannot write to output {out_dir}: {error.strerror}") from None
    if not os.access(out_dir, os.W_OK):
        raise AquinError(f"cannot write to output {out_dir}: permission denied")

    budget = tokens or (steps * batch_size if steps else (QUICK_TOKENS if quick else 1_000_000))
    if activations is not None:
        data = collect_from_capture(Path(activations), layer, d_model)
    else:
        # Batches are drawn with replacement, so 400k distinct tokens is plenty.
        data = collect_from_model(
            model_text,
            checkpoint,
            layer,
            prompts,
            numerics,
            cache_dir_for(out_dir, layer, corpus_context, dtype_name(model_dtype)),
            min(budget, 400_000),
            d_model,
            progress,
            corpus_context,
            device,
            model_dtype,
        )
    if len(data) < 20:
        raise AquinError(f"only {len(data)} activations to train on; give more prompts")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=generator)
    n_held = max(10, len(data) // 10)
    held_out, train = data[order[:n_held]], data[order[n_held:]]
    effective_batch = min(batch_size, len(train))
    total_steps = steps or max(1, budget // effective_batch)
    if len(train) < 20 * effective_batch and total_steps * effective_batch > 5 * len(train):
        logger.warning(
            "training on only %d activations for %d steps: the temporary SAE will overfit; "
            "capture more prompts or train on the corpus",
            len(train),
            total_steps,
        )

    metadata = SAEMetadata(
        model_name=label,
        hook_name=numerics.hook_name,
        hook_head_index=None,
        context_size=window,
        prepend_bos=numerics.prepend_bos,
        model_from_pretrained_kwargs={key: True for key, on in numerics.processing.items() if on},
    )
    torch.manual_seed(seed)
    sae = _training_sae(
        architecture, d_model, d_sae, public, init_from, metadata, l1_coefficient, k
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total_steps * effective_batch,
        train_batch_size_samples=effective_batch,
        lr=lr,
        lr_end=lr / 10,
        lr_warm_up_steps=min(50, total_steps // 10),
        n_batches_for_norm_estimate=10,
        dead_feature_window=max(50, total_steps // 4),
        feature_sampling_window=max(100, total_steps // 2),
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    trainer = _recording_trainer_class()(
        cfg=trainer_cfg, sae=sae, data_provider=Batches(train, effective_batch, seed)
    )
    interrupted = False
    try:
        with _trainer_bar(progress):
            trained = trainer.fit()
    except KeyboardInterrupt:
        interrupted = True
        logger.warning(
            "training interrupted at step %d: saving what was trained", trainer.n_training_steps
        )
        trained = trainer.sae
        if trainer.activation_scaler.scaling_factor is not None:
            trained.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
    path, saelens_dir = _save(trained, out_dir, layer)
    inference = load_sae(saelens_dir)

    features = pd.DataFrame(columns=list(ROTATION_COLUMNS))
    if init_from == "public" and public is not None:
        cosine = (
            torch.nn.functional.cosine_similarity(
                inference.W_dec.detach(), public.W_dec.detach(), dim=1
            )
            .double()
            .numpy()
        )
        features = pd.DataFrame(
            {"feature": np.arange(len(cosine)), "decoder_cosine": cosine, "rotation": 1.0 - cosine}
        )
        features = features.sort_values(
            ["rotation", "feature"], ascending=[False, True], kind="stable"
        ).reset_index(drop=True)
    summary = {
        "path": str(path),
        "saelens_dir": str(saelens_dir),
        "model": label,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "name": name,
        "layer": layer,
        "hook": numerics.hook_name,
        "context_size": window,
        "init_from": init_from,
        "architecture": architecture,
        "d_sae": d_sae,
        "steps": trainer.n_training_steps,
        "tokens": trainer.n_training_samples,
        "data": str(activations) if activations is not None else "corpus",
        "interrupted": interrupted,
        "config": {
            "lr": lr,
            "batch_size": batch_size,
            "l1_coefficient": l1_coefficient,
            "k": k if architecture == "topk" else None,
            "seed": seed,
        },
        "metrics": {
            "n_held_out": n_held,
            "trained": _metrics(inference, held_out),
            "public": _metrics(public, held_out) if public is not None else None,
        },
        "tool_version": __version__,
    }
    loss_curve = pd.DataFrame(trainer.losses, columns=list(LOSS_COLUMNS))
    return TrainedSae(summary=summary, loss_curve=loss_curve, features=features)


def _capture_context(directory: Path, requested: int | None) -> int | None:
    """The context size a capture directory was made at (``None`` for older captures);
    a different ``requested`` one is refused, since the windows are already cut."""
    from .capture import Capture

    made_at = Capture.open(directory).summary.get("context_size")
    if requested is not None and made_at is not None and requested != made_at:
        raise AquinError(
            f"context_size {requested} does not match the capture in {directory}, "
            f"made at {made_at} tokens; capture again with that context size"
        )
    return int(made_at) if made_at is not None else None


def _save(sae: Any, out_dir: Path, layer: int) -> tuple[Path, Path]:
    """Write the SAELens directory, then the ``{cfg, state_dict}`` .pt from it."""
    saelens_dir = out_dir / f"sae_layer{layer}"
    staging = out_dir / f".sae_layer{layer}.partial"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    sae.save_inference_model(str(staging))
    if saelens_dir.exists():
        import shutil

        shutil.rmtree(saelens_dir)
    staging.rename(saelens_dir)
    inference = load_sae(saelens_dir)
    path = atomic_torch_save(
        out_dir / f"sae_layer{layer}.pt",
        {
            "cfg": inference.cfg.to_dict(),
            "state_dict": {
                key: value.detach().cpu() for key, value in inference.state_dict().items()
            },
        },
    )
    return path, saelens_dir


@contextlib.contextmanager
def _trainer_bar(progress: bool) -> Iterator[None]:
    """SAELens's "Training SAE" bar, named ours and hidden with ``progress=False``.

    SAELens builds the bar inside ``fit`` from its module's ``tqdm``; the bar is
    swapped for the duration of the call only.
    """
    from sae_lens.training import sae_trainer
    from tqdm.auto import tqdm

    original = sae_trainer.tqdm
    sae_trainer.tqdm = functools.partial(tqdm, disable=not progress, unit="act")
    try:
        yield
    finally:
        sae_trainer.tqdm = original


def _recording_trainer_class() -> type:
    from sae_lens import SAETrainer

    class RecordingTrainer(SAETrainer):  # type: ignore[misc]
        """SAELens's trainer, recording each step's loss for the loss curve."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.losses: list[tuple[int, float, float]] = []

        def step(self, batch: torch.Tensor) -> Any:
            output = super().step(batch)
            mse = output.losses.get("mse_loss")
            self.losses.append(
                (
                    self.n_training_steps,
                    output.loss.item(),
                    mse.item() if mse is not None else float("nan"),
                )
            )
            return output

        def _update_pbar(self, step_output: Any, pbar: Any, update_interval: int = 100) -> None:
            # SAELens moves its bar every 100 steps, so a short run sat at 0: move it every step.
            pbar.update(self.cfg.train_batch_size_samples)
            if self.n_training_steps % 10 == 0 or self.n_training_steps == 1:
                pbar.set_description(f"sae train step {self.n_training_steps}")
                pbar.set_postfix(loss=f"{step_output.loss.item():.4g}", refresh=False)

    return RecordingTrainer
