"""The web mirror's receiver: ``aquin-nb serve`` (Starlette on uvicorn, SQLite).

Example:
    >>> from aquin_nb.server import create_app, open_socket, run
    >>> app = create_app("mirror.sqlite")  # doctest: +SKIP
    >>> run(app, open_socket("127.0.0.1", 8765))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from .._errors import AquinError
from .app import create_app

__all__ = ["create_app", "default_db", "open_socket", "run"]

ENV_DB = "AQUIN_NB_DB"


def default_db() -> Path:
    """``$AQUIN_NB_DB``, else ``~/.local/share/aquin_nb/mirror.sqlite``."""
    return Path(
        os.environ.get(ENV_DB) or Path.home() / ".local" / "share" / "aquin_nb" / "mirror.sqlite"
    )


def open_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so a busy port is a clear error, not a log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then,
    # and without it every kept-alive request waits out a 40 ms delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise AquinError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(128)
    return sock


def run(app: Any, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until interrupted."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])
