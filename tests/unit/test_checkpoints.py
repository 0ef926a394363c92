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


# --- hostile tensors (issue 17) ----------------------------------------------------


def _dense_alternatives():
    weight = torch.randn(4, 16)
    return {
        "sparse": (lambda: weight.to_sparse(), r"is a sparse tensor \(torch\.sparse_coo\)"),
        "sparse_csr": (lambda: weight.to_sparse_csr(), r"is a sparse tensor \(torch\.sparse_csr\)"),
        "quantized": (
            lambda: torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8),
            r"is a quantized tensor \(torch\.qint8\)",
        ),
        "meta": (lambda: torch.empty(4, 16, device="meta"), r"is a meta tensor"),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(_dense_alternatives()))
def test_sparse_quantized_and_meta_tensors_are_refused_naming_the_tensor(tmp_path, kind):
    make, message = _dense_alternatives()[kind]
    path = tmp_path / f"{kind}.pt"
    torch.save(
        {"step": 1, "state_dict": dict(MODEL, **{"transformer.h.0.mlp.c_fc.weight": make()})}, path
    )
    pattern = rf"tensor transformer\.h\.0\.mlp\.c_fc\.weight in checkpoint .*{kind}\.pt {message}"
    with pytest.raises(AquinError, match=pattern):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1e30, r"magnitude 1e\+30, beyond the 1e\+15"),
        (float("nan"), "NaN or inf"),
        (float("-inf"), "NaN or inf"),
    ],
)
def test_finite_but_absurd_and_non_finite_weights_are_refused(tmp_path, suffix, value, message):
    from safetensors.torch import save_file

    state = {key: tensor.clone() for key, tensor in MODEL.items()}
    state["transformer.h.0.mlp.c_fc.weight"][1, 2] = value
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    loaded, _ = read_checkpoint(path)
    with pytest.raises(
        AquinError, match=rf"tensor transformer\.h\.0\.mlp\.c_fc\.weight .*{message}"
    ):
        check_against_model(loaded, MODEL, source=str(path), model_name="tiny")


def test_largest_accepted_magnitude_is_documented_bound():
    from aquin_nb._checkpoints import MAX_ABS_VALUE, check_tensor_values

    check_tensor_values("w", torch.tensor([MAX_ABS_VALUE, -MAX_ABS_VALUE]), "x.pt")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for sign in (1, -1):  # either end of the range, whatever the values around it
            values = torch.zeros(5, 3, dtype=torch.float64)
            values[2, 1] = sign * MAX_ABS_VALUE * 1.01
            expected = "NaN or inf" if dtype == torch.float16 else "beyond"  # fp16: inf
            with pytest.raises(AquinError, match=expected):
                check_tensor_values("w", values.to(dtype), "x.pt", torch.float64)
            for bad in (float("nan"), sign * float("inf")):
                values[2, 1] = bad
                with pytest.raises(AquinError, match="NaN or inf"):
                    check_tensor_values("w", values.to(dtype), "x.pt")


def test_values_that_overflow_the_model_dtype_are_refused():
    from aquin_nb._checkpoints import check_tensor_values

    # 1e5 is fine for a float32 model but is inf once copied into a float16 one.
    check_tensor_values("w", torch.tensor([1e5]), "x.pt", torch.float32)
    with pytest.raises(AquinError, match=r"tensor w in x\.pt .*magnitude 1e\+05.*float16"):
        check_tensor_values("w", torch.tensor([1e5]), "x.pt", torch.float16)
    with pytest.raises(AquinError, match="is complex"):
        check_tensor_values("w", torch.zeros(2, dtype=torch.complex64), "x.pt", torch.float32)


def test_a_1e30_weight_is_refused_before_it_reaches_the_model(tmp_path, tiny_hf, base_state):
    import copy

    from aquin_nb.models import apply_checkpoint

    state = {key: value.clone() for key, value in base_state.items()}
    state["transformer.h.1.mlp.c_proj.bias"][0] = 1e30
    path = tmp_path / "huge.pt"
    torch.save({"step": 3, "state_dict": state}, path)
    model = copy.deepcopy(tiny_hf[0])
    with pytest.raises(
        AquinError, match=r"transformer\.h\.1\.mlp\.c_proj\.bias in checkpoint .*huge\.pt"
    ):
        apply_checkpoint(model, path)
    assert torch.equal(
        model.state_dict()["transformer.h.1.mlp.c_proj.bias"],
        base_state["transformer.h.1.mlp.c_proj.bias"],
    )


# --- zip bombs ---------------------------------------------------------------------


def _zip_bomb(path, inflated_mib: int) -> None:
    """A torch-style zip whose data.pkl inflates to ``inflated_mib`` MiB of zeros (tiny on disk)."""
    import zipfile

    chunk = bytes(1024 * 1024)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("bomb/version", "3\n")
        with archive.open("bomb/data.pkl", "w") as member:
            for _ in range(inflated_mib):
                member.write(chunk)


def test_zip_bomb_is_refused_from_declared_sizes_before_inflating(tmp_path):
    path = tmp_path / "bomb.pt"
    _zip_bomb(path, inflated_mib=160)
    assert path.stat().st_size < 1024 * 1024
    with pytest.raises(
        AquinError, match=r"bomb\.pt: its zip members declare 160\.0 MiB .*zip bomb"
    ):
        read_checkpoint(path)


