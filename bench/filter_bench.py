#!/usr/bin/env python3
"""filter_bench: mxward's content filter against a pass-through relay and smtp-sink, in one run.

Run from the repository root (as root or not; smtp-sink drops root to ``nobody``)::

    .venv/bin/pip install aiosmtplib        # once: the pass-through relay needs it (not an mxward dependency)
    .venv/bin/python bench/filter_bench.py                      # every server, unpinned, 5 runs each
    .venv/bin/python bench/filter_bench.py --pinning both       # unpinned, then pinned
    .venv/bin/python bench/filter_bench.py --servers passthrough,sink --repeat 3 --pinning both
    .venv/bin/python bench/filter_bench.py --servers passthrough,mxward --sizes 51200 --seconds 6

What is measured: Postfix's ``smtp-source`` pushes messages (``-d``: each session sends its next
message over the same connection; ``-s 16`` sessions; ``-l 5120`` and ``-l 51200`` payload bytes)
through each server under test into Postfix's ``smtp-sink``:

passthrough  ``bench/passthrough_relay.py``: aiosmtpd in, aiosmtplib out, nothing else. It answers
             250 only after the sink said 250. The ceiling for a Python filter on this machine.
mxward       ``mxward --config FILE filter`` with ``[filter] checks = ["headers"]``, one worker,
             its own redis-server on a free TCP port (see ``mxward_filter_config``), reinjecting
             into the sink.
sink         smtp-source straight into smtp-sink, no filter: what the tools themselves reach.

All servers run side by side for the whole of one pinning mode; for each payload size each server
first gets an unmeasured warm-up that also sets its message count (``-m``) so that a measured
run lasts about ``--seconds``, then ``--repeat`` rounds, each round running every server once, in
an order that rotates from round to round (so slow drifts of the machine spread over all servers).

For every run:

* **msg/s**: smtp-source's message count over the wall time around smtp-source (its start,
  connections and QUIT included, as in the baseline). MB/s counts payload bytes (decimal MB).
* **server CPU µs/msg**: utime+stime (plus reaped children) of the server process and all its
  descendants, from /proc, read before and after the run, divided by the messages it handled in
  the run (smtp-source's plus the latency probe's). For mxward, its redis-server is a second
  group, reported within the total and apart. The downstream sink's CPU is not part of it (it is
  in the JSON).
* **latency**: smtp-source reports none, so a probe (a thread of this script, its own connection
  to the server under test) sends one message every ``--probe-interval`` ms (default 5; the next
  one waits for the reply to the previous) while smtp-source runs, and takes the time from
  sending the final ``.`` to reading the reply. The same size and shape of message as
  smtp-source's. p50 and p99 per run.
* **delivery**: smtp-sink runs with ``-c`` and prints its running counters; its message counter
  before and after the run gives the messages that arrived. Expected: smtp-source's count, less
  what was refused at end of DATA (smtp-source runs with ``-A`` and warns about each refusal
  instead of aborting), plus the probe's accepted messages. A difference is reported: for mxward a
  message that fails a check is quarantined (answered 250 but not reinjected), so it shows up here.
* **generator µs/msg**: smtp-source's own CPU per message (from the rusage of the reaped child).

Pinning: ``pinned`` runs the server under test (and mxward's redis-server) under ``taskset -c 0``
and smtp-source, the downstream smtp-sink and the probe thread on core 1; ``unpinned`` pins
nothing. ``--pinning both`` runs unpinned, then pinned.

Messages: ``--message generated`` (default) uses smtp-source's own message: headers ``From:
<bench@d1.senders.test>``, ``To: <user1@example.test>``, ``Date: <now> +0000 (UTC)`` and
``Message-Id: <pid.session.message@localhost>``, no Subject, then the payload in lines of 80
bytes (``1XXX...``). ``--message prepared`` writes a message with a fuller header set (display
name, Subject, Message-ID, MIME-Version, Content-Type) and the same payload size to a file and
sends it with ``smtp-source -F`` (every copy identical, Message-ID included).

Workloads: ``--workload plain`` (default) is the above. ``--workload signed`` measures DKIM
verification and DMARC: at set-up the script makes an RSA-2048 key (``openssl genrsa``), writes a
zone for ``signed.bench.test`` with the key at ``bench._domainkey`` and ``_dmarc`` saying
``v=DMARC1; p=reject``, and serves it with ``bench/fake_dns.py`` on a free loopback port, which
mxward asks through ``[dns] nameservers``. For each payload size it builds a message like
``--message prepared``'s, From ``bench@signed.bench.test``, and signs it with the reference signer,
Perl's Mail::DKIM (``bench/dkim_sign.pl``: rsa-sha256, relaxed/relaxed). smtp-source sends it with
``-F`` (envelope sender ``bench@signed.bench.test``); the probe sends the same bytes. mxward runs
with ``checks = ["headers", "dkim", "dmarc"]`` (the checks' defaults); the pass-through relays the
same messages. Every message that arrives is checked: the downstream smtp-sink dumps what it
receives (``-D``), and after each run the script reads the dump back. Each message must end with
the signed message byte for byte; each of mxward's must also carry an Authentication-Results field
with ``dkim=pass`` and ``dmarc=pass``. A message that does not counts as a failure (listed, exit
status 1); in a warm-up it stops the server's measurement at once.

Output: progress lines, then a results table and a table of each server against the
pass-through (msg/s ratio and CPU/msg ratio), saved with every run's numbers to
``bench/results/filter-<UTC timestamp>.md`` and ``.json`` (``filter-signed-...`` for the signed
workload; gitignored). Everything started (in its own session) is stopped at the end, also on
errors, Ctrl-C and SIGTERM.

Needs: ``/usr/sbin/smtp-source`` and ``/usr/sbin/smtp-sink`` (Debian package ``postfix``; install
it with debconf's "No configuration", as ``tests/run.sh`` does), ``/usr/bin/redis-server`` and
``.venv/bin/mxward`` for mxward, ``aiosmtplib`` in the venv for the pass-through, ``taskset`` and
two cores for ``--pinning pinned``; for ``--workload signed`` also ``openssl`` and ``perl`` with
Mail::DKIM (Debian ``libmail-dkim-perl``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import email.utils
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import policy_load
from policy_bench import (
    BenchError,
    FakeDns,
    Proc,
    can_bind,
    comma_list,
    command_output,
    fmt,
    free_port,
    header,
    ratio,
    read_ready,
    row,
    sigterm_as_interrupt,
    wait_until,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RELAY = HERE / "passthrough_relay.py"
FAKE_DNS = HERE / "fake_dns.py"
DKIM_SIGN = HERE / "dkim_sign.pl"
SERVERS = ("passthrough", "mxward", "sink")
WORKLOADS = ("plain", "signed")
SENDER = "bench@d1.senders.test"
SIGNED_DOMAIN = "signed.bench.test"  # the signed workload's From domain, d= and DMARC domain
SIGNED_SELECTOR = "bench"
SIGNED_SENDER = f"bench@{SIGNED_DOMAIN}"
CHECKS = {"plain": ("headers",), "signed": ("headers", "dkim", "dmarc")}
RECIPIENT = "user1@example.test"
HELO = "localhost"  # smtp-source -M: its HELO name and the domain of its Message-Ids
WARMUP_SECONDS = 0.5  # the warm-up grows its message count until one pass lasts this long
MIN_COUNT, MAX_COUNT = 100, 2_000_000
COUNTER = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)\r")


# region #### processes ####


def smtp_greeting(port: int, timeout: float = 2.0) -> str:
    """Connect, read the 220 greeting (all its lines), say QUIT; ConnectionError unless it is 220."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        lines = read_reply(reader)
        with contextlib.suppress(OSError):
            sock.sendall(b"QUIT\r\n")
            read_reply(reader)
    if not lines[0].startswith(b"220"):
        raise ConnectionError(f"greeting is not 220: {lines[0]!r}")
    return lines[-1].decode("ascii", "replace").strip()


