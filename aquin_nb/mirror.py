"""Mirror every verb's card to a web session page (DESIGN.md decision 9).

After `connect`, the session listens on the verb seam (`aquin_nb._verbs`), so
each verb (every one the result registry names: `sae_diff`, `model_diff`,
`sae_trajectory`, `feature_dashboards`, `capture_activations`, `sae_train`,
`sae_align`, `simulate`) pushes a ``tool.start`` and a ``tool.result`` event to
the session on an ``aquin-nb serve`` receiver. The verb itself never waits on
the network: it hands the event to a bounded in-memory queue and a background
thread delivers it, with retries. If the server is down the verb still returns
its result, the session warns once, and events wait in the queue; what is still
undelivered when the process exits goes to a spool file that the next
`connect` to the same server and session sends first. Delivery is idempotent
(the receiver ignores an event id it already has), so a retry never duplicates.

Example:
    >>> import aquin_nb
    >>> session = aquin_nb.connect("my-run", url="http://127.0.0.1:8765", token="…")  # doctest: +SKIP
    >>> aquin_nb.sae_diff("tiny-gpt2", "runs/lora/checkpoints/checkpoint.pt")  # doctest: +SKIP
    >>> session.flush()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _events, _verbs
from ._errors import AquinError

log = logging.getLogger(__name__)

ENV_URL = "AQUIN_NB_URL"
ENV_TOKEN = "AQUIN_NB_TOKEN"
ENV_SESSION = "AQUIN_NB_SESSION"
ENV_SPOOL = "AQUIN_NB_SPOOL"
DEFAULT_URL = "http://127.0.0.1:8765"
BATCH_EVENTS = 64

_active: Session | None = None


class SyncWarning(UserWarning):
    """The mirror could not deliver events (shown at most once per session)."""


def default_spool_dir() -> Path:
    return Path(os.environ.get(ENV_SPOOL) or Path.home() / ".cache" / "aquin_nb" / "outbox")


class Session:
    """A connection to one session on an ``aquin-nb serve`` receiver.

    ``emit`` never blocks: events go to a queue of at most ``max_queue`` events
    (the oldest is dropped, and counted in ``dropped``, when it is full) that a
    background thread posts in batches, ``linger_s`` after the first one queued,
    retrying with backoff up to ``retry_max_s`` seconds apart. ``delivered``
    counts events the server acknowledged, ``rejected`` those it would refuse (or
    did), which are dropped rather than retried.
    """

    def __init__(
        self,
        name: str,
        url: str,
        token: str,
        *,
        max_queue: int = 1000,
        spool_dir: str | Path | None = None,
        retry_max_s: float = 5.0,
        timeout_s: float = 10.0,
        linger_s: float = 0.25,
    ) -> None:
        import httpx

        from .cards import _specs  # noqa: F401  (imported now, not during a later verb)

        problem = _events.check_session_name(name)
        if problem:
            raise AquinError(problem)
        if not url.startswith(("http://", "https://")):
            raise AquinError(f"mirror url {url!r} must start with http:// or https://")
        if max_queue < 1:
            raise AquinError(f"max_queue must be at least 1, got {max_queue}")
        self.name = name
        self.url = url.rstrip("/")
        self.max_queue = max_queue
        self.retry_max_s = retry_max_s
        self.linger_s = linger_s
        self.dropped = 0
        self.delivered = 0
        self.rejected = 0
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 1.0)),
        )
        self._spool = Path(spool_dir or default_spool_dir()) / (
            f"{hashlib.sha256(self.url.encode()).hexdigest()[:12]}-{name}.jsonl"
        )
        self._cond = threading.Condition()
        self._pending: deque[dict[str, Any] | Callable[[], dict[str, Any]]] = deque()
        self._sending: list[Any] = []
        self._backoff = 0.0
        self._delivered_ids: set[str] = set()
        self._problem: str | None = None
        self._failed_while_closing = False
        self._warned = False
        self._closing = False
        self._stopped = False
        self._hurry = False
        self._reachable = False
        self._first_pending_at = time.monotonic()
        self.listener = _VerbListener(self)
        self._pending.extend(self._read_spool())
        self._thread = threading.Thread(
            target=self._deliver_loop, name=f"aquin-nb-mirror-{name}", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)

    def __repr__(self) -> str:
        return f"Session({self.name!r}, url={self.url!r}, pending={self.pending}, delivered={self.delivered})"

    @property
    def pending(self) -> int:
        """Events not yet acknowledged by the server."""
        with self._cond:
            return len(self._pending) + len(self._sending)

    def emit(self, event: dict[str, Any] | Callable[[], dict[str, Any]]) -> None:
        """Queue an event (or a function that builds it, run on the delivery thread)."""
        with self._cond:
            if self._stopped:
                raise AquinError(f"mirror session {self.name!r} is closed")
            while len(self._pending) + len(self._sending) >= self.max_queue and self._pending:
                self._pending.popleft()
                self.dropped += 1
            if not self._pending:
                self._first_pending_at = time.monotonic()
            self._pending.append(event)
            self._cond.notify_all()

    def warn_if_failing(self, spooled: int = 0) -> None:
        """Warn, at most once per session and in the caller's thread, if delivery is failing."""
        with self._cond:
            if self._problem is None or self._warned:
                return
            self._warned = True
            problem = self._problem
        where = (
            f"{spooled} events kept in {self._spool} for the next session to this server"
            if spooled
            else f"events are queued ({self.pending}) and sent when it is reachable"
        )
        warnings.warn(
            f"aquin_nb mirror {self.url} (session {self.name!r}): {problem}; {where}",
            SyncWarning,
            stacklevel=3,
        )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait up to ``timeout`` seconds for the queue to drain; True when it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            while self._pending or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            drained = not self._pending and not self._sending
            self._hurry = False
        if not drained:
            self.warn_if_failing()
        return drained

    def close(self, timeout: float = 2.0) -> None:
        """Deliver what can be delivered within ``timeout``, then spool the rest to disk.

        When delivery is already failing, one immediate last attempt is made rather
        than waiting out ``timeout``, so a dead server never holds up the exit.
        """
        global _active
        with self._cond:
            if self._stopped:
                return
            self._closing = True
            self._cond.notify_all()
            deadline = time.monotonic() + timeout
            while (self._pending or self._sending) and not self._failed_while_closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        with self._cond:
            raw = list(self._sending) + list(self._pending)
            self._pending.clear()
            self._sending = []
        leftover = [e for e in map(self._materialise, raw) if e is not None]
        self._write_spool(leftover)
        if leftover:
            self.warn_if_failing(spooled=len(leftover))
        self._client.close()
        _verbs.remove_listener(self.listener)
        atexit.unregister(self.close)
        if _active is self:
            _active = None

    # -- delivery thread ---------------------------------------------------------

    def _deliver_loop(self) -> None:
        retry_at = 0.0
        while True:
            with self._cond:
                # After a failure, wait out the backoff (new events don't cut it
                # short; closing does, for one last attempt).
                while not self._stopped and not self._closing and time.monotonic() < retry_at:
                    self._cond.wait(retry_at - time.monotonic())
                while not self._pending and not self._stopped:
                    self._cond.wait()
                # Linger a moment so a quick verb's start and result go as one post,
                # after the verb has returned rather than while it computes.
                while not (self._stopped or self._closing or self._hurry):
                    left = self._first_pending_at + self.linger_s - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stopped:
                    return
                # Until the server has answered (and while it fails), probe with one
                # event: queued results' cards are built only once it is reachable.
                size = BATCH_EVENTS if self._reachable else 1
                batch = [self._pending.popleft() for _ in range(min(size, len(self._pending)))]
                self._sending = batch
            events = [e for e in map(self._materialise, batch) if e is not None and self._valid(e)]
            with self._cond:
                self._sending = events
            outcome = self._post(events) if events else "ok"
            with self._cond:
                if outcome == "retry":
                    self._pending.extendleft(reversed(events))
                    self._backoff = min(self.retry_max_s, max(0.2, self._backoff * 2))
                    retry_at = time.monotonic() + self._backoff
                    if self._closing:
                        self._failed_while_closing = True
                else:
                    self._backoff = 0.0
                    self._delivered_ids.update(e["event_id"] for e in events)
                self._sending = []
                self._cond.notify_all()

    def _valid(self, event: dict[str, Any]) -> bool:
        """Drop (and count) an event the server would refuse: one bad event must not
        take the rest of its batch down with it."""
        problem = _events.event_problem(event)
        if problem is not None:
            self.rejected += 1
            log.error("mirror: an event was not sent: %s", problem)
        return problem is None

    def _materialise(self, event: Any) -> dict[str, Any] | None:
        if not callable(event):
            return event  # type: ignore[no-any-return]
        try:
            return event()  # type: ignore[no-any-return]
        except Exception as error:  # never let one bad result kill the delivery thread
            log.warning("mirror: building an event failed, it is dropped: %s", error)
            return None

    def _post(self, events: list[dict[str, Any]]) -> str:
        import httpx

        body = b'{"events":[' + b",".join(_events.encode(e) for e in events) + b"]}"
        try:
            response = self._client.post(f"/api/sessions/{self.name}/events", content=body)
        except httpx.HTTPError as error:
            self._set_problem(f"unreachable ({type(error).__name__}: {error})")
            return "retry"
        if response.status_code in (401, 403):
            self._set_problem("the server rejected the token (401)")
            return "retry"
        if response.status_code >= 500 or response.status_code == 429:
            self._set_problem(f"server error {response.status_code}")
            return "retry"
        if response.status_code >= 400:
            # A payload the server will never accept: retrying cannot help.
            self.rejected += len(events)
            log.error("mirror rejected %d events: %s", len(events), response.text[:300])
            return "rejected"
        with self._cond:
            self.delivered += len(events)
            self._problem = None
            self._reachable = True
        return "ok"

    def _set_problem(self, problem: str) -> None:
        with self._cond:
            self._problem = problem
            self._reachable = False
        log.debug("mirror %s: %s", self.url, problem)

    # -- spool -------------------------------------------------------------------

    def _read_spool(self) -> list[dict[str, Any]]:
        try:
            lines = self._spool.read_text("utf-8").splitlines()
        except FileNotFoundError:
            return []
        except OSError as error:
            log.warning("mirror: cannot read spool %s: %s", self._spool, error)
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line: the rest of the spool is still good
            if _events.event_problem(event) is None:
                events.append(event)
        return events[-self.max_queue :]

    def _write_spool(self, leftover: list[dict[str, Any]]) -> None:
        """Merge ``leftover`` with the spool on disk (another process may have written
        it) minus what this session delivered; atomic, and removed when empty."""
        from ._io import atomic_write_text

        merged: dict[str, dict[str, Any]] = {}
        for event in self._read_spool() + leftover:
            if event["event_id"] not in self._delivered_ids:
                merged.setdefault(event["event_id"], event)
        events = list(merged.values())[-self.max_queue :]
        try:
            if events:
                text = "".join(json.dumps(e, allow_nan=False) + "\n" for e in events)
                atomic_write_text(self._spool, text)
                log.info("mirror: %d undelivered events kept in %s", len(events), self._spool)
            else:
                self._spool.unlink(missing_ok=True)
        except (OSError, AquinError) as error:
            log.warning("mirror: cannot write spool %s: %s", self._spool, error)


