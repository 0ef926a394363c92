"""Issue 17's hostile inputs through the real CLI: each exits 2 with one stderr line.

Every case the issue lists under "Tracebacks instead of exit 2 and one line",
"PEFT adapters skip the checks" and "Resource exhaustion" that the command line
can reach, fed to ``aquin-nb sae diff`` on the embedded tiny-gpt2. Each must
exit 2 with exactly one stderr line that names the file or value, print no
traceback, and leave no ``--output`` file or temp file behind. The library-level
refusals are tested in tests/unit/test_checkpoints.py and test_hostile_inputs.py,
whose fixture builders these cases reuse.
"""

from __future__ import annotations

import pickle
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from aquin_nb.cli import main

from ..unit.test_checkpoints import _zip_bomb
from ..unit.test_hostile_inputs import (
    LORA_A,
    LORA_B,
    _Exploit,
    _sae_variant,
    _variant,
    _with,
    _without,
    save_adapter,
)

WEIGHT = "transformer.h.0.mlp.c_fc.weight"
PWNED = "pwned"  # the file the malicious adapter pickle would create if it ran


def _checkpoint(directory: Path, name: str, base_state, value_of) -> Path:
    """The base model's state dict with ``WEIGHT`` replaced by ``value_of(WEIGHT's tensor)``."""
    state = {key: tensor.clone() for key, tensor in base_state.items()}
    state[WEIGHT] = value_of(state[WEIGHT])
    path = directory / f"{name}.pt"
    torch.save({"step": 1, "state_dict": state}, path)
    return path


