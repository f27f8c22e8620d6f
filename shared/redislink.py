"""One connection to Redis for every caller in a process (compiled: see setup.py).

The state store (:mod:`mxward.shared.state`) sends the calls of standalone, unix-socket and
Sentinel URLs through a :class:`Link`:

* a call is encoded when it is made (:func:`mxward.shared.resp.pack_commands`) and queued; the
  queue is written with one write at the end of the loop turn, so the calls of all requests that
  reached Redis in one turn travel together;
* replies are read by the connection's own asyncio protocol, straight into a hiredis reader,
  and handed to the callers' futures in order, inside the transport's read callback: no task
  wakes up per batch and no stream layer sits in between;
* a call whose script the server does not know (NOSCRIPT: first use, SCRIPT FLUSH, a restart, a
  failover) is sent again once with the script's source (EVAL), under the same future;
* every call must be answered within ``timeout`` seconds of being made (``connect_timeout +
  timeout`` when a connection has to be opened first). One loop timer watches the oldest
  unanswered call; when it is late, every unanswered call fails, the connection is dropped and
  the next call opens a new one.

redis-py opens the connection (TCP, unix socket, TLS, AUTH, SELECT, CLIENT SETNAME, asking the
Sentinels for the master); the store passes a coroutine that does that and returns the
transport, a hiredis reader set up like redis-py's and a coroutine that gives the connection
back. What counts as unavailable, how errors are named and the fail-fast window stay in the
store, behind :class:`Hooks`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Protocol

from mxward.shared.aio import running_loop
from mxward.shared.resp import pack_commands

__all__ = ["Connected", "Hooks", "Link"]

# What hiredis' Reader.gets() returns while a reply is incomplete (its default notEnoughData).
_INCOMPLETE: Final = False


class Hooks(Protocol):
    """The store's side: errors, and the fail-fast window."""

    def translate(self, exc: BaseException) -> BaseException:
        """A reply error, connection error or encoding error as the store's own exception."""
        ...

    def unavailable(self, message: str) -> BaseException: ...

    def is_unavailable(self, error: BaseException) -> bool: ...

    def is_noscript(self, exc: BaseException) -> bool: ...

    def closed(self) -> BaseException: ...

    def trip(self, reason: str) -> None:
        """Open the fail-fast window."""
        ...

    def waiting(self) -> bool:
        """True inside the fail-fast window: do not even connect."""
        ...

    def window_error(self) -> BaseException: ...


class Connected:
    """What opening a connection gives the link."""

    __slots__ = ("reader", "release", "transport")

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        reader: Any,
        release: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.transport = transport
        self.reader = reader  # a hiredis.Reader
        self.release = release


class _Call:
    __slots__ = ("args", "deadline", "fut", "source")

    def __init__(
        self, fut: asyncio.Future[Any], deadline: float, args: tuple[Any, ...] | None, source: str | None
    ) -> None:
        self.fut = fut
        self.deadline = deadline
        self.args = args  # kept only for a script call, to resend it with its source
        self.source = source


class _Connection(asyncio.Protocol):
    """The asyncio protocol of one connection; tells its link what happens to it."""

    def __init__(self, link: Link, connected: Connected) -> None:
        self.link = link
        self.transport = connected.transport
        self.reader = connected.reader
        self.release = connected.release

    def data_received(self, data: bytes) -> None:
        self.link._replies(self, data)  # noqa: SLF001 - the link and its connections are one unit

    def eof_received(self) -> bool:
        # The server closed its side: forget this connection now (not one loop turn later, in
        # connection_lost), so that no call is written to it any more.
        self.link._lost(self, None)  # noqa: SLF001
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._lost(self, exc)  # noqa: SLF001