def connect(
    name: str | None = None,
    url: str | None = None,
    token: str | None = None,
    **options: Any,
) -> Session:
    """Mirror every verb from now on to session ``name`` on an ``aquin-nb serve`` receiver.

    Args:
        name: the session (1-64 letters, digits, ``.``, ``_``, ``-``); default
            ``$AQUIN_NB_SESSION``.
        url: the receiver; default ``$AQUIN_NB_URL``, else ``http://127.0.0.1:8765``.
        token: the token ``aquin-nb serve`` printed; default ``$AQUIN_NB_TOKEN``.
        options: passed to `Session` (``max_queue``, ``spool_dir``, ``retry_max_s``).

    A previous session is closed first. Returns the `Session`.

    Example:
        >>> session = connect("my-run", token="…")  # doctest: +SKIP
    """
    global _active
    name = name or os.environ.get(ENV_SESSION)
    url = url or os.environ.get(ENV_URL) or DEFAULT_URL
    token = token or os.environ.get(ENV_TOKEN)
    if not name:
        raise AquinError(f"no mirror session name: pass name= or set {ENV_SESSION}")
    if not token:
        raise AquinError(
            f"no mirror token: pass token= or set {ENV_TOKEN} (aquin-nb serve prints it)"
        )
    disconnect()
    _active = Session(name, url, token, **options)
    _verbs.add_listener(_active.listener)
    return _active


