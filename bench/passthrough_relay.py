#!/usr/bin/env python3
"""passthrough_relay: the ceiling for a Python SMTP content filter, relaying without looking.

A minimal after-queue filter: aiosmtpd receives each message and hands it unchanged to a
downstream SMTP server with aiosmtplib. It answers the client's end of DATA with 250 only after
the downstream server said 250 to the relayed copy (as a content filter must: until then the
mail is still the sender's), and with the downstream server's own 4xx/5xx reply otherwise, or
``451 4.4.1`` when the downstream server cannot be reached. No check, no parsing, no header is
added: whatever a real filter costs beyond this is the cost of its checks and its own protocol
code. ``filter_bench.py`` runs it next to ``mxward filter`` as the pass-through reference.

Usage::

    .venv/bin/python bench/passthrough_relay.py --listen 127.0.0.1:10025 --relay 127.0.0.1:10026
    .venv/bin/python bench/passthrough_relay.py --listen 127.0.0.1:10025 --relay 127.0.0.1:10026 \\
        --loop asyncio --line-length-limit 1001

Details:

* The server is aiosmtpd's ``SMTP`` protocol class served with ``loop.create_server`` (no
  ``Controller`` thread), with 8BITMIME and SMTPUTF8 announced, ``--max-size`` as
  ``data_size_limit`` (64 MiB by default) and ``--line-length-limit`` (8192 by default; aiosmtpd's
  own default is 1001) as the longest line it reads. aiosmtpd's stream reader pauses the socket
  when it holds twice that many bytes, so the limit also sets how much of a message is read per
  wake-up.
* Downstream connections come from a pool: a message takes an idle connection (or opens a new
  one), and puts it back after the relayed message was accepted. So each upstream session that
  has a message in flight holds one downstream connection, and connections are reused across
  messages, as Postfix's SMTP client caches them. A pooled connection that the downstream
  server closed meanwhile is replaced once, transparently. After any failure the connection is
  closed rather than reused.
* One downstream transaction per message carries all its recipients. If the downstream server
  refuses some recipients but not all, the message has gone to the others and the client gets
  ``451 4.3.0``, so it retries and the others get a second copy: the usual trade-off of a
  filter that speaks SMTP, not LMTP, downstream. The benchmark sends one recipient per message.
* ``--loop auto`` (the default) uses uvloop when it is installed, as mxward does with
  ``event_loop = "auto"``; ``asyncio`` or ``uvloop`` force one.
* Host names are given, never looked up: the greeting says ``--hostname`` and so does the EHLO
  sent downstream, so no DNS query is made.
* It runs until SIGTERM or SIGINT, then closes its listener and its downstream connections and
  exits with status 0. It needs ``aiosmtplib``, which is not a dependency of mxward; install it
  into the venv for the benchmark: ``.venv/bin/pip install aiosmtplib``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

try:
    import aiosmtplib
except ImportError:  # pragma: no cover - the message is the point
    print(
        "passthrough_relay: aiosmtplib is not installed; install it into the venv for the benchmark:\n"
        "    .venv/bin/pip install aiosmtplib",
        file=sys.stderr,
    )
    sys.exit(2)

DEFAULT_MAX_SIZE = 64 * 1024 * 1024
DEFAULT_LINE_LIMIT = 8192


class RelayHandler:
    """aiosmtpd handler: relays each message downstream and answers with the downstream verdict."""

    def __init__(self, host: str, port: int, *, helo: str, timeout: float) -> None:
        self.host = host
        self.port = port
        self.helo = helo
        self.timeout = timeout
        self.idle: list[aiosmtplib.SMTP] = []

    async def connect(self) -> aiosmtplib.SMTP:
        client = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo,
            timeout=self.timeout,
            start_tls=False,
        )
        await client.connect()
        return client

    async def handle_DATA(  # noqa: N802  (aiosmtpd finds its hooks by the SMTP verb)
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content
        if not isinstance(content, bytes):  # decode_data=False keeps the raw bytes; be sure
            content = (content or "").encode("utf-8", "surrogateescape")
        sender = envelope.mail_from or ""
        recipients = list(envelope.rcpt_tos)
        for attempt in (1, 2):
            pooled = bool(self.idle)
            try:
                client = self.idle.pop() if pooled else await self.connect()
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                return f"451 4.4.1 downstream unavailable: {type(exc).__name__}"
            try:
                errors, _reply = await client.sendmail(
                    sender, recipients, content, mail_options=list(envelope.mail_options)
                )
            except aiosmtplib.SMTPServerDisconnected:
                client.close()
                if pooled and attempt == 1:
                    continue  # the downstream server closed an idle connection: one fresh try
                return "451 4.4.2 downstream connection lost"
            except aiosmtplib.SMTPRecipientsRefused as exc:
                client.close()
                first = exc.recipients[0] if exc.recipients else None
                return reply_from(first.code, first.message) if first else "451 4.3.0 recipients refused"
            except aiosmtplib.SMTPResponseException as exc:
                client.close()
                return reply_from(exc.code, exc.message)
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                client.close()
                return f"451 4.4.1 downstream failed: {type(exc).__name__}"
            self.idle.append(client)
            if errors:
                return f"451 4.3.0 downstream refused {len(errors)} of {len(recipients)} recipients"
            return "250 2.0.0 Ok: relayed"
        return "451 4.4.2 downstream connection lost"  # not reached: the second attempt returns

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def reply_from(code: int, message: str) -> str:
    """The downstream server's 4xx/5xx reply as ours; anything else becomes a temporary failure."""
    text = " ".join(message.split()) or "downstream refused"
    if 400 <= code <= 599:
        return f"{code} {text}"
    return f"451 4.3.0 unexpected downstream reply {code}"


