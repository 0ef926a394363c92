"""simulate end to end on the embedded zoo."""

from __future__ import annotations

import json

import pytest
import torch

from aquin_nb import AquinError
from aquin_nb.cli import main
from aquin_nb.demo.finetune import FINETUNE_DATA
from aquin_nb.simulation import simulate

ROWS = [json.loads(line) for line in FINETUNE_DATA.read_text().splitlines()][:24]


def test_lr_zero_writes_the_base_and_changes_nothing(tmp_path, tiny_hf):
    sim = simulate("tiny-gpt2", ROWS, lr=0.0, steps=10, output=tmp_path / "zero.pt", progress=False)
    assert sim.diff.summary["n_changed"] == 0 and sim.diff.summary["max_abs_delta"] == 0.0
    state = torch.load(tmp_path / "zero.pt", weights_only=True)["state_dict"]
    for key, value in tiny_hf[0].state_dict().items():
        assert torch.equal(state[key], value)


def test_forecast_moves_only_the_filtered_parameters(tmp_path, tiny_hf):
    sim = simulate("tiny-gpt2", ROWS, lr=0.05, steps=20, output=tmp_path / "f.pt", progress=False)
    state = torch.load(tmp_path / "f.pt", weights_only=True)["state_dict"]
    moved = {k for k, v in tiny_hf[0].state_dict().items() if not torch.equal(state[k], v)}
    assert moved and all(k.startswith(("transformer.h.0.", "transformer.h.1.")) for k in moved)
    assert all(k.endswith("weight") and ("attn" in k or "mlp" in k) for k in moved)
    assert sim.diff.summary["n_changed"] > 0 and sim.summary["method"] == "ntk-diagonal"


def test_exact_linear_runs_and_moves_features(tmp_path):
    sim = simulate(
        "tiny-gpt2",
        ROWS,
        lr=0.05,
        steps=5,
        exact_linear=True,
        output=tmp_path / "lin.pt",
        progress=False,
    )
    assert sim.summary["method"] == "exact-linear" and sim.diff.summary["max_abs_delta"] > 0


def test_cli_streams_the_summary_line(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in ROWS[:8]))
    code = main(
        [
            "simulate",
            "--model",
            "tiny-gpt2",
            "--data",
            str(data),
            "--lr",
            "0.05",
            "--steps",
            "10",
            "--checkpoint-out",
            str(tmp_path / "sim.pt"),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert any(
        line.startswith("[simulate] SAE diff: nChanged=") and "meanAbsDelta=" in line
        for line in out.splitlines()
    )


@pytest.mark.parametrize(
    "rows,flags,message",
    [
        ([], [], "is empty"),
        ([{"instruction": "q"}], [], "no response"),
        (ROWS[:2], ["--lr", "nan"], "lr must be a finite"),
        (ROWS[:2], ["--params", "nothing_matches_this"], "matches no parameter"),
    ],
)
def test_bad_inputs_are_refused_and_leave_no_file(tmp_path, capsys, rows, flags, message):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    output = tmp_path / "sim.pt"
    code = main(
        [
            "simulate",
            "--model",
            "tiny-gpt2",
            "--data",
            str(data),
            "--checkpoint-out",
            str(output),
            "-q",
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not output.exists() and not list(tmp_path.glob(".sim.pt*"))


def test_library_refuses_non_finite_lr():
    with pytest.raises(AquinError, match="lr must be a finite"):
        simulate("tiny-gpt2", ROWS, lr=float("inf"), progress=False)


def test_bfloat16_forecast_agrees_with_float32_and_writes_the_float32_base_plus_delta(
    tmp_path, tiny_hf
):
    from scipy.stats import spearmanr

    full = simulate("tiny-gpt2", ROWS, lr=0.05, steps=20, output=tmp_path / "32.pt", progress=False)
    half = simulate(
        "tiny-gpt2",
        ROWS,
        lr=0.05,
        steps=20,
        dtype="bf16",
        output=tmp_path / "16.pt",
        progress=False,
    )
    assert (full.summary["dtype"], half.summary["dtype"]) == ("float32", "bfloat16")
    base = tiny_hf[0].state_dict()
    full_state = torch.load(tmp_path / "32.pt", weights_only=True)["state_dict"]
    half_state = torch.load(tmp_path / "16.pt", weights_only=True)["state_dict"]
    # no bfloat16 rounding reaches the checkpoint: what the forecast does not move is
    # the float32 base bit for bit, and what it moves moves the same way
    for key, value in base.items():
        assert half_state[key].dtype == torch.float32
        if torch.equal(full_state[key], value):
            assert torch.equal(half_state[key], value), key
    full_delta = torch.cat([(full_state[k] - v).flatten() for k, v in base.items()])
    half_delta = torch.cat([(half_state[k] - v).flatten() for k, v in base.items()])
    assert torch.nn.functional.cosine_similarity(full_delta, half_delta, dim=0) > 0.99
    assert set(half.diff.top(20)["feature"]) == set(full.diff.top(20)["feature"])
    left = full.diff.features.set_index("feature").sort_index()["delta"]
    right = half.diff.features.set_index("feature").sort_index()["delta"]
    assert spearmanr(left, right).statistic > 0.99


@pytest.mark.parametrize(
    "dtype,message",
    [("float8", "unknown dtype 'float8'"), (torch.float64, "dtype float64 is not supported")],
)
def test_unknown_dtype_is_refused_before_anything_loads(tmp_path, dtype, message):
    with pytest.raises(AquinError, match=message):
        simulate("tiny-gpt2", ROWS, dtype=dtype, output=tmp_path / "s.pt", progress=False)
    assert not (tmp_path / "s.pt").exists()
