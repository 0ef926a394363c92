"""Feature labels: Neuronpedia explanations where imported, offline labels otherwise.

Every feature a card shows carries a label (DESIGN.md decision 10), and nothing
is fetched at render time:

1. an **explanation** imported from a Neuronpedia export (`import_explanations`
   reads the JSON or JSONL rows into the local cache, offline), when the SAE's
   SAELens metadata carries a ``neuronpedia_id``;
2. else an **offline label** of up to three tokens joined by `` · ``, e.g.
   ``oven · bake · preheat``: the tokens the feature fires on hardest (the most
   frequent tokens at the peak of its top contexts, when a dashboard pass has
   run, see `aquin_nb.dashboards`), then the tokens its decoder direction
   promotes through the unembedding (its logit lens, `aquin_nb._lens`), without
   repeats. Tokens are stripped of surrounding whitespace; empty ones are skipped.

A feature with a ``neuronpedia_id`` links to ``https://neuronpedia.org/{id}/{index}``,
the address SAELens's own ``open_neuronpedia_feature_dashboard`` opens.

Example:
    >>> feature_url("gpt2-small/6-res-jb", 1234)
    'https://neuronpedia.org/gpt2-small/6-res-jb/1234'
    >>> offline_label([" oven", " oven", " bake"], ["Preheat", " oven", " bake"])
    'oven · bake · Preheat'
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any

from ._errors import AquinError

NEURONPEDIA = "https://neuronpedia.org"
LABEL_TOKENS = 3
ENV_CACHE = "AQUIN_NB_CACHE"


def cache_dir() -> Path:
    """Where labels, explanations and dashboards are cached (``$AQUIN_NB_CACHE``)."""
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "aquin_nb")


def neuronpedia_id(sae: Any) -> str | None:
    """The SAE's ``neuronpedia_id`` from its SAELens metadata, or ``None``."""
    metadata = getattr(getattr(sae, "cfg", None), "metadata", None)
    value = getattr(metadata, "neuronpedia_id", None)
    return value if isinstance(value, str) and value else None


def feature_url(neuronpedia: str, index: int) -> str:
    """The Neuronpedia page of feature ``index`` of the SAE ``neuronpedia``."""
    return f"{NEURONPEDIA}/{neuronpedia}/{int(index)}"


def offline_label(top_tokens: list[str], lens_tokens: list[str], size: int = LABEL_TOKENS) -> str:
    """Up to ``size`` words: the most frequent peak tokens, then logit-lens tokens."""
    counts: dict[str, int] = {}
    for token in top_tokens:
        token = token.strip()
        counts[token] = counts.get(token, 0) + 1
    # most frequent first, ties in order of appearance (as Counter.most_common)
    counted = sorted(counts, key=counts.__getitem__, reverse=True)
    words: list[str] = []
    for token in [*counted, *(t.strip() for t in lens_tokens)]:
        if token and token not in words:
            words.append(token)
            if len(words) == size:
                break
    return " · ".join(words)


def _explanations_path(neuronpedia: str) -> Path:
    model, _, source = neuronpedia.partition("/")
    return cache_dir() / "explanations" / model / f"{source or 'default'}.json"


