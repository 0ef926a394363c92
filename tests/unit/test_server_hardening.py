"""The receiver under hostile or careless input (issue 17): 4xx answers, never a 500,
and a database that is private to its owner and holds no token."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import sqlite3
import stat

import pytest
from starlette.testclient import TestClient

from aquin_nb import AquinError
from aquin_nb.server import create_app
from aquin_nb.server._input import parse_body, parse_row_id
from aquin_nb.server.app import SECURITY_HEADERS

from .test_mirror_api import post, result, start

BAD_ROW_IDS = {
    "10**20": str(10**20),
    "2**63": str(2**63),
    "negative": "-1",
    "not-a-number": "abc",
    "empty": "",
    "spaces": " 1 ",
    "underscores": "1_000",
    "arabic-digits": "١٢",
    "superscript": "²",
    "exponent": "1e3",
    "5000-digits": "9" * 5000,
}


@pytest.fixture
def app(tmp_path):
    return create_app(tmp_path / "mirror.sqlite")


@pytest.fixture
def client(app):
    # raise_server_exceptions=False: a 500 must show as a status, not as a raised error.
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {app.state.token}"
        yield client


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- tokens ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/?token=é", "/s/s1?token=%C3%A9", "/?token=%FF%FE", "/s/s1?token=%ED%A0%80"]
)
def test_non_ascii_page_tokens_get_401(app, path):
    with TestClient(app, raise_server_exceptions=False) as browser:
        response = browser.get(path, follow_redirects=False)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers


def test_a_non_ascii_token_given_explicitly_works_in_header_page_and_cookie(tmp_path):
    app = create_app(tmp_path / "m.sqlite", token="pässwörd-ő")
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer pässwörd-ő".encode()}
        assert client.get("/api/sessions", headers=headers).status_code == 200
        # The same letters in latin-1 are other bytes, so another token.
        latin1 = {"Authorization": b"Bearer p\xe4ssw\xf6rd-\xf5"}
        assert client.get("/api/sessions", headers=latin1).status_code == 401
        opened = client.get("/?token=pässwörd-ő", follow_redirects=False)
        assert opened.status_code == 303
        assert client.get("/api/sessions").status_code == 200  # through the cookie


# --- query parameters, headers and path parameters -------------------------------


@pytest.mark.parametrize("value", list(BAD_ROW_IDS.values()), ids=list(BAD_ROW_IDS))
@pytest.mark.parametrize("where", ["events?after", "stream?after", "stream Last-Event-ID"])
def test_bad_event_row_ids_get_400(client, where, value):
    assert post(client, [start()]).status_code == 200
    if where == "stream Last-Event-ID":
        if not value:
            pytest.skip("an empty Last-Event-ID is no header: ?after= is read instead")
        response = client.get("/api/sessions/s1/stream", headers={"Last-Event-ID": value.encode()})
    else:
        response = client.get(f"/api/sessions/s1/{where}", params={"after": value})
    assert response.status_code == 400, response.text
    assert "event id" in response.json()["error"]


def test_the_largest_row_id_is_read_as_nothing_after_it(client):
    assert post(client, [start()]).status_code == 200
    assert len(client.get("/api/sessions/s1/events", params={"after": "0"}).json()["events"]) == 1
    response = client.get("/api/sessions/s1/events", params={"after": str(2**63 - 1)})
    assert response.status_code == 200 and response.json()["events"] == []


def asgi_status(app, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """POST straight to the ASGI app: headers arrive byte for byte (TestClient
    re-encodes them), and an error in the app raises here."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"])


# b"\xb2" is "²" in latin-1, which str.isdigit() calls a digit and int() refuses.
@pytest.mark.parametrize("declared", [b"\xb2", b"9" * 5000, b"abc", b"-1", b"1e9", b""])
def test_odd_content_lengths_are_answered_not_crashed_on(app, declared):
    headers = [
        (b"authorization", f"Bearer {app.state.token}".encode()),
        (b"content-type", b"application/json"),
        (b"content-length", declared),
    ]
    status = asgi_status(app, "/api/sessions/s1/events", headers, b'{"events": []}')
    assert status in (413, 422)
    assert app.state.store.sessions() == []


@pytest.mark.parametrize("invocation", ["x" * 5000, "%00", "..%2F..", "A" * 32, "é", "%ED%A0%80"])
def test_odd_invocation_ids_get_404(client, invocation):
    assert post(client, [start()]).status_code == 200
    response = client.get(f"/api/sessions/s1/invocations/{invocation}")
    assert response.status_code == 404, response.text


def test_a_stored_card_that_breaks_the_renderer_is_served_without_its_charts(app, client):
    """A card an older server let in (integers past 64 bits) must not make its
    invocation a 500 forever."""
    begin = start()
    done = result(begin)
    done["card"]["sections"].append(
        {"type": "histogram", "title": "h", "counts": [1], "edges": [-(10**308), 10**308]}
    )
    app.state.store.add_events("s1", [begin, done])  # past the API's checks, as before
    response = client.get(f"/api/sessions/s1/invocations/{begin['invocation_id']}")
    assert response.status_code == 200, response.text
    sections = response.json()["card"]["sections"]
    assert "cannot draw this chart: OverflowError" in sections[-1]["error"]
    assert sections[1]["rows"][0] == {"feature": 7, "delta": 0.5}  # the table is intact


