"""watch: checkpoints diffed as a trainer writes them, exactly once, across restarts."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
import torch

from aquin_nb import AquinError, SaeTrajectory, _verbs, watch
from aquin_nb._io import atomic_torch_save
from aquin_nb.cli import main

from ..conftest import plant

POLL = 0.2


class Seen:
    """A verb listener: the sae_trajectory calls the seam reports, by step."""

    def __init__(self) -> None:
        self.events: list[_verbs.VerbEvent] = []

    def __call__(self, event: _verbs.VerbEvent) -> None:
        if event.tool == "sae_trajectory" and event.phase == "result":
            self.events.append(event)

    def steps(self, ok: bool = True) -> list[int]:
        return [e.args[1] for e in self.events if (e.error is None) == ok]

    def __enter__(self) -> Seen:
        _verbs.add_listener(self)
        return self

    def __exit__(self, *_: object) -> None:
        _verbs.remove_listener(self)


def checkpoint_bytes(step: int, state) -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": step, "state_dict": state}, buffer)
    return buffer.getvalue()


def write_slowly(path, data: bytes, pieces: int = 8, pause: float = POLL / 4) -> None:
    """A trainer that writes in place: the partial file is visible, and grows, for a while."""
    with open(path, "wb") as handle:
        for index in range(pieces):
            handle.write(data[index * len(data) // pieces : (index + 1) * len(data) // pieces])
            handle.flush()
            time.sleep(pause)


@pytest.fixture
def polling(monkeypatch):
    """Set once the watch has prepared its base and looks at the folder for the first time,
    so a test's trainer writes while the watch is watching."""
    from aquin_nb import watcher as watch_module

    started = threading.Event()
    look = watch_module.checkpoint_folder

    def first_look(run_dir):
        started.set()
        return look(run_dir)

    monkeypatch.setattr(watch_module, "checkpoint_folder", first_look)
    return started


@pytest.fixture(scope="module")
def states(base_state, tiny_sae, planted_feature):
    return {
        step: plant(base_state, tiny_sae, planted_feature, boost=step / 10)
        for step in range(10, 60, 10)
    }


