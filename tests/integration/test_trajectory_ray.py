"""The Ray backend on a local 2-CPU runtime gives the local backend's trajectory."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from aquin_nb import AquinError, sae_trajectory

from ..conftest import plant

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_state, tiny_sae, planted_feature):
    folder = tmp_path_factory.mktemp("ray") / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (100, 200, 300):
        state = plant(base_state, tiny_sae, planted_feature, boost=step / 100)
        torch.save({"step": step, "state_dict": state}, folder / f"step_{step}.pt")
    return folder.parent


def test_ray_tasks_over_checkpoints_and_prompt_shards_equal_the_local_backend(local_ray, run):
    local = sae_trajectory("tiny-gpt2", run, progress=False)
    remote = sae_trajectory("tiny-gpt2", run, backend="ray", prompt_shards=2, progress=False)
    assert remote.summary["backend"] == "ray" and local.summary["backend"] == "local"
    for key in ("n_prompts", "n_tokens", "n_ever_changed", "n_steps"):
        assert remote.summary[key] == local.summary[key], key
    for key, value in local.summary["fit_base"].items():
        expected = pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
        assert remote.summary["fit_base"][key] == expected, key
    pd.testing.assert_frame_equal(remote.features, local.features)
    assert remote.steps[["step", "feature", "changed"]].equals(
        local.steps[["step", "feature", "changed"]]
    )
    np.testing.assert_allclose(remote.steps["delta"], local.steps["delta"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        remote.steps["q_value"], local.steps["q_value"], rtol=1e-4, atol=1e-12
    )
    numbers = ["n_changed", "mean_abs_delta", "max_abs_delta", "explained_variance", "l0"]
    numbers += ["ce_loss_recovered", "kl_div_score"]
    np.testing.assert_allclose(
        remote.per_step[numbers].to_numpy(float), local.per_step[numbers].to_numpy(float), rtol=1e-5
    )
    assert remote.per_step["fit_verdict"].tolist() == local.per_step["fit_verdict"].tolist()


def test_a_bad_checkpoint_in_a_ray_task_is_the_loaders_message(local_ray, tmp_path, run):
    folder = tmp_path / "bad" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step_1.pt").write_bytes((run / "checkpoints" / "step_100.pt").read_bytes()[:4096])
    with pytest.raises(AquinError, match=r"cannot read checkpoint .*step_1\.pt: the file is trunc"):
        sae_trajectory("tiny-gpt2", tmp_path / "bad", backend="ray", fit="off", progress=False)


def test_ray_needs_paths(local_ray, run):
    from aquin_nb import load_model

    with pytest.raises(AquinError, match="backend='ray' needs checkpoints as paths"):
        sae_trajectory("tiny-gpt2", {1: load_model("tiny-gpt2")}, backend="ray")
