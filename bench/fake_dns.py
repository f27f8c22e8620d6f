#!/usr/bin/env python3
"""fake_dns: the benchmark's authoritative DNS server, on loopback only.

Usage (``policy_bench.py`` starts it; run by hand to try the zone data)::

    fake_dns.py --listen 127.53.0.1:53 --zone bench/data/policy-bench.zone --zone clients.zone \
                [--ready FILE]

It answers UDP and TCP on ``--listen`` from the zone files, with the answer logic of the tests'
DNS server (``tests/support/dnsserver.py``: authoritative data, CNAMEs, NXDOMAIN and NODATA with
the SOA, REFUSED outside the zones; no wildcards). Every question is answered; nothing is ever
forwarded, so no query leaves the machine. Port 53 needs root; any other port works for mxward,
whose ``[dns] nameservers`` take ``host:port``, but not for programs that read resolv.conf.

Speed: the load of a DNS-heavy peer (spf-engine asks about 2.5 questions per request, over
10,000 per second) must not be limited by this server. The first question of each kind (name,
type, flags, EDNS or not) is answered by the tests' responder; its reply is kept as a template,
and repeats are answered by splicing the query's ID and question (with the query's letter case)
into that template, without parsing the message. TCP questions and truncated replies always take
the full path.

Control: a UDP socket on the same address, port chosen by the system, answers any datagram with a
JSON object: ``queries`` (questions received, UDP and TCP), ``templated`` (answered from a
template), ``by_type`` (questions per type number), ``cpu_s`` (this process's CPU seconds).
``policy_load.py --dns-stats HOST:PORT`` reads it at the edges of each measured run. ``--ready
FILE`` is written (atomically) once both sockets listen: ``{"pid", "listen", "control"}``. On
SIGTERM or SIGINT the server prints the counts and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
HEADER = 12  # bytes of a DNS message header
MAX_LABEL = 63


def load_responder(zones: list[Path]) -> Any:
    """The tests' Responder serving ``zones`` (imported from tests/support, which is no package)."""
    sys.path.insert(0, str(REPO / "tests"))
    dnsserver = importlib.import_module("support.dnsserver")
    return dnsserver.Responder(zones)


def question_key(data: bytes) -> tuple[bytes, int, int] | None:
    """(template key, end of the question, qtype) of a plain query, or None for anything unusual.

    Plain: QR clear, opcode QUERY, one question, no answer or authority records, an uncompressed
    question name. The key holds the flags byte (RD), whether the query has additional records
    (EDNS), the lower-cased name and the type and class.
    """
    if len(data) < HEADER + 5 or data[2] & 0xF8 or data[4:12:2] != b"\x00\x00\x00\x00":
        return None
    if data[5] != 1 or data[7] or data[9]:
        return None
    i = HEADER
    size = len(data)
    while i < size:
        length = data[i]
        if length == 0:
            break
        if length > MAX_LABEL:
            return None
        i += length + 1
    end = i + 5
    if end > size:
        return None
    qtype = data[i + 1] << 8 | data[i + 2]
    key = data[2:3] + (b"E" if data[11] else b"-") + data[HEADER : i + 1].lower() + data[i + 1 : end]
    return key, end, qtype


class Answers:
    """Replies to queries: the responder for the first of each kind, templates for the repeats."""

    def __init__(self, responder: Any) -> None:
        self.responder = responder
        self.templates: dict[bytes, bytes] = {}
        self.queries = 0
        self.templated = 0
        self.by_type: Counter[int] = Counter()

    def fast(self, data: bytes) -> tuple[bytes | None, tuple[bytes, int] | None]:
        """(reply, None) from a template, or (None, (key, end)) when the full path must answer."""
        self.queries += 1
        parsed = question_key(data)
        if parsed is None:
            return None, None
        key, end, qtype = parsed
        self.by_type[qtype] += 1
        template = self.templates.get(key)
        if template is None:
            return None, (key, end)
        self.templated += 1
        return data[:2] + template[2:HEADER] + data[HEADER:end] + template[end:], None

    async def full(self, data: bytes, parsed: tuple[bytes, int] | None, *, tcp: bool) -> bytes | None:
        """The responder's reply; a plain UDP reply becomes the template for its kind of query."""
        wire = cast("bytes | None", await self.responder.respond(data, tcp=tcp))
        if wire is not None and parsed is not None and not tcp:
            key, end = parsed
            truncated = len(wire) > 2 and wire[2] & 0x02
            if not truncated and len(wire) >= end and wire[HEADER:end].lower() == data[HEADER:end].lower():
                self.templates[key] = wire
        return wire

    def stats(self) -> dict[str, Any]:
        times = os.times()
        return {
            "queries": self.queries,
            "templated": self.templated,
            "templates": len(self.templates),
            "by_type": {str(k): v for k, v in sorted(self.by_type.items())},
            "cpu_s": times.user + times.system,
        }


class UdpDns(asyncio.DatagramProtocol):
    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        reply, parsed = self.answers.fast(data)
        if reply is not None:
            if self.transport is not None:
                self.transport.sendto(reply, addr)
            return
        task = asyncio.get_running_loop().create_task(self.answer(data, parsed, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def answer(
        self, data: bytes, parsed: tuple[bytes, int] | None, addr: tuple[str | int, ...]
    ) -> None:
        wire = await self.answers.full(data, parsed, tcp=False)
        if wire is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(wire, addr)


class Control(asyncio.DatagramProtocol):
    """Answers any datagram with the counters as JSON."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.transport is not None:
            self.transport.sendto(json.dumps(self.answers.stats()).encode(), addr)


def tcp_handler(answers: Answers) -> Any:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(2), "big")
                data = await reader.readexactly(length)
                answers.queries += 1
                wire = await answers.full(data, None, tcp=True)
                if wire is not None:
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return serve


def split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen {text!r}: expected host:port")
    host = host.strip("[]")
    if not (host.startswith("127.") or host == "::1"):
        raise argparse.ArgumentTypeError(f"--listen {text!r}: loopback addresses only")
    return host, int(port)


def write_ready(path: Path, document: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document) + "\n", encoding="utf-8")
    tmp.replace(path)


async def serve(args: argparse.Namespace) -> Answers:
    host, port = args.listen
    answers = Answers(load_responder(args.zone))
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(lambda: UdpDns(answers), local_addr=(host, port))
    tcp = await asyncio.start_server(tcp_handler(answers), host, port, reuse_address=True)
    control, _ = await loop.create_datagram_endpoint(lambda: Control(answers), local_addr=(host, 0))
    control_port = int(control.get_extra_info("sockname")[1])
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if args.ready:
        write_ready(args.ready, {"pid": os.getpid(), "listen": listen, "control": control_port})
    print(f"fake_dns: serving {', '.join(map(str, args.zone))} on {listen} (control port {control_port})")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        udp.close()
        control.close()
        tcp.close()
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Authoritative DNS server for the policy benchmark.")
    parser.add_argument("--listen", type=split_listen, required=True, help="loopback host:port (UDP and TCP)")
    parser.add_argument("--zone", type=Path, action="append", required=True, help="zone file (repeatable)")
    parser.add_argument("--ready", type=Path, help="write this JSON file once listening")
    args = parser.parse_args(argv)
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            answers = runner.run(serve(args))
    except OSError as exc:
        print(f"fake_dns: cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}", file=sys.stderr)
        return 3
    print(f"fake_dns: {json.dumps(answers.stats())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