def disconnect(timeout: float = 2.0) -> None:
    """Stop mirroring: deliver what can be delivered in ``timeout`` s, spool the rest."""
    if _active is not None:
        _active.close(timeout)


def active_session() -> Session | None:
    return _active


def _card(result: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The result's summary and card spec (built on the delivery thread)."""
    from .cards import card_spec

    summary = getattr(result, "summary", None)
    summary = dict(summary) if isinstance(summary, dict) else {}
    try:
        card = card_spec(result)
    except Exception as error:  # the event still goes, without its card
        log.warning("mirror: no card for %s: %s", type(result).__name__, error)
        card = None
    return summary, card


class _VerbListener:
    """Turns the verb seam's events into mirror events for one session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.labels: dict[str, str] = {}

    def __call__(self, event: _verbs.VerbEvent) -> None:
        session = self.session
        if event.phase == "start":
            arguments = _events.describe_arguments(event.function, event.args, event.kwargs)
            self.labels[event.invocation_id] = _events.invocation_label(arguments)
            session.emit(
                _events.start_event(uuid.uuid4().hex, event.invocation_id, event.tool, arguments)
            )
            return
        label = self.labels.pop(event.invocation_id, "")
        if event.error is not None:
            session.emit(
                _events.result_event(
                    uuid.uuid4().hex,
                    event.invocation_id,
                    event.tool,
                    label,
                    duration_s=event.duration_s,
                    error=event.error,
                )
            )
            session.warn_if_failing()
            return
        result_id = uuid.uuid4().hex

        def build() -> dict[str, Any]:
            summary, card = _card(event.result)
            name = summary.get("name") if isinstance(summary.get("name"), str) else label
            return _events.result_event(
                result_id,
                event.invocation_id,
                event.tool,
                name or label,
                duration_s=event.duration_s,
                summary=summary,
                card=card,
            )

        session.emit(build)
        session.warn_if_failing()
