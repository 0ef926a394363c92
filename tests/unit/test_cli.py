"""The CLI's light paths: --help without torch, argument errors in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from aquin_nb.cli import main


def test_help_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from aquin_nb.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import aquin_nb\nassert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "sae" in result.stdout and "demo" in result.stdout


def test_missing_required_flag_is_one_line_exit_2(capsys):
    try:
        code = main(["sae", "diff", "--model", "tiny-gpt2"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--checkpoint" in err


def test_models_lists_the_catalog(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.index("tiny-gpt2") < out.index("gpt2-small") and "llama-3.1-8b" in out


def test_pull_sae_offline_says_so_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr("aquin_nb._hub.hub_reachable", lambda host="huggingface.co": False)
    assert main(["pull", "sae", "gpt2-small"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "huggingface.co is unreachable (offline?)" in err


def test_pull_sae_of_the_embedded_model_works_offline(capsys):
    assert main(["pull", "sae", "tiny-gpt2"]) == 0
    assert "ships with aquin_nb (d_in 192, d_sae 1536)" in capsys.readouterr().out


# ------------------------------------------------------------- flags every verb shares


def run_cli(capsys, *argv):
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


ALIGN = ["sae", "align", "--sae-a", "tiny-gpt2", "--sae-b", "tiny-gpt2", "--max-features", "32"]


def test_the_cli_text_comes_from_the_card_spec(capsys, tmp_path):
    from pathlib import Path

    import aquin_nb.cli

    for name in ("cli.py", "_cli_commands.py"):  # the CLI knows no summary keys
        source = (Path(aquin_nb.cli.__file__).parent / name).read_text()
        assert "summary[" not in source and ".summary" not in source, name
    code, out, err = run_cli(capsys, *ALIGN, "-q", "--top", "2", "--output", tmp_path / "a.json")
    assert code == 0, err
    assert out.startswith("[sae align] tiny-gpt2 ↔ tiny-gpt2\n[sae align] matched 32")
    assert out.count("\n    ") == 0 and "strongest pairs:" in out
    assert f"wrote {tmp_path / 'a.json'}" in out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top", "-5"], "argument --top: '-5' is negative"),
        (["--top", "many"], "argument --top: 'many' is not a whole number"),
    ],
)
def test_bad_shared_flags_are_one_line_exit_2(capsys, flags, message):
    code, _, err = run_cli(capsys, *ALIGN, *flags)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_a_non_finite_threshold_is_refused(capsys, copy_pt):
    code, _, err = run_cli(
        capsys, "sae", "diff", "--model", "tiny-gpt2", "--checkpoint", copy_pt,
        "--min-rel-delta", "nan",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "'nan' is not a finite number" in err


def test_output_naming_a_directory_or_the_input_is_refused_before_any_work(
    capsys, tmp_path, copy_pt
):
    code, _, err = run_cli(capsys, *ALIGN, "--output", tmp_path)
    assert code == 2 and err.count("\n") == 1
    assert f"--output: output {tmp_path} is a directory" in err
    target = tmp_path / "ckpt.pt"
    target.write_bytes(copy_pt.read_bytes())
    before = target.read_bytes()
    code, _, err = run_cli(
        capsys, "sae", "diff", "--model", "tiny-gpt2", "--checkpoint", target, "--output", target
    )
    assert code == 2 and err.count("\n") == 1 and "writing it would replace the input" in err
    assert target.read_bytes() == before


def test_old_output_spellings_still_work_for_one_release(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "capture", "--output", tmp_path / "cap", "--layers", "2", "--count", "8", "-q"
    )
    assert code == 0, err
    assert err.count("\n") == 1 and "--output" in err and "--out-dir" in err
    assert (tmp_path / "cap" / "manifest.json").is_file()
    code, out, err = run_cli(
        capsys, "sae", "train", "--model", "tiny-gpt2", "--layer", "2",
        "--activations", tmp_path / "cap", "--steps", "3", "--output", tmp_path / "sae",
        "--json", tmp_path / "trained.json", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert err.count("deprecated") == 2 and "use --output FILE" in err
    assert (tmp_path / "trained.json").is_file() and (tmp_path / "sae").is_dir()
    assert "[sae train]" in out


def test_only_the_projects_own_warnings_reach_stderr(capsys):
    import warnings

    from aquin_nb.cli import _one_line_warning
    from aquin_nb.mirror import SyncWarning

    _one_line_warning(
        "is_gradient_checkpointing is deprecated", FutureWarning, "/x/transformers/a.py", 1
    )
    assert capsys.readouterr().err == ""
    _one_line_warning("mirror unreachable", SyncWarning, warnings.__file__, 1)
    assert capsys.readouterr().err == "aquin-nb: warning: mirror unreachable\n"
