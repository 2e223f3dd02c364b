"""Limits on how slowly, and with how large a header, a client may send a request.

What uvicorn's own settings bound (uvicorn 0.3x-0.55, ``uvicorn/protocols/http/*_impl.py``):

* ``timeout_keep_alive`` is armed only after a response, and every received byte cancels it
  (``_unset_keepalive_if_required`` opens ``data_received``), so it never bounds a request that
  is still arriving: a client dripping a header or body byte now and then holds its connection
  for good (uvicorn issue #157: ``--timeout-request-start`` was never added).
* ``limit_concurrency`` answers 503 to new requests once that many connections are open; with
  held connections that is the denial of service, not a defence.
* ``h11_max_incomplete_event_size`` bounds the request line plus headers, but only in the h11
  implementation (default 16 KiB, answered 400; the httptools one, uvicorn's default when
  installed, has no header limit: a 16 MB header was accepted), and only while the head is
  incomplete: a 64 KiB head arriving in one read (up to 256 KiB on loopback) passes.

So the server runs uvicorn's h11 implementation (``h11_max_incomplete_event_size`` set too, for
chunk-size lines) through a small subclass (uvicorn's ``http=`` setting takes a protocol class)
that answers a request head over the limit 431, counted up to its blank line as it arrives, and
adds the two missing deadlines:

* headers: within ``header_timeout_s`` of the connection opening or of the previous response;
* body: within ``body_timeout_s`` of its headers.

Past a deadline the connection is answered 408 (when part of a request came and no response
has started) and closed; an idle one is just closed, as at keep-alive's end; an application
still reading the body sees a client disconnect. Nothing is armed while the application works
on a complete request, so long generations and streams are unaffected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vlmlab.config import ServerSettings

logger = logging.getLogger(__name__)
_END_OF_HEAD = re.compile(rb"\n\r?\n")  # where h11 ends a request head (it accepts bare \n too)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines and a 431 for large headers.

    The limits are class attributes; :func:`bounded_h11_protocol` makes a subclass with values.
    """

    header_timeout_s: ClassVar[float] = 10.0
    body_timeout_s: ClassVar[float] = 60.0
    max_header_bytes: ClassVar[int] = 32 * 2**10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers", "body", or None (nothing awaited)
        self._partial = False  # some bytes of the awaited headers have arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        state = self.conn.their_state
        if state in (h11.IDLE, h11.DONE) and self._header_too_large(data):
            if state is h11.DONE:  # a pipelined request while a response is being sent
                self.transport.close()
                return
            self._reply_and_close(
                431,
                "Request Header Fields Too Large",
                f"the request line and headers are larger than this server's limit of "
                f"{self.max_header_bytes:,} bytes (vlmlab serve --http-max-header-bytes)",
            )
            return
        super().data_received(data)
        self._watch()
        self._partial = self._phase == "headers"  # still waiting for the rest of them

    def _header_too_large(self, data: bytes) -> bool:
        """Whether the request head being received (h11's buffer, which holds only the next
        request's bytes in these states, plus ``data``) is, or will be, over the limit.

        h11's own ``max_incomplete_event_size`` only applies while the head is incomplete: a
        64 KiB head arriving in one read (one loopback read takes up to 256 KiB) passes it."""
        buffered, _ = self.conn.trailing_data
        window = buffered + data[: self.max_header_bytes + 4]
        end = _END_OF_HEAD.search(window)
        size = end.end() if end is not None else len(buffered) + len(data)
        return size > self.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # keep-alive: the next request's headers are awaited from now

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    # -- deadlines -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """(Re)arm the deadline for what the connection is waiting for from the client."""
        if self.transport is None or self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        phase = "headers" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        self._set_phase(phase)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self._phase:
            return  # the deadline runs from the start of the phase, not from the last byte
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        self._partial = False
        if phase is not None:
            limit = self.header_timeout_s if phase == "headers" else self.body_timeout_s
            self._deadline = self.loop.call_later(limit, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        phase, self._phase = self._phase, None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed already, or handed over (a WebSocket upgrade)
        if phase == "headers" and not self._partial:
            self.transport.close()  # an idle connection: closed without a word, as keep-alive
            return
        limit = self.header_timeout_s if phase == "headers" else self.body_timeout_s
        what = "the request headers" if phase == "headers" else "the request body"
        logger.warning("closing the connection from %s: %s took over %gs", self.client, what, limit)
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            message = f"{what} did not arrive within {limit:g} s"
            self._reply_and_close(408, "Request Timeout", message)
        else:
            self.transport.close()

    def _reply_and_close(self, status: int, reason: str, message: str) -> None:
        """Write a final response below h11 (its state may not allow one) and close."""
        error_type = reason.replace(" ", "") + "Error"
        error = {"message": message, "type": error_type, "param": None, "code": status}
        body = json.dumps({"error": error})
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode("latin-1") + body.encode())
        self.transport.close()


def bounded_h11_protocol(
    header_timeout_s: float, body_timeout_s: float, max_header_bytes: int
) -> type[H11Protocol]:
    """A :class:`BoundedH11Protocol` subclass with these limits (uvicorn builds one per
    connection from the class alone)."""
    limits = {
        "header_timeout_s": header_timeout_s,
        "body_timeout_s": body_timeout_s,
        "max_header_bytes": max_header_bytes,
    }
    return type("BoundedH11Protocol", (BoundedH11Protocol,), limits)


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """The ``uvicorn.run`` / ``uvicorn.Config`` keyword arguments that apply ``settings``' HTTP
    limits: the bounded h11 protocol and h11's own header-size limit."""
    protocol = bounded_h11_protocol(
        settings.http_header_timeout_s, settings.http_body_timeout_s, settings.http_max_header_bytes
    )
    return {"http": protocol, "h11_max_incomplete_event_size": settings.http_max_header_bytes}