def _set_first(value: float):
    def edit(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[0] = value
        return tensor

    return edit


def _quantized(tensor: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch deprecates building quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(tensor, 0.1, 0, torch.qint8)


def _poison_w_enc(tensors):
    tensors["W_enc"].view(-1)[5] = float("nan")
    return tensors


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def hostile(hostile_root, tiny_hf, base_state, copy_pt):
    """Every case's flags (besides --model, -q and --output) and the message it must give."""
    root = hostile_root

    def fresh(name: str) -> Path:
        directory = root / name
        directory.mkdir()
        return directory

    cases: dict[str, tuple[list[str], str]] = {}

    # Checkpoints holding tensors that are not plain dense data, or absurd values.
    for name, value_of, problem in [
        ("sparse", lambda t: t.to_sparse(), r"is a sparse tensor \(torch\.sparse_coo\)"),
        ("quantized", _quantized, r"is a quantized tensor \(torch\.qint8\)"),
        ("meta", lambda t: torch.empty(t.shape, device="meta"), r"is a meta tensor"),
        ("huge", _set_first(1e30), r"holds a value of magnitude 1e\+30"),
    ]:
        path = _checkpoint(root, name, base_state, value_of)
        cases[f"checkpoint_{name}"] = (
            ["--checkpoint", str(path)],
            rf"tensor {re.escape(WEIGHT)} in checkpoint .*{name}\.pt {problem}",
        )
    bomb = root / "bomb.pt"
    _zip_bomb(bomb, inflated_mib=160)
    cases["checkpoint_zip_bomb"] = (
        ["--checkpoint", str(bomb)],
        r"refused to load checkpoint .*bomb\.pt: its zip members declare 160\.0 MiB .*zip bomb",
    )

    # PEFT adapter directories.
    adapter = root / "adapter"
    save_adapter(tiny_hf[0], adapter)
    pickled = _variant(fresh("pickle"), adapter)
    (pickled / "adapter_model.safetensors").unlink()
    with open(pickled / "adapter_model.bin", "wb") as handle:
        pickle.dump({LORA_A: _Exploit(root / PWNED)}, handle, protocol=2)
    config = r"adapter_config\.json"
    weights = r"adapter_model\.safetensors"
    for name, directory, pattern in [
        ("pickle", pickled, r"adapter_model\.bin: it would import posix\.system"),
        (
            "r_abc",
            _variant(fresh("r_abc"), adapter, config={"r": "abc"}),
            rf"{config}: r is 'abc', expected an integer rank",
        ),
        (
            "targets_5",
            _variant(fresh("targets_5"), adapter, config={"target_modules": 5}),
            rf"{config}: target_modules is 5, expected a module name list",
        ),
        (
            "config_list",
            _variant(fresh("config_list"), adapter, config_text="[1, 2]"),
            rf"{config} holds a JSON array, expected an object",
        ),
        (
            "nan_lora_B",
            _variant(
                fresh("nan_lora_B"),
                adapter,
                tensors=_with(LORA_B, lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))),
            ),
            rf"tensor {re.escape(LORA_B)} in PEFT adapter .*{weights} holds NaN or inf",
        ),
        (
            "missing_lora_A",
            _variant(fresh("missing_lora_A"), adapter, tensors=_without(LORA_A)),
            rf"{weights} does not match its config .*missing \(first: {re.escape(LORA_A)}\)",
        ),
        (
            "targets_absent",
            _variant(fresh("targets_absent"), adapter, config={"target_modules": ["q_proj"]}),
            rf"{config}: target_modules \['q_proj'\] match no module of the model",
        ),
        (
            "backtracking_regex",
            _variant(fresh("regex"), adapter, config={"target_modules": "(.|.)*Q"}),
            rf"{config}: target_modules '\(\.\|\.\)\*Q' is refused because Python's regex",
        ),
    ]:
        cases[f"adapter_{name}"] = (["--checkpoint", str(directory)], pattern)

    # Prompt files, with a checkpoint that is fine.
    good = ["--checkpoint", str(copy_pt)]
    deep = root / "deep.json"
    deep.write_text("[" * 100_000)
    digits = root / "digits.json"
    digits.write_text("[" + "9" * 5000 + "]")
    cases["prompts_nested_100000"] = (
        [*good, "--prompts", str(deep)],
        r"prompts file .*deep\.json is not usable JSON: it is nested too deeply",
    )
    cases["prompts_5000_digits"] = (
        [*good, "--prompts", str(digits)],
        r"prompts file .*digits\.json is not usable JSON: Exceeds the limit",
    )

    # --sae: SAELens directories with poisoned weights or configs.
    for name, kwargs, pattern in [
        (
            "nan_W_enc",
            {"tensors": _poison_w_enc},
            r"tensor W_enc in SAE .*sae_weights\.safetensors",
        ),
        ("d_sae_0", {"cfg": {"d_sae": 0}}, r"cfg\.json: d_sae is 0, expected an integer"),
        ("d_sae_-5", {"cfg": {"d_sae": -5}}, r"cfg\.json: d_sae is -5, expected an integer"),
        (
            "d_sae_1e12",
            {"cfg": {"d_sae": 10**12}},
            r"cfg\.json: d_sae is 1000000000000, expected an integer",
        ),
        ("d_in_abc", {"cfg": {"d_in": "abc"}}, r"cfg\.json: d_in is 'abc', expected an integer"),
        ("cfg_list", {"cfg_text": "[1, 2]"}, r"cfg\.json holds a JSON array, expected an object"),
    ]:
        directory = _sae_variant(fresh(f"sae_{name}"), **kwargs)
        cases[f"sae_{name}"] = ([*good, "--sae", str(directory)], pattern)

    # Flags.
    cases["min_rel_delta_nan"] = (
        [*good, "--min-rel-delta", "nan"],
        r"argument --min-rel-delta: 'nan' is not a finite number",
    )
    cases["top_negative"] = ([*good, "--top", "-5"], r"argument --top: '-5' is negative")
    cases["dtype_int8"] = (
        [*good, "--dtype", "int8"],
        r"unknown dtype 'int8': use one of float32, bfloat16, float16",
    )
    cases["device_cuda_absent"] = (
        [*good, "--device", "cuda:7"],
        r"device cuda:7 requested, but (CUDA is not available here|there are \d+ CUDA device)",
    )
    return cases


