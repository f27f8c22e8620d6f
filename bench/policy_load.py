#!/usr/bin/env python3
"""policy_load: load generator for Postfix policy delegation servers.

Sends RCPT-stage ``smtpd_access_policy`` requests with the full attribute set Postfix 3.7 sends
(about 700 bytes, in Postfix's order) over ``-c`` connections. Each connection has one request in
flight and sends the next one as soon as the reply arrives, as an smtpd process does.

Usage::

    policy_load.py 127.0.0.1:10023 [-c 16] [-d 5] [-w 1] [--repeat 5] [--pause 1]
                   [--pool 0|N] [--start N] [-n COUNT] [--server-pid PID ...]
                   [--dns-stats HOST:PORT] [--json FILE]
    policy_load.py unix:/path/to/socket ...

Workloads:
    --pool 0  a brand-new client/sender/recipient triplet on every request (the greylisting worst case).
              Numbers start at a random offset (``--start``), so two invocations do not share triplets.
    --pool N  cycle over N fixed triplets (numbers ``--start`` .. ``--start``+N-1, default 0..N-1). Every
              invocation with the same N uses the same triplets, so a server can be warmed beforehand
              (``-n N --pool N`` sends each triplet exactly once).

Triplet number n gives: client_address in 198.18.0.0/15 (254 hosts per /24), client_name ``unknown`` for
one n in ten and ``mail-198-18-A-B.static.ispK.clients.test`` otherwise, sender
``userN@dK.senders.test`` (50 domains) and recipient ``userN@example.test``. ``instance`` is unique
per request, in Postfix's format ``<pid hex>.<seconds hex>.<microseconds hex>.<sequence hex>``.

Measurement: after ``-w`` seconds of unmeasured warm-up, ``--repeat`` runs of ``-d`` seconds each, with
``--pause`` seconds of no load between runs. A reply counts in a run if it arrives inside the run's
window. Server CPU is utime+stime (plus the times of reaped children) of each ``--server-pid`` and all
its descendants, read from /proc at the window's edges. Each ``--server-pid`` is reported as its own
group and in the total (pass a Redis PID as a second ``--server-pid`` to see it apart). With ``-n`` each
run sends exactly COUNT requests instead (no warm-up unless ``-w`` is given, one run unless
``--repeat`` is given).

DNS: with ``--dns-stats HOST:PORT`` (the control socket of ``fake_dns.py``, the benchmark's DNS
server), the questions the DNS server received and the CPU it used are read at the same window edges
and reported per request: how much DNS the server under test asks for, and what the DNS server cost
on its core.

Output: one line per run, then min/median/max over the runs of req/s, p50/p99 latency, server CPU %,
server CPU µs per request and the generator's own CPU µs per request (and DNS questions and DNS
server CPU per request with ``--dns-stats``), and a histogram of the action verbs (first word after
``action=``). ``--json FILE`` writes every number. Exit status 1 if the server closes a connection,
stops answering for ``--timeout`` seconds, or cannot be reached.

The module also serves ``policy_bench.py`` as a library: ``Target``, ``probe``, ``build_request`` and
the triplet functions (``client_address``, ``client_name``, ``helo_name``, ``sender_domain``) from
which the benchmark builds its DNS data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

CLIENT_NETS = 512  # the /24 networks of 198.18.0.0/15
HOSTS_PER_NET = 254  # .1 .. .254
SENDER_DOMAINS = 50
CLK_TCK = os.sysconf("SC_CLK_TCK")


# region #### targets ####


@dataclass(frozen=True, slots=True)
class Target:
    """Where the policy server listens: ``host:port`` or ``unix:/path``."""

    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Target:
        if text.startswith("unix:"):
            return cls(path=text[5:])
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target {text!r}: expected host:port or unix:/path")
        return cls(host=host.strip("[]"), port=int(port))

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    def connect_socket(self, timeout: float) -> socket.socket:
        """A blocking socket connected to the target (for probes)."""
        if self.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection((self.host, self.port), timeout=timeout)


# endregion
# region #### requests ####


def client_address(n: int) -> str:
    net, host = divmod(n % (CLIENT_NETS * HOSTS_PER_NET), HOSTS_PER_NET)
    return f"198.{18 + net // 256}.{net % 256}.{host + 1}"


def client_name(n: int, address: str = "") -> str:
    """Postfix's ``client_name`` of triplet n: ``unknown`` for one n in ten, else a host name."""
    if n % 10 == 0:
        return "unknown"
    address = address or client_address(n)
    return f"mail-{address.replace('.', '-')}.static.isp{n % 100}.clients.test"


