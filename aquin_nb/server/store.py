"""The receiver's SQLite store: sessions, events (unique by event id) and the token."""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .._errors import AquinError

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


class Store:
    """One SQLite file. Writes are serialised by a lock; WAL lets pages read meanwhile."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            raise AquinError(f"cannot open the mirror database {self.path}: {error}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def token(self, explicit: str | None = None) -> tuple[str, bool]:
        """The server token and whether it was generated now (first start)."""
        if explicit:
            return explicit, False
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = 'token'").fetchone()
            if row:
                return str(row[0]), False
            token = secrets.token_urlsafe(32)
            self._db.execute("INSERT INTO settings (key, value) VALUES ('token', ?)", (token,))
            return token, True

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
