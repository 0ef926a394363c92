"""The CLI's light paths: --help without torch, argument errors in one line."""

from __future__ import annotations

import subprocess
import sys

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