def explanations_for(neuronpedia: str | None) -> dict[int, str]:
    """Imported explanations of the SAE ``neuronpedia`` (feature index → description)."""
    if not neuronpedia:
        return {}
    path = _explanations_path(neuronpedia)
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text("utf-8"))
        return {int(index): str(text) for index, text in stored.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise AquinError(f"explanations cache {path} is unreadable ({error}); delete it") from None


def import_explanations(
    path: str | Path, sae: Any = None, *, neuronpedia: str | None = None
) -> int:
    """Read a Neuronpedia explanations export into the local cache, offline.

    ``path`` is a JSON array or a JSONL file of rows with ``modelId``, ``layer``
    (the SAE's id on Neuronpedia, also accepted as ``source``), ``index`` and
    ``description``, as Neuronpedia's exports write them. Rows must all belong
    to one SAE: the ``sae``'s ``neuronpedia_id`` (or ``neuronpedia``) when
    given. Returns how many explanations were imported; the cache entry is
    written atomically, so a bad file leaves it as it was.

    Example:
        >>> import json, os, tempfile
        >>> rows = [{"modelId": "gpt2-small", "layer": "6-res-jb", "index": "7",
        ...          "description": "cooking verbs"}]
        >>> export = os.path.join(tempfile.mkdtemp(), "explanations.jsonl")
        >>> _ = open(export, "w").write("\\n".join(json.dumps(r) for r in rows))
        >>> import_explanations(export, neuronpedia="gpt2-small/6-res-jb")
        1
        >>> explanations_for("gpt2-small/6-res-jb")
        {7: 'cooking verbs'}
    """
    from ._io import atomic_write_json
    from .probes import read_json_items

    path = Path(path)
    expected = neuronpedia or (neuronpedia_id(sae) if sae is not None else None)
    if sae is not None and expected is None:
        raise AquinError(
            "the SAE has no neuronpedia_id in its metadata, so explanations cannot be matched "
            "to it; pass neuronpedia='MODEL/SAE_ID'"
        )
    items = read_json_items(path, "explanations file")
    found: dict[str, dict[int, str]] = {}
    for number, row in enumerate(items, start=1):
        if not isinstance(row, dict):
            raise AquinError(f"explanations file {path} row {number} is not an object")
        model, source = row.get("modelId"), row.get("layer", row.get("source"))
        index: Any = row.get("index")
        text = row.get("description")
        if not (isinstance(model, str) and isinstance(source, str) and isinstance(text, str)):
            raise AquinError(
                f"explanations file {path} row {number} needs string modelId, layer and description"
            )
        try:
            feature = int(index)  # exports write the index as a string
        except (TypeError, ValueError):
            raise AquinError(
                f"explanations file {path} row {number} has index {index!r}, not an integer"
            ) from None
        if feature < 0:
            raise AquinError(f"explanations file {path} row {number} has a negative index")
        found.setdefault(f"{model}/{source}", {})[feature] = text
    if not found:
        raise AquinError(f"explanations file {path} holds no explanations")
    if len(found) > 1 or (expected is not None and expected not in found):
        names = ", ".join(sorted(found))
        wanted = f" the SAE is {expected}" if expected else " pass one SAE's explanations"
        raise AquinError(f"explanations file {path} is for {names};{wanted}")
    ((name, explanations),) = found.items()
    d_sae = getattr(getattr(sae, "cfg", None), "d_sae", None)
    if d_sae is not None and max(explanations) >= int(d_sae):
        raise AquinError(
            f"explanations file {path} has feature {max(explanations)}, but the SAE has "
            f"{d_sae} features (0-{int(d_sae) - 1})"
        )
    merged = {**explanations_for(name), **explanations}
    atomic_write_json(_explanations_path(name), {str(k): v for k, v in sorted(merged.items())})
    return len(explanations)


def lens_labels(bridge: Any, sae: Any, features: list[int]) -> dict[int, str]:
    """Offline labels of ``features`` from their decoder rows' logit lens alone.

    A feature's lens label depends only on its decoder row, the model's final norm,
    its unembedding and its tokenizer, so labels already read for this SAE and
    model (another checkpoint's diff against the same base, a rerun) are read
    back; only the others run the lens (`_LensLabelCache`).
    """
    from ._lens import decode_tokens, logit_lens

    if not features:
        return {}
    cached = _LENS_LABELS.labels(bridge, sae)
    missing = [int(f) for f in dict.fromkeys(features) if int(f) not in cached]
    if missing:
        lens = logit_lens(bridge, sae.W_dec[missing].detach(), k=LABEL_TOKENS * 2)
        width = int(lens.top.shape[1])
        tokens = decode_tokens(bridge.tokenizer, lens.top.reshape(-1).tolist())  # one call
        for row, feature in enumerate(missing):
            cached[feature] = offline_label([], tokens[row * width : (row + 1) * width])
    return {int(feature): cached[int(feature)] for feature in features}


class _LensLabelCache:
    """Lens labels per SAE (held weakly), for the model they were read through.

    An entry is used only while every tensor it was computed from (the SAE's
    decoder, the model's unembedding and final-norm parameters) is the same
    object at the same in-place version, and the tokenizer is the same object:
    a weight edited in place, a model loaded anew or another base reads afresh.
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[Any, tuple[list[Any], dict[int, str]]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def _sources(bridge: Any, sae: Any) -> list[Any]:
        unembed = bridge.original_model.get_output_embeddings().weight
        norm = list(bridge.ln_final.parameters()) if hasattr(bridge, "ln_final") else []
        return [sae.W_dec, unembed, *norm, bridge.tokenizer]

    @staticmethod
    def _state(sources: list[Any]) -> list[tuple[Any, int]]:
        return [(weakref.ref(source), getattr(source, "_version", 0)) for source in sources]

    def labels(self, bridge: Any, sae: Any) -> dict[int, str]:
        """The labels read so far for ``sae`` through ``bridge`` (a dict to add to)."""
        try:
            sources = self._sources(bridge, sae)
            state = self._state(sources)
        except (AttributeError, TypeError, RuntimeError):  # no unembedding, no weakrefs,
            # or inference-mode tensors (no version counter)
            return {}
        held = self._entries.get(sae)
        if held is not None:
            old_state, labels = held
            same = len(old_state) == len(state) and all(
                ref() is source and version == getattr(source, "_version", 0)
                for (ref, version), source in zip(old_state, sources, strict=True)
            )
            if same:
                return labels
        labels = {}
        self._entries[sae] = (state, labels)
        return labels


_LENS_LABELS = _LensLabelCache()


def feature_labels(
    bridge: Any, sae: Any, features: list[int], dashboards: Any = None
) -> dict[int, str]:
    """A label for each of ``features``: explanation, else dashboard tokens, else the lens."""
    explained = explanations_for(neuronpedia_id(sae))
    labels = {f: explained[f] for f in features if f in explained}
    rest = [f for f in features if f not in labels]
    if dashboards is not None:
        for feature, label in zip(rest, dashboards.labels(rest), strict=True):
            if label:
                labels[feature] = label
        rest = [f for f in rest if f not in labels]
    labels.update(lens_labels(bridge, sae, rest))
    return labels
