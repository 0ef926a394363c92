"""``progress=False`` keeps other libraries' bars and warnings out of the user's output."""

from __future__ import annotations

import warnings

import aquin_nb
from aquin_nb._quiet import third_party_quiet


def test_progress_false_hides_loading_and_training_bars(capfd, tmp_path):
    def train(progress: bool) -> str:
        aquin_nb.sae_train(
            "tiny-gpt2", 2, steps=3, batch_size=64, output=tmp_path / str(progress),
            progress=progress,
        )  # fmt: skip
        return capfd.readouterr().err

    loud = train(True)  # the control: these bars exist and reach stderr
    assert "Loading weights" in loud and "sae train step" in loud
    quiet = train(False)
    assert (
        "Loading weights" not in quiet and "sae train" not in quiet and "Training SAE" not in quiet
    )


def test_quiet_silences_other_libraries_warnings_but_not_ours():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with third_party_quiet():
            warnings.warn_explicit("theirs", FutureWarning, "a.py", 1, module="transformers.a")
            warnings.warn_explicit("ours", UserWarning, "b.py", 1, module="aquin_nb.diff")
        warnings.warn_explicit("after", FutureWarning, "a.py", 2, module="transformers.a")
    assert [str(w.message) for w in caught] == ["ours", "after"]
