"""sae_trajectory end to end: a planted direction that grows with the step, copies, bad runs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from aquin_nb import AquinError, SaeTrajectory, sae_diff, sae_trajectory
from aquin_nb.cli import main

from ..conftest import plant

ALPHA = 0.5  # the planted pre-activation boost per step
STEPS = (1, 2, 3, 4, 5, 6)


def write_run(folder, states_by_step, metrics=None):
    """A Run directory: checkpoints/step_<N>.pt, checkpoint.pt (the latest), metrics.jsonl."""
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir(parents=True)
    for step, state in states_by_step.items():
        torch.save({"step": step, "state_dict": state}, checkpoints / f"step_{step}.pt")
    last = max(states_by_step)
    torch.save({"step": last, "state_dict": states_by_step[last]}, checkpoints / "checkpoint.pt")
    if metrics:
        lines = [json.dumps(row) for row in metrics]
        (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def growing_run(tmp_path_factory, base_state, tiny_sae, planted_feature):
    states = {s: plant(base_state, tiny_sae, planted_feature, boost=ALPHA * s) for s in STEPS}
    metrics = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-4, "phase": "train"} for s in range(7)]
    return write_run(tmp_path_factory.mktemp("growing") / "run", states, metrics)


@pytest.fixture(scope="module")
def growing(growing_run):
    return sae_trajectory("tiny-gpt2", growing_run, fit="off", progress=False)


def expected_changes(tiny_sae, feature):
    """The known answer, computed without any checkpoint: the base's residuals plus the
    planted vector (what block 1's bias adds to every token), encoded by the SAE; the
    paired t-test across prompts (scipy), Benjamini-Hochberg over all features, and the
    effect floor of `sae_diff`, step by step."""
    from scipy.stats import false_discovery_control

    from aquin_nb._activations import residual, token_batches
    from aquin_nb._diff_core import prepare

    prepared = prepare("tiny-gpt2", None, None, tiny_sae, None, "test")
    direction = tiny_sae.W_dec[feature].detach().clone()
    direction -= direction.mean()
    unit = direction / float(direction @ tiny_sae.W_enc[:, feature].detach())
    xs, owners = [], []
    with torch.no_grad():
        for batch in token_batches(prepared.token_lists, batch_size=16, skip_first=True):
            xs.append(
                residual(prepared.base, batch.tokens, prepared.numerics.hook_name)[batch.mask]
            )
            owners.append(batch.prompt_index[:, None].expand_as(batch.mask)[batch.mask])
    x, owner = torch.cat(xs), torch.cat(owners).numpy()
    n_prompts = int(owner.max()) + 1
    with torch.no_grad():
        base = tiny_sae.encode(x).double().numpy()
    base_means = np.stack([base[owner == p].mean(0) for p in range(n_prompts)])
    answers = {}
    for step in STEPS:
        with torch.no_grad():
            planted = tiny_sae.encode(x + ALPHA * step * unit).double().numpy()
        planted_means = np.stack([planted[owner == p].mean(0) for p in range(n_prompts)])
        with np.errstate(invalid="ignore", divide="ignore"):
            p_values = stats.ttest_rel(planted_means, base_means).pvalue
        p_values = np.where(np.isnan(p_values), 1.0, p_values)  # no variance: no change
        q_values = false_discovery_control(p_values, method="bh")
        b, c = base.mean(0), planted.mean(0)
        delta = c - b
        effect = (np.abs(delta) >= 0.1 * np.maximum(b, c)) & (np.abs(delta) >= 1e-3)
        answers[step] = {
            "delta": float(delta[feature]),
            "q": float(q_values[feature]),
            "changed": bool(q_values[feature] <= 0.05 and effect[feature]),
        }
    return answers


def test_a_direction_growing_with_the_step_rises_and_first_changes_where_computed(
    growing, tiny_sae, planted_feature
):
    answers = expected_changes(tiny_sae, planted_feature)
    expected_first = min(step for step in STEPS if answers[step]["changed"])
    # The answer must be informative: unchanged at the first steps, changed later.
    assert STEPS[0] < expected_first < STEPS[-1]
    assert all(answers[s]["changed"] for s in STEPS if s >= expected_first)

    rows = growing.steps[growing.steps["feature"] == planted_feature].set_index("step")
    deltas = rows["delta"]
    assert deltas.is_monotonic_increasing and deltas.diff().dropna().gt(0).all()
    assert rows.index[-1] == STEPS[-1]
    for step in rows.index:
        assert rows.loc[step, "delta"] == pytest.approx(answers[step]["delta"], rel=1e-3, abs=1e-6)
        assert bool(rows.loc[step, "changed"]) == answers[step]["changed"]
    assert growing.first_changed()[planted_feature] == expected_first
    assert growing.top(1) == [planted_feature]
    # The residual shift is alpha * step along the planted direction: the decomposition's
    # coefficient for it grows in proportion, and it leads by |shift| at every step.
    shifts = growing.steps.assign(size=growing.steps["shift"].abs())
    leaders = shifts.sort_values("size", ascending=False).groupby("step")["feature"].first()
    assert set(leaders) == {planted_feature}
    per_unit = rows["shift"] / rows.index.to_numpy()
    np.testing.assert_allclose(per_unit, per_unit.iloc[0], rtol=1e-4)
    assert per_unit.iloc[0] > 0
    per_step = growing.per_step.set_index("step")
    assert list(per_step.index) == list(STEPS)  # checkpoint.pt (the latest copy) is not a step
    assert per_step["max_abs_delta"].is_monotonic_increasing


def test_the_trajectory_equals_separate_diffs_step_by_step(growing_run, planted_feature):
    step_3 = growing_run / "checkpoints" / "step_3.pt"
    one = sae_trajectory("tiny-gpt2", {3: step_3}, top_k=1536, max_features=1536, progress=False)
    diff = sae_diff("tiny-gpt2", step_3, progress=False)
    mine = one.steps.set_index("feature").sort_index()
    theirs = diff.features.set_index("feature").loc[mine.index]
    np.testing.assert_allclose(mine["delta"], theirs["delta"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mine["q_value"], theirs["q_value"], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(mine["shift"], theirs["shift"], rtol=1e-5, atol=1e-9)
    labels = one.summary["labels"]
    assert labels[str(planted_feature)] == theirs.loc[planted_feature, "label"]
    assert (mine["changed"] == theirs["changed"]).all()
    row = one.per_step.iloc[0]
    assert row["n_changed"] == diff.summary["n_changed"]
    fit = diff.summary["fit"]
    assert row["fit_verdict"] == fit["verdict"]
    assert row["explained_variance"] == pytest.approx(fit["checkpoint"]["explained_variance"])
    assert row["ce_loss_recovered"] == pytest.approx(fit["checkpoint"]["ce_loss_recovered"])
    assert one.summary["fit_base"]["explained_variance"] == pytest.approx(
        fit["base"]["explained_variance"]
    )


def test_a_run_of_copies_changes_nothing_at_any_step(tmp_path, base_state):
    run = write_run(tmp_path / "copies", {0: base_state, 10: base_state, 20: base_state})
    trajectory = sae_trajectory("tiny-gpt2", run, fit="off", progress=False)
    assert trajectory.per_step["step"].tolist() == [0, 10, 20]
    assert trajectory.per_step["n_changed"].tolist() == [0, 0, 0]
    assert trajectory.per_step["max_abs_delta"].tolist() == [0.0, 0.0, 0.0]
    assert trajectory.steps.empty and trajectory.features.empty
    assert trajectory.summary["n_ever_changed"] == 0
    assert set(trajectory.per_step["fit_verdict"]) == {"pass"}


def test_a_directory_a_glob_a_list_and_a_mapping_name_the_same_run(growing_run, growing):
    folder = growing_run / "checkpoints"
    picks = [folder / "step_5.pt", folder / "step_2.pt"]
    forms = {
        "glob": str(folder / "step_[25].pt"),
        "list": picks,
        "mapping": {5: picks[0], 2: picks[1]},
    }
    for form, checkpoints in forms.items():
        trajectory = sae_trajectory("tiny-gpt2", checkpoints, fit="off", progress=False)
        assert trajectory.per_step["step"].tolist() == [2, 5], form
        expected = growing.per_step.set_index("step").loc[[2, 5], "n_changed"].tolist()
        assert trajectory.per_step["n_changed"].tolist() == expected, form
    # The checkpoints/ folder itself and a name without a number (its step field) work too.
    (tmp := growing_run.parent / "unnumbered").mkdir()
    (tmp / "final.pt").write_bytes((folder / "step_4.pt").read_bytes())
    trajectory = sae_trajectory("tiny-gpt2", [tmp / "final.pt"], fit="off", progress=False)
    assert trajectory.per_step["step"].tolist() == [4]


def test_json_round_trip_card_and_metrics_on_the_step_axis(growing, tmp_path, planted_feature):
    from aquin_nb.cards import card_spec, render_html, render_text

    path = growing.to_json(tmp_path / "trajectory.json")
    again = SaeTrajectory.from_json(path)
    assert again.summary == json.loads(json.dumps(growing.summary))
    for name in SaeTrajectory.frames:
        pd.testing.assert_frame_equal(getattr(again, name), getattr(growing, name))
    assert sorted(set(again.metrics["metric"])) == ["loss", "lr"]  # "phase" is not a number

    spec = card_spec(again)
    lines = [s for s in spec["sections"] if s["type"] == "line"]
    assert {tuple(s["x_range"]) for s in lines} == {(0, STEPS[-1])}  # one step axis
    top = lines[0]["series"][0]
    label = again.summary["labels"][str(planted_feature)]  # the decoder row's logit lens
    assert top["name"] == f"feature {planted_feature} · {label}" and top["x"] == list(STEPS)
    assert any(s["title"] == "Training metric: loss" for s in lines)
    heatmap = next(s for s in spec["sections"] if s["type"] == "heatmap")
    assert heatmap["row_labels"][0] == planted_feature and heatmap["column_labels"] == list(STEPS)
    html = render_html(again)
    assert 'data-kind="sae_trajectory"' in html and html.count("<polyline") >= 5
    assert f"feature {planted_feature}" in html
    text = render_text(spec)
    assert text.startswith("[sae trajectory] tiny-gpt2 vs run") and "fit per step:" in text
    # The same charts as plotly figures (result.figure), on the same step axis.
    from aquin_nb.cards.figures import figure_names

    assert figure_names(again) == [
        "features",
        "delta",
        "changed",
        "fit",
        "metric loss",
        "metric lr",
    ]
    lines = again.figure("features")
    assert len(lines.data) == 5 and list(lines.layout.xaxis.range) == [0, STEPS[-1]]
    assert list(lines.data[0].y) == top["y"]
    cells = again.figure("delta").data[0]
    assert (
        cells.type == "heatmap" and cells.zmid == 0 and len(cells.z) == len(heatmap["row_labels"])
    )


def test_cli_sae_diff_over_a_run_directory_writes_the_trajectory(capsys, tmp_path, growing_run):
    output, html = tmp_path / "t.json", tmp_path / "t.html"
    code = main(
        ["sae", "diff", "--model", "tiny-gpt2", "--checkpoint", str(growing_run), "-q"]
        + ["--output", str(output), "--html", str(html), "--top", "3", "--top-k", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "[sae trajectory]" in out and f"wrote {output}" in out
    trajectory = SaeTrajectory.from_json(output)
    assert trajectory.summary["n_steps"] == len(STEPS)
    assert trajectory.summary["tracking"]["top_k"] == 4
    assert 'data-kind="sae_trajectory"' in html.read_text()


def _other_architecture_state():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=4096, n_positions=128, n_embd=64, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).state_dict()


BAD_RUNS = {
    "empty": ("no checkpoints in", "checkpoints"),
    "no match": ("no checkpoints match", "step_9*.pt"),
    "duplicate": ("step 2 appears twice", "step-2.pt"),
    "other architecture": ("does not fit", "step_2.pt"),
    "truncated": ("truncated", "step_2.pt"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_bad_run_exits_2_naming_the_file_and_writes_nothing(capsys, tmp_path, base_state, case):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    checkpoint = str(tmp_path / "run")
    if case != "empty":
        torch.save({"step": 1, "state_dict": base_state}, folder / "step_1.pt")
        torch.save({"step": 3, "state_dict": base_state}, folder / "step_3.pt")
    if case == "duplicate":
        torch.save({"step": 2, "state_dict": base_state}, folder / "step_2.pt")
        torch.save({"step": 2, "state_dict": base_state}, folder / "step-2.pt")
    if case == "other architecture":
        torch.save({"step": 2, "state_dict": _other_architecture_state()}, folder / "step_2.pt")
    if case == "truncated":
        whole = (folder / "step_1.pt").read_bytes()
        (folder / "step_2.pt").write_bytes(whole[: len(whole) // 2])
    if case == "no match":
        checkpoint = str(folder / "step_9*.pt")
    output = tmp_path / "out.json"
    args = ["sae", "diff", "--model", "tiny-gpt2", "--checkpoint", checkpoint, "-q"]
    code = main([*args, "--output", str(output), "--html", str(tmp_path / "out.html")])
    err = capsys.readouterr().err.strip().splitlines()
    message, names = BAD_RUNS[case]
    assert code == 2 and len(err) == 1 and err[0].startswith("aquin-nb: error:")
    assert message in err[0] and (names is None or names in err[0])
    assert not output.exists() and not (tmp_path / "out.html").exists()
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_run_flags_on_a_single_checkpoint_are_refused(capsys, copy_pt):
    args = ["sae", "diff", "--model", "tiny-gpt2", "--checkpoint", str(copy_pt)]
    assert main([*args, "--backend", "ray"]) == 2
    assert "--backend only apply to a run of checkpoints" in capsys.readouterr().err


def test_bad_arguments_are_clear_errors(growing_run, base_state, tmp_path):
    with pytest.raises(AquinError, match="top_k must be 0 or more"):
        sae_trajectory("tiny-gpt2", growing_run, top_k=-1)
    with pytest.raises(AquinError, match="backend must be one of local, ray"):
        sae_trajectory("tiny-gpt2", growing_run, backend="spark")
    with pytest.raises(AquinError, match="pass loaded models as"):
        sae_trajectory("tiny-gpt2", [object()])
    gone = tmp_path / "step_9.pt"  # listed, then deleted before the run reached it
    with pytest.raises(AquinError, match=r"checkpoint .*step_9\.pt does not exist"):
        sae_trajectory("tiny-gpt2", {1: growing_run / "checkpoints" / "step_1.pt", 9: gone})
    (tmp_path / "nameless").mkdir()
    torch.save(base_state, tmp_path / "nameless" / "final.pt")
    with pytest.raises(AquinError, match=r"cannot tell the step of checkpoint .*final\.pt"):
        sae_trajectory("tiny-gpt2", [tmp_path / "nameless" / "final.pt"])
