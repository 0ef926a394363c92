"""The model catalog: slugs mapped to Hugging Face models and SAELens releases.

The embedded ``tiny-gpt2`` comes first: it ships with the package and runs
offline. The others go through exactly the same code once a hub is reachable.

Example:
    >>> from aquin_nb.catalog import get_entry
    >>> get_entry("gpt2-small").sae_id_for(6)
    'blocks.6.hook_resid_pre'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._errors import AquinError

EMBEDDED_DIR = Path(__file__).parent / "demo" / "artifacts"


@dataclass(frozen=True)
class CatalogEntry:
    """One model the catalog knows, with its public SAE release.

    ``sae_id_template`` is a SAELens ``sae_id`` with ``{layer}`` left open;
    ``registry_model`` is the model name SAELens's registry records for the release.
    """

    slug: str
    hf_model: str
    sae_release: str
    sae_id_template: str
    registry_model: str
    default_layer: int
    n_layers: int
    description: str

    @property
    def embedded(self) -> bool:
        return self.hf_model.startswith("embedded:")

    def sae_id_for(self, layer: int | None = None) -> str:
        layer = self.default_layer if layer is None else layer
        if not 0 <= layer < self.n_layers:
            raise AquinError(
                f"layer {layer} is out of range: {self.slug} has {self.n_layers} layers "
                f"(0-{self.n_layers - 1})"
            )
        return self.sae_id_template.format(layer=layer)

    def model_path(self) -> str:
        """A local directory for embedded models, else the Hugging Face repo id."""
        if self.embedded:
            return str(EMBEDDED_DIR / self.hf_model.removeprefix("embedded:"))
        return self.hf_model


CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        slug="tiny-gpt2",
        hf_model="embedded:tiny-gpt2",
        sae_release="embedded:tiny-gpt2-res",
        sae_id_template="blocks.{layer}.hook_resid_pre",
        registry_model="tiny-gpt2",
        default_layer=2,
        n_layers=4,
        description="Embedded 2.6M-parameter GPT-2 trained on stdlib docstrings (offline default)",
    ),
    CatalogEntry(
        slug="gpt2-small",
        hf_model="gpt2",
        sae_release="gpt2-small-res-jb",
        sae_id_template="blocks.{layer}.hook_resid_pre",
        registry_model="gpt2-small",
        default_layer=6,
        n_layers=12,
        description="GPT-2 small with Joseph Bloom's residual-stream SAEs (24k features)",
    ),
    CatalogEntry(
        slug="pythia-70m-deduped",
        hf_model="EleutherAI/pythia-70m-deduped",
        sae_release="pythia-70m-deduped-res-sm",
        sae_id_template="blocks.{layer}.hook_resid_post",
        registry_model="pythia-70m-deduped",
        default_layer=3,
        n_layers=6,
        description="Pythia-70M deduped with Sam Marks's residual SAEs",
    ),
    CatalogEntry(
        slug="gemma-2-2b",
        hf_model="google/gemma-2-2b",
        sae_release="gemma-scope-2b-pt-res-canonical",
        sae_id_template="layer_{layer}/width_16k/canonical",
        registry_model="gemma-2-2b",
        default_layer=12,
        n_layers=26,
        description="Gemma 2 2B with Gemma Scope residual SAEs (16k, canonical L0)",
    ),
    CatalogEntry(
        slug="gemma-2-9b",
        hf_model="google/gemma-2-9b",
        sae_release="gemma-scope-9b-pt-res-canonical",
        sae_id_template="layer_{layer}/width_16k/canonical",
        registry_model="gemma-2-9b",
        default_layer=20,
        n_layers=42,
        description="Gemma 2 9B with Gemma Scope residual SAEs (16k, canonical L0)",
    ),
    CatalogEntry(
        slug="llama-3.1-8b",
        hf_model="meta-llama/Llama-3.1-8B",
        sae_release="llama_scope_lxr_8x",
        sae_id_template="l{layer}r_8x",
        registry_model="meta-llama/Llama-3.1-8B",
        default_layer=15,
        n_layers=32,
        description="Llama 3.1 8B with Llama Scope residual SAEs (32k)",
    ),
)


def get_entry(slug: str) -> CatalogEntry:
    """The catalog entry for ``slug``; raises `AquinError` listing known slugs."""
    for entry in CATALOG:
        if entry.slug == slug:
            return entry
    known = ", ".join(entry.slug for entry in CATALOG)
    raise AquinError(f"unknown model slug {slug!r}: the catalog has {known}")


def find_entry(slug: str) -> CatalogEntry | None:
    return next((entry for entry in CATALOG if entry.slug == slug), None)