class Link:
    """Many callers, one connection: queue calls, write once per loop turn, answer in order."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Connected]],
        hooks: Hooks,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        self._connect = connect
        self._hooks = hooks
        self._timeout = timeout
        self._connect_budget = connect_timeout + timeout
        self._loop = running_loop()
        self._chunks: list[bytes] = []
        self._queued: list[_Call] = []
        self._inflight: collections.deque[_Call] = collections.deque()
        self._conn: _Connection | None = None
        self._opening: asyncio.Task[None] | None = None
        self._flush_soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()

    # calls ------------------------------------------------------------------------------------

    def submit(self, args: tuple[Any, ...], source: str | None = None) -> asyncio.Future[Any]:
        """Queue one command; ``source``: the Lua source to resend on NOSCRIPT (EVALSHA only)."""
        if self._closed:
            raise self._hooks.closed()
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            data = pack_commands((args,))
        except TypeError as exc:
            fut.set_exception(self._hooks.translate(exc))
            return fut
        self._chunks.append(data)
        self._queued.append(_Call(fut, loop.time() + self._timeout, args if source else None, source))
        self._flush_later()
        return fut

    def _flush_later(self) -> None:
        """Write the queue at the end of this loop turn (once, however many calls join it)."""
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._queued:
            return
        conn = self._conn
        if conn is not None and conn.transport.is_closing():
            self._lost(conn, None)
            conn = None
        if conn is None:
            if self._opening is None and not self._closed:
                self._opening = self._loop.create_task(self._open(), name="mxward-state-connect")
            return
        calls = self._queued
        chunks = self._chunks
        self._queued = []
        self._chunks = []
        inflight = self._inflight
        for call in calls:
            inflight.append(call)
        conn.transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))  # type: ignore[attr-defined]
        first = calls[0].deadline  # the batch's oldest call
        if self._timer is None or first < self._timer_at:
            self._arm(first)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire)

    # replies ----------------------------------------------------------------------------------

    def _replies(self, conn: _Connection, data: bytes) -> None:
        if conn is not self._conn:
            return
        reader = conn.reader
        inflight = self._inflight
        stale = ""
        try:
            reader.feed(data)
            while True:
                reply = reader.gets()
                if reply is _INCOMPLETE:
                    break
                if not inflight:
                    stale = "state store sent a reply nobody asked for"
                    break
                call = inflight.popleft()
                if isinstance(reply, BaseException):
                    stale = self._reply_error(call, reply)
                    if stale:
                        break
                elif not call.fut.done():
                    call.fut.set_result(reply)
        except Exception as exc:  # a protocol error: nothing more on this connection can be trusted
            stale = f"state store unavailable: bad reply: {exc}"
        if stale:
            self._hooks.trip(stale)
            self._drop(self._hooks.unavailable(stale))

    def _reply_error(self, call: _Call, exc: BaseException) -> str:
        """Answer one call with its error reply; the reason to drop the connection, or ``""``."""
        hooks = self._hooks
        if call.source is not None and call.args is not None and hooks.is_noscript(exc):
            # Send the source once: EVAL runs it and caches it again under the same SHA1.
            args = ("EVAL", call.source, *call.args[2:])
            self._chunks.append(pack_commands((args,)))
            self._queued.append(_Call(call.fut, call.deadline, None, None))
            self._flush_later()
            return ""
        error = hooks.translate(exc)
        if not call.fut.done():
            call.fut.set_exception(error)
        # READONLY (a demoted master after a failover), LOADING, MASTERDOWN: this server cannot
        # serve us now; a new connection asks the Sentinels for the current master.
        return str(error) if hooks.is_unavailable(error) else ""

    def _expire(self) -> None:
        self._timer = None
        inflight = self._inflight
        if not inflight:
            return
        # (Calls queued while a connection was opened have later deadlines than those after.)
        first = min([call.deadline for call in inflight])
        if first > self._loop.time():
            self._arm(first)
            return
        message = f"state store did not answer in time (timeout {self._timeout:g}s)"
        self._hooks.trip(message)
        self._drop(self._hooks.unavailable(message))

    def _lost(self, conn: _Connection, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        if self._inflight:
            reason = f"state store unavailable: connection lost ({exc or 'closed by the server'})"
            self._hooks.trip(reason)
            self._drop(self._hooks.unavailable(reason))
        else:  # closed while idle (the server's timeout, a restart): the next call reconnects
            self._drop(None)

    # connections ------------------------------------------------------------------------------

    async def _open(self) -> None:
        hooks = self._hooks
        try:
            if hooks.waiting():
                self._fail_queued(hooks.window_error())
                return
            loop = self._loop
            latest = loop.time() + self._connect_budget
            for call in self._queued:
                call.deadline = max(call.deadline, latest)
            try:
                async with asyncio.timeout(self._connect_budget):
                    connected = await self._connect()
            except TimeoutError as exc:
                error = hooks.unavailable(f"state store did not answer in time (timeout {self._timeout:g}s)")
                error.__cause__ = exc
                hooks.trip(str(error))
                self._fail_queued(error)
                return
            except Exception as exc:
                error = hooks.translate(exc)
                if hooks.is_unavailable(error):
                    hooks.trip(str(error))
                self._fail_queued(error)
                return
            if self._closed:
                connected.transport.close()
                await connected.release()
                return
            conn = _Connection(self, connected)
            connected.transport.set_protocol(conn)
            self._conn = conn
        finally:
            self._opening = None
        self._flush()

    def _drop(self, error: BaseException | None) -> None:
        """Forget the connection; fail the calls sent on it with ``error``."""
        conn, self._conn = self._conn, None
        inflight = list(self._inflight)
        self._inflight.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if error is not None:
            _fail(inflight, error)
        if conn is not None:
            conn.transport.abort()  # type: ignore[attr-defined]
            task = self._loop.create_task(conn.release())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._queued and not self._closed:
            self._flush_later()

    def _fail_queued(self, error: BaseException) -> None:
        calls = self._queued
        self._queued = []
        self._chunks = []
        _fail(calls, error)

    async def aclose(self) -> None:
        """Fail every waiting call, close the connection; later calls raise."""
        self._closed = True
        opening = self._opening
        if opening is not None:
            opening.cancel()
            await asyncio.wait([opening])
        error = self._hooks.closed()
        self._fail_queued(error)
        self._drop(error)
        if self._tasks:
            await asyncio.wait(set(self._tasks))


def _fail(calls: list[_Call], error: BaseException) -> None:
    """Fail every waiting call, each with its own exception object (tracebacks stay apart)."""
    for call in calls:
        if not call.fut.done():
            copy = type(error)(*error.args)
            copy.__cause__ = error.__cause__
            call.fut.set_exception(copy)