def helo_name(n: int, address: str = "") -> str:
    """The HELO name of triplet n: its client name, or ``hostN.helo.test`` when that is unknown."""
    name = client_name(n, address)
    return f"host{n}.helo.test" if name == "unknown" else name


def sender_domain(n: int) -> str:
    return f"d{n % SENDER_DOMAINS}.senders.test"


def request_parts(n: int, address: str = "", user: str = "") -> tuple[bytes, bytes]:
    """The request for triplet n, split around the ``instance`` value: (head, tail).

    The head ends with ``instance=``; the tail starts with the LF that ends the instance line and ends
    with the empty line that ends the request. ``address`` and ``user`` replace the client address and
    the local parts of sender and recipient (``userN``).
    """
    address = address or client_address(n)
    user = user or f"user{n}"
    name = client_name(n, address)
    helo = helo_name(n, address)
    head = (
        "request=smtpd_access_policy\n"
        "protocol_state=RCPT\n"
        "protocol_name=ESMTP\n"
        f"client_address={address}\n"
        f"client_name={name}\n"
        f"client_port={1024 + n * 7919 % 64000}\n"
        f"reverse_client_name={name}\n"
        "server_address=192.0.2.25\n"
        "server_port=25\n"
        f"helo_name={helo}\n"
        f"sender={user}@{sender_domain(n)}\n"
        f"recipient={user}@example.test\n"
        "recipient_count=0\n"
        "queue_id=\n"
        "instance="
    )
    tail = (
        "\n"
        f"size={1000 + n * 2654435761 % 200000}\n"
        "etrn_domain=\n"
        "stress=\n"
        "sasl_method=\n"
        "sasl_username=\n"
        "sasl_sender=\n"
        "ccert_subject=\n"
        "ccert_issuer=\n"
        "ccert_fingerprint=\n"
        "ccert_pubkey_fingerprint=\n"
        "encryption_protocol=TLSv1.3\n"
        "encryption_cipher=TLS_AES_256_GCM_SHA384\n"
        "encryption_keysize=256\n"
        "policy_context=\n"
        "\n"
    )
    return head.encode(), tail.encode()


def instance_prefix(serial: int) -> bytes:
    """``<pid hex>.<seconds hex>.<microseconds hex>.`` for one connection; the sequence number follows.

    ``serial`` (the connection's index) is added to the microseconds so that connections opened in the
    same microsecond still get distinct instances.
    """
    now = time.time_ns() // 1000 + serial
    seconds, micros = divmod(now, 1_000_000)
    return f"{os.getpid():x}.{seconds:x}.{micros:x}.".encode()


def build_request(n: int, instance: str = "1.2.3.4") -> bytes:
    head, tail = request_parts(n)
    return head + instance.encode() + tail


def build_probe_request() -> bytes:
    """A full request for a triplet outside every workload (client 192.0.2.1), for readiness probes."""
    head, tail = request_parts(1, address="192.0.2.1", user="probe")
    return head + instance_prefix(0) + b"0" + tail


def read_reply(sock: socket.socket) -> bytes:
    buf = b""
    while b"\n\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed the connection before replying")
        buf += chunk
    return buf[: buf.index(b"\n\n")]


