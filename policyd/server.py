"""The policy server: listeners, connections and their limits, graceful shutdown.

One :class:`PolicyServer` runs in each worker process, on listening sockets created by the
supervisor (:mod:`mxward.policyd.daemon`) and shared by all workers; the kernel spreads new
connections across them.

Per connection (:class:`PolicyConnection`):

* clients outside ``[policyd] allowed_clients`` are logged and closed at once (unix-socket
  clients are governed by the socket's file mode);
* requests are answered one at a time, in order (Postfix waits for each answer, but a pipelining
  client still gets its answers in sequence);
* a malformed or oversized request is logged with the client and the connection closed without
  a reply, so Postfix retries and, failing again, applies its ``default_action``;
* an exception in the service never escapes: the request is answered with the tempfail
  action (``451 4.3.0``) and the connection stays usable;
* idle connections are closed after ``idle_timeout``, a half-sent request after
  ``read_timeout``.

Shutdown: stop accepting, let requests in progress finish (up to ``shutdown_grace``), close.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
from collections.abc import Sequence
from typing import cast

from mxward.policyd.protocol import Limits, ProtocolError, RequestParser, format_reply
from mxward.policyd.service import PolicyService
from mxward.shared.aio import running_loop
from mxward.shared.netutil import NetworkList, parse_ip

__all__ = ["PolicyConnection", "PolicyServer", "ServerLimits"]

log = logging.getLogger("mxward.policyd.server")


class ServerLimits:
    """Connection-level settings (from ``[policyd]``)."""

    __slots__ = ("allowed", "idle_timeout", "protocol", "read_timeout", "tempfail")

    def __init__(
        self,
        *,
        allowed: NetworkList,
        protocol: Limits,
        idle_timeout: float,
        read_timeout: float,
        tempfail: str,
    ) -> None:
        self.allowed = allowed
        self.protocol = protocol
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.tempfail = tempfail


class PolicyConnection(asyncio.Protocol):
    """One Postfix policy client connection."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.parser = RequestParser(server.limits.protocol)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.queue: collections.deque[dict[str, str]] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.working = False
        self.last_activity = time.monotonic()
        self.partial_since = 0.0
        self.closing = False
        self.eof = False
        self.requests = 0

    # asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but offer the same methods.
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.peer = f"[{peer[0]}]:{peer[1]}"
            ip = parse_ip(str(peer[0]))
            if ip is None or ip not in self.server.limits.allowed:
                log.warning("refused connection from %s: not in [policyd] allowed_clients", self.peer)
                transport.abort()
                return
        else:
            self.peer = f"unix:{transport.get_extra_info('sockname') or '?'}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.closing = True
        if self.task is not None and not self.task.done():
            # Postfix hung up while we were deciding: nobody wants the answer any more.
            self.task.cancel()

    def eof_received(self) -> bool:
        # The client closed its sending side (socat, a test script): answer what it sent, then
        # close. Returning True keeps the transport open for those answers.
        self.eof = True
        if not self.busy:
            self.close()
        return True

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_activity = time.monotonic()
        try:
            requests = self.parser.feed(data)
        except ProtocolError as exc:
            log.warning("bad request from %s: %s; closing the connection", self.peer, exc)
            self.close()
            return
        self.partial_since = self.last_activity if self.parser.pending else 0.0
        if requests:
            self.queue.extend(requests)
            if self.task is None:
                self.task = running_loop().create_task(self._serve())
            elif self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    # request loop --------------------------------------------------------------------------

    async def _serve(self) -> None:
        """One task per connection: answers queued requests in order, then waits for more."""
        loop = running_loop()
        transport = self.transport
        assert transport is not None
        while not self.closing:
            if not self.queue:
                if self.server.stopping or self.eof:
                    self.close()
                    return
                self.waiter = loop.create_future()
                await self.waiter
                self.waiter = None
                continue
            attrs = self.queue.popleft()
            self.requests += 1
            self.working = True
            try:
                text = await self.server.service.handle(attrs)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("request from %s failed; answering with the tempfail action", self.peer)
                text = self.server.limits.tempfail
            finally:
                self.working = False
            if self.closing:
                return
            transport.write(format_reply(text))
            self.last_activity = time.monotonic()

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.working

    def close(self) -> None:
        self.closing = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def sweep(self, now: float) -> None:
        """Close the connection if it has been idle, or half-sent, for too long."""
        limits = self.server.limits
        if self.busy:
            return
        if self.partial_since and now - self.partial_since > limits.read_timeout:
            log.warning("closing %s: incomplete request for %.0fs", self.peer, now - self.partial_since)
            self.close()
        elif now - self.last_activity > limits.idle_timeout:
            log.debug("closing idle connection %s", self.peer)
            self.close()


class PolicyServer:
    """Serves the policy protocol on already-bound listening sockets."""

    def __init__(
        self, service: PolicyService, limits: ServerLimits, sockets: Sequence[socket.socket]
    ) -> None:
        self.service = service
        self.limits = limits
        self.sockets = list(sockets)
        self.connections: set[PolicyConnection] = set()
        self.servers: list[asyncio.Server] = []
        self.stopping = False
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = running_loop()
        for sock in self.sockets:
            factory = lambda: PolicyConnection(self)  # noqa: E731 - one factory per listener
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock, backlog=1024)
            else:
                server = await loop.create_server(factory, sock=sock, backlog=1024)
            self.servers.append(server)
        self._sweeper = loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        interval = max(0.05, min(self.limits.read_timeout, self.limits.idle_timeout, 30.0) / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in progress finish within ``grace``, close the rest."""
        self.stopping = True
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
        deadline = time.monotonic() + grace
        # Polls many connections, once, at shutdown.
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.busy:
                log.warning("closing %s with a request still in progress after %.1fs", conn.peer, grace)
            conn.close()
        await self.service.drain(max(0.0, deadline - time.monotonic()))
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self.servers:
            await server.wait_closed()
