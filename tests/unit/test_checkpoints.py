"""Checkpoint reading: formats, key normalisation, refusals that name the tensor."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from aquin_nb import AquinError
from aquin_nb._checkpoints import check_against_model, normalise_keys, read_checkpoint

MODEL = {
    "transformer.wte.weight": torch.zeros(8, 4),
    "transformer.h.0.mlp.c_fc.weight": torch.zeros(4, 16),
    "lm_head.weight": torch.zeros(8, 4),
}


@pytest.mark.parametrize("prefix", ["model.", "_orig_mod.", "base_model.model.", "module."])
def test_wrapper_prefixes_are_stripped(prefix):
    state = {prefix + key: value for key, value in MODEL.items()}
    assert set(normalise_keys(state, MODEL)) == set(MODEL)


def test_llama_style_model_prefix_is_kept_when_it_is_the_real_name():
    expected = {"model.layers.0.mlp.weight": torch.zeros(2), "lm_head.weight": torch.zeros(2)}
    assert set(normalise_keys(dict(expected), expected)) == set(expected)


def test_step_and_state_dict_are_unwrapped(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 12, "state_dict": MODEL}, path)
    state, step = read_checkpoint(path)
    assert step == 12 and set(state) == set(MODEL)


def test_bare_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    torch.save(MODEL, tmp_path / "bare.pt")
    save_file({k: v.clone() for k, v in MODEL.items()}, tmp_path / "w.safetensors")
    for name in ("bare.pt", "w.safetensors"):
        state, step = read_checkpoint(tmp_path / name)
        assert step is None and set(state) == set(MODEL)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": exploit}, handle)
    with pytest.raises(
        AquinError, match=r"refused to load checkpoint .*evil\.pt: it would import posix\.system"
    ):
        read_checkpoint(path)
    assert not marker.exists()


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"step": 1, "state_dict": MODEL}, good)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(AquinError, match=r"broken\.pt: the file is truncated or corrupt"):
        read_checkpoint(broken)


def test_shape_mismatch_names_the_tensor_and_both_shapes():
    state = dict(MODEL, **{"transformer.h.0.mlp.c_fc.weight": torch.zeros(4, 32)})
    with pytest.raises(
        AquinError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight has shape \(4, 32\).*\(4, 16\)"
    ):
        check_against_model(state, MODEL, source="x.pt", model_name="tiny")


def test_missing_and_unexpected_tensors_are_named():
    state = {
        "transformer.wte.weight": torch.zeros(8, 4),
        "gpt_neox.embed_in.weight": torch.zeros(1),
    }
    with pytest.raises(AquinError, match=r"missing \(first: lm_head\.weight\).*gpt_neox\.embed_in"):
        check_against_model(state, MODEL, source="x.pt", model_name="tiny")


def test_tied_weight_may_be_absent():
    shared = torch.zeros(8, 4)
    model = {"transformer.wte.weight": shared, "lm_head.weight": shared}
    check_against_model(
        {"transformer.wte.weight": torch.ones(8, 4)}, model, source="x", model_name="tiny"
    )
