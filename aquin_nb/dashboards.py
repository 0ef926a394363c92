"""``feature_dashboards``: what each SAE feature is, read from a reference corpus.

For every feature of any SAE (public, temporary or your own), one streaming pass
over a reference corpus (default: the shipped corpus and the probes) records:

* the ``k`` contexts where it fires hardest, each a window of tokens with the
  feature's activation on every token (memory O(d_sae · k), whatever the corpus);
* its density (the fraction of tokens where it fires) and a histogram of its
  non-zero activations (fixed log-spaced bins, `HISTOGRAM_EDGES`);
* its logit lens: the 10 tokens its decoder direction promotes and suppresses
  through the unembedding (`aquin_nb._lens`);
* a label (`aquin_nb.labels`) and, when the SAE has a ``neuronpedia_id``, its
  Neuronpedia address.

With a checkpoint the same is computed on the checkpoint model, so a changed
feature shows its base contexts beside its checkpoint contexts. Results are
cached on disk (``$AQUIN_NB_CACHE/dashboards/``) under a key of the model, the
checkpoint, the SAE and the corpus content, so a second diff or card reuses
them; the arrays are written atomically as one ``.npz``.

Example:
    >>> import aquin_nb
    >>> boards = aquin_nb.feature_dashboards("tiny-gpt2", corpus=["Preheat the oven.", "Bake the bread."], k=2, progress=False)
    >>> board = boards.feature(int(boards.features["max_activation"].idxmax()))
    >>> sorted(board)[:4], len(board["base"]["contexts"]) <= 2
    (['base', 'checkpoint', 'density', 'feature'], True)
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from ._activations import context_length, prepare_bridge, residual, token_batches
from ._corpus import corpus_digest, pack_windows, read_corpus
from ._errors import AquinError
from ._quiet import quiet_unless_progress
from ._verbs import verb
from .results import Dashboards
from .saes import encode

logger = logging.getLogger(__name__)

__all__ = ["Dashboards", "feature_dashboards", "reference_corpus"]

# log10 of the activation, 24 bins from 0.001 to 100 (values outside land in the end bins)
HISTOGRAM_EDGES = np.logspace(-3, 2, 25)
BEFORE, AFTER = 12, 4  # tokens of context around each top activation
LENS_TOKENS = 10


def reference_corpus(max_texts: int | None = None) -> list[str]:
    """The default reference corpus as texts: the shipped corpus (its first
    ``max_texts`` documents, when given) and the probes.

    Example:
        >>> len(reference_corpus(10))
        42
    """
    from ._corpus import shipped_texts
    from .probes import load_prompts

    texts = shipped_texts()
    return (texts if max_texts is None else texts[:max_texts]) + load_prompts(None)


class TopContexts:
    """The ``k`` strongest activations of every feature, with their token windows."""

    def __init__(self, d_sae: int, k: int) -> None:
        width = BEFORE + 1 + AFTER
        self.values = torch.full((d_sae, k), float("-inf"))
        self.tokens = torch.full((d_sae, k, width), -1, dtype=torch.int32)
        self.acts = torch.zeros((d_sae, k, width), dtype=torch.float32)
        self.fires = torch.zeros(d_sae, dtype=torch.int64)
        self.histogram = torch.zeros(d_sae * (len(HISTOGRAM_EDGES) - 1), dtype=torch.int64)
        self._edges = torch.from_numpy(HISTOGRAM_EDGES)  # float64, as numpy's searchsorted
        self.n_tokens = 0

    def update(self, features: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """``features`` ``[batch, pos, d_sae]``, the batch's ``tokens`` and its stats ``mask``.

        Works on the firings only (an SAE fires on a few percent of its features a
        token): the batch's top ``k`` of each feature come from one sort of the
        fired values, and only those get a window of context. ``features`` is
        zeroed in place at the positions ``mask`` leaves out.
        """
        batch, positions, d_sae = features.shape
        features, mask, tokens = features.float().cpu(), mask.cpu(), tokens.cpu()
        features = features.contiguous()
        left_out = (~mask).nonzero(as_tuple=True)  # BOS and padding: a few rows
        features[left_out] = 0.0  # zeroed in place, row by row
        self.n_tokens += int(mask.sum())
        # flat (row, position, feature) of every firing; nonzero over a bool mask is
        # 1.5x faster than over the floats themselves
        where = (features.reshape(-1) > 0).nonzero()[:, 0]
        if not len(where):
            return
        values = features.reshape(-1)[where]
        feature = where % d_sae
        self.fires += torch.bincount(feature, minlength=d_sae)
        bins = (
            torch.bucketize(values.double(), self._edges)
            .sub_(1)
            .clamp_(0, len(HISTOGRAM_EDGES) - 2)
        )
        self.histogram += torch.bincount(
            feature * (len(HISTOGRAM_EDGES) - 1) + bins, minlength=len(self.histogram)
        )
        # only a firing above its feature's k-th best so far can enter the top k
        candidate = (values > self.values[:, -1][feature]).nonzero()[:, 0]
        if not len(candidate):
            return
        where, values, feature = where[candidate], values[candidate], feature[candidate]
        # group by feature, strongest first, with one sort of an integer key: a positive
        # float32's bits order as its value does
        strength = (2**31 - 1) - values.view(torch.int32).long()
        order = (feature * 2**31 + strength).argsort()
        feature = feature[order]
        starts = torch.zeros(d_sae + 1, dtype=torch.long)
        starts[1:] = torch.bincount(feature, minlength=d_sae).cumsum(0)
        rank = torch.arange(len(feature)) - starts[feature]
        k = self.values.shape[1]
        top = (rank < k).nonzero()[:, 0]
        feature, rank, chosen = feature[top], rank[top], order[top]
        where, values = where[chosen], values[chosen]
        row, position = where // (positions * d_sae), (where // d_sae) % positions
        offsets = torch.arange(-BEFORE, AFTER + 1)
        window = position[:, None] + offsets  # [n_top, width]
        clamped = window.clamp(0, positions - 1)
        at = row[:, None] * positions + clamped  # flat (row, position): 1-D gathers are fast
        inside = (window >= 0) & (window < positions) & mask.reshape(-1)[at]
        window_tokens = tokens.reshape(-1)[at].masked_fill(~inside, -1)
        window_acts = features.reshape(-1)[at * d_sae + feature[:, None]].masked_fill(~inside, 0.0)
        # merge into the touched features' rows only
        touched, slot = torch.unique(feature, return_inverse=True)
        width = offsets.numel()
        new_values = torch.full((len(touched), k), float("-inf"))
        new_tokens = torch.full((len(touched), k, width), -1, dtype=torch.int32)
        new_acts = torch.zeros((len(touched), k, width), dtype=torch.float32)
        new_values[slot, rank] = values
        new_tokens[slot, rank] = window_tokens.int()
        new_acts[slot, rank] = window_acts
        merged = torch.cat([self.values[touched], new_values], dim=1)
        keep = merged.topk(k, dim=1).indices
        spread = keep[..., None].expand(-1, -1, width)
        self.values[touched] = merged.gather(1, keep)
        self.tokens[touched] = torch.cat([self.tokens[touched], new_tokens], 1).gather(1, spread)
        self.acts[touched] = torch.cat([self.acts[touched], new_acts], 1).gather(1, spread)


def _cache_key(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()[:24]


def _sae_digest(sae: Any) -> str:
    digest = hashlib.sha256()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        tensor = getattr(sae, name, None)
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _checkpoint_identity(checkpoint: Any) -> Any:
    if checkpoint is None:
        return None
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint).expanduser().resolve()
        stat = path.stat() if path.exists() else None
        return (str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None)
    return ("object", id(checkpoint))  # a loaded model: not cached across processes


def _side_pass(
    bridge: Any,
    sae: Any,
    hook: str,
    windows: Sequence[Any],
    skip_first: bool,
    k: int,
    batch_size: int,
    progress: bool,
    label: str,
) -> TopContexts:
    stats = TopContexts(int(sae.W_dec.shape[0]), k)
    device = next(bridge.original_model.parameters()).device
    total = (len(windows) + batch_size - 1) // batch_size
    batches = token_batches(windows, batch_size=batch_size, skip_first=skip_first)
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc=f"dashboards ({label})", disable=not progress):
            acts = residual(bridge, batch.tokens, hook).to(sae.W_dec.dtype)
            stats.update(encode(sae, acts.to(device)), batch.tokens, batch.mask)
    return stats


_VOCABULARIES: weakref.WeakKeyDictionary[Any, tuple[int, dict[str, np.ndarray]]] = (
    weakref.WeakKeyDictionary()
)


def _vocabulary_arrays(tokenizer: Any) -> dict[str, np.ndarray]:
    """Every token's text as UTF-8 bytes and offsets: stored without pickle.

    Decoded once per tokenizer (and again if its vocabulary grows)."""
    known = _VOCABULARIES.get(tokenizer)
    if known is not None and known[0] == len(tokenizer):
        return known[1]
    pieces = [tokenizer.decode([i]).encode("utf-8") for i in range(len(tokenizer))]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(piece) for piece in pieces])
    arrays: dict[str, np.ndarray] = {
        "vocab_bytes": np.frombuffer(b"".join(pieces), dtype=np.uint8),
        "vocab_offsets": offsets,
    }
    _VOCABULARIES[tokenizer] = (len(tokenizer), arrays)
    return arrays


def compute_dashboards(
    base: Any,
    checkpoint_bridge: Any,
    sae: Any,
    numerics: Any,
    texts: list[str],
    *,
    label: str,
    identity: Any,
    sae_name: str,
    k: int,
    batch_size: int,
    cache: bool,
    progress: bool,
) -> Dashboards:
    """The dashboards pass on loaded bridges (`feature_dashboards` and
    `SaeDiff.with_dashboards` share it); ``identity`` names the checkpoint in the cache key."""
    from ._io import atomic_write
    from ._lens import logit_lens
    from .labels import cache_dir, explanations_for, feature_url, neuronpedia_id

    windows = pack_windows(
        base.tokenizer,
        texts,
        prepend_bos=numerics.prepend_bos,
        max_length=context_length(base, numerics),
    )
    model_dtype = next(base.original_model.parameters()).dtype
    key = _cache_key(
        __version__, label, identity, _sae_digest(sae), numerics.hook_name,
        corpus_digest(texts), k, BEFORE, AFTER,
        *([] if model_dtype == torch.float32 else [str(model_dtype)]),
    )  # fmt: skip
    path = cache_dir() / "dashboards" / f"{key}.npz"
    d_sae = int(sae.W_dec.shape[0])
    if not (cache and path.is_file()):
        sides = {"base": base}
        if checkpoint_bridge is not None:
            sides["checkpoint"] = checkpoint_bridge
        arrays: dict[str, np.ndarray] = {}
        for side, bridge in sides.items():
            prepare_bridge(bridge, numerics)
            sae_device = next(bridge.original_model.parameters()).device
            stats = _side_pass(
                bridge, sae.to(sae_device), numerics.hook_name, windows,
                numerics.prepend_bos, k, batch_size, progress, side,
            )  # fmt: skip
            lens = logit_lens(bridge, sae.W_dec.detach(), LENS_TOKENS)
            arrays.update(
                {
                    f"{side}_values": stats.values.numpy(),
                    f"{side}_tokens": stats.tokens.numpy(),
                    f"{side}_acts": stats.acts.numpy(),
                    f"{side}_density": (stats.fires.double() / max(stats.n_tokens, 1)).numpy(),
                    f"{side}_histogram": stats.histogram.reshape(d_sae, -1).numpy(),
                    f"{side}_lens_top": lens.top.numpy(),
                    f"{side}_lens_bottom": lens.bottom.numpy(),
                    f"{side}_lens_top_cosine": lens.top_cosine.numpy(),
                    f"{side}_lens_bottom_cosine": lens.bottom_cosine.numpy(),
                }
            )
            n_tokens = stats.n_tokens
        arrays.update(_vocabulary_arrays(base.tokenizer))
        arrays["n_tokens"] = np.array([n_tokens])
        arrays["window_before"] = np.array([BEFORE])
        # uncompressed: zlib took a tenth of the whole computation; the arrays are
        # O(d_sae · k · window) (2.6 MB for the embedded SAE's 1,536 features)
        atomic_write(path, lambda handle: np.savez(handle, allow_pickle=False, **arrays))  # type: ignore[arg-type]
    from .results import _load_arrays

    _forget_loaded(path)
    stored = _load_arrays(str(path))
    sides_present = [s for s in ("base", "checkpoint") if f"{s}_values" in stored]
    frame: dict[str, Any] = {
        "feature": np.arange(d_sae),
        "density": stored["base_density"],
        "max_activation": np.maximum(stored["base_values"][:, 0], 0.0),
        "checkpoint_density": np.full(d_sae, np.nan),
        "checkpoint_max_activation": np.full(d_sae, np.nan),
    }
    if "checkpoint" in sides_present:
        frame["checkpoint_density"] = stored["checkpoint_density"]
        frame["checkpoint_max_activation"] = np.maximum(stored["checkpoint_values"][:, 0], 0.0)
    neuronpedia = neuronpedia_id(sae)
    features = pd.DataFrame(frame)
    features.insert(1, "label", pd.Series([None] * d_sae, dtype=object))
    features["url"] = pd.Series(
        [feature_url(neuronpedia, f) if neuronpedia else None for f in range(d_sae)], dtype=object
    )
    summary = {
        "model": label,
        "checkpoint": identity[0]
        if isinstance(identity, tuple) and identity[0] != "object"
        else None,
        "sae": sae_name,
        "hook": numerics.hook_name,
        "layer": numerics.layer,
        "neuronpedia_id": neuronpedia,
        "n_windows": len(windows),
        "n_tokens": int(stored["n_tokens"][0]),
        "k": k,
        "sides": sides_present,
        "histogram_edges": HISTOGRAM_EDGES.tolist(),
        "dead_fraction": float((features["density"] == 0).mean()),
        "cache": str(path),
        "tool_version": __version__,
    }
    boards = Dashboards(summary=summary, features=features)
    explained = explanations_for(neuronpedia)
    offline = boards.labels()
    features["label"] = pd.Series(
        [explained.get(f) or offline[f] for f in range(d_sae)], dtype=object
    )
    return boards


def _forget_loaded(path: Path) -> None:
    """A freshly written file replaces what this process had loaded from that path."""
    from .results import _ARRAYS

    _ARRAYS.pop(str(path), None)


@verb("feature_dashboards")
@quiet_unless_progress
def feature_dashboards(
    model: Any,
    sae: Any = None,
    corpus: Any = None,
    checkpoint: Any = None,
    layer: int | None = None,
    *,
    k: int = 10,
    batch_size: int = 16,
    cache: bool = True,
    device: str | None = None,
    dtype: Any = None,
    progress: bool = True,
) -> Dashboards:
    """Dashboards of every feature of ``sae``: top contexts, density, histogram, logit lens.

    Args:
        model: catalog slug, local model directory, or a loaded ``TransformerBridge``.
        sae: anything `load_sae` takes (default: the model's public SAE).
        corpus: ``None`` (the shipped corpus and the probes), a list of texts, or a
            JSON/JSONL/text file (documents separated by blank lines).
        checkpoint: also compute the dashboards on this checkpoint.
        k: contexts kept per feature.
        cache: reuse and write ``$AQUIN_NB_CACHE/dashboards/<key>.npz``.
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
    """
    from ._diff_core import bridge_label, load_base, load_pair
    from .saes import check_sae_fits, load_sae, sae_numerics

    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise AquinError(f"k must be a positive integer, got {k!r}")
    if checkpoint is None:
        base, checkpoint_bridge = load_base(model, device, dtype), None
    else:
        base, checkpoint_bridge, _, _ = load_pair(model, checkpoint, device, dtype)
    label = bridge_label(base) if not isinstance(model, (str, Path)) else str(model)
    sae_obj = load_sae(sae if sae is not None else label, layer)
    numerics = sae_numerics(sae_obj, layer)
    check_sae_fits(sae_obj, int(base.cfg.d_model), int(base.cfg.n_layers), numerics.layer, label)
    texts = read_corpus(corpus, base.tokenizer)
    return compute_dashboards(
        base,
        checkpoint_bridge,
        sae_obj,
        numerics,
        texts,
        label=label,
        identity=_checkpoint_identity(checkpoint),
        sae_name=str(sae) if isinstance(sae, (str, Path)) else label,
        k=k,
        batch_size=batch_size,
        cache=cache,
        progress=progress,
    )
