"""Every catalog entry against SAELens's bundled registry, offline."""

from __future__ import annotations

import pytest
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from aquin_nb import AquinError
from aquin_nb.catalog import CATALOG, EMBEDDED_DIR, get_entry


def test_embedded_model_comes_first_and_ships_its_artifacts():
    first = CATALOG[0]
    assert first.slug == "tiny-gpt2" and first.embedded
    assert (EMBEDDED_DIR / "tiny-gpt2" / "config.json").is_file()
    assert (EMBEDDED_DIR / "tiny-gpt2-res" / first.sae_id_for() / "cfg.json").is_file()


@pytest.mark.parametrize("entry", [e for e in CATALOG if not e.embedded], ids=lambda e: e.slug)
def test_entry_matches_the_sae_lens_registry(entry):
    directory = get_pretrained_saes_directory()
    assert entry.sae_release in directory, entry.sae_release
    release = directory[entry.sae_release]
    assert release.model == entry.registry_model
    for layer in {0, entry.default_layer, entry.n_layers - 1}:
        assert entry.sae_id_for(layer) in release.saes_map, (entry.slug, layer)


def test_layer_out_of_range_names_the_model_and_its_layers():
    with pytest.raises(
        AquinError, match=r"layer 14 is out of range: tiny-gpt2 has 4 layers \(0-3\)"
    ):
        get_entry("tiny-gpt2").sae_id_for(14)


def test_unknown_slug_lists_the_catalog():
    with pytest.raises(AquinError, match="gpt2-small"):
        get_entry("gpt-5")