def test_no_hostile_input_gets_a_500(app, client):
    """A sweep over every route with the inputs above: 4xx, never 5xx."""
    anonymous = {"Authorization": "Bearer é".encode()}
    body = b"[" * 100_000
    requests = [
        ("GET", "/?token=é", {}, None),
        ("GET", "/api/sessions", anonymous, None),
        ("POST", "/api/sessions/s1/events", anonymous, b"{}"),
        ("POST", "/api/sessions/s1/events", {}, body),
        ("POST", "/api/sessions/%ED%A0%80/events", {}, b"{}"),
        ("GET", "/s/%00", {}, None),
        ("GET", "/static/%00", {}, None),
        ("GET", "/api/sessions/s1/events?after=" + "9" * 5000, {}, None),
        ("GET", "/api/sessions/s1/stream?after=-5", {}, None),
        ("GET", "/api/sessions/s1/invocations/" + "f" * 5000, {}, None),
    ]
    for method, path, headers, content in requests:
        response = client.request(method, path, headers=headers, content=content)
        assert 400 <= response.status_code < 500, (method, path, response.status_code)


def test_parse_body_names_the_problem():
    assert parse_body(b'{"a": [1, -2.5, 18446744073709551615]}') == {"a": [1, -2.5, 2**64 - 1]}
    for body, problem in [
        (b'{"a": ' + b"9" * 5000 + b"}", "(5000 digits) is out of range"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b'{"a": 1e999}', "number 1e999 is out of range"),
        (b"[" * 100_000, "nested deeper than 64 levels"),
        (b"[" * 65 + b"]" * 65, "nested deeper than 64 levels"),
        (b'["\\udc80"]', "lone surrogate"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_body(body)
    assert parse_body(b"[" * 64 + b"]" * 64) is not None  # the limit itself is fine
    assert [parse_row_id(text) for text in (None, "0", str(2**63 - 1))] == [0, 0, 2**63 - 1]
    assert {parse_row_id(text) for text in BAD_ROW_IDS.values()} == {None}


# --- the database and the token file ---------------------------------------------


@pytest.fixture
def open_umask():
    """umask 0: the modes checked are the ones the code asks for, not the umask's."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_the_database_is_private_and_holds_only_a_hash_of_the_token(tmp_path, open_umask):
    db = tmp_path / "new" / "mirror.sqlite"
    app = create_app(db)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {app.state.token}"
        assert post(client, [start()]).status_code == 200
    files = {path.name: mode(path) for path in db.parent.iterdir()}
    assert files == {
        "mirror.sqlite": 0o600,
        "mirror.sqlite-wal": 0o600,
        "mirror.sqlite-shm": 0o600,
        "mirror.sqlite.token": 0o600,
    }
    assert mode(db.parent) == 0o700
    token = app.state.token
    assert (db.parent / "mirror.sqlite.token").read_text() == token + "\n"
    for name in ("mirror.sqlite", "mirror.sqlite-wal"):
        assert token.encode() not in (db.parent / name).read_bytes()
    settings = dict(app.state.store._db.execute("SELECT key, value FROM settings").fetchall())
    assert settings == {"token_sha256": hashlib.sha256(token.encode()).hexdigest()}
    app.state.store.close()


def test_a_clear_token_from_an_older_version_moves_out_of_the_database(tmp_path, open_umask):
    db = tmp_path / "mirror.sqlite"
    legacy = "legacy-token-" + "x" * 40
    old = sqlite3.connect(db)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    old.execute("INSERT INTO settings (key, value) VALUES ('token', ?)", (legacy,))
    old.commit()
    os.chmod(db, 0o644)
    app = create_app(db)
    old.close()
    assert app.state.token == legacy and not app.state.token_generated  # clients keep working
    assert mode(db) == 0o600 and mode(tmp_path / "mirror.sqlite.token") == 0o600
    for path in tmp_path.iterdir():
        if path.name.startswith("mirror.sqlite") and path.suffix != ".token":
            assert b"legacy-token" not in path.read_bytes(), path.name
    app.state.store.close()
    again = create_app(db)
    assert again.state.token == legacy and not again.state.token_generated
    again.state.store.close()


def test_a_missing_token_file_means_a_new_token(tmp_path):
    first = create_app(tmp_path / "m.sqlite")
    first.state.store.close()
    (tmp_path / "m.sqlite.token").unlink()
    second = create_app(tmp_path / "m.sqlite")
    assert second.state.token_generated and second.state.token != first.state.token
    with TestClient(second) as client:
        old = {"Authorization": f"Bearer {first.state.token}"}
        assert client.get("/api/sessions", headers=old).status_code == 401
    second.state.store.close()


def test_a_token_file_that_does_not_match_the_database_is_refused(tmp_path):
    create_app(tmp_path / "m.sqlite").state.store.close()
    (tmp_path / "m.sqlite.token").write_text("someone-else's-token\n")
    with pytest.raises(AquinError, match=r"m\.sqlite\.token is not the one the database"):
        create_app(tmp_path / "m.sqlite")
    # --token still starts it, and leaves both files as they were.
    assert create_app(tmp_path / "m.sqlite", token="explicit").state.token == "explicit"
    assert (tmp_path / "m.sqlite.token").read_text() == "someone-else's-token\n"


def test_a_group_readable_token_file_is_made_private(tmp_path):
    first = create_app(tmp_path / "m.sqlite")
    first.state.store.close()
    os.chmod(tmp_path / "m.sqlite.token", 0o644)
    assert create_app(tmp_path / "m.sqlite").state.token == first.state.token
    assert mode(tmp_path / "m.sqlite.token") == 0o600


# --- the pages' second fence ------------------------------------------------------


def test_every_response_carries_the_content_security_policy(app, client):
    assert post(client, [start()]).status_code == 200
    for path in ("/", "/s/s1", "/api/sessions", "/static/card.js", "/static/nothing", "/s/%00"):
        response = client.get(path)
        for key, value in SECURITY_HEADERS.items():
            assert response.headers[key] == value, path
    policy = SECURITY_HEADERS["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]
    # The sessions page's one inline script is allowed by its hash, and only it.
    page = client.get("/").text
    (script,) = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy
