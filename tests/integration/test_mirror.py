"""The web mirror end to end on loopback: real uvicorn servers, real verbs, real kills."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
import warnings

import httpx
import pytest

import aquin_nb
from aquin_nb import _events, _verbs, mirror
from aquin_nb.cli import main
from tests.mirror_server import ServeProcess, ThreadedServer, free_port


@pytest.fixture
def server(tmp_path):
    with ThreadedServer(tmp_path / "mirror.sqlite") as running:
        yield running


@pytest.fixture(autouse=True)
def _no_session_left(tmp_path, monkeypatch):
    monkeypatch.setenv(mirror.ENV_SPOOL, str(tmp_path / "spool"))
    for name in (mirror.ENV_URL, mirror.ENV_TOKEN, mirror.ENV_SESSION):
        monkeypatch.delenv(name, raising=False)
    yield
    mirror.disconnect(timeout=0.5)


ALIGN_ARGS = [
    "sae",
    "align",
    "--sae-a",
    "tiny-gpt2",
    "--sae-b",
    "tiny-gpt2",
    "--max-features",
    "64",
    "-q",
]


def synthetic_start() -> dict:
    return _events.start_event(uuid.uuid4().hex, uuid.uuid4().hex, "sae_align", {"name": "x"})


def test_a_synced_verb_sends_start_and_result_with_its_card(server, planted_pt, planted_feature):
    session = aquin_nb.connect("diff-run", url=server.url, token=server.token)
    diff = aquin_nb.sae_diff("tiny-gpt2", planted_pt, name="planted", progress=False)
    assert session.flush(10)
    begin, done = server.events("diff-run")
    assert (begin["type"], done["type"]) == ("tool.start", "tool.result")
    assert begin["invocation_id"] == done["invocation_id"] and begin["tool"] == "sae_diff"
    assert begin["arguments"]["checkpoint"] == str(planted_pt) and begin["name"] == "planted"
    assert done["status"] == "ok" and done["error"] is None and done["duration_s"] > 0
    assert done["summary"]["n_changed"] == diff.summary["n_changed"]
    table = next(s for s in done["card"]["sections"] if s["type"] == "table")
    assert table["rows"][0]["feature"] == planted_feature == int(diff.top(1)["feature"].iloc[0])
    assert len(_events.encode(done)) <= _events.MAX_EVENT_BYTES
    (row,) = server.invocations("diff-run")
    assert row["status"] == "completed" and row["name"] == "planted"


def test_a_failing_verb_is_reported_as_failed_and_still_raises(server, tmp_path):
    aquin_nb.connect("fail-run", url=server.url, token=server.token)
    missing = tmp_path / "missing.pt"
    with pytest.raises(aquin_nb.AquinError):
        aquin_nb.sae_diff("tiny-gpt2", missing, progress=False)
    assert mirror.active_session().flush(10)
    (row,) = server.invocations("fail-run")
    assert row["status"] == "failed" and "missing.pt" in row["error"]


def test_nested_verbs_report_only_the_outer_one(server):
    @_verbs.verb("sae_diff")
    def inner():
        return "inner"

    @_verbs.verb("simulate")
    def outer():
        return inner()

    aquin_nb.connect("nested", url=server.url, token=server.token)
    assert outer() == "inner"
    assert mirror.active_session().flush(10)
    rows = server.invocations("nested")
    assert [r["tool"] for r in rows] == ["simulate"] and rows[0]["status"] == "completed"


def test_server_down_the_verb_runs_warns_once_and_delivers_later(tmp_path, tiny_sae):
    port = free_port()
    session = aquin_nb.connect("late", url=f"http://127.0.0.1:{port}", token="t0ken")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [
            aquin_nb.sae_align(tiny_sae, tiny_sae, max_features=64, progress=False)
            for _ in range(3)
        ]
        session.flush(0.3)
    assert [r.summary["mean_cosine"] for r in results] == pytest.approx([1.0] * 3)
    sync_warnings = [w for w in caught if issubclass(w.category, mirror.SyncWarning)]
    assert len(sync_warnings) == 1, [str(w.message) for w in sync_warnings]
    assert "unreachable" in str(sync_warnings[0].message)
    assert session.pending == 6 and session.delivered == 0
    with ThreadedServer(tmp_path / "late.sqlite", port=port, token="t0ken") as server:
        assert session.flush(20)
        rows = server.invocations("late")
        assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
        assert len(server.events("late")) == 6


def test_kill_and_restart_mid_run_loses_and_duplicates_nothing(tmp_path):
    port, db = free_port(), tmp_path / "killed.sqlite"
    server = ServeProcess(db, port=port, token="k1ll").__enter__()
    session = mirror.Session(
        "killed", f"http://127.0.0.1:{port}", "k1ll", max_queue=5000, retry_max_s=0.5
    )
    sent = []
    try:
        for index in range(300):
            event = synthetic_start()
            sent.append(event["event_id"])
            session.emit(event)
            time.sleep(0.004)
            if index == 100:
                server.process.send_signal(signal.SIGKILL)  # no clean shutdown, mid-stream
                server.process.wait()
            if index == 200:
                server = ServeProcess(db, port=port, token="k1ll").__enter__()
        assert session.flush(30), f"{session.pending} events still pending"
        response = httpx.get(
            f"http://127.0.0.1:{port}/api/sessions/killed/events",
            headers={"Authorization": "Bearer k1ll"},
        )
        stored = [event["event_id"] for event in response.json()["events"]]
        assert len(stored) == len(set(stored)) == 300  # none lost, none twice
        assert stored == sent  # and in the order they were emitted
    finally:
        session.close(0.5)
        server.__exit__()


def test_undelivered_events_are_spooled_at_exit_and_sent_by_the_next_session(tmp_path):
    port, spool = free_port(), tmp_path / "outbox"
    url = f"http://127.0.0.1:{port}"
    session = mirror.Session("spooled", url, "sp00l", spool_dir=spool)
    events = [synthetic_start() for _ in range(5)]
    for event in events:
        session.emit(event)
    with pytest.warns(mirror.SyncWarning, match="5 events kept in"):
        session.close(timeout=0.5)
    (spool_file,) = spool.iterdir()
    assert len(spool_file.read_text().splitlines()) == 5
    with ThreadedServer(tmp_path / "spool.sqlite", port=port, token="sp00l") as server:
        later = mirror.Session("spooled", url, "sp00l", spool_dir=spool)
        assert later.flush(10)
        later.close()
        assert [e["event_id"] for e in server.events("spooled")] == [e["event_id"] for e in events]
    assert not spool_file.exists()


def test_load_5000_events_from_4_clients_are_stored_exactly_once(server):
    per_client, clients = 1250, 4
    batches = [[synthetic_start() for _ in range(per_client)] for _ in range(clients)]
    failures: list[str] = []

    def send(events: list[dict]) -> None:
        with server.client() as client:
            for index, event in enumerate(events):
                response = client.post("/api/sessions/load/events", json={"events": [event]})
                if response.status_code != 200:
                    failures.append(response.text)
                if index % 10 == 0:  # a retry after a lost reply: must not store twice
                    again = client.post("/api/sessions/load/events", json={"events": [event]})
                    if again.json() != {"stored": 0, "duplicates": 1}:
                        failures.append(again.text)

    threads = [threading.Thread(target=send, args=(events,)) for events in batches]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    seconds = time.perf_counter() - started
    assert not failures, failures[:3]
    stored = [event["event_id"] for event in server.events("load")]
    expected = {event["event_id"] for events in batches for event in events}
    assert len(stored) == len(set(stored)) == 5000 and set(stored) == expected
    print(
        f"\nmirror load: 5000 events (+500 re-sends) from 4 clients in {seconds:.2f}s, "
        f"{5500 / seconds:.0f} requests/s"
    )


def test_the_stream_sends_rows_live_in_order(server):
    begin = synthetic_start()
    done = {
        **_events.result_event(
            uuid.uuid4().hex, begin["invocation_id"], "sae_align", "x", duration_s=0.1
        )
    }
    received: list[dict] = []

    def listen() -> None:
        with server.client() as client, client.stream("GET", "/api/sessions/live/stream") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    import json

                    received.append(json.loads(line[6:]))
                    if len(received) == 2:
                        return

    with server.client() as client:  # the session exists before the page opens
        client.post("/api/sessions/live/events", json={"events": [begin]})
    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    time.sleep(0.3)
    with server.client() as client:
        client.post("/api/sessions/live/events", json={"events": [done]})
    listener.join(10)
    assert [r["type"] for r in received] == ["tool.start", "tool.result"]
    assert received[1]["status"] == "ok" and "card" not in received[1]


def test_cli_sync_flag_mirrors_the_verb(server, monkeypatch, capsys):
    monkeypatch.setenv(mirror.ENV_URL, server.url)
    monkeypatch.setenv(mirror.ENV_TOKEN, server.token)
    monkeypatch.setenv(mirror.ENV_SESSION, "cli-run")
    assert main([*ALIGN_ARGS, "--sync"]) == 0
    (row,) = server.invocations("cli-run")
    assert row["tool"] == "sae_align" and row["status"] == "completed"
    assert "warning" not in capsys.readouterr().err


def test_cli_with_the_server_down_exits_0_with_one_warning_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(mirror.ENV_URL, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(mirror.ENV_TOKEN, "t")
    assert main(ALIGN_ARGS) == 0  # AQUIN_NB_URL alone turns sync on
    captured = capsys.readouterr()
    assert "mean cosine 1.0000" in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aquin-nb: warning: aquin_nb mirror"), lines
    assert "unreachable" in lines[0]  # "queued" or "kept in", as the timing falls
    (spool_file,) = (tmp_path / "spool").iterdir()
    assert len(spool_file.read_text().splitlines()) == 2


def test_cli_sync_without_a_token_and_serve_on_a_busy_port_exit_2(monkeypatch, capsys, tmp_path):
    from aquin_nb.server import open_socket

    args = ["sae", "align", "--sae-a", "tiny-gpt2", "--sae-b", "tiny-gpt2", "--sync"]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith("(aquin-nb serve prints it)")
    busy = open_socket("127.0.0.1", 0)
    try:
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port), "--db", str(tmp_path / "x.sqlite")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err
    finally:
        busy.close()
    if os.name == "posix":
        assert main(["serve", "--port", "70000"]) == 2


def test_capture_and_train_send_their_own_cards(server, tmp_path):
    aquin_nb.connect("pipeline", url=server.url, token=server.token)
    aquin_nb.capture_activations("tiny-gpt2", output=tmp_path / "cap", layers=[2], progress=False)
    aquin_nb.sae_train(
        "tiny-gpt2",
        2,
        activations=tmp_path / "cap",
        steps=5,
        batch_size=128,
        output=tmp_path / "out",
        progress=False,
    )
    assert mirror.active_session().flush(10)
    rows = server.invocations("pipeline")
    assert [r["tool"] for r in rows] == ["capture_activations", "sae_train"]
    assert {r["status"] for r in rows} == {"completed"}
    with server.client() as client:
        cards = [
            client.get(f"/api/sessions/pipeline/invocations/{r['invocation_id']}").json()["card"]
            for r in rows
        ]
    assert [c["kind"] for c in cards] == ["capture", "sae_train"]
    assert cards[0]["sections"][0]["rows"][0]["layer"] == 2
    line = next(s for s in cards[1]["sections"] if s["type"] == "line")
    assert len(line["y"]) == 5 and line["svg"].startswith("<svg")


def test_a_wrong_token_warns_once_and_stores_nothing(server, tiny_sae):
    session = aquin_nb.connect("wrong-token", url=server.url, token="not-the-token")
    with pytest.warns(mirror.SyncWarning, match="rejected the token"):
        aquin_nb.sae_align(tiny_sae, tiny_sae, max_features=32, progress=False)
        session.flush(1.0)
    assert session.pending == 2 and session.delivered == 0
    assert server.events("wrong-token") == []


def test_a_bad_event_is_dropped_alone(server):
    session = aquin_nb.connect("mixed", url=server.url, token=server.token)
    good = [synthetic_start() for _ in range(3)]
    session.emit(good[0])
    session.emit({**synthetic_start(), "tool": "rm_rf"})
    session.emit(good[1])
    session.emit({**synthetic_start(), "schema_version": 99})
    session.emit(good[2])
    assert session.flush(10)
    assert session.rejected == 2 and session.delivered == 3
    assert [e["event_id"] for e in server.events("mixed")] == [e["event_id"] for e in good]
