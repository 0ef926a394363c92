"""Shared fixtures: the embedded zoo and checkpoints with known, planted changes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_hf():
    from aquin_nb.models import load_hf_model

    model, tokenizer, _ = load_hf_model("tiny-gpt2")
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_sae():
    from aquin_nb import load_sae

    return load_sae("tiny-gpt2")


@pytest.fixture(scope="session")
def base_state(tiny_hf) -> dict[str, torch.Tensor]:
    model, _ = tiny_hf
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def self_selective_features(sae, margin: float = 1.2) -> list[int]:
    """Features whose encoder answers their own decoder direction ``margin``x more than any other.

    That is what makes a feature readable, and it holds for about 90% of the
    embedded SAE's features; a plant along such a direction must rank first.
    """
    directions = sae.W_dec.detach() - sae.W_dec.detach().mean(1, keepdim=True)
    response = directions @ sae.W_enc.detach()  # [planted f, responding g]
    own = response.diag()
    others = response.masked_fill(torch.eye(len(response), dtype=torch.bool), float("-inf"))
    return (own > margin * others.max(1).values).nonzero().flatten().tolist()


@pytest.fixture(scope="session")
def planted_feature(tiny_sae) -> int:
    feature = 101
    assert feature in self_selective_features(tiny_sae)
    return feature


def plant(
    state: dict[str, torch.Tensor], sae, feature: int, boost: float = 4.0
) -> dict[str, torch.Tensor]:
    """Add feature's decoder direction to the MLP output bias of block 1.

    ``blocks.1`` writes straight into ``blocks.2.hook_resid_pre``, the SAE's hook,
    so every token's activation moves by exactly that vector (centred, as the
    SAE's numerics centre writing weights). The vector is scaled so the feature's
    pre-activation rises by ``boost``.
    """
    direction = sae.W_dec[feature].detach().clone()
    direction -= direction.mean()
    alpha = boost / float(direction @ sae.W_enc[:, feature].detach())
    planted = {key: value.clone() for key, value in state.items()}
    planted["transformer.h.1.mlp.c_proj.bias"] += alpha * direction
    return planted


@pytest.fixture(scope="session")
def planted_state(base_state, tiny_sae, planted_feature):
    return plant(base_state, tiny_sae, planted_feature)


@pytest.fixture(scope="session")
def planted_pt(tmp_path_factory, planted_state) -> Path:
    path = tmp_path_factory.mktemp("planted") / "planted.pt"
    torch.save({"step": 7, "state_dict": planted_state}, path)
    return path


@pytest.fixture(scope="session")
def copy_pt(tmp_path_factory, base_state) -> Path:
    path = tmp_path_factory.mktemp("copy") / "copy.pt"
    torch.save({"step": 0, "state_dict": base_state}, path)
    return path


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
_executed: dict[str, object] = {}


@pytest.fixture(scope="session")
def run_notebook(tmp_path_factory):
    """Execute a shipped notebook once per session (nbclient) and return it with outputs."""
    import nbformat
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("notebooks")

    def execute(name: str):
        if name not in _executed:
            notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
            client = NotebookClient(
                notebook,
                timeout=600,
                kernel_name="python3",
                resources={"metadata": {"path": str(workdir)}},
            )
            client.execute()
            _executed[name] = notebook
        return _executed[name]

    return execute
