"""The receiver's ASGI app (Starlette): the events API, the pages and the live stream.

Access model: one token per server, generated at first start (like Jupyter's)
and kept in a 0600 file beside the database, which stores only its SHA-256. It
grants every session on that server. Clients send it as ``Authorization: Bearer
TOKEN``; a browser opens ``/?token=TOKEN`` once, which sets an HttpOnly,
SameSite=Strict cookie for the pages and their reads.
Writes (POST) accept only the header, so a page on another site cannot post.

Everything a client sends is checked before it is used: a malformed token,
body, number, nesting or query parameter gets a 4xx answer, never a 500.
Every response carries a Content-Security-Policy that forbids inline script
(besides the sessions page's own, by hash), as a second fence behind the
pages' escaping.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import html
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _events
from ..cards._html import live_spec, widget_source
from ._input import parse_body, parse_row_id
from .store import Store, token_digest

logger = logging.getLogger(__name__)

COOKIE = "aquin_nb_token"
STATIC = {
    "card.js": "text/javascript",
    "card.css": "text/css",
    "session.js": "text/javascript",
    "session.css": "text/css",
}
KEEPALIVE_S = 15.0
_INVOCATION_ID = re.compile(r"[0-9a-f]{32}")


class _Changes:
    """Wakes the live streams when events arrive (one asyncio.Event per generation)."""

    def __init__(self) -> None:
        self.current = asyncio.Event()

    def bump(self) -> None:
        self.current.set()
        self.current = asyncio.Event()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(db: str | Path, token: str | None = None) -> Starlette:
    """The receiver app on the SQLite file ``db`` (created when missing, mode 0600).

    The token is ``token`` when given; else the one kept in ``db`` + ``.token``
    (0600), generated at first start. ``app.state`` holds ``token``,
    ``token_generated`` and ``token_file``.

    Example:
        >>> app = create_app("mirror.sqlite")  # doctest: +SKIP
        >>> app.state.token, app.state.token_file  # doctest: +SKIP
    """
    store = Store(db)
    server_token, generated = store.token(token)
    server_digest = token_digest(server_token)
    changes = _Changes()

    def matches(offered: bytes) -> bool:
        # Digests of bytes: compare_digest refuses non-ASCII str (a 500 before),
        # and equal-length digests leak nothing about the token's length.
        return hmac.compare_digest(hashlib.sha256(offered).digest(), server_digest)

    def authorised(request: Request, allow_cookie: bool) -> bool:
        header = request.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            # Starlette decodes headers as latin-1: encoding back gives the bytes sent.
            return matches(header[7:].encode("latin-1"))
        offered = request.cookies.get(COOKIE) if allow_cookie else None
        return offered is not None and matches(unquote_to_bytes(offered))

    def session_name(request: Request) -> str | JSONResponse:
        name = request.path_params["name"]
        problem = _events.check_session_name(name)
        return _error(404, problem) if problem else name

    def readable_session(request: Request) -> str | Response:
        """The session a read is for, or the 401/404 to answer instead."""
        if not authorised(request, allow_cookie=True):
            return _error(401, "missing or wrong token")
        return session_name(request)

    async def page_guard(request: Request) -> Response | None:
        """None when the browser may see the page; a redirect that sets the cookie
        when it came with ``?token=``; else 401."""
        offered = request.query_params.get("token")
        if offered is not None:
            raw = offered.encode("utf-8", "surrogatepass")
            if not matches(raw):
                return HTMLResponse(_unauthorised_page(), status_code=401)
            response = RedirectResponse(request.url.path, status_code=303)
            # Percent-encoded: a cookie holds ASCII (a generated token is unchanged).
            cookie = quote_from_bytes(raw, safe="")
            response.set_cookie(COOKIE, cookie, httponly=True, samesite="strict", path="/")
            return response
        if not authorised(request, allow_cookie=True):
            return HTMLResponse(_unauthorised_page(), status_code=401)
        return None

    async def sessions_page(request: Request) -> Response:
        refused = await page_guard(request)
        if refused is not None:
            return refused
        sessions = await run_in_threadpool(store.sessions)
        return HTMLResponse(_sessions_page(sessions))

    async def session_page(request: Request) -> Response:
        name = session_name(request)
        if isinstance(name, Response):
            return name
        refused = await page_guard(request)
        if refused is not None:
            return refused
        return HTMLResponse(_session_page(name))

    async def static(request: Request) -> Response:
        file = request.path_params["file"]
        if file not in STATIC:
            return PlainTextResponse("not found", status_code=404)
        return Response(widget_source(file), media_type=STATIC[file])

    async def list_sessions(request: Request) -> Response:
        if not authorised(request, allow_cookie=True):
            return _error(401, "missing or wrong token")
        return JSONResponse({"sessions": await run_in_threadpool(store.sessions)})

    async def post_events(request: Request) -> Response:
        if not authorised(request, allow_cookie=False):
            return _error(401, "missing or wrong token (send Authorization: Bearer TOKEN)")
        name = session_name(request)
        if isinstance(name, Response):
            return name
        declared = request.headers.get("content-length", "")
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > 12 or int(declared) > _events.MAX_REQUEST_BYTES)
        ):
            return _error(413, f"request body over {_events.MAX_REQUEST_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _events.MAX_REQUEST_BYTES:
                return _error(413, f"request body over {_events.MAX_REQUEST_BYTES} bytes")
        try:
            payload = parse_body(body)
        except ValueError as bad_json:
            return _error(400, f"{bad_json}; nothing was stored")
        events = payload.get("events") if isinstance(payload, dict) else None
        if not isinstance(events, list) or not events:
            return _error(422, 'expected {"events": [event, ...]} with at least one event')
        for index, event in enumerate(events):
            problem = _events.schema_problem(event)
            if problem is not None:
                return _error(422, f"event {index}: {problem}; nothing was stored")
            problem = _events.size_problem(event)
            if problem is not None:
                return _error(413, f"event {index}: {problem}; nothing was stored")
        stored, duplicates = await run_in_threadpool(store.add_events, name, events)
        if stored:
            changes.bump()
        return JSONResponse({"stored": stored, "duplicates": duplicates})

    async def list_events(request: Request) -> Response:
        name = readable_session(request)
        if isinstance(name, Response):
            return name
        after = parse_row_id(request.query_params.get("after"))
        if after is None:
            return _error(400, "after must be an event id (a whole number from 0 to 2**63-1)")
        rows = await run_in_threadpool(store.events, name, after)
        return JSONResponse({"events": [{"id": i, **event} for i, event in rows]})

    async def list_invocations(request: Request) -> Response:
        name = readable_session(request)
        if isinstance(name, Response):
            return name
        last = await run_in_threadpool(store.last_id, name)
        rows = await run_in_threadpool(store.invocations, name)
        return JSONResponse({"invocations": rows, "last_event": last})

    async def get_invocation(request: Request) -> Response:
        name = readable_session(request)
        if isinstance(name, Response):
            return name
        invocation = request.path_params["invocation"]
        row = None
        if _INVOCATION_ID.fullmatch(invocation):
            row = await run_in_threadpool(store.invocation, name, invocation)
        if row is None:
            return _error(404, "no such invocation in this session")
        if row.get("card"):
            row["card"] = _drawn(row["card"])
        return JSONResponse(row)

    async def stream(request: Request) -> Response:
        """Server-sent events: one message per stored event, in arrival order."""
        name = readable_session(request)
        if isinstance(name, Response):
            return name
        last_or_none = parse_row_id(
            request.headers.get("last-event-id") or request.query_params.get("after")
        )
        if last_or_none is None:
            return _error(
                400,
                "after and Last-Event-ID must be an event id (a whole number from 0 to 2**63-1)",
            )
        last = last_or_none

        async def messages() -> AsyncIterator[str]:
            nonlocal last
            yield "retry: 1000\n\n"
            while True:
                waiter = changes.current  # taken before reading, so no bump is missed
                rows = await run_in_threadpool(store.events, name, last, 500)
                for row_id, event in rows:
                    last = row_id
                    data = json.dumps(_stream_row(event))
                    yield f"id: {row_id}\nevent: {event['type']}\ndata: {data}\n\n"
                if len(rows) == 500:
                    continue
                try:
                    await asyncio.wait_for(waiter.wait(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"

        return StreamingResponse(
            messages(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    app = Starlette(
        routes=[
            Route("/", sessions_page),
            Route("/s/{name}", session_page),
            Route("/static/{file}", static),
            Route("/api/sessions", list_sessions),
            Route("/api/sessions/{name}/events", post_events, methods=["POST"]),
            Route("/api/sessions/{name}/events", list_events, methods=["GET"]),
            Route("/api/sessions/{name}/invocations", list_invocations),
            Route("/api/sessions/{name}/invocations/{invocation}", get_invocation),
            Route("/api/sessions/{name}/stream", stream),
        ],
        middleware=[Middleware(_SecurityHeaders)],
    )
    app.state.token = server_token
    app.state.token_generated = generated
    # Where the token is kept, for `aquin-nb serve` to say; None for a token given.
    app.state.token_file = None if token else store.token_file
    app.state.store = store
    return app


def _drawn(card: dict[str, Any]) -> dict[str, Any]:
    """`live_spec`, or the card without charts when its data breaks the renderer
    (stored by an older server that let any number in)."""
    try:
        return live_spec(card)
    except (ArithmeticError, RecursionError, AttributeError) as problem:
        logger.warning("cannot draw a stored card: %s", problem)
        card = copy.deepcopy(card)
        for section in card.get("sections", []):
            section.pop("svg", None)
            if section.get("type") != "table":
                section["error"] = f"cannot draw this chart: {type(problem).__name__}"
        return card


class _SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every response (pages, API, static files, errors)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _stream_row(event: dict[str, Any]) -> dict[str, Any]:
    """What the page needs to draw or update a row (the card is fetched on expand)."""
    keys = ("type", "invocation_id", "tool", "name", "time", "status", "duration_s", "error")
    return {key: event.get(key) for key in keys}


_TIMES_SCRIPT = (
    "for (const cell of document.querySelectorAll('[data-time]')) "
    "cell.textContent = new Date(Number(cell.dataset.time) * 1000).toLocaleString();"
)
_TIMES_HASH = base64.b64encode(hashlib.sha256(_TIMES_SCRIPT.encode()).digest()).decode()
# No inline script but the sessions page's own (by hash), no inline event handlers,
# no plugins, no <base>: if hostile text ever reached the DOM as markup, it would
# still not run. Styles may be inline (the server-drawn SVG uses attributes).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'self'; script-src 'self' 'sha256-{_TIMES_HASH}'; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

_HEAD = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<link rel="stylesheet" href="/static/card.css">'
    '<link rel="stylesheet" href="/static/session.css">'
)


def _unauthorised_page() -> str:
    return (
        f'{_HEAD}<title>aquin_nb: token needed</title></head><body class="aquin-page">'
        "<h1>Token needed</h1><p>Open the address that <code>aquin-nb serve</code> printed "
        "(it ends in <code>?token=…</code>).</p></body></html>"
    )


def _sessions_page(sessions: list[dict[str, Any]]) -> str:
    rows = "".join(
        f'<tr><td><a href="/s/{html.escape(s["name"])}">{html.escape(s["name"])}</a></td>'
        f"<td>{int(s['invocations'])}</td>"
        f'<td data-time="{html.escape(str(s["last_event"] or s["created"]))}"></td></tr>'
        for s in sessions
    )
    empty = (
        ""
        if sessions
        else '<p class="aquin-empty">No sessions yet: call <code>aquin_nb.connect("my-run", '
        "url=…, token=…)</code> in a notebook, or pass <code>--sync</code> to a CLI verb.</p>"
    )
    return (
        f'{_HEAD}<title>aquin_nb sessions</title></head><body class="aquin-page">'
        f"<h1>aquin_nb sessions</h1>{empty}"
        '<table class="aquin-table aquin-sessions"><thead><tr><th>session</th>'
        f"<th>invocations</th><th>last activity</th></tr></thead><tbody>{rows}</tbody></table>"
        f"<script>{_TIMES_SCRIPT}</script></body></html>"
    )


def _session_page(name: str) -> str:
    config = json.dumps({"session": name}).replace("<", "\\u003c")
    return (
        f"{_HEAD}<title>{html.escape(name)} · aquin_nb</title></head>"
        '<body class="aquin-page"><p><a href="/">← sessions</a></p>'
        f'<h1>Session <span class="aquin-session-name">{html.escape(name)}</span></h1>'
        '<p class="aquin-live" data-state="connecting">connecting…</p>'
        '<div id="aquin-rows"></div>'
        f'<script type="application/json" id="aquin-config">{config}</script>'
        '<script type="module" src="/static/session.js"></script></body></html>'
    )