def split_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{what}: write HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Minimal aiosmtpd -> aiosmtplib pass-through SMTP relay.")
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept SMTP on")
    parser.add_argument("--relay", required=True, help="HOST:PORT of the downstream SMTP server")
    parser.add_argument("--hostname", default="passthrough.bench.test", help="name in greeting and EHLO")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="event loop")
    parser.add_argument(
        "--max-size", type=int, default=DEFAULT_MAX_SIZE, help="largest message in bytes (64 MiB)"
    )
    parser.add_argument(
        "--line-length-limit",
        type=int,
        default=DEFAULT_LINE_LIMIT,
        help=f"longest line read, in bytes ({DEFAULT_LINE_LIMIT}; aiosmtpd's default is 1001)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="downstream timeout in seconds (60)")
    args = parser.parse_args(argv)
    try:
        args.listen_host, args.listen_port = split_address(args.listen, "--listen")
        args.relay_host, args.relay_port = split_address(args.relay, "--relay")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.max_size < 1024 or args.line_length_limit < 1001 or args.timeout <= 0:
        parser.error("--max-size must be >= 1024, --line-length-limit >= 1001, --timeout > 0")
    return args


def loop_factory(choice: str) -> tuple[str, Any]:
    """(name, factory for asyncio.Runner) of the event loop to use."""
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            print("passthrough_relay: uvloop is not installed", file=sys.stderr)
            sys.exit(2)
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


async def serve(args: argparse.Namespace, loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    handler = RelayHandler(args.relay_host, args.relay_port, helo=args.hostname, timeout=args.timeout)
    smtp_class = type("RelaySMTP", (SMTP,), {"line_length_limit": args.line_length_limit})

    def protocol() -> SMTP:
        return smtp_class(  # type: ignore[no-any-return]
            handler,
            data_size_limit=args.max_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=args.hostname,
            ident="passthrough_relay",
        )

    server = await loop.create_server(protocol, args.listen_host, args.listen_port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(
        f"passthrough_relay: {loop_name} loop, listening on {args.listen}, relaying to {args.relay}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        server.close()
        handler.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop_name, factory = loop_factory(args.loop)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(serve(args, loop_name))
    except OSError as exc:
        print(f"passthrough_relay: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