def probe(target: Target, timeout: float = 2.0) -> str:
    """Send one probe request on a new connection and return the reply (raises OSError on failure)."""
    with target.connect_socket(timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(build_probe_request())
        return read_reply(sock).decode(errors="replace")


def action_verb(reply: bytes) -> bytes:
    """The first word of the ``action=`` attribute of one reply, or ``(none)``."""
    for line in reply.split(b"\n"):
        if line.startswith(b"action="):
            words = line[7:].split(None, 1)
            return words[0] if words else b"(empty)"
    return b"(none)"


# endregion
# region #### CPU accounting ####


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].decode().split()


def _children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs, for every process (/proc/*/task/*/children is not always built in)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(root: int, children: dict[int, list[int]] | None = None) -> list[int]:
    """root and all its descendants that are alive now."""
    if children is None:
        children = _children_map()
    tree = [root]
    i = 0
    while i < len(tree):
        tree.extend(children.get(tree[i], ()))
        i += 1
    return tree


def tree_cpu_seconds(roots: list[int]) -> list[float]:
    """For each root, utime+stime+cutime+cstime of the root and all its descendants, in seconds.

    cutime/cstime hold the time of children that have exited and been reaped, so a worker that exits
    inside a window still counts. Raises ProcessLookupError if a root is gone.
    """
    children = _children_map()
    totals = []
    for root in roots:
        ticks = 0
        for pid in process_tree(root, children):
            fields = stat_fields(pid)
            if fields is None:
                if pid == root:
                    raise ProcessLookupError(f"server process {root} is gone")
                continue
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        totals.append(ticks / CLK_TCK)
    return totals


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def dns_counters(address: str, timeout: float = 2.0) -> tuple[int, float]:
    """(questions received, CPU seconds) of ``fake_dns.py``, asked at its control ``host:port``."""
    target = Target.parse(address)
    with socket.socket(socket.AF_INET6 if ":" in target.host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(b"stats", (target.host, target.port))
        document = json.loads(sock.recv(65536))
    return int(document["queries"]), float(document["cpu_s"])


# endregion
# region #### load ####


class LoadError(Exception):
    """The server misbehaved: closed a connection, stopped answering, or could not be reached."""


class Load:
    """Shared state of all connections: where requests come from, and what the current run records."""

    def __init__(self, pool: int, start: int) -> None:
        self.pool = [request_parts(start + i) for i in range(pool)]  # prebuilt; empty with --pool 0
        self.start = start
        self.counter = 0  # requests handed out, over all connections
        self.limit = 0  # with -n: stop handing out requests at this counter value
        self.sending = False
        self.recording = False
        self.latencies: list[float] = []
        self.actions: dict[bytes, int] = {}
        self.in_flight = 0
        self.last_reply = 0.0
        self.idle: list[PolicyClient] = []
        self.error: LoadError | None = None
        self.changed = asyncio.Event()  # set when in_flight drops to 0 or an error occurs

    def next_parts(self) -> tuple[bytes, bytes] | None:
        i = self.counter
        if self.limit and i >= self.limit:
            return None
        self.counter = i + 1
        if self.pool:
            return self.pool[i % len(self.pool)]
        return request_parts(self.start + i)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = LoadError(message)
        self.sending = False
        self.changed.set()

    def kick(self) -> None:
        """Resume sending on every idle connection."""
        self.last_reply = time.perf_counter()
        idle, self.idle = self.idle, []
        for client in idle:
            client.send_next()


class PolicyClient(asyncio.Protocol):
    """One policy connection with one request in flight at a time."""

    def __init__(self, load: Load, serial: int) -> None:
        self.load = load
        self.prefix = instance_prefix(serial)
        self.seq = 0
        self.buf = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods
        self.transport = cast("asyncio.Transport", transport)
        self.load.idle.append(self)

    def send_next(self) -> None:
        load = self.load
        parts = load.next_parts() if load.sending else None
        if parts is None or self.transport is None:
            load.idle.append(self)
            if load.in_flight == 0:
                load.changed.set()
            return
        head, tail = parts
        self.seq += 1
        load.in_flight += 1
        self.sent_at = time.perf_counter()
        self.transport.write(b"%b%b%x%b" % (head, self.prefix, self.seq, tail))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        end = buf.find(b"\n\n")
        if end < 0:
            self.buf = buf
            return
        now = time.perf_counter()
        load = self.load
        reply = buf[:end]
        self.buf = buf[end + 2 :]
        if self.buf:
            load.fail(f"unexpected data after a reply: {self.buf[:80]!r}")
            return
        load.in_flight -= 1
        load.last_reply = now
        if load.recording:
            load.latencies.append(now - self.sent_at)
            if reply.startswith(b"action=") and b"\n" not in reply:
                space = reply.find(b" ")
                verb = reply[7:space] if space > 0 else reply[7:]
            else:
                verb = action_verb(reply)
            load.actions[verb] = load.actions.get(verb, 0) + 1
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.load.fail(f"server closed a connection ({exc or 'EOF'})")


# endregion
# region #### runs ####


@dataclass(slots=True)
class RunResult:
    requests: int
    seconds: float
    req_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_pct: float
    server_cpu_us_per_req: float
    groups: list[dict[str, float]]  # per --server-pid: pid, cpu_pct, cpu_us_per_req
    gen_cpu_pct: float
    gen_cpu_us_per_req: float
    actions: dict[str, int] = field(default_factory=dict)
    dns_queries_per_req: float = float("nan")  # with --dns-stats: questions the DNS server received
    dns_cpu_us_per_req: float = float("nan")  # and the DNS server's CPU


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def per_request(cpu_seconds: float, requests: int) -> float:
    return cpu_seconds * 1e6 / requests if requests else float("nan")


async def wait_drained(load: Load) -> None:
    """Wait until no request is in flight and none is left to send, or an error (see watchdog)."""
    while load.in_flight and load.error is None:
        load.changed.clear()
        await load.changed.wait()


async def sleep_unless_error(load: Load, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while load.error is None and (remaining := deadline - loop.time()) > 0:
        load.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(remaining):
                await load.changed.wait()


async def watchdog(load: Load, timeout: float) -> None:
    """Fail the load if requests are in flight but no reply arrived for timeout seconds."""
    while True:
        await asyncio.sleep(min(1.0, timeout / 4))
        if load.in_flight and time.perf_counter() - load.last_reply > timeout:
            load.fail(f"no reply for {timeout:g} s ({load.in_flight} requests in flight)")
            return


async def measured_run(load: Load, args: argparse.Namespace) -> RunResult:
    load.latencies = []
    load.actions = {}
    dns0 = dns_counters(args.dns_stats) if args.dns_stats else (0, 0.0)
    server0 = tree_cpu_seconds(args.server_pid) if args.server_pid else []
    gen0 = own_cpu_seconds()
    t0 = time.perf_counter()
    load.recording = True
    if args.count:
        load.limit = load.counter + args.count
    load.sending = True
    load.kick()
    if args.count:
        await wait_drained(load)
    else:
        await sleep_unless_error(load, args.duration)
    load.recording = False
    t1 = time.perf_counter()
    gen1 = own_cpu_seconds()
    server1 = tree_cpu_seconds(args.server_pid) if args.server_pid else []
    dns1 = dns_counters(args.dns_stats) if args.dns_stats else (0, 0.0)
    if load.error is not None:
        raise load.error
    seconds = t1 - t0
    requests = len(load.latencies)
    if not requests:
        raise LoadError("no reply arrived during the run")
    lat = sorted(load.latencies)
    deltas = [b - a for a, b in zip(server0, server1, strict=True)]
    total = sum(deltas)
    groups = [
        {"pid": pid, "cpu_pct": 100 * d / seconds, "cpu_us_per_req": per_request(d, requests)}
        for pid, d in zip(args.server_pid, deltas, strict=True)
    ]
    return RunResult(
        requests=requests,
        seconds=seconds,
        req_s=requests / seconds,
        p50_ms=percentile(lat, 50) * 1e3,
        p99_ms=percentile(lat, 99) * 1e3,
        server_cpu_pct=100 * total / seconds if args.server_pid else float("nan"),
        server_cpu_us_per_req=per_request(total, requests) if args.server_pid else float("nan"),
        groups=groups,
        gen_cpu_pct=100 * (gen1 - gen0) / seconds,
        gen_cpu_us_per_req=per_request(gen1 - gen0, requests),
        actions={k.decode(errors="replace"): v for k, v in sorted(load.actions.items())},
        dns_queries_per_req=(dns1[0] - dns0[0]) / requests if args.dns_stats else float("nan"),
        dns_cpu_us_per_req=per_request(dns1[1] - dns0[1], requests) if args.dns_stats else float("nan"),
    )


def format_actions(actions: dict[str, int]) -> str:
    total = sum(actions.values()) or 1
    items = sorted(actions.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{verb} {100 * n / total:.4g}%" for verb, n in items) or "-"


def format_run(label: str, r: RunResult) -> str:
    cpu = f"server CPU {r.server_cpu_pct:5.1f} % {r.server_cpu_us_per_req:7.1f} µs/req" if r.groups else ""
    if len(r.groups) > 1:
        cpu += " (" + " + ".join(f"{g['cpu_us_per_req']:.1f}" for g in r.groups) + ")"
    dns = "" if math.isnan(r.dns_queries_per_req) else f"  dns {r.dns_queries_per_req:.2f} q/req"
    return (
        f"{label}: {r.req_s:9.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  {cpu}"
        f"  gen {r.gen_cpu_us_per_req:5.1f} µs/req{dns}  [{format_actions(r.actions)}]"
    )


SUMMARY_METRICS = (
    ("req_s", "req/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("server_cpu_pct", "server CPU %", "{:.1f}"),
    ("server_cpu_us_per_req", "server CPU µs/req", "{:.1f}"),
    ("gen_cpu_pct", "generator CPU %", "{:.1f}"),
    ("gen_cpu_us_per_req", "generator CPU µs/req", "{:.1f}"),
    ("dns_queries_per_req", "DNS queries/req", "{:.2f}"),
    ("dns_cpu_us_per_req", "DNS server CPU µs/req", "{:.1f}"),
)


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """min/median/max of each metric over the runs, per-group CPU, and the summed action histogram."""
    summary: dict[str, Any] = {}
    for key, _, _ in SUMMARY_METRICS:
        values = [getattr(r, key) for r in runs]
        summary[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    summary["groups"] = [
        {
            "pid": group["pid"],
            "cpu_pct": statistics.median(r.groups[i]["cpu_pct"] for r in runs),
            "cpu_us_per_req": statistics.median(r.groups[i]["cpu_us_per_req"] for r in runs),
        }
        for i, group in enumerate(runs[0].groups)
    ]
    actions: dict[str, int] = {}
    for r in runs:
        for verb, n in r.actions.items():
            actions[verb] = actions.get(verb, 0) + n
    summary["actions"] = actions
    summary["requests"] = sum(r.requests for r in runs)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    print(f"{'':22} {'min':>10} {'median':>10} {'max':>10}")
    for key, title, fmt in SUMMARY_METRICS:
        s = summary[key]
        if math.isnan(s["median"]):
            continue  # not measured (DNS counters without --dns-stats)
        print(f"{title:22} " + " ".join(f"{fmt.format(s[k]):>10}" for k in ("min", "median", "max")))
    for group in summary["groups"]:
        print(
            f"  pid {group['pid']} and descendants: median {group['cpu_pct']:.1f} % CPU,"
            f" {group['cpu_us_per_req']:.1f} µs/req"
        )
    print(f"actions: {format_actions(summary['actions'])} ({summary['requests']} requests)")


async def connect_all(load: Load, target: Target, connections: int, timeout: float) -> list[PolicyClient]:
    loop = asyncio.get_running_loop()

    async def one(serial: int) -> PolicyClient:
        client = PolicyClient(load, serial)
        async with asyncio.timeout(timeout):
            if target.path:
                await loop.create_unix_connection(lambda: client, target.path)
            else:
                await loop.create_connection(lambda: client, target.host, target.port)
        return client

    try:
        return list(await asyncio.gather(*(one(i) for i in range(connections))))
    except (OSError, TimeoutError) as exc:
        raise LoadError(f"cannot connect to {target}: {exc!r}") from exc


async def run(args: argparse.Namespace) -> list[RunResult]:
    load = Load(args.pool, args.start)
    clients = await connect_all(load, Target.parse(args.target), args.connections, args.timeout)
    dog = asyncio.create_task(watchdog(load, args.timeout))
    results: list[RunResult] = []
    try:
        if args.warmup > 0:
            load.sending = True
            load.kick()
            await sleep_unless_error(load, args.warmup)
            if load.error is not None:
                raise load.error
        for i in range(args.repeat):
            if (i and args.pause > 0) or args.count:
                load.sending = False
                await wait_drained(load)
                if load.error is not None:
                    raise load.error
                if i and args.pause > 0:
                    await asyncio.sleep(args.pause)
            result = await measured_run(load, args)
            results.append(result)
            print(format_run(f"run {i + 1}/{args.repeat}", result), flush=True)
        load.sending = False
        await wait_drained(load)
    finally:
        dog.cancel()
        for client in clients:
            client.closing = True
            if client.transport is not None:
                client.transport.close()
    return results


# endregion
# region #### main ####


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Load generator for Postfix policy servers (RCPT-stage smtpd_access_policy requests).",
    )
    parser.add_argument("target", help="host:port or unix:/path")
    parser.add_argument("-c", "--connections", type=int, default=16, help="connections (default 16)")
    parser.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per measured run (5)")
    parser.add_argument(
        "-w", "--warmup", type=float, default=None, help="unmeasured warm-up seconds (1; 0 with -n)"
    )
    parser.add_argument("--repeat", type=int, default=None, help="measured runs (5; 1 with -n)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds without load between runs (1)")
    parser.add_argument(
        "-n", "--count", type=int, default=0, help="send exactly COUNT requests per run instead of -d"
    )
    parser.add_argument(
        "--pool", type=int, default=0, help="0: a new triplet on every request; N: cycle over N triplets"
    )
    parser.add_argument(
        "--start", type=int, default=None, help="first triplet number (0 with --pool N, random with --pool 0)"
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        action="append",
        default=[],
        help="count CPU of this PID and its descendants (repeatable; each is also reported apart)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="fail if no reply arrives for this many seconds (10)"
    )
    parser.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="auto: uvloop if installed"
    )
    parser.add_argument(
        "--dns-stats",
        metavar="HOST:PORT",
        help="control address of fake_dns.py: count its questions and CPU per request in each run",
    )
    parser.add_argument("--json", metavar="FILE", help="write all numbers to FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the per-run lines")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 0.0 if args.count else 1.0
    if args.repeat is None:
        args.repeat = 1 if args.count else 5
    if args.start is None:
        args.start = 0 if args.pool else random.randrange(10**6, 10**9)
    if args.connections < 1 or args.repeat < 1 or args.pool < 0 or args.count < 0:
        parser.error("-c and --repeat must be >= 1, --pool and -n >= 0")
    try:
        Target.parse(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def event_loop_factory(choice: str) -> tuple[str, Any]:
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loop_name, factory = event_loop_factory(args.loop)
    for pid in args.server_pid:
        if stat_fields(pid) is None:
            print(f"policy_load: no process {pid}", file=sys.stderr)
            return 1
    if not args.quiet:
        what = f"-n {args.count}" if args.count else f"-d {args.duration:g}"
        print(
            f"policy_load: {args.target} -c {args.connections} {what} -w {args.warmup:g}"
            f" --repeat {args.repeat} --pool {args.pool} --start {args.start} ({loop_name})",
            flush=True,
        )
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            results = runner.run(run(args))
    except (LoadError, ProcessLookupError) as exc:
        print(f"policy_load: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    summary = summarize(results)
    if not args.quiet:
        print_summary(summary)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in {"json", "quiet"}}
        document = {
            "config": config | {"event_loop": loop_name},
            "runs": [asdict(r) for r in results],
            "summary": summary,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# endregion