CASES = [
    "checkpoint_sparse",
    "checkpoint_quantized",
    "checkpoint_meta",
    "checkpoint_huge",
    "checkpoint_zip_bomb",
    "adapter_pickle",
    "adapter_r_abc",
    "adapter_targets_5",
    "adapter_config_list",
    "adapter_nan_lora_B",
    "adapter_missing_lora_A",
    "adapter_targets_absent",
    "adapter_backtracking_regex",
    "prompts_nested_100000",
    "prompts_5000_digits",
    "sae_nan_W_enc",
    "sae_d_sae_0",
    "sae_d_sae_-5",
    "sae_d_sae_1e12",
    "sae_d_in_abc",
    "sae_cfg_list",
    "min_rel_delta_nan",
    "top_negative",
    "dtype_int8",
    "device_cuda_absent",
]


def _sae_diff(capsys, output: Path, flags: list[str]) -> tuple[int, str]:
    code = main(["sae", "diff", "--model", "tiny-gpt2", "-q", "--output", str(output), *flags])
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, pattern: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert re.match(r"aquin-nb( sae diff)?: error: ", err), err
    assert "Traceback" not in err
    assert re.search(pattern, err), err


def test_the_cases_cover_every_built_input(hostile):
    assert sorted(hostile) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_exits_2_with_one_line_and_no_output(
    capsys, tmp_path, hostile_root, hostile, case
):
    flags, pattern = hostile[case]
    output = tmp_path / "out" / "out.json"
    code, err = _sae_diff(capsys, output, flags)
    _assert_one_line_error(code, err, pattern)
    assert not output.exists()
    assert list(output.parent.glob(".*.tmp")) == []
    assert not (hostile_root / PWNED).exists()


def test_output_naming_an_existing_directory(capsys, tmp_path, copy_pt):
    output = tmp_path / "out"
    output.mkdir()
    code, err = _sae_diff(capsys, output, ["--checkpoint", str(copy_pt)])
    _assert_one_line_error(code, err, rf"--output: output {re.escape(str(output))} is a directory")
    assert output.is_dir() and list(output.iterdir()) == []


def test_output_equal_to_the_input_checkpoint_leaves_it_unchanged(capsys, tmp_path, copy_pt):
    checkpoint = tmp_path / "ckpt.pt"
    shutil.copyfile(copy_pt, checkpoint)
    before = checkpoint.read_bytes()
    code, err = _sae_diff(capsys, checkpoint, ["--checkpoint", str(checkpoint)])
    _assert_one_line_error(code, err, r"--output: output .*ckpt\.pt is the input .*ckpt\.pt")
    assert checkpoint.read_bytes() == before
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize(
    ("command", "flags", "pattern"),
    [
        (
            ["capture", "--out-dir", "{out}/acts"],
            ["--context-size", "100000"],
            r"context_size 100000 is above .*128",
        ),
        (["capture", "--out-dir", "{out}/acts"], ["--dtype", "float8"], r"unknown dtype 'float8'"),
        (
            ["model", "diff", "--output", "{out}/md.json"],
            ["--checkpoint", "{ckpt}", "--dtype", "fp64"],
            r"unknown dtype 'fp64'",
        ),
        (
            ["sae", "dashboards", "--output", "{out}/boards.json"],
            ["--dtype", "int4"],
            r"unknown dtype 'int4'",
        ),
    ],
    ids=["capture_context", "capture_dtype", "model_diff_dtype", "dashboards_dtype"],
)
def test_other_commands_refuse_bad_sizes_and_dtypes_writing_nothing(
    capsys, tmp_path, copy_pt, command, flags, pattern
):
    out = tmp_path / "out"
    argv = [part.format(out=out, ckpt=copy_pt) for part in [*command, *flags]]
    code = main([*argv, "--model", "tiny-gpt2", "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    assert not out.exists() or list(out.rglob("*")) == []
