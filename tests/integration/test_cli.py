"""`aquin-nb sae diff`: exit codes, one-line errors, and no partial output files."""

from __future__ import annotations

import json

import pytest
import torch

from aquin_nb.cli import main


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sae_diff_prints_and_writes_json(capsys, tmp_path, planted_pt, planted_feature):
    output = tmp_path / "out" / "diff.json"
    code, out, err = run_cli(
        capsys,
        "sae",
        "diff",
        "--model",
        "tiny-gpt2",
        "--checkpoint",
        str(planted_pt),
        "--output",
        str(output),
        "-q",
        "--top",
        "5",
    )
    assert code == 0, err
    assert "nChanged=" in out and "feature" in out
    payload = json.loads(output.read_text())
    assert payload["schema_version"] == 1
    assert payload["features"]["feature"][0] == planted_feature


def test_html_flag_writes_the_card(capsys, tmp_path, copy_pt):
    page = tmp_path / "card.html"
    code, out, err = run_cli(
        capsys,
        "sae",
        "diff",
        "--model",
        "tiny-gpt2",
        "--checkpoint",
        str(copy_pt),
        "--html",
        str(page),
        "-q",
    )
    assert code == 0, err
    html = page.read_text()
    assert html.startswith("<!doctype html>") and 'data-kind="sae_diff"' in html
    assert "<th>p_value</th>" in html


def _bad_inputs(tmp_path, copy_pt):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(copy_pt.read_bytes()[:5000])
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    other = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
        )
    )
    other_path = tmp_path / "neox.pt"
    torch.save({"step": 1, "state_dict": other.state_dict()}, other_path)
    sae_path = tmp_path / "narrow_sae.pt"
    torch.save(
        {
            "cfg": {
                "architecture": "standard",
                "d_in": 64,
                "d_sae": 128,
                "metadata": {"hook_name": "blocks.2.hook_resid_pre"},
            },
            "state_dict": {
                "W_enc": torch.zeros(64, 128),
                "W_dec": torch.zeros(128, 64),
                "b_enc": torch.zeros(128),
                "b_dec": torch.zeros(64),
            },
        },
        sae_path,
    )
    empty = tmp_path / "empty.json"
    empty.write_text("   \n")
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('"ok"\n{"instruction": \n')
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('["caf\xe9 au lait"]'.encode("latin-1"))
    good = ["--checkpoint", str(copy_pt)]
    return {
        "truncated": (["--checkpoint", str(truncated)], r"truncated\.pt: the file is truncated"),
        "architecture": (
            ["--checkpoint", str(other_path)],
            r"neox\.pt does not fit .*another architecture",
        ),
        "sae_width": (
            good + ["--sae", str(sae_path)],
            r"SAE d_in 64 does not match tiny-gpt2's d_model 192",
        ),
        "layer": (
            good + ["--layer", "7"],
            r"layer 7 is out of range: tiny-gpt2 has 4 layers \(0-3\)",
        ),
        "empty_prompts": (good + ["--prompts", str(empty)], r"empty\.json is empty"),
        "malformed_prompts": (
            good + ["--prompts", str(malformed)],
            r"malformed\.jsonl line 2 is not valid JSON",
        ),
        "non_utf8": (good + ["--prompts", str(latin1)], r"latin1\.json is not UTF-8"),
        "missing": (["--checkpoint", str(tmp_path / "nope.pt")], r"nope\.pt does not exist"),
    }


CASES = [
    "truncated",
    "architecture",
    "sae_width",
    "layer",
    "empty_prompts",
    "malformed_prompts",
    "non_utf8",
    "missing",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line_and_no_output(capsys, tmp_path, copy_pt, case):
    flags, pattern = _bad_inputs(tmp_path, copy_pt)[case]
    output = tmp_path / "result.json"
    code, out, err = run_cli(
        capsys, "sae", "diff", "--model", "tiny-gpt2", "-q", "--output", str(output), *flags
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("aquin-nb: error: ")
    assert "Traceback" not in err
    import re

    assert re.search(pattern, err), err
    assert not output.exists()
    assert not list(tmp_path.glob(".result.json.*"))


def test_unwritable_output_is_a_clear_error(capsys, tmp_path, copy_pt):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(
        capsys,
        "sae",
        "diff",
        "--model",
        "tiny-gpt2",
        "-q",
        "--checkpoint",
        str(copy_pt),
        "--output",
        str(blocker / "diff.json"),
    )
    assert code == 2 and "cannot write" in err
