"""The pieces of a trajectory with known answers: merges, tracking, metrics, checkpoint sets,
the multi-series line and the labelled heatmap, the mirror's schema."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from aquin_nb import AquinError
from aquin_nb._checkpoint_sets import names_a_set, resolve_checkpoints
from aquin_nb._fit import DownstreamStats
from aquin_nb._metrics import MAX_POINTS, read_metrics
from aquin_nb._stats import BaseFeatureStats, FitStats, PairedFeatureStats
from aquin_nb._track import add_step, empty_trajectory, tracked_after


def _tokens(seed: int, n_prompts: int = 10, d_sae: int = 6):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=n_prompts)
    owner = np.repeat(np.arange(n_prompts), counts)
    base = rng.exponential(1.0, size=(len(owner), d_sae))
    checkpoint = base + rng.normal(0.2, 0.3, size=base.shape)
    return torch.as_tensor(base), torch.as_tensor(checkpoint), torch.as_tensor(owner)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_merged_shards_equal_one_pass_and_the_base_side_pairs_like_update(layout):
    """The trajectory's base side and checkpoint side, fed dense features or sparse ones
    (`sparse_features`, as the passes feed them where few fire), against one dense pass."""
    base, checkpoint, owner = _tokens(0)
    base[base < 0.7] = 0.0  # about half not firing
    whole = PairedFeatureStats(6)
    whole.update(base, checkpoint, owner, 10)
    # Two prompt shards, each as the trajectory computes it: base once, checkpoint against it.
    merged = None
    for prompts in (range(0, 4), range(4, 10)):
        keep = (owner >= prompts.start) & (owner < prompts.stop)
        rows = owner[keep] - prompts.start
        base_side = BaseFeatureStats(6)
        as_given = (lambda t: t.to_sparse()) if layout == "sparse" else (lambda t: t)
        base_side.update(as_given(base[keep]), rows, len(prompts))
        part = base_side.paired()
        part.update_checkpoint(as_given(checkpoint[keep]), rows, base_side.batch_means[0])
        merged = part if merged is None else merged.merge(part)
    assert merged is not None
    for name in ("base_sum", "checkpoint_sum", "base_fires", "checkpoint_fires", "diff_sum"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-6)
    np.testing.assert_allclose(merged.diff_sq_sum, whole.diff_sq_sum, rtol=1e-5)
    assert (merged.n_tokens, merged.n_prompts) == (whole.n_tokens, whole.n_prompts)
    np.testing.assert_allclose(merged.paired_t_pvalues(), whole.paired_t_pvalues(), rtol=1e-5)


def test_fit_and_downstream_merges_are_sums():
    x = torch.randn(40, 3, dtype=torch.float64)
    rebuilt = x + 0.1 * torch.randn_like(x)
    whole, first, second = FitStats(3), FitStats(3), FitStats(3)
    whole.update(x, rebuilt)
    first.update(x[:15], rebuilt[:15])
    second.update(x[15:], rebuilt[15:])
    assert first.merge(second).explained_variance() == pytest.approx(whole.explained_variance())
    a, b = DownstreamStats(), DownstreamStats()
    a.sums["ce_clean"], a.n_predictions, b.sums["ce_clean"], b.n_predictions = 2.0, 2, 4.0, 2
    assert a.merge(b).sums["ce_clean"] == 6.0 and a.n_predictions == 4


def _frame(deltas: dict[int, float], changed: set[int], d_sae: int = 8) -> pd.DataFrame:
    delta = np.array([deltas.get(f, 0.0) for f in range(d_sae)])
    frame = pd.DataFrame(
        {
            "feature": np.arange(d_sae),
            "delta": delta,
            "abs_delta": np.abs(delta),
            "q_value": np.where([f in changed for f in range(d_sae)], 0.001, 0.9),
            "changed": [f in changed for f in range(d_sae)],
        }
    )
    return frame.sort_values(["abs_delta", "feature"], ascending=[False, True]).reset_index(
        drop=True
    )


FIT = {"verdict": "pass", "checkpoint": {"explained_variance": 0.9, "l0": 3.0}, "warning": None}


def test_tracking_top_features_first_changed_ones_in_half_the_room():
    frame = _frame({0: 5.0, 1: -4.0, 2: 3.0, 3: 2.0, 4: 1.0}, changed={2, 3, 4})
    assert tracked_after([], frame, top_k=2, max_features=4) == [0, 1]  # room for changed: 2
    assert tracked_after([], frame, top_k=1, max_features=6) == [0, 2, 3]
    assert tracked_after([7, 6, 5], frame, top_k=2, max_features=4) == [7, 6, 5, 0]
    still = _frame({}, changed=set())
    assert tracked_after([], still, top_k=3, max_features=4) == []  # nothing moved: no rows


def test_tracking_equals_its_definition_on_random_frames():
    """Random frames (ties in |delta| and |shift|, signed shifts, zeros): the tracked list is
    the definition spelled out in plain Python: top_k by |delta| (the frame's order), then
    top_k non-zero shifts by |shift| with ties by feature, while fewer than max_features
    are tracked; then changed features while fewer than half are."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        d_sae = int(rng.integers(1, 40))
        deltas = {f: float(rng.choice([0.0, 0.5, 1.0, rng.normal()])) for f in range(d_sae)}
        frame = _frame(deltas, {f for f in range(d_sae) if rng.random() < 0.3}, d_sae)
        shifts = rng.choice([0.0, 0.0, 0.25, -0.25, 1.0], size=d_sae) * rng.random(d_sae).round(1)
        frame = frame.assign(shift=shifts[frame["feature"].to_numpy()])
        tracked = [int(f) for f in rng.choice(60, int(rng.integers(0, 5)), replace=False)]
        top_k, max_features = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        rows = list(frame.itertuples(index=False))
        top = [r.feature for r in rows if r.abs_delta > 0][:top_k]
        pushed = sorted((r for r in rows if r.shift != 0), key=lambda r: (-abs(r.shift), r.feature))
        top += [r.feature for r in pushed][:top_k]
        expected = list(tracked)
        for candidates, room in (
            (top, max_features),
            ([r.feature for r in rows if r.changed], max(1, max_features // 2)),
        ):
            for feature in candidates:
                if len(expected) >= room:
                    break
                if int(feature) not in expected:
                    expected.append(int(feature))
        assert tracked_after(tracked, frame, top_k, max_features) == expected


def test_steps_grow_rows_for_tracked_features_and_first_changed_steps():
    trajectory = empty_trajectory({"tracking": {"top_k": 1, "max_features": 10}})
    steps = [
        (10, {0: 1.0, 3: 0.2}, {3}),
        (20, {0: 1.0, 5: 2.0}, {0, 5}),
        (30, {0: 0.5, 5: 2.5}, {0}),
    ]
    for step, deltas, changed in steps:
        trajectory = add_step(
            trajectory,
            step=step,
            name=f"step_{step}",
            checkpoint=f"c/step_{step}.pt",
            frame=_frame(deltas, changed),
            fit=FIT,
        )
    rows = trajectory.steps
    # Step 10: top-1 feature 0 and changed 3; step 20: 5 joins; every tracked feature each step.
    assert rows.groupby("step")["feature"].apply(list).to_dict() == {
        10: [0, 3],
        20: [0, 3, 5],
        30: [0, 3, 5],
    }
    assert trajectory.first_changed() == {3: 10, 0: 20, 5: 20}
    features = trajectory.features.set_index("feature")
    assert features.loc[0, "n_steps_changed"] == 2 and features.loc[0, "last_changed_step"] == 30
    assert trajectory.per_step["n_changed"].tolist() == [1, 2, 1]
    assert trajectory.top(2) == [5, 0]
    feature_5 = trajectory.wide().loc[5]  # not tracked yet at step 10: NaN
    assert np.isnan(feature_5[10]) and feature_5[[20, 30]].tolist() == [2.0, 2.5]
    with pytest.raises(AquinError, match="step 20 .* is already in the trajectory"):
        add_step(trajectory, step=20, name="x", checkpoint="x.pt", frame=_frame({}, set()), fit=FIT)
    # A late step that arrives out of order lands in step order.
    late = add_step(
        trajectory, step=15, name="s", checkpoint="s.pt", frame=_frame({}, set()), fit=FIT
    )
    assert late.per_step["step"].tolist() == [10, 15, 20, 30]
    assert late.summary["first_step"] == 10 and late.summary["n_steps"] == 4


def test_metrics_skip_partial_and_bad_lines_and_thin_long_logs(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 0, "loss": 4.0, "lr": 1e-3, "tag": "warmup", "done": True},
        {"step": 10, "loss": float("nan"), "lr": 1e-3},
        "not json",
        {"loss": 3.0},
        {"step": 20, "loss": 2.5},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path.write_text(text + "\n" + '{"step": 30, "lo')  # the trainer is mid-line
    with caplog.at_level(logging.WARNING):
        frame = read_metrics(path)
    assert frame.to_dict("records") == [
        {"step": 0, "metric": "loss", "value": 4.0},
        {"step": 20, "metric": "loss", "value": 2.5},
        {"step": 0, "metric": "lr", "value": 1e-3},
        {"step": 10, "metric": "lr", "value": 1e-3},
    ]
    assert "skipped 2 line(s)" in caplog.text and "first: line 3" in caplog.text
    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(5000))
    )
    thinned = read_metrics(long)
    assert len(thinned) == MAX_POINTS
    assert thinned["step"].iloc[0] == 0 and thinned["step"].iloc[-1] == 4999
    with pytest.raises(AquinError, match="metrics file .*missing.jsonl does not exist"):
        read_metrics(tmp_path / "missing.jsonl")


def test_checkpoint_sets_order_by_step_skip_the_latest_copy_and_refuse_duplicates(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for name in ("step_100.pt", "step_20.pt", "checkpoint.pt", "notes.txt", "checkpoint-5"):
        path = folder / name
        path.mkdir() if name == "checkpoint-5" else path.write_bytes(b"x")
    refs = resolve_checkpoints(tmp_path / "run")
    assert [(r.step, r.label) for r in refs] == [
        (5, "checkpoint-5"),
        (20, "step_20"),
        (100, "step_100"),
    ]
    assert [r.step for r in resolve_checkpoints(folder)] == [5, 20, 100]
    assert [r.step for r in resolve_checkpoints(str(folder / "*.pt"))] == [20, 100]
    assert names_a_set(tmp_path / "run") and names_a_set(str(folder / "step_*.pt"))
    assert not names_a_set(folder / "step_20.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert not names_a_set(tmp_path / "hf")  # a save_pretrained directory is one checkpoint
    (folder / "step-20.safetensors").write_bytes(b"x")
    with pytest.raises(AquinError, match=r"step 20 appears twice: .*step-20\.safetensors"):
        resolve_checkpoints(folder)
    with pytest.raises(AquinError, match="no checkpoints in .*empty"):
        (tmp_path / "empty").mkdir()
        resolve_checkpoints(tmp_path / "empty")
    with pytest.raises(AquinError, match="steps must be non-negative integers"):
        resolve_checkpoints({-1: "a.pt"})
    with pytest.raises(AquinError, match="no checkpoints given"):
        resolve_checkpoints([])


def test_line_sections_draw_several_series_on_a_shared_axis_and_keep_the_single_form():
    from aquin_nb.cards._html import line_svg, live_spec

    single = line_svg({"x": [0, 10, 20], "y": [3.0, 2.0, 1.0]})
    assert single.count("<polyline") == 1 and "step 20" in single and "<rect" not in single
    several = line_svg(
        {
            "x_range": [0, 40],
            "series": [
                {"name": "feature <7>", "x": [10, 20, 30], "y": [None, 1.0, 2.0]},
                {"name": "feature 9", "x": [10, 20, 30], "y": [0.5, None, 1.5]},
            ],
        }
    )
    # A null leaves a gap: feature 9's two points are dots, not one line through the gap.
    assert several.count("<polyline") == 1 and several.count("<circle") == 2
    assert "feature &lt;7&gt;" in several and "feature <7>" not in several  # escaped legend
    assert "step 40" in several  # the shared axis, not the data's own end
    spec = {
        "kind": "sae_trajectory",
        "title": "t",
        "chips": [],
        "sections": [
            {"type": "line", "title": "l", "series": [{"name": "a", "x": [1], "y": ["x"]}]}
        ],
    }
    assert "cannot draw this chart" in live_spec(spec)["sections"][0]["error"]


def test_the_labelled_heatmap_is_diverging_and_marks_untracked_cells():
    from aquin_nb.cards._html import heatmap_svg

    svg = heatmap_svg(
        {
            "values": [[1.0, -1.0], [None, 0.5]],
            "row_labels": [101, 7],
            "column_labels": [10, 20],
            "row_name": "feature",
            "column_name": "step",
            "value_label": "Δ",
        }
    )
    assert "rgb(255,55,55)" in svg and "rgb(55,55,255)" in svg  # +max red, -max blue
    assert "feature 7 · step 10: Δ not tracked" in svg and "#e4e7eb" in svg
    assert heatmap_svg({"cosine": [[1.0]], "a": [1], "b": [2]}).count("<rect") == 1


def test_a_trajectory_event_passes_the_mirror_schema():
    from aquin_nb import _events
    from aquin_nb.cards import card_spec

    trajectory = empty_trajectory(
        {
            "model": "tiny-gpt2",
            "name": "run",
            "hook": "blocks.2.hook_resid_pre",
            "n_features": 8,
            "n_prompts": 4,
            "backend": "local",
            "tracking": {"top_k": 2, "max_features": 4},
        }
    )
    trajectory = add_step(
        trajectory, step=1, name="s", checkpoint="s.pt", frame=_frame({0: 1.0}, {0}), fit=FIT
    )
    event = _events.result_event(
        "a" * 32,
        "b" * 32,
        "sae_trajectory",
        "run",
        duration_s=1.0,
        summary=trajectory.summary,
        card=card_spec(trajectory),
    )
    assert _events.event_problem(event) is None and event["card"]["kind"] == "sae_trajectory"


def test_the_live_card_pages_every_feature_that_changed_with_its_label():
    trajectory = empty_trajectory(
        {
            "model": "tiny-gpt2",
            "name": "run",
            "hook": "blocks.2.hook_resid_pre",
            "n_features": 40,
            "n_prompts": 4,
            "backend": "local",
            "labels": {"3": "def · return"},
            "tracking": {"top_k": 2, "max_features": 4},
        }
    )
    for step, changed in ((1, set(range(0, 20))), (2, set(range(10, 30)))):
        frame = _frame({f: 1.0 + f for f in changed}, changed, d_sae=40)
        trajectory = add_step(
            trajectory, step=step, name=f"s{step}", checkpoint=f"s{step}.pt", frame=frame, fit=FIT
        )
    widget = trajectory.widget()
    assert widget.row_count == 30 and len(widget.page_rows) == 25  # beyond the card's 25 rows
    widget.query = {**widget.query, "sort": "first_changed_step", "descending": True}
    assert widget.page_rows[0]["first_changed_step"] == 2
    widget.query = {**widget.query, "filter": "def", "page": 0}
    assert [row["feature"] for row in widget.page_rows] == [3]
    assert widget.page_rows[0]["label"] == "def · return"
