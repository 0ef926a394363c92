"""Doctest setup: the examples in aquin_nb's docstrings run on the embedded zoo.

``pytest --doctest-modules aquin_nb`` (part of ``make test``) runs each example
in a fresh temporary directory, with ``checkpoint`` bound to a fine-tuned
checkpoint of tiny-gpt2 whose change is known: feature 101's decoder direction
planted in block 1's MLP output bias, which writes into the SAE's hook.
``run_dir`` is a Run directory in that temporary directory whose
``checkpoints/`` holds that checkpoint as ``step_1.pt`` and ``step_2.pt``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _pytest.doctest import DoctestItem

PLANTED_FEATURE = 101


@pytest.fixture(scope="session")
def doctest_checkpoint(tmp_path_factory) -> Path:
    import torch

    from aquin_nb import load_sae
    from aquin_nb.models import load_hf_model

    model, _, _ = load_hf_model("tiny-gpt2")
    sae = load_sae("tiny-gpt2")
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    direction = sae.W_dec[PLANTED_FEATURE].detach().clone()
    direction -= direction.mean()
    alpha = 4.0 / float(direction @ sae.W_enc[:, PLANTED_FEATURE].detach())
    state["transformer.h.1.mlp.c_proj.bias"] += alpha * direction
    path = tmp_path_factory.mktemp("doctest") / "checkpoint.pt"
    torch.save({"step": 1, "state_dict": state}, path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Labels, explanations and dashboards are cached in a temporary directory, never
    in the user's ~/.cache."""
    import os

    from aquin_nb.labels import ENV_CACHE

    previous = os.environ.get(ENV_CACHE)
    os.environ[ENV_CACHE] = str(tmp_path_factory.mktemp("aquin-cache"))
    yield
    if previous is None:
        os.environ.pop(ENV_CACHE, None)
    else:
        os.environ[ENV_CACHE] = previous


@pytest.fixture(autouse=True)
def _doctest_workdir(request, doctest_namespace, tmp_path, monkeypatch):
    """Doctests write their files into a temporary directory, never the checkout."""
    if isinstance(request.node, DoctestItem):
        monkeypatch.chdir(tmp_path)
        checkpoint = request.getfixturevalue("doctest_checkpoint")
        doctest_namespace["checkpoint"] = checkpoint
        folder = tmp_path / "run" / "checkpoints"
        folder.mkdir(parents=True)
        for step in (1, 2):  # links: a Run directory costs no copy
            (folder / f"step_{step}.pt").hardlink_to(checkpoint)
        doctest_namespace["run_dir"] = tmp_path / "run"
