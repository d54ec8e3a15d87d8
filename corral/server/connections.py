"""Connections: read timeouts, a connection cap and log lines that cannot flood (RELIABILITY 41).

uvicorn closes an idle keep-alive connection, but a client that connects and then sends its headers
one byte a minute (slow-loris), or a body shorter than its Content-Length, holds a connection and
a descriptor forever; enough of them and accept() fails with EMFILE, /health stops answering and
the accept loop logs without pause. This module gives uvicorn's h11 protocol three timers and a cap:

    connection made  -> over max_connections? answer 503 and close
    headers          -> all of them within header_timeout, else 408 and close
    body             -> a byte at least every body_timeout (while the app is reading), else 408 and close
    between requests -> uvicorn's own timeout_keep_alive

``uvicorn_config(app, config)`` builds the uvicorn.Config that ``corral serve`` (and the tests) run.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import threading
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from corral.server.state import ServeConfig

log = logging.getLogger("corral.server")
DESCRIPTOR_RESERVE = 64
"""Descriptors kept free of client connections: model files, the store, the chat database, logs."""
TIMEOUT_BODY = b'{"error": "request timed out: the client sent too slowly"}'
OVERLOADED_BODY = b'{"error": "too many open connections; try again"}'


def _raw_response(status: int, reason: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body idle timeout and a connection cap.

    The limits come from the uvicorn Config (``config.corral_limits``, a ServeConfig) so uvicorn can
    build one protocol per connection as usual.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.limits: ServeConfig = config.corral_limits
        self._read_timer: asyncio.TimerHandle | None = None
        self._phase = "headers"

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > max_connections(self.limits):
            log.warning("connection refused: %d connections open (the limit)", len(self.connections) - 1)
            transport.write(_raw_response(503, "Service Unavailable", OVERLOADED_BODY))
            transport.close()
            return
        self._arm("headers", self.limits.header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return self._disarm()
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm("body", self.limits.body_timeout)  # reset by every piece of body that arrives
        elif state is h11.IDLE:
            if self._phase != "headers" or self._read_timer is None:
                self._arm("headers", self.limits.header_timeout)  # a deadline for the whole header, not per byte
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self._disarm()  # between requests uvicorn's keep-alive timer runs
        super().on_response_complete()

    def _arm(self, phase: str, seconds: float) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._phase = phase
        self._read_timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self._phase == "body" and self.flow.read_paused:  # the app is slow to read, not the client to send
            return self._arm("body", self.limits.body_timeout)
        log.info("closing a connection whose %s did not arrive in time", self._phase)
        cycle = self.cycle
        started = cycle is not None and cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() answers http.disconnect; its answer goes nowhere
            cycle.message_event.set()
        if not started:
            self.transport.write(_raw_response(408, "Request Timeout", TIMEOUT_BODY))
        self.transport.close()


def max_connections(config: ServeConfig) -> int:
    """The configured cap, kept below the process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return config.max_connections
    return max(1, min(config.max_connections, soft - DESCRIPTOR_RESERVE))


class RepeatFilter(logging.Filter):
    """At most `burst` records with the same logger and message template per `window` seconds; the first one
    after a quiet spell says how many were dropped. Stops a failing accept loop from writing millions of lines."""

    def __init__(self, burst: int = 5, window: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.burst, self.window, self.clock = burst, window, clock
        self._seen: dict[tuple[str, object], list[float | int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg))
        now = self.clock()
        with self._lock:
            start, count, dropped = self._seen.get(key, (now, 0, 0))
            if now - start > self.window:
                start, count = now, 0
            if count >= self.burst:
                self._seen[key] = [start, count, dropped + 1]
                return False
            self._seen[key] = [start, count + 1, 0]
            if len(self._seen) > 1000:  # messages with their values baked in: forget old templates
                self._seen = {key: self._seen[key]}
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar lines dropped)"
            record.args = None
        return True


LOGGERS = ("uvicorn.error", "asyncio", "corral.server")
_filter = RepeatFilter()


def quiet_repeats() -> None:
    """Install the repeat filter on the loggers a flood comes from (once per process)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _filter not in logger.filters:
            logger.addFilter(_filter)


def uvicorn_config(app, config: ServeConfig, **kwargs) -> uvicorn.Config:
    """The uvicorn.Config for `app`: h11 with Corral's timeouts and connection cap; kwargs pass through."""
    quiet_repeats()
    settings = {"timeout_keep_alive": config.keep_alive_timeout, "timeout_graceful_shutdown": 5,
                "h11_max_incomplete_event_size": 64 * 1024, **kwargs}
    uv = uvicorn.Config(app, http=GuardedH11Protocol, **settings)
    uv.corral_limits = config
    return uv