def test_a_background_writer_three_checkpoints_each_diffed_once_and_a_restart_redoes_none(
    tmp_path, states, polling
):
    run = tmp_path / "run"
    folder = run / "checkpoints"
    folder.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - s / 100}) + "\n" for s in range(0, 31, 5))
    )
    partial_seen = threading.Event()

    def trainer() -> None:
        assert polling.wait(60)
        time.sleep(2 * POLL)
        atomic_torch_save(folder / "step_10.pt", {"step": 10, "state_dict": states[10]})
        time.sleep(3 * POLL)
        data = checkpoint_bytes(20, states[20])
        with open(folder / "step_20.pt", "wb") as handle:  # partial first, then the rest
            handle.write(data[: len(data) // 3])
            handle.flush()
            partial_seen.set()
            time.sleep(POLL / 2)
        write_slowly(folder / "step_20.pt", data)
        time.sleep(3 * POLL)
        atomic_torch_save(folder / "step_30.pt", {"step": 30, "state_dict": states[30]})

    writer = threading.Thread(target=trainer)
    with Seen() as seen:
        writer.start()
        trajectory = watch(run, "tiny-gpt2", fit="off", poll_s=POLL, max_new=3, progress=False)
        writer.join()
    assert partial_seen.is_set()
    assert seen.steps() == [10, 20, 30] and seen.steps(ok=False) == []
    assert trajectory.per_step["step"].tolist() == [10, 20, 30]
    saved = SaeTrajectory.from_json(run / "trajectory.json")
    assert saved.per_step["step"].tolist() == [10, 20, 30]
    assert set(saved.metrics["metric"]) == {"loss"}
    # Each event carries the whole trajectory so far: the mirror's card grows step by step.
    assert [e.result.summary["n_steps"] for e in seen.events] == [1, 2, 3]

    with Seen() as again:  # a restart: nothing is redone
        restored = watch(run, "tiny-gpt2", fit="off", poll_s=POLL, idle_timeout_s=0, progress=False)
    assert again.events == [] and restored.per_step["step"].tolist() == [10, 20, 30]

    atomic_torch_save(folder / "step_40.pt", {"step": 40, "state_dict": states[40]})
    with Seen() as later:  # a restart after the trainer went on: only the new step
        grown = watch(run, "tiny-gpt2", fit="off", poll_s=POLL, idle_timeout_s=0, progress=False)
    assert later.steps() == [40] and grown.per_step["step"].tolist() == [10, 20, 30, 40]
    assert not list(run.rglob("*.tmp"))


def test_the_watched_trajectory_equals_the_batch_one(tmp_path, states):
    from aquin_nb import sae_trajectory

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (10, 20, 30):
        torch.save({"step": step, "state_dict": states[step]}, folder / f"step_{step}.pt")
    watched = watch(
        tmp_path / "run", "tiny-gpt2", fit="off", poll_s=0.05, idle_timeout_s=0, progress=False
    )
    batch = sae_trajectory("tiny-gpt2", tmp_path / "run", fit="off", progress=False)
    for name in ("steps", "features"):
        assert getattr(watched, name).equals(getattr(batch, name)), name
    assert watched.per_step["n_changed"].tolist() == batch.per_step["n_changed"].tolist()


def test_bad_checkpoints_mid_run_are_reported_and_skipped(tmp_path, states, caplog):
    from .test_trajectory import _other_architecture_state

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"step": 10, "state_dict": states[10]}, folder / "step_10.pt")
    (folder / "step_20.pt").write_bytes(checkpoint_bytes(20, states[20])[:5000])  # stalled writer
    torch.save({"step": 25, "state_dict": _other_architecture_state()}, folder / "step_25.pt")
    torch.save({"step": 30, "state_dict": states[30]}, folder / "step_30.pt")
    torch.save({"step": 30, "state_dict": states[30]}, folder / "step-30.pt")
    with Seen() as seen:
        trajectory = watch(
            tmp_path / "run", "tiny-gpt2", fit="off", poll_s=0.05, idle_timeout_s=0, progress=False
        )
    assert trajectory.per_step["step"].tolist() == [10, 30]
    assert sorted(seen.steps(ok=False)) == [20, 25]  # the mirror shows them as failed rows
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step_20.pt" in w and "truncated" in w for w in warnings)
    assert any("step_25.pt" in w and "does not fit" in w for w in warnings)
    assert any("step 30 is already in the trajectory" in w and "step-30.pt" in w for w in warnings)

    # The stalled writer finishes: the changed file is read again and diffed.
    (folder / "step_20.pt").write_bytes(checkpoint_bytes(20, states[20]))
    with Seen() as seen:
        trajectory = watch(
            tmp_path / "run", "tiny-gpt2", fit="off", poll_s=0.05, idle_timeout_s=0, progress=False
        )
    assert seen.steps() == [20] and trajectory.per_step["step"].tolist() == [10, 20, 30]


def test_a_checkpoint_deleted_while_watched_is_named(tmp_path, states, caplog, polling):
    from aquin_nb.watcher import _diff_new_checkpoint

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    stop = threading.Event()

    def trainer() -> None:
        assert polling.wait(60)
        data = checkpoint_bytes(10, states[10])
        with open(folder / "step_10.pt", "wb") as handle:
            for index in range(15):  # seen growing by the watch, never complete, then gone
                handle.write(data[index * 1000 : (index + 1) * 1000])
                handle.flush()
                time.sleep(0.02)
        (folder / "step_10.pt").unlink()
        time.sleep(0.4)
        stop.set()

    writer = threading.Thread(target=trainer)
    writer.start()
    trajectory = watch(
        tmp_path / "run", "tiny-gpt2", fit="off", poll_s=0.05, stop=stop, progress=False
    )
    writer.join()
    assert (
        trajectory.summary["n_steps"] == 0 and not (tmp_path / "run" / "trajectory.json").exists()
    )
    assert any(
        "step_10.pt was deleted before it was diffed" in r.getMessage() for r in caplog.records
    )
    # Deleted between the completeness check and the read:
    with pytest.raises(AquinError, match=r"checkpoint .*step_99\.pt \(step 99\) was deleted while"):
        _diff_new_checkpoint(
            str(folder / "step_99.pt"), 99, comparison=_comparison(), trajectory=trajectory
        )


def _comparison():
    from aquin_nb.trajectory import Comparison

    return Comparison(
        "tiny-gpt2",
        None,
        None,
        None,
        batch_size=16,
        fdr=0.05,
        min_rel_delta=0.1,
        min_abs_delta=1e-3,
        fit="off",
        backend="local",
        prompt_shards=1,
        device=None,
    )


def test_ctrl_c_stops_cleanly_with_the_finished_steps_saved(tmp_path, states):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (10, 20):
        torch.save({"step": step, "state_dict": states[step]}, folder / f"step_{step}.pt")

    def interrupt_the_second(event: _verbs.VerbEvent) -> None:
        if event.phase == "start" and event.args[1] == 20:
            raise KeyboardInterrupt  # what Ctrl-C raises, in the middle of a diff

    _verbs.add_listener(interrupt_the_second)
    try:
        trajectory = watch(tmp_path / "run", "tiny-gpt2", fit="off", poll_s=0.05, progress=False)
    finally:
        _verbs.remove_listener(interrupt_the_second)
    assert trajectory.per_step["step"].tolist() == [10]
    assert SaeTrajectory.from_json(tmp_path / "run" / "trajectory.json").summary["n_steps"] == 1
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_watch_prints_each_step_and_refuses_a_foreign_trajectory(capsys, tmp_path, states):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (10, 20):
        torch.save({"step": step, "state_dict": states[step]}, folder / f"step_{step}.pt")
    args = ["watch", str(tmp_path / "run"), "--model", "tiny-gpt2", "--poll", "0.05"]
    html = tmp_path / "w.html"
    assert main([*args, "--idle-timeout", "0", "-q", "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "[watch] step 10 (step_10)" in out and "[watch] step 20 (step_20)" in out
    assert (
        "[sae trajectory] tiny-gpt2 vs run" in out
        and 'data-kind="sae_trajectory"' in html.read_text()
    )
    # A trajectory of other prompts in the way: exit 2, the file named, nothing overwritten.
    before = (tmp_path / "run" / "trajectory.json").read_text()
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["Open the file.", "Close the door.", "Sort the list."]))
    assert main([*args, "--idle-timeout", "0", "-q", "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trajectory.json was computed with n_prompts 32" in err[0]
    assert (tmp_path / "run" / "trajectory.json").read_text() == before
    assert main(["watch", str(tmp_path / "nowhere"), "--model", "tiny-gpt2"]) == 2
    assert "run directory" in capsys.readouterr().err


def test_the_mirror_shows_the_trajectory_grow_one_row_per_checkpoint(tmp_path, states, monkeypatch):
    import aquin_nb
    from aquin_nb import mirror
    from tests.mirror_server import ThreadedServer

    monkeypatch.setenv(mirror.ENV_SPOOL, str(tmp_path / "spool"))
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (10, 20):
        torch.save({"step": step, "state_dict": states[step]}, folder / f"step_{step}.pt")
    (folder / "step_15.pt").write_bytes(b"not a checkpoint")
    with ThreadedServer(tmp_path / "mirror.sqlite") as server:
        session = aquin_nb.connect("watch-run", url=server.url, token=server.token)
        try:
            watch(
                tmp_path / "run",
                "tiny-gpt2",
                fit="off",
                poll_s=0.05,
                idle_timeout_s=0,
                progress=False,
            )
            assert session.flush(10)
        finally:
            mirror.disconnect(timeout=0.5)
        rows = server.invocations("watch-run")
        results = [e for e in server.events("watch-run") if e["type"] == "tool.result"]
    assert [row["tool"] for row in rows] == ["sae_trajectory"] * 3
    assert sorted(row["status"] for row in rows) == ["completed", "completed", "failed"]
    failed = next(row for row in rows if row["status"] == "failed")
    assert "step_15.pt" in failed["error"]
    cards = [e["card"] for e in results if e["status"] == "ok"]
    per_step = [
        next(s for s in card["sections"] if s["title"] == "Fit per step" and s["type"] == "table")
        for card in cards
    ]
    assert [[row["step"] for row in table["rows"]] for table in per_step] == [[10], [10, 20]]
