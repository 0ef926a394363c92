"""The receiver's ASGI app (Starlette): the events API, the pages and the live stream.

Access model: one token per server, generated at first start and stored in its
database (like Jupyter's). It grants every session on that server. Clients send
it as ``Authorization: Bearer TOKEN``; a browser opens ``/?token=TOKEN`` once,
which sets an HttpOnly, SameSite=Strict cookie for the pages and their reads.
Writes (POST) accept only the header, so a page on another site cannot post.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
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

from .. import _events
from ..cards._html import live_spec, widget_source
from .store import Store

COOKIE = "aquin_nb_token"
STATIC = {
    "card.js": "text/javascript",
    "card.css": "text/css",
    "session.js": "text/javascript",
    "session.css": "text/css",
}
KEEPALIVE_S = 15.0


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
    """The receiver app on the SQLite file ``db`` (created when missing).

    Example:
        >>> app = create_app("mirror.sqlite")  # doctest: +SKIP
        >>> app.state.token  # doctest: +SKIP
    """
    store = Store(db)
    server_token, generated = store.token(token)
    changes = _Changes()

    def authorised(request: Request, allow_cookie: bool) -> bool:
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else None
        if offered is None and allow_cookie:
            offered = request.cookies.get(COOKIE)
        return offered is not None and hmac.compare_digest(offered, server_token)

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
            if not hmac.compare_digest(offered, server_token):
                return HTMLResponse(_unauthorised_page(), status_code=401)
            response = RedirectResponse(request.url.path, status_code=303)
            response.set_cookie(COOKIE, offered, httponly=True, samesite="strict", path="/")
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
        declared = request.headers.get("content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > _events.MAX_REQUEST_BYTES
        ):
            return _error(413, f"request body over {_events.MAX_REQUEST_BYTES} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _events.MAX_REQUEST_BYTES:
                return _error(413, f"request body over {_events.MAX_REQUEST_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as bad_json:
            return _error(400, f"malformed JSON: {bad_json}")
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
        after = _int(request.query_params.get("after"), 0)
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
        row = await run_in_threadpool(store.invocation, name, request.path_params["invocation"])
        if row is None:
            return _error(404, "no such invocation in this session")
        if row.get("card"):
            row["card"] = live_spec(row["card"])
        return JSONResponse(row)

    async def stream(request: Request) -> Response:
        """Server-sent events: one message per stored event, in arrival order."""
        name = readable_session(request)
        if isinstance(name, Response):
            return name
        last = _int(request.headers.get("last-event-id") or request.query_params.get("after"), 0)

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
        ]
    )
    app.state.token = server_token
    app.state.token_generated = generated
    app.state.store = store
    return app


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text)) if text is not None else default
    except ValueError:
        return default


def _stream_row(event: dict[str, Any]) -> dict[str, Any]:
    """What the page needs to draw or update a row (the card is fetched on expand)."""
    keys = ("type", "invocation_id", "tool", "name", "time", "status", "duration_s", "error")
    return {key: event.get(key) for key in keys}


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
        "<script>for (const cell of document.querySelectorAll('[data-time]')) "
        "cell.textContent = new Date(Number(cell.dataset.time) * 1000).toLocaleString();</script>"
        "</body></html>"
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