def read_reply(reader: Any) -> list[bytes]:
    """The lines of one SMTP reply (a multi-line reply ends with ``NNN `` or ``NNN`` alone)."""
    lines = []
    while True:
        line = reader.readline(4096)
        if not line:
            raise ConnectionError("connection closed while waiting for a reply")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return lines


def redis_ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b"+PONG"):
        raise ConnectionError(f"unexpected reply to PING: {reply!r}")


@dataclass
class Sink:
    """An smtp-sink with ``-c``: its message counter is how we know what arrived.

    With ``dump`` (the signed workload's downstream sink) it also appends every message it
    receives to that file (``-D``), which :func:`check_delivered` reads back after each run.
    """

    proc: Proc
    port: int
    dump: Path | None = None

    def delivered(self) -> int:
        """The sink's running message counter (the last complete one it printed)."""
        try:
            with open(self.proc.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                tail = fh.read()
        except OSError:
            return 0
        matches = COUNTER.findall(tail)
        return int(matches[-1][2]) if matches else 0

    def wait_delivered(self, at_least: int, timeout: float = 2.0) -> int:
        """The counter, once it reaches ``at_least`` or ``timeout`` seconds have passed."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.delivered()
            if count >= at_least or time.monotonic() > deadline:
                return count
            time.sleep(0.02)


def start_sink(
    args: argparse.Namespace, workdir: Path, name: str, core: int | None, *, dump: bool = False
) -> Sink:
    port = free_port()
    argv = [args.smtp_sink, "-c"]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
    dump_file = None
    if dump:
        # smtp-sink writes each transaction to a new file next to the dump, then appends it: the
        # directory must be writable by the user it runs as.
        dump_dir = workdir / f"{name}-dump"
        dump_dir.mkdir()
        dump_dir.chmod(0o1777)
        dump_file = dump_dir / "messages"
        argv += ["-D", str(dump_file)]
    argv += [f"127.0.0.1:{port}", "1024"]
    proc = Proc(name, argv, workdir / f"{name}.log", core)
    try:
        wait_until(name, lambda: smtp_greeting(port), [proc], args.ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return Sink(proc, port, dump_file)


@dataclass
class Server:
    """A server under test: its port, its CPU groups (server first, then Redis) and its sink."""

    kind: str
    port: int
    procs: list[Proc]
    group_names: list[str]
    sink: Sink  # where its messages end up (the downstream sink, or itself for "sink")
    greeting: str = ""

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def start_passthrough(args: argparse.Namespace, workdir: Path, downstream: Sink, core: int | None) -> Server:
    port = free_port()
    argv = [
        sys.executable, str(RELAY), f"--listen=127.0.0.1:{port}",
        f"--relay=127.0.0.1:{downstream.port}", f"--loop={args.passthrough_loop}",
    ]  # fmt: skip
    proc = Proc("passthrough", argv, workdir / "passthrough.log", core)
    return Server("passthrough", port, [proc], ["passthrough"], downstream)


def mxward_filter_config(
    workdir: Path,
    *,
    redis_port: int,
    port: int,
    reinject_port: int,
    workers: int,
    workload: str = "plain",
    nameserver: str = "",
) -> str:
    """THE mxward configuration of the benchmark: adjust here when ``[filter]``'s keys change.

    A private redis-server on TCP ``redis_port`` (never 6379), the filter on ``127.0.0.1:port``,
    reinjecting into the downstream smtp-sink on ``reinject_port``, with the headers check alone
    (``plain``), or with the headers, dkim and dmarc checks at their defaults (``signed``), which
    ask the benchmark's DNS server at ``nameserver`` (``host:port``). ``hostname`` is set so that
    nothing asks the DNS for this machine's name.
    """
    checks = ", ".join(f'"{name}"' for name in CHECKS[workload])
    dns = f'\n[dns]\nnameservers = ["{nameserver}"]\n' if nameserver else ""
    return f"""\
[mxward]
data_dir = "{workdir}/data"
hostname = "filter.bench.test"
log_level = "warning"
log_target = "file:{workdir}/mxward.log"

[state]
url = "redis://127.0.0.1:{redis_port}"
{dns}
[filter]
listen = ["127.0.0.1:{port}"]
reinject = "127.0.0.1:{reinject_port}"
checks = [{checks}]
workers = {workers}
"""


def start_mxward(
    args: argparse.Namespace, workdir: Path, downstream: Sink, core: int | None, nameserver: str = ""
) -> Server:
    redis_port = free_port()
    redis_argv = [
        args.redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    redis = Proc("redis-server", redis_argv, workdir / "redis.log", core)
    try:
        wait_until("redis-server", lambda: redis_ping(redis_port), [redis], args.ready_timeout)
        port = free_port()
        (workdir / "data").mkdir(exist_ok=True)
        config = workdir / "mxward.toml"
        config.write_text(
            mxward_filter_config(
                workdir,
                redis_port=redis_port,
                port=port,
                reinject_port=downstream.port,
                workers=args.workers,
                workload=args.workload,
                nameserver=nameserver,
            ),
            encoding="utf-8",
        )
        proc = Proc("mxward", [args.mxward, "--config", str(config), "filter"], workdir / "mxward.out", core)
    except BaseException:
        redis.stop()
        raise
    return Server("mxward", port, [proc, redis], ["mxward", "redis"], downstream)


def start_servers(
    args: argparse.Namespace, workdir: Path, pinning: str, nameserver: str = ""
) -> tuple[dict[str, Server], Sink | None, dict[str, str]]:
    """Start every selected server (and the downstream sink) and wait until each greets.

    Returns the servers that started, the downstream sink, and for each server that did not start
    the reason (the others are measured all the same). ``nameserver``: the signed workload's DNS
    server, for mxward; the downstream sink then dumps what it receives.
    """
    server_core, load_core = (0, 1) if pinning == "pinned" else (None, None)
    servers: dict[str, Server] = {}
    failed: dict[str, str] = {}
    downstream: Sink | None = None
    try:
        if any(kind != "sink" for kind in args.servers):
            downstream = start_sink(
                args, workdir, "downstream-sink", load_core, dump=args.workload == "signed"
            )
        for kind in args.servers:
            if kind == "sink":
                sink = start_sink(args, workdir, "sink", server_core)
                servers[kind] = Server("sink", sink.port, [sink.proc], ["smtp-sink"], sink)
                continue
            assert downstream is not None
            try:
                if kind == "passthrough":
                    server = start_passthrough(args, workdir, downstream, server_core)
                else:
                    server = start_mxward(args, workdir, downstream, server_core, nameserver)
            except BenchError as exc:
                failed[kind] = f"did not start: {exc}"
                continue
            servers[kind] = server
            try:
                server.greeting = wait_until(
                    kind, lambda s=server: smtp_greeting(s.port), server.procs, args.ready_timeout
                )
            except BenchError as exc:
                server.stop()
                del servers[kind]
                failed[kind] = f"did not start: {exc}"
    except BaseException:
        for server in servers.values():
            server.stop()
        if downstream is not None:
            downstream.proc.stop()
        raise
    return servers, downstream, failed


# endregion
# region #### messages and the latency probe ####


def payload(size: int) -> bytes:
    """``size`` bytes of body in 80-byte CRLF lines, numbered as smtp-source numbers them."""
    lines = []
    remaining, n = size, 1
    while remaining > 0:
        width = min(80, remaining)
        text = (str(n % 10) + "X" * 78)[: max(0, width - 2)]
        lines.append(text.encode("ascii") + b"\r\n")
        remaining -= width
        n += 1
    return b"".join(lines)


def rfc5322_now() -> str:
    return email.utils.format_datetime(datetime.now(UTC)).replace("-0000", "+0000") + " (UTC)"


def prepared_message(size: int, sender: str = SENDER) -> bytes:
    """The ``--message prepared`` message: a full header set and ``size`` bytes of body (CRLF).

    The signed workload's message is the same with its own ``sender`` (before it is signed).
    """
    domain = sender.rpartition("@")[2]
    head = (
        f"From: Bench Sender <{sender}>\r\n"
        f"To: <{RECIPIENT}>\r\n"
        "Subject: filter benchmark message\r\n"
        f"Date: {email.utils.format_datetime(datetime.now(UTC))}\r\n"
        f"Message-ID: <filter-bench.{size}@{domain}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    )
    return head.encode("ascii") + payload(size)


@dataclass(frozen=True)
class PreparedMessage:
    """A message sent as it is (``--message prepared``, the signed workload).

    ``data``: the message with CRLF line ends; ``file``: the same with LF line ends, for
    ``smtp-source -F``, which sends each line of the file with CRLF, then one empty line more
    (``\\r\\n`` before the final ``.``; DKIM's body canonicalizations both ignore it).
    """

    data: bytes
    file: Path

    @classmethod
    def write(cls, data: bytes, file: Path) -> PreparedMessage:
        file.write_bytes(data.replace(b"\r\n", b"\n"))
        return cls(data, file)

    def wire(self) -> bytes:
        """The DATA of the probe's copy: dot-stuffed, with the final ``.``."""
        return re.sub(rb"(?m)^\.", b"..", self.data) + b".\r\n"


class Probe:
    """Latency probe: its own SMTP connection, one message at a time, at most one per interval.

    Records the time from sending the last line (the ``.``) to reading the whole reply. Runs in a
    thread of this process; with a core given, the thread pins itself to it.
    """

    def __init__(
        self,
        port: int,
        size: int,
        *,
        message: PreparedMessage | None,
        sender: str,
        interval: float,
        timeout: float,
        core: int | None,
    ) -> None:
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self.core = core
        self.sender = sender
        self.body = payload(size)
        self.prepared = message.wire() if message is not None else b""
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.sent = 0
        self.error = ""
        self.stop_event = threading.Event()
        self.sock: socket.socket | None = None
        self.reader: Any = None
        self.thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)

    def open(self) -> None:
        """Connect and greet (before the measured window)."""
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")
        self._expect(read_reply(self.reader), b"220", "greeting")
        self._command(b"EHLO probe.bench.test\r\n", b"250", "EHLO")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(self.timeout + 5)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError, ConnectionError):
                self.sock.sendall(b"QUIT\r\n")
                read_reply(self.reader)
            self.sock.close()
            self.sock = None

    def _expect(self, lines: list[bytes], code: bytes, what: str) -> None:
        if not lines[0].startswith(code):
            raise ConnectionError(f"{what}: {lines[-1].decode('ascii', 'replace').strip()}")

    def _command(self, line: bytes, code: bytes, what: str) -> None:
        assert self.sock is not None
        self.sock.sendall(line)
        self._expect(read_reply(self.reader), code, what)

    def _message(self) -> bytes:
        if self.prepared:
            return self.prepared
        head = (
            f"From: <{self.sender}>\r\nTo: <{RECIPIENT}>\r\nDate: {rfc5322_now()}\r\n"
            f"Message-Id: <probe.{os.getpid()}.{self.sent}@{HELO}>\r\n\r\n"
        )
        return head.encode("ascii") + self.body + b".\r\n"

    def _run(self) -> None:
        if self.core is not None:
            os.sched_setaffinity(0, {self.core})  # this thread only
        assert self.sock is not None
        try:
            while not self.stop_event.is_set():
                next_at = time.perf_counter() + self.interval
                self._command(f"MAIL FROM:<{self.sender}>\r\n".encode(), b"250", "MAIL")
                self._command(f"RCPT TO:<{RECIPIENT}>\r\n".encode(), b"250", "RCPT")
                self._command(b"DATA\r\n", b"354", "DATA")
                data = self._message()
                self.sock.sendall(data)
                sent_at = time.perf_counter()
                reply = read_reply(self.reader)
                done = time.perf_counter()
                self.sent += 1
                if reply[0].startswith(b"250"):
                    self.latencies.append(done - sent_at)
                else:
                    self.failures.append(reply[-1].decode("ascii", "replace").strip())
                self.stop_event.wait(max(0.0, next_at - time.perf_counter()))
        except (OSError, ConnectionError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"


# endregion
# region #### the signed workload ####


@dataclass
class SignedSetup:
    """The signed workload's material, made once per benchmark: the key's zone file and, per
    payload size, the message signed by the reference signer."""

    directory: Path
    zone: Path
    messages: dict[int, PreparedMessage]


def run_tool(argv: list[str], what: str) -> bytes:
    """Run a set-up command; its standard output, or BenchError with its standard error."""
    try:
        result = subprocess.run(argv, capture_output=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"{what}: {' '.join(argv)}: {exc}") from exc
    if result.returncode != 0:
        error = result.stderr.decode("utf-8", "replace").strip()
        raise BenchError(f"{what}: {' '.join(argv)} exited with {result.returncode}: {error}")
    return result.stdout


def signed_zone(public_key: bytes) -> str:
    """The zone of ``SIGNED_DOMAIN``: the DKIM key record (in strings of at most 250 characters,
    RFC 1035 section 3.3 allows 255) and a DMARC policy of reject."""
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(public_key).decode("ascii")
    strings = " ".join(f'"{record[i : i + 250]}"' for i in range(0, len(record), 250))
    return (
        "; Generated by filter_bench.py for the signed workload (bench/fake_dns.py serves it).\n"
        "$TTL 86400\n"
        f"$ORIGIN {SIGNED_DOMAIN}.\n"
        "@  SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 604800 3600\n"
        "@  NS  ns.bench.test.\n"
        f"{SIGNED_SELECTOR}._domainkey  TXT  {strings}\n"
        '_dmarc  TXT  "v=DMARC1; p=reject"\n'
    )


def prepare_signed(args: argparse.Namespace, directory: Path) -> SignedSetup:
    """Make the RSA-2048 key and its zone, and sign one message per payload size with Mail::DKIM."""
    directory.mkdir()
    key = directory / f"{SIGNED_SELECTOR}.{SIGNED_DOMAIN}.key"
    run_tool([args.openssl, "genrsa", "-traditional", "-out", str(key), "2048"], "making the DKIM key")
    public_key = run_tool(
        [args.openssl, "rsa", "-in", str(key), "-pubout", "-outform", "DER"], "reading the public key"
    )
    zone = directory / "signed-bench.zone"
    zone.write_text(signed_zone(public_key), encoding="utf-8")
    messages = {}
    for size in args.sizes:
        unsigned = prepared_message(size, SIGNED_SENDER)
        source, signed = directory / f"unsigned-{size}.eml", directory / f"signed-{size}.eml"
        source.write_bytes(unsigned)
        run_tool(
            [
                args.perl, str(DKIM_SIGN), "--key", str(key), "--domain", SIGNED_DOMAIN,
                "--selector", SIGNED_SELECTOR, "--in", str(source), "--out", str(signed),
            ],
            "signing with Mail::DKIM",
        )  # fmt: skip
        data = signed.read_bytes()
        if not data.startswith(b"DKIM-Signature:") or not data.endswith(unsigned):
            raise BenchError(f"{DKIM_SIGN.name} wrote something else than the signed message into {signed}")
        messages[size] = PreparedMessage.write(data, directory / f"signed-{size}.txt")
    return SignedSetup(directory, zone, messages)


def start_fake_dns(args: argparse.Namespace, workdir: Path, zone: Path, core: int | None) -> FakeDns:
    """bench/fake_dns.py serving ``zone`` on a free port of 127.0.0.1 (UDP and TCP)."""
    host = "127.0.0.1"
    for _ in range(50):
        port = free_port()
        if can_bind(host, port):
            break
    else:
        raise BenchError("no port free for both UDP and TCP on 127.0.0.1 for the DNS server")
    ready = workdir / "fake_dns.ready"
    argv = [sys.executable, str(FAKE_DNS), f"--listen={host}:{port}", f"--zone={zone}", f"--ready={ready}"]
    proc = Proc("fake_dns", argv, workdir / "fake_dns.log", core)
    try:
        document = wait_until("fake_dns", lambda: read_ready(ready), [proc], args.ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return FakeDns(proc, host, port, f"{host}:{document['control']}")


DUMP_START = b"X-Client-Addr: "  # smtp-sink's first line of each dumped message
AUTH_RESULTS = re.compile(rb"(?im)^Authentication-Results:[^\n]*(?:\n[ \t][^\n]*)*")
DKIM_PASS = re.compile(rb"(?<![\w.-])dkim=pass\b")
DMARC_PASS = re.compile(rb"(?<![\w.-])dmarc=pass\b")


@dataclass
class Delivery:
    """What the sink's dump says about the messages of one run."""

    checked: int = 0  # messages in the dump
    intact: int = 0  # ending with the signed message, byte for byte
    passed: int = 0  # with Authentication-Results saying dkim=pass and dmarc=pass
    samples: list[str] = field(default_factory=list)


def dumped_count(data: bytes) -> int:
    return data.count(b"\n" + DUMP_START) + data.startswith(DUMP_START)


def dns_questions(dns: FakeDns) -> int:
    """How many questions the stopped fake_dns answered (its last line says), -1 if unknown."""
    try:
        lines = dns.proc.log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        if line.startswith("fake_dns: {"):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                return int(json.loads(line.removeprefix("fake_dns: "))["queries"])
    return -1


def drain_dump(sink: Sink) -> None:
    """Forget what the sink dumped so far (smtp-sink appends to the file, so it may be emptied)."""
    if sink.dump is not None and sink.dump.exists():
        with open(sink.dump, "r+b") as fh:
            fh.truncate(0)


def check_delivered(sink: Sink, message: PreparedMessage, delivered: int, *, authenticated: bool) -> Delivery:
    """Read back (and empty) the sink's dump: every message must be ``message`` as signed, and
    with ``authenticated`` carry an Authentication-Results field with dkim=pass and dmarc=pass."""
    assert sink.dump is not None
    deadline = time.monotonic() + 5.0
    while True:  # the dump may trail the sink's counter by a moment
        try:
            data = sink.dump.read_bytes()
        except FileNotFoundError:
            data = b""
        if dumped_count(data) >= delivered or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    drain_dump(sink)
    result = Delivery()
    expected = message.data.replace(b"\r\n", b"\n").rstrip(b"\n")
    chunks = data.split(b"\n" + DUMP_START)
    if chunks and not chunks[0].startswith(DUMP_START):
        chunks = chunks[1:]  # nothing before the first message (an empty dump)
    for chunk in chunks:
        result.checked += 1
        text = chunk.rstrip(b"\n")
        problem = ""
        if text.endswith(expected):
            result.intact += 1
        else:
            problem = "the message arrived changed"
        if authenticated:
            head = text[: text.find(b"\n\n")] if b"\n\n" in text else text
            fields = [re.sub(rb"\n[ \t]+", b" ", f) for f in AUTH_RESULTS.findall(head)]
            if any(DKIM_PASS.search(f) and DMARC_PASS.search(f) for f in fields):
                result.passed += 1
            elif not problem:
                shown = b" | ".join(fields).decode("utf-8", "replace")[:400]
                problem = shown or "no Authentication-Results field"
        if problem and problem not in result.samples and len(result.samples) < 3:
            result.samples.append(problem)
    return result


# endregion
# region #### one run ####


@dataclass
class Run:
    """One smtp-source run against one server."""

    server: str
    size: int
    pinning: str
    round: int  # 0 = warm-up
    messages: int
    seconds: float
    msg_s: float
    mb_s: float
    source_status: int
    refused: int  # end of DATA refused (smtp-source warnings)
    other_warnings: int
    warning_samples: list[str]
    delivered: int  # the sink's counter difference
    expected: int
    probe_sent: int = 0
    probe_failed: int = 0
    probe_error: str = ""
    probe_failure_samples: list[str] = field(default_factory=list)
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    cpu_pct: float = float("nan")
    cpu_us_per_msg: float = float("nan")
    group_us_per_msg: list[float] = field(default_factory=list)
    downstream_us_per_msg: float = float("nan")
    source_us_per_msg: float = float("nan")
    # The signed workload: the sink's dump read back (checked = -1: not checked).
    checked: int = -1
    intact: int = 0
    auth_required: bool = False
    auth_pass: int = 0
    check_samples: list[str] = field(default_factory=list)

    @property
    def unverified(self) -> int:
        """Messages that arrived but not as they must (changed, or without dkim=pass and dmarc=pass),
        or that are missing from the sink's dump."""
        if self.checked < 0:
            return 0
        bad = self.checked - min(self.intact, self.auth_pass if self.auth_required else self.intact)
        return bad + abs(self.delivered - self.checked)

    @property
    def not_as_signed(self) -> int:
        """The signed workload: messages lost (mxward quarantines what fails DMARC) or unverified."""
        return self.unverified + max(0, self.expected - self.delivered) if self.checked >= 0 else 0

    @property
    def failures(self) -> int:
        lost = max(0, self.expected - self.delivered)
        return (
            self.refused + self.other_warnings + self.probe_failed + lost + (self.source_status != 0)
            + self.unverified
        )  # fmt: skip


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def source_argv(
    args: argparse.Namespace, port: int, size: int, count: int, message: PreparedMessage | None
) -> list[str]:
    argv = [args.smtp_source, "-A", "-d", "-s", str(args.sessions), "-m", str(count)]
    argv += ["-F", str(message.file)] if message is not None else ["-l", str(size)]
    return [*argv, "-M", HELO, "-f", args.sender, "-t", RECIPIENT, f"127.0.0.1:{port}"]


def run_source(argv: list[str], stderr_path: Path, timeout: float) -> tuple[int, float]:
    """Run smtp-source in its own session; (exit status, wall seconds). Kills it after ``timeout``."""
    with open(stderr_path, "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
        try:
            status = proc.wait(timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return status, time.perf_counter() - started


def source_warnings(stderr_path: Path) -> tuple[int, int, list[str]]:
    """(end-of-data refusals, other warnings and fatal errors, a few distinct samples) of a run."""
    refused = other = 0
    samples: list[str] = []
    try:
        lines = stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return 0, 0, []
    for line in lines:
        if "end of data rejected" in line:
            refused += 1
        elif "warning:" in line or "fatal:" in line:
            other += 1
        else:
            continue
        text = line.removeprefix("smtp-source: ")
        if text not in samples and len(samples) < 5:
            samples.append(text)
    return refused, other, samples


def measure_run(
    args: argparse.Namespace,
    server: Server,
    downstream: Sink | None,
    *,
    size: int,
    count: int,
    pinning: str,
    round_no: int,
    message: PreparedMessage | None,
    workdir: Path,
) -> Run:
    load_core = 1 if pinning == "pinned" else None
    for proc in server.procs:
        proc.check_alive()
    probe: Probe | None = None
    if args.probe_interval > 0 and round_no > 0:
        probe = Probe(
            server.port,
            size,
            message=message,
            sender=args.sender,
            interval=args.probe_interval / 1000,
            timeout=args.timeout,
            core=load_core,
        )
        try:
            probe.open()
        except (OSError, ConnectionError) as exc:
            probe.close()
            raise BenchError(f"{server.kind}: the latency probe could not start a session: {exc}") from exc
    try:
        return _measure_run(
            args, server, downstream, probe, size=size, count=count, pinning=pinning, round_no=round_no,
            message=message, workdir=workdir,
        )  # fmt: skip
    finally:
        if probe is not None:
            probe.close()


def _measure_run(
    args: argparse.Namespace,
    server: Server,
    downstream: Sink | None,
    probe: Probe | None,
    *,
    size: int,
    count: int,
    pinning: str,
    round_no: int,
    message: PreparedMessage | None,
    workdir: Path,
) -> Run:
    load_core = 1 if pinning == "pinned" else None
    argv = source_argv(args, server.port, size, count, message)
    if load_core is not None:
        argv = ["taskset", "-c", str(load_core), *argv]
    roots = [proc.pid for proc in server.procs]
    relay_sink = downstream if downstream is not None and server.sink is downstream else None
    dumping = relay_sink is not None and relay_sink.dump is not None
    if dumping:
        assert relay_sink is not None
        drain_dump(relay_sink)
    before_counter = server.sink.delivered()
    cpu_before = policy_load.tree_cpu_seconds(roots)
    sink_before = policy_load.tree_cpu_seconds([relay_sink.proc.pid])[0] if relay_sink else 0.0
    gen_before = children_cpu()
    try:
        if probe is not None:
            probe.start()
        status, seconds = run_source(
            argv, workdir / f"source-{server.kind}-{size}-{round_no}.err", args.run_timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{server.kind}: smtp-source did not finish within {args.run_timeout:g} s") from exc
    finally:
        if probe is not None:
            probe.stop()
    gen_after = children_cpu()
    for proc in server.procs:
        proc.check_alive()
    try:
        cpu_after = policy_load.tree_cpu_seconds(roots)
        sink_after = policy_load.tree_cpu_seconds([relay_sink.proc.pid])[0] if relay_sink else 0.0
    except ProcessLookupError as exc:
        raise BenchError(f"{server.kind}: a process ended during the run: {exc}") from exc
    refused, other, samples = source_warnings(workdir / f"source-{server.kind}-{size}-{round_no}.err")
    probe_ok = len(probe.latencies) if probe is not None else 0
    expected = count - refused + probe_ok if status == 0 else -1
    delivered = server.sink.wait_delivered(before_counter + max(expected, 0)) - before_counter
    if expected < 0:
        expected = delivered  # smtp-source aborted: the failure is its status, not the count
    delivery = None
    if dumping and message is not None and relay_sink is not None:
        delivery = check_delivered(relay_sink, message, delivered, authenticated=server.kind == "mxward")
    handled = count + (probe.sent if probe is not None else 0)
    cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    latencies = sorted(probe.latencies) if probe is not None else []
    run = Run(
        server=server.kind, size=size, pinning=pinning, round=round_no, messages=count, seconds=seconds,
        msg_s=count / seconds, mb_s=count * size / seconds / 1e6, source_status=status, refused=refused,
        other_warnings=other, warning_samples=samples, delivered=delivered, expected=expected,
        cpu_pct=100 * sum(cpu) / seconds, cpu_us_per_msg=sum(cpu) * 1e6 / handled,
        group_us_per_msg=[c * 1e6 / handled for c in cpu],
        source_us_per_msg=(gen_after - gen_before) * 1e6 / count,
    )  # fmt: skip
    if relay_sink is not None:
        run.downstream_us_per_msg = (sink_after - sink_before) * 1e6 / handled
    if delivery is not None:
        run.checked, run.intact, run.auth_pass = delivery.checked, delivery.intact, delivery.passed
        run.auth_required = server.kind == "mxward"
        run.check_samples = delivery.samples
    if probe is not None:
        run.probe_sent = probe.sent
        run.probe_failed = len(probe.failures)
        run.probe_error = probe.error
        run.probe_failure_samples = list(dict.fromkeys(probe.failures))[:3]
        if latencies:
            run.p50_ms = 1000 * policy_load.percentile(latencies, 50)
            run.p99_ms = 1000 * policy_load.percentile(latencies, 99)
            run.max_ms = 1000 * latencies[-1]
    return run


def describe(run: Run) -> str:
    label = "warm-up" if run.round == 0 else f"round {run.round}"
    text = (
        f"  {run.server:<11} {label:<8} {run.messages:>7} msgs in {run.seconds:6.2f} s:"
        f" {run.msg_s:8.0f} msg/s"
        f" {run.mb_s:6.1f} MB/s, CPU {run.cpu_pct:5.1f} % {run.cpu_us_per_msg:7.1f} µs/msg"
    )
    if not math.isnan(run.p99_ms):
        text += f", probe {run.probe_sent} msgs p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms"
    text += f", delivered {run.delivered}/{run.expected}"
    if run.checked >= 0:
        text += f", {'dkim+dmarc pass' if run.auth_required else 'intact'} {verified(run)}/{run.checked}"
    if run.failures:
        text += f", FAILURES {run.failures}"
    return text


def problems(run: Run) -> list[str]:
    """What went wrong in a run, in words (empty when every message arrived)."""
    out = []
    if run.source_status != 0:
        out.append(f"smtp-source exited with status {run.source_status}")
    if run.refused:
        out.append(f"{run.refused} messages refused at end of DATA")
    if run.other_warnings:
        out.append(f"{run.other_warnings} other smtp-source warnings")
    out += [f"smtp-source: {sample}" for sample in run.warning_samples]
    if run.delivered != run.expected:
        out.append(f"the sink received {run.delivered} messages, {run.expected} expected")
    if run.probe_failed:
        out.append(f"probe: {run.probe_failed} messages refused ({'; '.join(run.probe_failure_samples)})")
    if run.probe_error:
        out.append(f"probe stopped: {run.probe_error}")
    if run.checked >= 0:
        if run.checked != run.delivered:
            out.append(f"the sink's dump holds {run.checked} messages, its counter says {run.delivered}")
        if run.intact != run.checked:
            out.append(f"{run.checked - run.intact} messages arrived changed")
        if run.auth_required and run.auth_pass != run.checked:
            out.append(f"{run.checked - run.auth_pass} messages without dkim=pass and dmarc=pass")
        out += [f"sample: {sample}" for sample in run.check_samples]
    return out


def verified(run: Run) -> int:
    """Messages of the run that arrived as they must (see :attr:`Run.unverified`)."""
    return min(run.intact, run.auth_pass) if run.auth_required else run.intact


# endregion
# region #### measuring ####


@dataclass
class Measurement:
    """All runs of one server, payload size and pinning mode."""

    server: str
    size: int
    pinning: str
    count: int = 0
    runs: list[Run] = field(default_factory=list)
    warmup: list[Run] = field(default_factory=list)
    error: str = ""

    def median(self, key: str) -> float:
        values = [getattr(r, key) for r in self.runs]
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else float("nan")

    def spread(self, key: str) -> tuple[float, float, float]:
        values = [getattr(r, key) for r in self.runs]
        if not values:
            return float("nan"), float("nan"), float("nan")
        return min(values), statistics.median(values), max(values)

    def group_median(self, index: int) -> float:
        values = [r.group_us_per_msg[index] for r in self.runs if len(r.group_us_per_msg) > index]
        return statistics.median(values) if values else float("nan")


def warm_up(
    args: argparse.Namespace,
    server: Server,
    downstream: Sink | None,
    m: Measurement,
    *,
    message: PreparedMessage | None,
    workdir: Path,
) -> None:
    """Unmeasured passes, growing until one lasts WARMUP_SECONDS; they set the measured count."""
    count = max(MIN_COUNT, 10 * args.sessions)
    while True:
        run = measure_run(
            args, server, downstream, size=m.size, count=count, pinning=m.pinning, round_no=0,
            message=message, workdir=workdir,
        )  # fmt: skip
        m.warmup.append(run)
        print(describe(run), flush=True)
        if run.source_status != 0:
            raise BenchError(f"warm-up failed: {'; '.join(problems(run))}")
        if run.not_as_signed:
            raise BenchError(f"warm-up: messages did not arrive as they must: {'; '.join(problems(run))}")
        if run.seconds >= WARMUP_SECONDS or count >= MAX_COUNT:
            break
        count = min(MAX_COUNT, max(2 * count, int(count * 1.2 * WARMUP_SECONDS / max(run.seconds, 1e-3))))
    if args.messages:
        m.count = args.messages
    else:
        m.count = max(MIN_COUNT, min(MAX_COUNT, int(round(run.msg_s * args.seconds, -2))))


def measure_mode(
    args: argparse.Namespace, pinning: str, workdir: Path, measurements: list[Measurement]
) -> None:
    """One pinning mode: start everything, then each size: warm-ups, then the rotating rounds."""
    print(f"\n=== {pinning} ===", flush=True)
    workdir.mkdir()
    dns: FakeDns | None = None
    if args.signed is not None:
        dns = start_fake_dns(args, workdir, args.signed.zone, 1 if pinning == "pinned" else None)
        print(f"fake_dns on {dns.nameserver} serving {args.signed.zone.name}")
    try:
        servers, downstream, failed = start_servers(args, workdir, pinning, dns.nameserver if dns else "")
    except BaseException:
        if dns is not None:
            dns.stop()
        raise
    for kind, reason in failed.items():
        print(f"filter_bench: {kind} {reason}", file=sys.stderr)
        measurements.extend(
            Measurement(kind, size, pinning, error=reason.splitlines()[0]) for size in args.sizes
        )
    try:
        for kind, server in servers.items():
            print(
                f"{kind}: 127.0.0.1:{server.port}, pids {[p.pid for p in server.procs]} ({server.greeting!r})"
            )
        if downstream is not None:
            print(f"downstream smtp-sink: 127.0.0.1:{downstream.port}")
        for size in args.sizes:
            message = None
            if args.signed is not None:
                message = args.signed.messages[size]
            elif args.message == "prepared":
                message = PreparedMessage.write(prepared_message(size), workdir / f"message-{size}.txt")
            current = {kind: Measurement(kind, size, pinning) for kind in servers}
            measurements.extend(current.values())
            print(f"\n--- payload {size} bytes, {pinning}: warm-up ---", flush=True)
            for kind, server in servers.items():
                try:
                    warm_up(args, server, downstream, current[kind], message=message, workdir=workdir)
                except BenchError as exc:
                    current[kind].error = str(exc).splitlines()[0]
                    print(f"filter_bench: {kind}: {exc}", file=sys.stderr)
            active = [kind for kind in servers if not current[kind].error]
            print(
                "counts: " + ", ".join(f"{kind} -m {current[kind].count}" for kind in active),
                flush=True,
            )
            for round_no in range(1, args.repeat + 1):
                shift = (round_no - 1) % max(1, len(active))
                order = active[shift:] + active[:shift]
                print(f"--- payload {size} bytes, {pinning}: round {round_no}/{args.repeat} ---", flush=True)
                for kind in order:
                    m = current[kind]
                    if m.error:
                        continue
                    time.sleep(args.pause)
                    try:
                        run = measure_run(
                            args, servers[kind], downstream, size=size, count=m.count, pinning=pinning,
                            round_no=round_no, message=message, workdir=workdir,
                        )  # fmt: skip
                    except BenchError as exc:
                        m.error = str(exc).splitlines()[0]
                        print(f"filter_bench: {kind}: {exc}", file=sys.stderr)
                        continue
                    m.runs.append(run)
                    print(describe(run), flush=True)
                    for problem in problems(run):
                        print(f"filter_bench: WARNING: {kind}: {problem}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
        if downstream is not None:
            downstream.proc.stop()
        if dns is not None:
            dns.stop()
            asked = dns_questions(dns)
            args.dns_questions[pinning] = asked
            print(f"fake_dns answered {asked} DNS questions in the {pinning} mode (mxward caches them)")


# endregion
# region #### report ####


def size_label(size: int) -> str:
    return f"{size / 1024:g} KB" if size % 1024 == 0 else f"{size} B"


def results_table(measurements: list[Measurement]) -> list[str]:
    checking = any(r.checked >= 0 for m in measurements for r in m.runs)
    titles = [
        "server", "payload", "pinning", "runs × msgs", "msg/s min / med / max", "MB/s (med)",
        "probe p50 ms", "probe p99 ms", "server CPU %", "CPU µs/msg", "µs/msg without Redis",
        "smtp-source µs/msg", "delivered / expected", "failures",
    ]  # fmt: skip
    if checking:
        titles.insert(-1, "as signed (passthrough) / dkim+dmarc pass (mxward)")
    lines = header(titles)
    for m in measurements:
        if not m.runs:
            lines.append(row([m.server, size_label(m.size), m.pinning, "0", f"not measured: {m.error}"]))
            continue
        low, mid, high = m.spread("msg_s")
        without = fmt(m.group_median(0), 1) if m.server == "mxward" else ""
        delivered = sum(r.delivered for r in m.runs)
        expected = sum(r.expected for r in m.runs)
        failures = sum(r.failures for r in m.runs)
        cells = [
            m.server, size_label(m.size), m.pinning, f"{len(m.runs)} × {m.count}",
            f"{fmt(low)} / {fmt(mid)} / {fmt(high)}", fmt(m.median("mb_s"), 1),
            fmt(m.median("p50_ms"), 2), fmt(m.median("p99_ms"), 2), fmt(m.median("cpu_pct")),
            fmt(m.median("cpu_us_per_msg"), 1), without, fmt(m.median("source_us_per_msg"), 1),
            f"{delivered} / {expected}", str(failures) + (f" ({m.error})" if m.error else ""),
        ]  # fmt: skip
        if checking:
            checked = [r for r in m.runs if r.checked >= 0]
            cells.insert(
                -1,
                f"{sum(verified(r) for r in checked)} / {sum(r.checked for r in checked)}" if checked else "",
            )
        lines.append(row(cells))
    return lines


def comparison_table(measurements: list[Measurement]) -> list[str]:
    """Each server's median msg/s and CPU/msg against the pass-through's, same size and pinning."""
    by_key = {(m.server, m.size, m.pinning): m for m in measurements if m.runs}
    lines = header([
        "payload", "pinning", "server", "msg/s (med)", "msg/s ÷ passthrough", "CPU µs/msg (med)",
        "CPU/msg ÷ passthrough", "probe p99 ms",
    ])  # fmt: skip
    for m in measurements:
        base = by_key.get(("passthrough", m.size, m.pinning))
        if base is None or not m.runs:
            continue
        rate, us = m.median("msg_s"), m.median("cpu_us_per_msg")
        lines.append(row([
            size_label(m.size), m.pinning, m.server, fmt(rate), ratio(rate, base.median("msg_s")),
            fmt(us, 1), ratio(us, base.median("cpu_us_per_msg")), fmt(m.median("p99_ms"), 2),
        ]))  # fmt: skip
    return lines if len(lines) > 2 else []


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(args: argparse.Namespace) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if command_output(["git", "-C", str(REPO), "status", "--porcelain"]) != "?":
        commit += " plus uncommitted changes"
    loop = args.passthrough_loop
    if loop == "auto":
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": f"{os.cpu_count()} × {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix (smtp-source, smtp-sink)": command_output(["dpkg-query", "-W", "-f=${Version}", "postfix"]),
        "passthrough": (
            f"aiosmtpd {version('aiosmtpd')} -> aiosmtplib {version('aiosmtplib')}, {loop} loop"
            + (f" (uvloop {version('uvloop')})" if loop == "uvloop" else "")
        ),
        "mxward commit": commit,
        "mxward filter": (
            f"checks = [{', '.join(repr(c) for c in CHECKS[args.workload])}], workers = {args.workers}, "
            "own redis-server on TCP"
            + (", [dns] nameservers = bench/fake_dns.py on 127.0.0.1" if args.workload == "signed" else "")
        ),
        "redis-server": command_output([args.redis_server, "--version"]),
        "load": (
            f"smtp-source -A -d -s {args.sessions} -m N "
            f"{'-F FILE' if args.message != 'generated' else '-l SIZE'} "
            f"-M {HELO} -f {args.sender} -t {RECIPIENT}; "
            f"about {args.seconds:g} s per run; {args.repeat} rounds; message {args.message}; "
            f"probe every {args.probe_interval:g} ms"
        ),
    }
    if args.workload == "signed":
        env["workload"] = (
            f"signed: From {SIGNED_SENDER}, signed by Mail::DKIM {perl_module_version(args, 'Mail::DKIM')} "
            f"(rsa-sha256, RSA-2048, relaxed/relaxed, selector {SIGNED_SELECTOR}); "
            f'_dmarc.{SIGNED_DOMAIN} "v=DMARC1; p=reject"; every delivered message read back from '
            "the downstream sink's dump"
        )
        env["dkimpy"] = version("dkimpy")
    if "mxward" not in args.servers:
        del env["mxward filter"], env["redis-server"]
    if "passthrough" not in args.servers:
        del env["passthrough"]
    return env


def perl_module_version(args: argparse.Namespace, module: str) -> str:
    return command_output([args.perl, f"-M{module}", "-e", f"print ${module}::VERSION"])


def report(args: argparse.Namespace, env: dict[str, str], measurements: list[Measurement]) -> str:
    title = "# Content filters side by side" + (": DKIM and DMARC" if args.workload == "signed" else "")
    lines = [title, ""]
    lines += [f"* {key}: {value}" for key, value in env.items()]
    lines += [
        "",
        (
            "msg/s: smtp-source's count over its wall time; min / median / max over the rounds. Other "
            "columns: medians. CPU µs/msg: the server's process tree (mxward: plus its redis-server) "
            "over the messages it handled (smtp-source's and the probe's); 100 % CPU = one core. "
            "Latency: the probe's, end of DATA to reply."
        ),
        "",
        "## Results",
        "",
        *results_table(measurements),
    ]
    comparison = comparison_table(measurements)
    if comparison:
        lines += ["", "## Against the pass-through", "", *comparison]
    if args.dns_questions:
        asked = ", ".join(f"{n} ({mode})" for mode, n in args.dns_questions.items())
        lines += ["", f"DNS questions answered by fake_dns over each whole mode: {asked}."]
    issues = []
    for m in measurements:
        for run in m.runs:
            issues += [
                f"* {m.server}, {size_label(m.size)}, {m.pinning}, round {run.round}: {p}"
                for p in problems(run)
            ]
        if m.error:
            issues.append(f"* {m.server}, {size_label(m.size)}, {m.pinning}: stopped: {m.error}")
    if issues:
        lines += ["", "## Delivery failures and warnings", "", *issues]
    if args.interrupted:
        lines += ["", f"Interrupted: {args.interrupted}"]
    return "\n".join(lines) + "\n"


def save(args: argparse.Namespace, env: dict[str, str], measurements: list[Measurement], text: str) -> None:
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = "filter" if args.workload == "plain" else f"filter-{args.workload}"
    md, js = results / f"{name}-{stamp}.md", results / f"{name}-{stamp}.json"
    md.write_text(text, encoding="utf-8")
    document = {
        "environment": env,
        "measurements": [
            {
                "server": m.server,
                "size": m.size,
                "pinning": m.pinning,
                "count": m.count,
                "error": m.error,
                "summary": {
                    key: dict(zip(("min", "median", "max"), m.spread(key), strict=True))
                    for key in ("msg_s", "mb_s", "p50_ms", "p99_ms", "cpu_pct", "cpu_us_per_msg")
                }
                if m.runs
                else {},
                "runs": [asdict(r) for r in m.runs],
                "warmup": [asdict(r) for r in m.warmup],
            }
            for m in measurements
        ],
    }
    js.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    print(f"\nsaved {md} and {js}")


# endregion
# region #### main ####


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kK]?)", text.strip())
    if match is None or int(match.group(1)) < 1:
        raise ValueError(text)
    return int(match.group(1)) * (1024 if match.group(2) else 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark mxward's content filter against a pass-through relay and smtp-sink."
    )
    parser.add_argument(
        "--servers",
        action="append",
        default=[],
        help=f"servers to run: {', '.join(SERVERS)} (repeatable or a,b; default all)",
    )
    parser.add_argument(
        "--sizes", action="append", default=[], help="payload bytes, a,b (5k = 5120; default 5120,51200)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="measured rounds per size (5)")
    parser.add_argument(
        "--pinning", choices=("unpinned", "pinned", "both"), default="unpinned", help="default unpinned"
    )
    parser.add_argument("--sessions", type=int, default=16, help="smtp-source -s: parallel sessions (16)")
    parser.add_argument("--seconds", type=float, default=4.0, help="target length of a measured run (4)")
    parser.add_argument(
        "--messages", type=int, default=0, help="fixed smtp-source -m for every run (0: auto)"
    )
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between runs (0.5)")
    parser.add_argument(
        "--probe-interval", type=float, default=5.0, help="ms between probe messages, 0 = no probe (5)"
    )
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="plain",
        help="plain: the headers check (default); signed: messages signed by Mail::DKIM, "
        "mxward with the headers, dkim and dmarc checks",
    )
    parser.add_argument(
        "--message",
        choices=("generated", "prepared"),
        default="generated",
        help="smtp-source's own message (default) or a prepared one with full headers (-F); "
        "the signed workload always sends its signed message",
    )
    parser.add_argument(
        "--passthrough-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the pass-through's event loop (auto: uvloop when installed, as mxward does)",
    )
    parser.add_argument("--workers", type=int, default=1, help="[filter] workers for mxward (1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="probe reply timeout in seconds (30)")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="longest smtp-source run (300 s)")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to start a server (30)")
    parser.add_argument("--mxward", default=str(REPO / ".venv" / "bin" / "mxward"), help="mxward executable")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server", help="redis-server executable")
    parser.add_argument("--smtp-source", default="/usr/sbin/smtp-source", help="smtp-source executable")
    parser.add_argument("--smtp-sink", default="/usr/sbin/smtp-sink", help="smtp-sink executable")
    parser.add_argument("--openssl", default="openssl", help="openssl executable (signed workload)")
    parser.add_argument("--perl", default="perl", help="perl with Mail::DKIM (signed workload)")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where to save (bench/results)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    servers = comma_list(args.servers) or list(SERVERS)
    for name in servers:
        if name not in SERVERS:
            parser.error(f"--servers: unknown server {name!r} (choose from {', '.join(SERVERS)})")
    args.servers = [s for s in SERVERS if s in servers]
    try:
        args.sizes = list(dict.fromkeys(parse_size(s) for s in comma_list(args.sizes))) or [5120, 51200]
    except ValueError as exc:
        parser.error(f"--sizes: not a size in bytes: {exc}")
    if args.repeat < 1 or args.sessions < 1 or args.seconds <= 0 or args.messages < 0:
        parser.error("--repeat, --sessions and --seconds must be positive, --messages not negative")
    if args.probe_interval < 0 or args.pause < 0 or args.timeout <= 0 or args.run_timeout <= 0:
        parser.error("--probe-interval and --pause must not be negative, the timeouts must be positive")
    if not 0 <= args.workers <= 256:
        parser.error("--workers: 0 (one per core) to 256")
    args.pinnings = ["unpinned", "pinned"] if args.pinning == "both" else [args.pinning]
    args.interrupted = ""
    args.sender = SIGNED_SENDER if args.workload == "signed" else SENDER
    if args.workload == "signed":
        args.message = "signed"
    args.signed = None  # the SignedSetup, made once the tools are found
    args.dns_questions = {}  # pinning mode -> questions fake_dns answered (signed workload)
    return args


def mxward_preflight(args: argparse.Namespace) -> None:
    """mxward must have a ``filter`` command and accept the benchmark's configuration."""
    result = subprocess.run(
        [args.mxward, "filter", "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise BenchError(
            f"mxward has no working 'filter' command ({args.mxward} filter --help exited with "
            f"{result.returncode}); run without it: --servers passthrough,sink"
        )
    with tempfile.TemporaryDirectory(prefix="filter-bench-check-") as tmp:
        config = Path(tmp) / "mxward.toml"
        (Path(tmp) / "data").mkdir()
        config.write_text(
            mxward_filter_config(
                Path(tmp),
                redis_port=free_port(),
                port=free_port(),
                reinject_port=free_port(),
                workers=args.workers,
                workload=args.workload,
                nameserver="127.0.0.1:53" if args.workload == "signed" else "",
            ),
            encoding="utf-8",
        )
        argv = [args.mxward, "--config", str(config), "config-check"]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        tail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-8:])
        raise BenchError(
            f"mxward does not accept the benchmark's configuration ({' '.join(argv)} exited with "
            f"{result.returncode}):\n{tail}\nAdjust mxward_filter_config() in {Path(__file__).name}, "
            "or run without mxward: --servers passthrough,sink"
        )


def preflight(args: argparse.Namespace) -> None:
    """Fail before starting anything if a tool is missing."""
    for path in (args.smtp_source, args.smtp_sink):
        if shutil.which(path) is None:
            raise BenchError(
                f"{path} not found: install Postfix's tools (apt-get install postfix, with debconf's "
                '"No configuration"; tests/run.sh does this)'
            )
    if "passthrough" in args.servers:
        missing = [name for name in ("aiosmtpd", "aiosmtplib") if importlib.util.find_spec(name) is None]
        if missing:
            raise BenchError(
                f"the pass-through relay needs {' and '.join(missing)}, which {sys.executable} cannot "
                "import. Run the benchmark with the project's venv (.venv/bin/python) and install "
                "aiosmtplib into it: .venv/bin/pip install aiosmtplib (a benchmark-only package, not "
                "an mxward dependency); or leave the pass-through out: --servers mxward,sink"
            )
        if args.passthrough_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise BenchError("--passthrough-loop uvloop: uvloop is not installed")
    if "mxward" in args.servers:
        for path in (args.mxward, args.redis_server):
            if shutil.which(path) is None:
                raise BenchError(f"mxward: {path} not found or not executable")
        mxward_preflight(args)
    if args.workload == "signed":
        if shutil.which(args.openssl) is None:
            raise BenchError(f"the signed workload makes its key with openssl: {args.openssl} not found")
        result = subprocess.run(
            [args.perl, "-MMail::DKIM::Signer", "-MMail::DKIM::TextWrap", "-e", "1"],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        if result.returncode != 0:
            raise BenchError(
                f"the signed workload signs with Perl's Mail::DKIM, which {args.perl} cannot load "
                "(Debian: apt-get install libmail-dkim-perl)"
            )
    if "pinned" in args.pinnings:
        if shutil.which("taskset") is None:
            raise BenchError("pinning needs taskset (util-linux)")
        if not {0, 1} <= os.sched_getaffinity(0):
            raise BenchError("pinning needs cores 0 and 1 (server on core 0, load on core 1)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preflight(args)
    except BenchError as exc:
        print(f"filter_bench: {exc}", file=sys.stderr)
        return 2
    env = environment(args)
    measurements: list[Measurement] = []
    tmp = Path(tempfile.mkdtemp(prefix="filter-bench-"))
    tmp.chmod(0o755)
    status = 0
    try:
        with sigterm_as_interrupt():
            if args.workload == "signed":
                args.signed = prepare_signed(args, tmp / "signed")
            for pinning in args.pinnings:
                measure_mode(args, pinning, tmp / pinning, measurements)
    except KeyboardInterrupt:
        args.interrupted = "stopped by signal; the tables hold the runs that finished"
        print("\nfilter_bench: interrupted; servers stopped", file=sys.stderr)
        status = 130
    except (BenchError, OSError, ConnectionError) as exc:
        args.interrupted = (
            f"stopped by an error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )
        print(f"\nfilter_bench: error: {exc}", file=sys.stderr)
        status = 1
    finally:
        if args.keep_tmp or status == 1:
            print(f"filter_bench: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if any(m.runs or m.error for m in measurements):
        text = report(args, env, measurements)
        print("\n" + text)
        save(args, env, measurements, text)
    unverified = sum(r.not_as_signed for m in measurements for r in m.runs)
    if unverified:
        print(
            f"filter_bench: FAILED: {unverified} measured messages did not arrive as they must (lost, "
            "changed, or without dkim=pass and dmarc=pass): see 'Delivery failures and warnings'",
            file=sys.stderr,
        )
    if status == 0 and any(m.error or any(r.failures for r in m.runs) for m in measurements):
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

# endregion
