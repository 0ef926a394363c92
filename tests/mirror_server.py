"""A real receiver for tests: uvicorn in a thread on 127.0.0.1, stopped after."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ThreadedServer:
    """``aquin-nb serve``'s app under uvicorn, in this process, on loopback."""

    def __init__(self, db: Path, port: int | None = None, token: str | None = None) -> None:
        import uvicorn

        from aquin_nb.server import create_app, open_socket

        self.app = create_app(db, token=token)
        self.token: str = self.app.state.token
        self.sock = open_socket("127.0.0.1", port or 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, log_level="warning", timeout_graceful_shutdown=1, lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        self.app.state.store.close()

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )

    def events(self, session: str) -> list[dict]:
        with self.client() as client:
            response = client.get(f"/api/sessions/{session}/events")
            response.raise_for_status()
            return response.json()["events"]

    def invocations(self, session: str) -> list[dict]:
        with self.client() as client:
            response = client.get(f"/api/sessions/{session}/invocations")
            response.raise_for_status()
            return response.json()["invocations"]


class ServeProcess:
    """``aquin-nb serve`` in its own process on loopback, as a user runs it."""

    def __init__(self, db: Path, port: int | None = None, token: str = "serve-token") -> None:
        self.port, self.token = port or free_port(), token
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "aquin_nb", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--db", str(db), "--token", token],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def __enter__(self) -> ServeProcess:
        assert self.process.stdout is not None
        banner = self.process.stdout.readline()
        if not banner.startswith("[serve] aquin_nb mirror on"):
            raise RuntimeError(f"aquin-nb serve did not start: {banner!r}")
        for _ in range(100):  # the socket is bound before the banner; wait for uvicorn
            try:
                httpx.get(f"{self.url}/static/card.css", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("aquin-nb serve did not answer")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(10)
