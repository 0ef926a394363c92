"""``capture_activations``: residual-stream activations of a model or checkpoint, to disk.

Example:
    >>> import aquin_nb
    >>> cap = aquin_nb.capture_activations(
    ...     "tiny-gpt2", output="acts", layers=[1, 2], count=8, progress=False
    ... )
    >>> cap.summary["layers"], cap.load_layer(2).shape[1]
    ([1, 2], 192)
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from ._activations import (
    context_length,
    prepare_bridge,
    read_hook_plan,
    read_hooks,
    token_batches,
    tokenize_prompts,
)
from ._errors import AquinError
from ._io import atomic_torch_save, atomic_write_json
from ._quiet import quiet_unless_progress
from ._verbs import verb
from .catalog import find_entry
from .probes import load_prompts
from .results import MANIFEST, Capture
from .saes import SaeNumerics, load_sae, parse_hook, sae_numerics

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "Capture", "capture_activations", "read_shard"]

POSITIONS = ("all", "last", "mean")


def read_shard(path: Path, d_model: int) -> dict[str, torch.Tensor]:
    """Load one activation shard, checking it is what the manifest promises."""
    from ._checkpoints import _torch_load

    if not path.is_file():
        raise AquinError(f"activation shard {path} is missing")
    payload = _torch_load(path)
    if not isinstance(payload, dict) or not isinstance(payload.get("activations"), torch.Tensor):
        raise AquinError(f"activation shard {path} holds no 'activations' tensor")
    activations = payload["activations"]
    if activations.ndim != 2 or activations.shape[1] != d_model:
        raise AquinError(
            f"activation shard {path} has shape {tuple(activations.shape)}, "
            f"expected (rows, {d_model}) as the manifest says"
        )
    return payload


def parse_layers(layers: Any, n_layers: int, label: str) -> list[int]:
    """``"all"``, ``"1,2"``, an int or a list → sorted unique layers, range-checked."""
    if layers is None or layers == "all":
        return list(range(n_layers))
    if isinstance(layers, str):
        try:
            layers = [int(part) for part in layers.split(",") if part.strip()]
        except ValueError:
            raise AquinError(
                f"layers must be 'all' or a comma list of integers, got {layers!r}"
            ) from None
    if isinstance(layers, int):
        layers = [layers]
    chosen = sorted(set(int(layer) for layer in layers))
    if not chosen:
        raise AquinError("no layers given")
    for layer in chosen:
        if not 0 <= layer < n_layers:
            raise AquinError(
                f"layer {layer} is out of range: {label} has {n_layers} layers (0-{n_layers - 1})"
            )
    return chosen


def default_numerics(model: str, layer: int, sae: Any = None) -> SaeNumerics:
    """How to read ``layer``: the given SAE's numerics, else the catalog SAE's, else raw."""
    base: SaeNumerics | None = None
    if sae is not None:
        base = sae_numerics(sae)
    elif (entry := find_entry(model)) is not None:
        try:
            base = sae_numerics(load_sae(entry.slug))
        except AquinError as error:
            logger.warning("using raw activations: the public SAE is unavailable (%s)", error)
    if base is None:
        raw = {
            "fold_ln": False,
            "center_writing_weights": False,
            "center_unembed": False,
            "fold_value_biases": False,
        }
        return SaeNumerics(f"blocks.{layer}.hook_resid_pre", layer, True, None, raw)
    _, kind = parse_hook(base.hook_name)
    return SaeNumerics(
        f"blocks.{layer}.{kind}", layer, base.prepend_bos, base.context_size, base.processing
    )


def shipped_probe_sample(count: int, seed: int = 0) -> list[str]:
    """``count`` probes from the shipped set (repeating it when more are asked for)."""
    if count < 1:
        raise AquinError(f"count must be at least 1, got {count}")
    probes = load_prompts(None)
    rng = random.Random(seed)
    picked = rng.sample(probes, min(count, len(probes)))
    while len(picked) < count:
        picked.append(probes[len(picked) % len(probes)])
    return picked


@torch.no_grad()
@verb("capture_activations")
@quiet_unless_progress
def capture_activations(
    model: str | Path,
    checkpoint: str | Path | None = None,
    prompts: Any = None,
    *,
    output: str | Path,
    layers: Any = "all",
    position: str = "all",
    count: int | None = None,
    encode_sae: bool = False,
    sae: Any = None,
    sae_layer: int | None = None,
    name: str | None = None,
    overwrite: bool = False,
    batch_size: int = 16,
    context_size: int | None = None,
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> Capture:
    """Run prompts through the model (or checkpoint) and write residual activations.

    ``layers`` is ``"all"`` or a list; ``position`` is ``all`` (every token but
    BOS), ``last`` or ``mean`` (one row per prompt). Without ``prompts``,
    ``count`` probes are drawn from the shipped probe set (all of it by default).
    With ``encode_sae``, the public SAE's feature vectors for ``sae_layer`` are
    written too, sparse, to ``sae/sae_layer_<N>.pt``. Activations are produced with
    the public SAE's numerics (BOS, weight processing) so they are comparable.

    Prompts are cut to ``context_size`` tokens (BOS included): by default the SAE's
    own context size, else 1,024 (`aquin_nb._architectures.DEFAULT_CONTEXT_SIZE`),
    or the model's maximum context when that is smaller. A ``context_size`` above
    the model's maximum is refused. The manifest records it.

    The model runs on ``device`` (default: CUDA when available) in ``dtype``
    (float32, bfloat16 or float16; the manifest's ``model_dtype``); activations are
    written as float32 whatever it is.

    Example:
        >>> capture_activations(
        ...     "tiny-gpt2", output="acts", layers="1,2", position="last", count=4, progress=False
        ... ).summary["n_rows"]
        4
    """
    from .models import load_model

    if position not in POSITIONS:
        raise AquinError(f"position must be one of {', '.join(POSITIONS)}, got {position!r}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise AquinError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise AquinError(
            f"output directory {output} is not empty; pass overwrite=True (--overwrite)"
        )
    bridge = load_model(model, checkpoint, device=device, dtype=dtype)
    label = str(getattr(bridge, "aquin_label", model))
    n_layers, d_model = int(bridge.cfg.n_layers), int(bridge.cfg.d_model)
    chosen = parse_layers(layers, n_layers, label)
    sae_obj = None
    if encode_sae:
        sae_layer = chosen[-1] if sae_layer is None else sae_layer
        if sae_layer not in chosen:
            raise AquinError(f"sae_layer {sae_layer} is not among the captured layers {chosen}")
        sae_obj = load_sae(sae if sae is not None else str(model), sae_layer)
    numerics = {layer: default_numerics(str(model), layer, sae_obj) for layer in chosen}
    prepare_bridge(bridge, numerics[chosen[0]])
    if prompts is None:
        texts = shipped_probe_sample(count) if count else load_prompts(None)
        logger.info("no prompts given: using %d probes from the shipped probe set", len(texts))
    else:
        texts = load_prompts(prompts, bridge.tokenizer)
    first = numerics[chosen[0]]
    max_length = context_length(bridge, first, context_size)
    token_lists = tokenize_prompts(
        bridge.tokenizer, texts, prepend_bos=first.prepend_bos, max_length=max_length
    )
    plans = {layer: read_hook_plan(numerics[layer].hook_name) for layer in chosen}
    names = sorted({read_name for read_name, _ in plans.values()})
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in chosen}
    owners: list[torch.Tensor] = []
    model_device = next(bridge.original_model.parameters()).device
    batches = token_batches(token_lists, batch_size=batch_size, skip_first=first.prepend_bos)
    total = (len(token_lists) + batch_size - 1) // batch_size
    for batch in tqdm(batches, total=total, desc="capture", disable=not progress):
        cache = read_hooks(bridge, batch.tokens, names)
        mask = batch.mask.to(model_device)
        for layer in chosen:
            acts = cache[plans[layer][0]].float()
            rows[layer].append(_pool(acts, mask, position).cpu())
        owner = batch.prompt_index[:, None].expand_as(batch.mask)[batch.mask]
        owners.append(owner if position == "all" else batch.prompt_index)
    prompt_index = torch.cat(owners)
    shapes = {}
    for layer in chosen:
        activations = torch.cat(rows[layer])
        atomic_torch_save(
            output / "layers" / f"layer_{layer}.pt",
            {"activations": activations, "prompt_index": prompt_index},
        )
        shapes[str(layer)] = list(activations.shape)
        if sae_obj is not None and layer == sae_layer:
            _write_sae_features(output / "sae" / f"sae_layer_{layer}.pt", sae_obj, activations)
    manifest = {
        "model": label,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "name": name or (Path(checkpoint).stem if checkpoint is not None else None),
        "layers": chosen,
        "hooks": {str(layer): numerics[layer].hook_name for layer in chosen},
        "position": position,
        "n_prompts": len(token_lists),
        "n_rows": int(len(prompt_index)),
        "d_model": d_model,
        "shapes": shapes,
        "dtype": "float32",
        "model_dtype": str(next(bridge.original_model.parameters()).dtype).removeprefix("torch."),
        "prepend_bos": first.prepend_bos,
        "context_size": max_length,
        "processing": first.processing,
        "sae_layer": sae_layer if sae_obj is not None else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
    }
    atomic_write_json(output / MANIFEST, manifest)
    return Capture(directory=output, summary=manifest)


def _pool(acts: torch.Tensor, mask: torch.Tensor, position: str) -> torch.Tensor:
    if position == "all":
        return acts[mask]
    if position == "last":
        last = mask.long().cumsum(1).argmax(1)  # index of the last counted token
        return acts[torch.arange(len(acts), device=acts.device), last]
    weights = mask.float()[..., None]
    return (acts * weights).sum(1) / weights.sum(1).clamp_min(1)


def _write_sae_features(path: Path, sae: Any, activations: torch.Tensor) -> None:
    """SAE features of every row, stored sparse as plain tensors (weights_only-safe)."""
    indices, values = [], []
    with torch.no_grad():
        for start in range(0, len(activations), 4096):
            feats = sae.encode(activations[start : start + 4096].to(sae.W_dec.dtype))
            nonzero = feats.nonzero()
            values.append(feats[nonzero[:, 0], nonzero[:, 1]].float().cpu())
            nonzero[:, 0] += start
            indices.append(nonzero.cpu())
    atomic_torch_save(
        path,
        {
            "indices": torch.cat(indices),
            "values": torch.cat(values),
            "shape": torch.tensor([len(activations), int(sae.W_dec.shape[0])]),
        },
    )