def test_checkpoint_larger_than_the_model_could_need_is_refused_unread(tmp_path):
    from aquin_nb._checkpoints import checkpoint_byte_limit

    path = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(256, 1024)}, path)  # 1 MiB of stored (uncompressed) data
    with pytest.raises(AquinError, match=r"big\.pt: it holds 1\.0 MiB, more than the 512\.0 KiB"):
        read_checkpoint(path, max_bytes=512 * 1024)
    read_checkpoint(path, max_bytes=checkpoint_byte_limit(MODEL))  # a sane bound lets it through


# --- the unpickling allow-list -----------------------------------------------------


def test_plainly_pickled_tensor_names_its_storage_loader_as_unsafe(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=2))
    with pytest.raises(AquinError, match=r"it would import torch\.storage\._load_from_bytes"):
        read_checkpoint(path)


class _BytesStorage:
    def __reduce__(self):
        return (torch.storage._load_from_bytes, (b"\x00",))


def test_torch_global_outside_the_allow_list_is_named_inside_a_torch_zip(tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"w": _BytesStorage()}}, path)
    with pytest.raises(
        AquinError, match=r"wrapped\.pt: it would import torch\.storage\._load_from_bytes"
    ):
        read_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_global_hidden_behind_the_memo_is_still_named(tmp_path):
    # PROTO 4; 'posix' MEMOIZE POP; 'system' MEMOIZE POP; 'a' POP; BINGET 0; BINGET 1; STACK_GLOBAL
    data = (
        b"\x80\x04"
        + b"\x8c\x05posix\x94"
        + b"0"
        + b"\x8c\x06system\x94"
        + b"0"
        + b"\x8c\x01a"
        + b"0"
        + b"h\x00h\x01\x93"
        + b")R."
    )
    path = tmp_path / "hidden.pt"
    path.write_bytes(data)
    with pytest.raises(AquinError, match=r"it would import posix\.system"):
        read_checkpoint(path)


def test_allow_list_accepts_everything_torch_weights_only_accepts():
    from aquin_nb._pickle_scan import is_safe_global

    allowed = pytest.importorskip("torch._weights_only_unpickler")._get_allowed_globals()
    assert [name for name in allowed if not is_safe_global(name)] == []
    for unsafe in (
        "torch.storage._load_from_bytes",
        "torch.load",
        "torch.hub.load",
        "posix.system",
    ):
        assert not is_safe_global(unsafe)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ordinary_checkpoints_import_only_allowed_globals(tmp_path):
    from aquin_nb._pickle_scan import unsafe_import

    path = tmp_path / "ok.pt"
    torch.save(
        {
            "step": 1,
            "state_dict": {
                "w": torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)),
                "s": torch.zeros(3, 3).to_sparse(),
                "q": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8),
                "i": torch.arange(3),
            },
        },
        path,
    )
    assert unsafe_import(path) is None


# --- TransformerBridge state dicts -------------------------------------------------


@pytest.fixture(scope="module")
def bridge_state():
    """A real bridge's ``original_model.state_dict()`` with a planted change."""
    import aquin_nb

    bridge = aquin_nb.load_model("tiny-gpt2", device="cpu")
    state = bridge.original_model.state_dict()
    with torch.no_grad():
        key = "transformer.h.1.mlp._original_component.c_proj._original_component.bias"
        state[key] += 0.5
    return state


def _assert_loads_back_exactly(path, bridge_state, tiny_hf):
    import copy

    from aquin_nb.models import apply_checkpoint

    model = apply_checkpoint(copy.deepcopy(tiny_hf[0]), path)
    canonical = {
        key.replace("._original_component", ""): value for key, value in bridge_state.items()
    }
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], canonical[key]) for key in loaded)
    assert not torch.equal(
        loaded["transformer.h.1.mlp.c_proj.bias"],
        tiny_hf[0].state_dict()["transformer.h.1.mlp.c_proj.bias"],
    )


def test_bridge_state_dict_loads_back_with_no_differences(tmp_path, bridge_state, tiny_hf):
    assert any("._original_component" in key for key in bridge_state)
    path = tmp_path / "bridge.pt"
    torch.save(bridge_state, path)
    _assert_loads_back_exactly(path, bridge_state, tiny_hf)


def test_bridge_state_dict_copied_into_safetensors_loads_back(tmp_path, bridge_state, tiny_hf):
    from safetensors.torch import save_file

    path = tmp_path / "bridge.safetensors"
    save_file({key: value.clone().contiguous() for key, value in bridge_state.items()}, path)
    _assert_loads_back_exactly(path, bridge_state, tiny_hf)


def test_bridge_alias_that_disagrees_with_its_weight_is_refused(bridge_state, base_state):
    state = dict(bridge_state)
    key = "transformer.h.0.ln1._original_component.weight"
    state[key] = state[key] + 1.0  # no longer the ln_1 weight it aliases
    normalised = normalise_keys(state, base_state, source="edited.pt")
    with pytest.raises(
        AquinError, match=r"1 unexpected tensor\(s\) \(first: transformer\.h\.0\.ln1\.weight\)"
    ):
        check_against_model(normalised, base_state, source="edited.pt", model_name="tiny")


def test_bridge_state_with_two_different_tensors_for_one_name_is_refused(bridge_state):
    state = dict(bridge_state)
    key = "transformer.h.0.attn.q._original_component.weight"
    state[key] = state[key] + 1.0  # the other path to attn.q keeps the real values
    with pytest.raises(
        AquinError,
        match=r"edited\.pt holds two different tensors for transformer\.h\.0\.attn\.q\.weight",
    ):
        normalise_keys(state, {}, source="edited.pt")
