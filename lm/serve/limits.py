"""What one connection may cost the server: body size, and how long its head and body may take.

Why here and not in uvicorn's settings alone: uvicorn (h11) bounds a request head's size
(`h11_max_incomplete_event_size`) and closes idle keep-alive connections (`timeout_keep_alive`),
but it has no limit on the body's size and no deadline for a head or a body that trickles in or
stops half-way (slowloris): such a connection, and the handler waiting on its body, are held
forever. So:

- `BodyLimit`, an ASGI middleware, reads every request's body itself before the app sees it:
  a `Content-Length` over `max_body_bytes` is answered 413 before a byte of the body is read, a
  chunked body is counted as it arrives and refused as soon as it passes the limit, and a body
  not complete within `body_timeout_s` is answered 408. Those answers close the connection.
  The app then gets the body in one message (later `receive` calls go to the server as before,
  so a client that disconnects is still seen).
- `head_timeout_protocol`: uvicorn's h11 protocol with one more timer: a connection that has not
  sent a whole request head within `head_timeout_s` of opening (or of its previous response)
  is closed.

`uvicorn_options(limits)` gives the uvicorn.Config keywords that install the protocol and set
the keep-alive and head-size limits; `lm serve` and `ServerThread` both use it.
"""

from __future__ import annotations

import asyncio
import dataclasses

from lm.errors import ConfigError

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-connection limits. The body limit is far above any prompt a served model's context
    can hold (a 128k-token context is ~1 MB of text), and a few MB of JSON parse in milliseconds."""

    max_body_bytes: int = 4 * MIB
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    max_head_bytes: int = 16 * 1024  # h11's own default

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise ConfigError(f"--{field.name} must be positive, got {value}")


class BodyTooLarge(Exception):
    """The body passed `max_body_bytes` while it was read."""


class ClientGone(Exception):
    """The client disconnected before its body was complete."""


def content_length(scope) -> int | None:
    """The request's declared Content-Length; None when absent or not a number (h11 has
    already refused malformed ones)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _closing_error(status: int, message: str, code: str):
    from lm.serve.protocol import error_response

    response = error_response(status, message, "invalid_request_error", None, code)
    response.headers["connection"] = "close"  # the rest of the body is never read
    return response


class BodyLimit:
    """ASGI middleware: reads each HTTP request's body within the limits, then calls the app
    with it (see the module docstring)."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        declared = content_length(scope)
        too_large = f"the request body is larger than the server's limit of {limit} bytes"
        if declared is not None and declared > limit:
            return await _closing_error(413, too_large, "body_too_large")(scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive, limit), self.limits.body_timeout_s)
        except BodyTooLarge:
            return await _closing_error(413, too_large, "body_too_large")(scope, receive, send)
        except TimeoutError:
            message = f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
            return await _closing_error(408, message, "body_timeout")(scope, receive, send)
        except ClientGone:
            return None
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _read(receive, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def head_timeout_protocol(head_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head is not complete within
    `head_timeout_s` of the connection opening or of its previous response ending (uvicorn is
    imported here, when a server starts, not when the CLI parses its flags)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer: asyncio.TimerHandle | None = None
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            if getattr(self, "_head_timer", None) is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            cycle = self.cycle  # a new request head makes a new cycle
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_late, cycle)

        def _head_late(self, cycle) -> None:
            self._head_timer = None
            waiting = self.cycle is cycle and self.conn.their_state is h11.IDLE
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutH11Protocol


def uvicorn_options(limits: Limits) -> dict:
    """uvicorn.Config keywords for `limits`: the head-timeout protocol, keep-alive, head size."""
    return dict(
        http=head_timeout_protocol(limits.head_timeout_s),
        timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )
