"""The receiver's SQLite store: sessions, events (unique by event id) and the token.

The database and its ``-wal``/``-shm`` files are private to their owner (0600).
The token itself lives in its own 0600 file beside the database
(``mirror.sqlite.token``); the database keeps only its SHA-256, so a copy of the
database (a backup, a file shared to debug) does not grant access to the server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .._errors import AquinError

logger = logging.getLogger(__name__)

PRIVATE = 0o600
TOKEN_SUFFIX = ".token"
_SIDE_FILES = ("-wal", "-shm", "-journal")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    session TEXT NOT NULL REFERENCES sessions(name),
    invocation_id TEXT NOT NULL,
    type TEXT NOT NULL,
    received REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session, id);
"""


def token_digest(token: str) -> bytes:
    """SHA-256 of ``token``'s UTF-8 bytes (lone surrogates kept, so no two tokens collide)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _make_private(path: Path) -> None:
    """Take group and other access away from ``path`` when it exists."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if mode & 0o077:
        path.chmod(mode & 0o700)


class Store:
    """One SQLite file. Writes are serialised by a lock; WAL lets pages read meanwhile."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.token_file = self.path.with_name(self.path.name + TOKEN_SUFFIX)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it: SQLite gives the -wal and -shm
            # files the database's own mode. Older databases are tightened.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE))
            for file in (self.path, *self._side_files()):
                _make_private(file)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A deleted row (the clear token of older versions) is overwritten,
            # not left in a free page.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
            for file in self._side_files():
                _make_private(file)
        except sqlite3.DatabaseError as error:
            raise AquinError(f"cannot open the mirror database {self.path}: {error}") from None
        except OSError as error:
            raise AquinError(
                f"cannot open the mirror database {self.path}: {error.strerror or error}"
            ) from None
        self._lock = threading.Lock()

    def _side_files(self) -> list[Path]:
        return [self.path.with_name(self.path.name + suffix) for suffix in _SIDE_FILES]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def token(self, explicit: str | None = None) -> tuple[str, bool]:
        """The server token and whether it was generated now.

        ``explicit`` is used as given and stored nowhere. Otherwise the token is
        read from `token_file` and checked against the SHA-256 the database
        keeps; a token stored in clear by an older version moves into the file.
        When the file is missing a new token is generated (clients holding the
        old one must be given the new one).
        """
        if explicit:
            return explicit, False
        with self._lock:
            # One transaction from reading to writing, so two servers starting on
            # the same database agree on one token.
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    token, generated, legacy = self._settle_token()
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                if legacy:  # the clear token's old page versions leave the WAL too
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError as error:
                raise AquinError(f"cannot keep the token in {self.path}: {error}") from None
        return token, generated

    def _settle_token(self) -> tuple[str, bool, bool]:
        """(token, generated now, moved from a clear-text row); inside a transaction."""
        settings = dict(self._db.execute("SELECT key, value FROM settings").fetchall())
        from_file = self._read_token_file()
        legacy = settings.get("token")
        stored_hash = settings.get("token_sha256")
        if not legacy and stored_hash and from_file:
            if not hmac.compare_digest(token_digest(from_file).hex(), stored_hash):
                raise AquinError(
                    f"the token in {self.token_file} is not the one the database "
                    f"{self.path} was set up with: pass --token, or delete "
                    f"{self.token_file} to generate a new token"
                )
            return from_file, False, False
        generated = False
        if legacy:
            token = legacy
        elif from_file:
            token = from_file
        else:
            if stored_hash:
                logger.warning("%s is missing: a new token was generated", self.token_file)
            token, generated = secrets.token_urlsafe(32), True
        # The file first: if it cannot be written, the database keeps what it had.
        self._write_token_file(token)
        self._db.execute("DELETE FROM settings WHERE key IN ('token', 'token_sha256')")
        self._db.execute(
            "INSERT INTO settings (key, value) VALUES ('token_sha256', ?)",
            (token_digest(token).hex(),),
        )
        return token, generated, bool(legacy)

    def _read_token_file(self) -> str | None:
        try:
            _make_private(self.token_file)
            text = self.token_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
            raise AquinError(f"cannot read the token file {self.token_file}: {reason}") from None
        return text or None

    def _write_token_file(self, token: str) -> None:
        """Write ``token`` to `token_file` atomically, mode 0600 from the start."""
        temporary = self.token_file.with_name(f".{self.token_file.name}.{secrets.token_hex(4)}.tmp")
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(token + "\n")
            os.replace(temporary, self.token_file)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise AquinError(
                f"cannot write the token file {self.token_file}: {error.strerror or error}"
            ) from None

    def add_events(self, session: str, events: list[dict[str, Any]]) -> tuple[int, int]:
        """Store ``events`` in one transaction; an event id already stored is skipped.
        Returns (stored, duplicates)."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO sessions (name, created) VALUES (?, ?)", (session, now)
                )
                stored = 0
                for event in events:
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO events "
                        "(event_id, session, invocation_id, type, received, body) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            event["event_id"],
                            session,
                            event["invocation_id"],
                            event["type"],
                            now,
                            json.dumps(event, allow_nan=False),
                        ),
                    )
                    stored += cursor.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored, len(events) - stored

    def sessions(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT s.name, s.created, COUNT(DISTINCT e.invocation_id), MAX(e.received) "
                "FROM sessions s LEFT JOIN events e ON e.session = s.name "
                "GROUP BY s.name ORDER BY COALESCE(MAX(e.received), s.created) DESC"
            ).fetchall()
        return [
            {"name": name, "created": created, "invocations": count, "last_event": last}
            for name, created, count, last in rows
        ]

    def has_session(self, session: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM sessions WHERE name = ?", (session,)).fetchone()
        return row is not None

    def events(
        self, session: str, after: int = 0, limit: int = 10_000
    ) -> list[tuple[int, dict[str, Any]]]:
        """(row id, event) in arrival order, after row id ``after``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body FROM events WHERE session = ? AND id > ? ORDER BY id LIMIT ?",
                (session, after, limit),
            ).fetchall()
        return [(row_id, json.loads(body)) for row_id, body in rows]

    def last_id(self, session: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT MAX(id) FROM events WHERE session = ?", (session,)
            ).fetchone()
        return int(row[0] or 0)

    def invocations(self, session: str) -> list[dict[str, Any]]:
        """One row per invocation, start and result folded together, oldest first."""
        rows: dict[str, dict[str, Any]] = {}
        for _, event in self.events(session, limit=1_000_000):
            fold(rows.setdefault(event["invocation_id"], {}), event)
        return list(rows.values())

    def invocation(self, session: str, invocation_id: str) -> dict[str, Any] | None:
        with self._lock:
            bodies = self._db.execute(
                "SELECT body FROM events WHERE session = ? AND invocation_id = ? ORDER BY id",
                (session, invocation_id),
            ).fetchall()
        if not bodies:
            return None
        row: dict[str, Any] = {}
        for (body,) in bodies:
            fold(row, json.loads(body), keep_detail=True)
        return row


def fold(row: dict[str, Any], event: dict[str, Any], keep_detail: bool = False) -> dict[str, Any]:
    """Merge one event into an invocation row (the session page's sync row)."""
    row.setdefault("invocation_id", event["invocation_id"])
    row["tool"] = event["tool"]
    if event.get("name") or not row.get("name"):
        row["name"] = event.get("name", "")
    if event["type"] == "tool.start":
        row["started"] = event["time"]
        row.setdefault("status", "invoked")
        if keep_detail:
            row["arguments"] = event.get("arguments", {})
    else:
        row["status"] = "completed" if event["status"] == "ok" else "failed"
        row["finished"] = event["time"]
        row["duration_s"] = event["duration_s"]
        row["error"] = event.get("error")
        if keep_detail:
            row["summary"] = event.get("summary", {})
            row["card"] = event.get("card")
    return row
