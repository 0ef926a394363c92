"""The receiver's API in-process (Starlette's TestClient): auth, validation, idempotency."""

from __future__ import annotations

import json
import uuid

import pytest
from starlette.testclient import TestClient

from aquin_nb import _events
from aquin_nb.server import create_app


def start(tool: str = "sae_diff", **extra) -> dict:
    event = _events.start_event(uuid.uuid4().hex, uuid.uuid4().hex, tool, {"name": "run-1"})
    event.update(extra)
    return event


def result(start_event: dict, **extra) -> dict:
    card = {
        "kind": "sae_diff",
        "title": "tiny-gpt2 vs run-1",
        "chips": [{"label": "changed", "value": "3 / 1536"}],
        "warning": None,
        "token_views": {},
        "sections": [
            {"type": "bars", "title": "Top ±Δ", "bars": [{"feature": 7, "delta": 0.5}]},
            {
                "type": "table",
                "title": "Features",
                "columns": ["feature", "delta"],
                "rows": [{"feature": 7, "delta": 0.5}, {"feature": 9, "delta": -0.25}],
                "select": "feature",
            },
        ],
    }
    event = _events.result_event(
        uuid.uuid4().hex,
        start_event["invocation_id"],
        start_event["tool"],
        "run-1",
        duration_s=1.25,
        summary={"n_changed": 3},
        card=card,
    )
    event.update(extra)
    return event


@pytest.fixture
def app(tmp_path):
    return create_app(tmp_path / "mirror.sqlite")


@pytest.fixture
def client(app):
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {app.state.token}"
        yield client


def post(client, events, session="s1", **kwargs):
    return client.post(f"/api/sessions/{session}/events", json={"events": events}, **kwargs)


def stored(app, session="s1") -> int:
    return len(app.state.store.events(session))


def test_token_is_generated_once_and_kept(tmp_path):
    first = create_app(tmp_path / "m.sqlite")
    second = create_app(tmp_path / "m.sqlite")
    assert first.state.token_generated and not second.state.token_generated
    assert first.state.token == second.state.token and len(first.state.token) >= 40
    assert create_app(tmp_path / "m.sqlite", token="explicit").state.token == "explicit"
    # Kept in a 0600 file beside the database; the database holds only its hash.
    assert first.state.token_file == tmp_path / "m.sqlite.token"
    assert first.state.token_file.read_text().strip() == first.state.token
    assert first.state.token.encode() not in (tmp_path / "m.sqlite").read_bytes()


def test_events_are_stored_once_by_event_id(app, client):
    begin = start()
    done = result(begin)
    assert post(client, [begin, done]).json() == {"stored": 2, "duplicates": 0}
    assert post(client, [done, begin]).json() == {"stored": 0, "duplicates": 2}
    assert stored(app) == 2
    (row,) = client.get("/api/sessions/s1/invocations").json()["invocations"]
    assert row["status"] == "completed" and row["tool"] == "sae_diff" and row["duration_s"] == 1.25
    detail = client.get(f"/api/sessions/s1/invocations/{begin['invocation_id']}").json()
    assert detail["arguments"] == {"name": "run-1"}
    assert detail["card"]["sections"][1]["rows"][0] == {"feature": 7, "delta": 0.5}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer é".encode()},  # UTF-8 bytes
        {"Authorization": b"Bearer \xe9\xff"},  # not UTF-8 at all
        {"Cookie": 'aquin_nb_token="\\351"'},  # a cookie that unquotes to é
    ],
    ids=["no-token", "wrong-token", "not-bearer", "non-ascii", "not-utf8", "non-ascii-cookie"],
)
def test_writes_without_the_token_get_401_and_store_nothing(app, headers):
    with TestClient(app) as anonymous:
        response = anonymous.post(
            "/api/sessions/s1/events", json={"events": [start()]}, headers=headers
        )
        assert response.status_code == 401
        for path in ("/api/sessions", "/api/sessions/s1/events", "/api/sessions/s1/invocations"):
            assert anonymous.get(path, headers=headers).status_code == 401
        assert anonymous.get("/", headers=headers).status_code == 401
        assert anonymous.get("/s/s1", headers=headers).status_code == 401
    assert stored(app) == 0 and app.state.store.sessions() == []


def test_the_cookie_opens_pages_and_reads_but_never_writes(app):
    with TestClient(app) as browser:
        opened = browser.get(f"/s/s1?token={app.state.token}", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/s/s1"
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert browser.get("/s/s1").status_code == 200  # the cookie now rides along
        assert browser.get("/api/sessions").status_code == 200
        # A cross-site form could carry the cookie; writes need the header.
        assert (
            browser.post("/api/sessions/s1/events", json={"events": [start()]}).status_code == 401
        )
        assert browser.get("/s/s1?token=wrong", follow_redirects=False).status_code == 401
    assert stored(app) == 0


def _bad_payloads() -> dict[str, tuple[bytes, int]]:
    good = start()
    wrong_version = {**start(), "schema_version": 2}
    unknown_tool = start(tool="rm_rf")
    unknown_type = {**start(), "type": "tool.progress"}
    huge = result(start(), error="x" * (_events.MAX_EVENT_BYTES + 10))
    return {
        "malformed-json": (b'{"events": [', 400),
        "not-utf8": (b"\xff\xfe", 400),
        "no-events": (b'{"events": []}', 422),
        "wrong-schema-version": (json.dumps({"events": [good, wrong_version]}).encode(), 422),
        "unknown-tool": (json.dumps({"events": [good, unknown_tool]}).encode(), 422),
        "unknown-type": (json.dumps({"events": [unknown_type]}).encode(), 422),
        "bad-id": (json.dumps({"events": [{**good, "event_id": "../x"}]}).encode(), 422),
        "bad-card": (
            json.dumps({"events": [result(good, card={"kind": "exec", "sections": []})]}).encode(),
            422,
        ),
        "event-over-64KB": (json.dumps({"events": [good, huge]}).encode(), 413),
        "body-over-1MB": (b'{"events": [' + b" " * _events.MAX_REQUEST_BYTES + b"]}", 413),
        # JSON that Python reads but no other reader agrees on: refused whole.
        "integer-of-5000-digits": (_with_value(good, "9" * 5000), 400),
        "integer-over-64-bits": (_with_value(good, str(2**64)), 400),
        "NaN": (_with_value(good, "NaN"), 400),
        "Infinity": (_with_value(good, "Infinity"), 400),
        "minus-Infinity": (_with_value(good, "-Infinity"), 400),
        "1e999": (_with_value(good, "1e999"), 400),
        "minus-1e999": (_with_value(good, "-1e999"), 400),
        "nested-100000-deep": (b"[" * 100_000, 400),
        "nested-100000-deep-in-an-event": (_with_value(good, "[" * 100_000 + "]" * 100_000), 400),
        "nested-65-deep-in-an-event": (_with_value(good, "[" * 65 + "]" * 65), 400),
        "lone-surrogate": (_with_value(good, '"\\ud800"'), 400),
    }


def _with_value(event: dict, value: str) -> bytes:
    """``event`` in a batch with one argument set to ``value``, spelled as raw JSON."""
    batch = json.dumps({"events": [{**event, "arguments": {"bomb": "HERE"}}]})
    return batch.replace('"HERE"', value).encode()


@pytest.mark.parametrize("case", list(_bad_payloads()))
def test_bad_payloads_get_4xx_and_store_nothing(app, client, case):
    body, status = _bad_payloads()[case]
    response = client.post(
        "/api/sessions/s1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert "error" in response.json()
    assert stored(app) == 0  # the good event in the same batch was not stored either


def test_bad_session_names_are_refused(app, client):
    response = post(client, [start()], session="..%2Fetc")
    assert response.status_code == 404
    assert client.get("/s/<script>").status_code == 404
    assert stored(app, "..%2Fetc") == 0


def test_client_svg_is_never_served_and_text_stays_escaped_in_pages(app, client):
    begin = start()
    done = result(begin)
    done["card"]["sections"][0]["svg"] = "<script>window.__pwned = 1</script>"
    done["card"]["sections"][0]["bars"][0]["feature"] = "<img src=x onerror=alert(1)>"
    assert post(client, [begin, done]).status_code == 200
    card = client.get(f"/api/sessions/s1/invocations/{begin['invocation_id']}").json()["card"]
    svg = card["sections"][0]["svg"]
    assert "<script>" not in svg and "<img" not in svg and "&lt;img src=x" in svg
    # A chart whose numbers are strings is reported, not drawn.
    done2 = result(start())
    done2["card"]["sections"][0]["bars"][0]["delta"] = "</svg><script>"
    post(client, [done2])
    card2 = client.get(f"/api/sessions/s1/invocations/{done2['invocation_id']}").json()["card"]
    assert "svg" not in card2["sections"][0] and "cannot draw" in card2["sections"][0]["error"]


def test_static_sources_are_the_widget_files(client):
    from aquin_nb.cards._html import widget_source

    assert client.get("/static/card.js").text == widget_source("card.js")
    assert "EventSource" in client.get("/static/session.js").text
    assert client.get("/static/../pyproject.toml").status_code == 404
    assert client.get("/static/secrets.txt").status_code == 404
