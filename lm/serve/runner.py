"""A uvicorn server on a background thread: `with ServerThread(app) as url: ...`.

Why: tests, the speedrun and benchmarks need a real HTTP server (real clients, real sockets,
real disconnects) inside their own process. The socket is bound before the thread starts, so
port 0 picks a free port with no race, and `url` is known as soon as `start` returns. The
connection limits are the app's own (`app.state.limits`, see lm/serve/limits.py), as in
`lm serve`.
"""

from __future__ import annotations

import socket
import threading

import uvicorn

from lm.errors import LMError
from lm.serve.limits import Limits, uvicorn_options


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (0: a free port); LMError when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


class ServerThread:
    """Serves `app` on host:port (port 0: a free one) until `stop` or the `with` block ends."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        start_timeout_s: float = 60.0,
        graceful_shutdown_s: float = 5.0,
    ):
        self.app, self.host, self.port = app, host, port
        self.start_timeout_s = start_timeout_s
        limits = getattr(getattr(app, "state", None), "limits", None) or Limits()
        config = uvicorn.Config(
            app,
            log_level=log_level,
            timeout_graceful_shutdown=graceful_shutdown_s,
            lifespan="on",
            **uvicorn_options(limits),
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> str:
        """Binds, starts serving, waits until the app's startup has run; returns the URL."""
        sock = bind_socket(self.host, self.port)
        self._socket, self.port = sock, sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="lm-serve", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.server.started:
            if not self._thread.is_alive():
                raise LMError(f"the server failed to start: {self._error!r}")
            if waited > self.start_timeout_s:
                self.stop()
                raise LMError(f"the server did not start within {self.start_timeout_s:g} s")
            self._thread.join(0.02)
            waited += 0.02
        return self.url

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self._socket])
        except BaseException as e:  # SystemExit from a failed lifespan startup included
            self._error = e

    def stop(self) -> None:
        """Asks the server to exit (open streams get `graceful_shutdown_s`) and waits for it."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
