#!/usr/bin/env python3
"""policy_bench: postgrey, spf-engine and mxward policyd side by side, same workloads, one invocation.

Run from the repository root, as root::

    .venv/bin/python bench/policy_bench.py                 # unpinned, every server, every workload
    .venv/bin/python bench/policy_bench.py --pinning both  # unpinned, then pinned (server on core 0)
    .venv/bin/python bench/policy_bench.py --only postgrey --dummy   # without mxward
    .venv/bin/python bench/policy_bench.py --workload spf,full       # mxward against spf-engine

For each pinning mode and each workload, each server that runs the workload is started fresh in a
temporary directory on a free loopback port, made ready (polled with a deadline), loaded with
``policy_load.py`` in a separate process, and stopped. Workloads:

new    ``--pool 0``: a new client/sender/recipient triplet on every request, so every request is
       greylisted. postgrey runs with ``--delay=300``, mxward with ``[checks.greylist] delay = "5m"``.
known  ``--pool 1000``: 1000 triplets that have already passed greylisting. The server starts with a
       1-second delay (postgrey ``--delay=1``, mxward ``delay = "1s"``); one pass over the pool (each
       triplet deferred), 2 s wait, a second pass (each triplet passes), then the measurement.
spf    SPF only, spf-engine against mxward with ``checks = ["spf"]``: the pool of 1000 triplets, the
       even ones with an SPF pass, the odd ones with an SPF fail (550). One warm-up pass over the
       pool, then the measurement.
full   mxward's whole envelope pipeline on the same pool: karma, dnsbl, helo, fcrdns, spf and
       greylist (``--full-checks``), with a warm DNS cache and known triplets: two passes as in
       ``known`` (the second also finds every DNS answer cached), then the measurement.

DNS (spf and full): ``fake_dns.py`` serves ``data/policy-bench.zone`` plus the records generated
here for the pool (PTR and A for nine clients in ten, a DNS block list listing one client in
twenty) on port 53 of a random 127.53.x.y address, started fresh for each measurement and pinned
with the generator. mxward asks it through ``[dns] nameservers``. spf-engine reads resolv.conf, so
it runs in a private mount namespace (``unshare --mount``) where a resolv.conf naming that address
is bind-mounted over /etc/resolv.conf; the system's file is never changed, and no query leaves the
machine.

Servers:
postgrey    ``/usr/sbin/postgrey --inet=127.0.0.1:PORT --dbdir=DIR --delay=N``; its DB directory is
            owned by the ``postgrey`` user (postgrey drops root to it). One process. new, known.
spf-engine  ``policyd-spf`` (Debian's postfix-policyd-spf-python, its Debian default configuration)
            behind ``socat TCP-LISTEN:PORT,fork EXEC:'policyd-spf CONF',nofork``: one process per
            connection, as Postfix's spawn(8) runs it. spf only.
mxward      a private ``redis-server`` on a unix socket (no TCP, no persistence), then
            ``mxward --config FILE policyd`` with ``workers = 0`` (one per core it may use: 2
            unpinned, 1 pinned to core 0): ``checks = ["greylist"]`` for new
            and known, ``["spf"]`` for spf, the full pipeline for full (check settings from
            ``data/full-pipeline.toml``). The CPU of the whole mxward process tree is counted, and
            Redis's CPU is reported both included and apart.
dummy       (``--dummy`` or ``--only dummy``) a DUNNO server in this file: the protocol ceiling.

Pinning: ``unpinned`` (default) pins nothing. ``pinned`` runs the server and its Redis with
``taskset -c 0`` and the generator (and the DNS server) with ``taskset -c 1``.

The generator's settings match the baseline (perf-baseline.md): 16 connections, 1 s warm-up (4 s in
the spf and full workloads: spf-engine's per-connection processes start, and every mxward worker
caches the pool's DNS answers), 5 runs of 5 s, 1 s pause. The table
and the JSON go to ``bench/results/`` (gitignored). Everything started is stopped at the end, also
on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import platform
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import policy_load
from policy_load import Target

if TYPE_CHECKING:
    from collections.abc import Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LOAD = HERE / "policy_load.py"
FAKE_DNS = HERE / "fake_dns.py"
DATA = HERE / "data"
SERVERS = ("postgrey", "mxward", "spf-engine", "dummy")
WORKLOADS = ("new", "known", "spf", "full")
RUNS_ON = {  # the servers that run each workload
    "new": ("postgrey", "mxward", "dummy"),
    "known": ("postgrey", "mxward", "dummy"),
    "spf": ("spf-engine", "mxward", "dummy"),
    "full": ("mxward", "dummy"),
}
DNS_WORKLOADS = ("spf", "full")
FULL_CHECKS = ("karma", "dnsbl", "helo", "fcrdns", "spf", "greylist")
KNOWN_WAIT = 2.0  # seconds between the two passes of the known and full workloads (delay is 1 s)
# Seconds of unmeasured load on the measured connections, at least, in the spf and full workloads:
# spf-engine's 16 per-connection processes start, and every mxward worker that holds one of the
# connections has each pool triplet's DNS answers cached (each worker process has its own cache).
DNS_WARMUP = 4.0
# The spf/full pool's clients must stay in 198.18.0.0/16, which the even sender domains authorise
# (data/policy-bench.zone): even triplets pass SPF, odd ones fail.
MAX_DNS_POOL = 256 * policy_load.HOSTS_PER_NET
LISTED_EVERY, LISTED_AT = 20, 4  # triplets n with n % 20 == 4 (SPF pass clients) are block-listed
DNSBL_ZONE = "bl.bench.test"


class BenchError(Exception):
    """A server did not start, died, or the generator failed."""


# region #### processes ####


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a PID from a reused one)."""
    fields = policy_load.stat_fields(pid)
    return int(fields[19]) if fields is not None else None


def session_members(session: int, started_after: int) -> list[int]:
    """Processes of a session (started by us), including orphans that left the process tree."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = policy_load.stat_fields(int(entry))
            if fields is not None and int(fields[3]) == session and int(fields[19]) >= started_after:
                members.append(int(entry))
    return members


class Proc:
    """A server process started in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, core: int | None) -> None:
        self.name = name
        self.log = log
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        self.argv = argv
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.pid = self.popen.pid
        self.started = start_time(self.pid) or 0

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.popen.returncode}\n"
                f"command: {' '.join(self.argv)}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- last lines of {self.log} ---\n" + "\n".join(text)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout; then SIGKILL any descendant it left behind."""
        tree = [(pid, start_time(pid)) for pid in policy_load.process_tree(self.pid)[1:]]
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"policy_bench: {self.name} ignored SIGTERM for {timeout:g} s", file=sys.stderr)
                self.popen.kill()
                self.popen.wait()
        leftovers = {pid for pid, started in tree if started is not None and start_time(pid) == started}
        leftovers.update(session_members(self.pid, self.started))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_until(what: str, ready: Any, procs: list[Proc], timeout: float) -> Any:
    """Call ready() until it returns without OSError; fail if a process dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            proc.check_alive()
        try:
            return ready()
        except OSError as exc:
            if time.monotonic() > deadline:
                tails = "\n".join(p.log_tail() for p in procs)
                raise BenchError(f"{what} not ready after {timeout:g} s: {exc!r}\n{tails}") from exc
        time.sleep(0.05)


def redis_ping(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        sock.connect(str(path))
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b"+PONG"):
        raise ConnectionError(f"unexpected reply to PING: {reply!r}")


# endregion
# region #### DNS ####

SOA = "@  SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 604800 3600\n@  NS  ns.bench.test.\n"


def listed(n: int) -> bool:
    return n % LISTED_EVERY == LISTED_AT


def client_zone(start: int, size: int) -> str:
    """DNS data for triplets start..start+size-1: PTR and A of named clients, and the block list.

    A client with a ``client_name`` (nine in ten) has a PTR record naming it and an A record of that
    name giving its address back (iprev pass; its HELO name is the same name). The others have no
    PTR (iprev permerror) and greet as ``hostN.helo.test``, which does not exist. One client in
    twenty is listed on ``bl.bench.test`` (127.0.0.2 with a TXT reason); the zone also has the
    RFC 5782 test entries, so health probes find it sane.
    """
    forward: list[str] = []
    reverse: dict[str, list[str]] = {"18": [], "19": []}
    block_list: list[str] = []
    for n in range(start, start + size):
        address = policy_load.client_address(n)
        octets = address.split(".")
        name = policy_load.client_name(n)
        if name != "unknown":
            forward.append(f"{name.removesuffix('.clients.test')}  A  {address}")
            reverse[octets[1]].append(f"{octets[3]}.{octets[2]}  PTR  {name}.")
        if listed(n):
            owner = ".".join(reversed(octets))
            block_list.append(f"{owner}  A  127.0.0.2")
            block_list.append(
                f'{owner}  TXT  "Listed by {DNSBL_ZONE}: see https://{DNSBL_ZONE}/?ip={address}"'
            )
    ipv6_test = ipaddress.ip_address("::ffff:7f00:2").reverse_pointer.removesuffix(".ip6.arpa")
    parts = [
        "; Generated by policy_bench.py for the spf and full workloads' pool.",
        "$TTL 86400",
        "$ORIGIN clients.test.",
        SOA,
        *forward,
        "$ORIGIN 18.198.in-addr.arpa.",
        SOA,
        *reverse["18"],
        "$ORIGIN 19.198.in-addr.arpa.",
        SOA,
        *reverse["19"],
        f"$ORIGIN {DNSBL_ZONE}.",
        SOA,
        "2.0.0.127  A  127.0.0.2",
        '2.0.0.127  TXT  "RFC 5782 test entry"',
        f"{ipv6_test}  A  127.0.0.2",
        *block_list,
    ]
    return "\n".join(parts) + "\n"


@dataclass
class FakeDns:
    """The benchmark's DNS server: where it answers, and its control socket for the counters."""

    proc: Proc
    host: str
    port: int
    control: str

    @property
    def nameserver(self) -> str:
        """The ``[dns] nameservers`` entry: ``host:port``."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.proc.stop()


def can_bind(host: str, port: int) -> bool:
    """Whether UDP and TCP ``port`` are both free on ``host``."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind((host, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
    except OSError:
        return False
    return True


def dns_address() -> tuple[str, int]:
    """Port 53 on a free random 127.53.x.y (programs reading resolv.conf need port 53; that needs
    root); without root a free port on 127.0.0.1 (enough for mxward, which takes host:port)."""
    if os.geteuid() != 0:
        return "127.0.0.1", free_port()
    for _ in range(50):
        host = f"127.53.{random.randrange(256)}.{random.randrange(1, 255)}"
        if can_bind(host, 53):
            return host, 53
    raise BenchError("no free port 53 on 127.53.0.0/16 for the DNS server")


def read_ready(path: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"{path.name} not written yet") from exc
    return document


def start_dns(args: argparse.Namespace, workdir: Path, core: int | None) -> FakeDns:
    size = args.pool_size
    clients = workdir / "clients.zone"
    clients.write_text(client_zone(0, size), encoding="utf-8")
    host, port = dns_address()
    ready = workdir / "fake_dns.ready"
    argv = [
        sys.executable, str(FAKE_DNS), f"--listen={host}:{port}", f"--zone={args.zone}",
        f"--zone={clients}", f"--ready={ready}",
    ]  # fmt: skip
    proc = Proc("fake_dns", argv, workdir / "fake_dns.log", core)
    try:
        document = wait_until("fake_dns", lambda: read_ready(ready), [proc], args.ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return FakeDns(proc, host, port, f"{host}:{document['control']}")


# endregion
# region #### servers ####


@dataclass
class Server:
    """One started server: where it listens, and the process groups whose CPU counts."""

    kind: str
    target: Target
    procs: list[Proc]  # CPU groups, in order: the server first, then helpers (Redis)
    group_names: list[str]
    probe_reply: str = ""

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def start_postgrey(args: argparse.Namespace, workdir: Path, delay_s: int, core: int | None) -> Server:
    dbdir = workdir / "postgrey-db"
    dbdir.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgrey")
        os.chown(dbdir, user.pw_uid, user.pw_gid)
    port = free_port()
    argv = [args.postgrey, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}", f"--delay={delay_s}"]
    proc = Proc("postgrey", argv, workdir / "postgrey.log", core)
    return Server("postgrey", Target("127.0.0.1", port), [proc], ["postgrey"])


MXWARD_CONFIG = """\
[mxward]
data_dir = "{workdir}/data"
log_level = "info"
log_target = "file:{workdir}/mxward.log"

[state]
url = "unix://{workdir}/redis.sock"

[policyd]
listen = ["127.0.0.1:{port}"]
workers = {workers}
checks = ["greylist"]

[checks.greylist]
delay = "{delay}"
"""

# The spf and full workloads: the checks' tables come from --checks-config.
MXWARD_DNS_CONFIG = """\
[mxward]
data_dir = "{workdir}/data"
hostname = "mx.bench.test"
log_level = "info"
log_target = "file:{workdir}/mxward.log"

[state]
url = "unix://{workdir}/redis.sock"

[dns]
nameservers = ["{nameserver}"]
reuse_results = {reuse}

[policyd]
listen = ["127.0.0.1:{port}"]
workers = {workers}
checks = [{checks}]

"""

CHECK_TABLE = re.compile(r"^\[\[?\s*checks\.([A-Za-z0-9_-]+)\s*[\].]")


def check_tables(text: str, names: tuple[str, ...]) -> str:
    """The ``[checks.NAME]`` and ``[[checks.NAME...]]`` blocks of ``text`` for the checks in ``names``."""
    blocks: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("["):
            match = CHECK_TABLE.match(line)
            if match is None:
                raise BenchError(f"check settings: only [checks.NAME] tables belong here, not {line!r}")
            blocks.append((match.group(1), [line]))
        elif blocks:
            blocks[-1][1].append(line)
    return "\n".join("\n".join(lines).strip() + "\n" for name, lines in blocks if name in names)


def mxward_checks(args: argparse.Namespace, workload: str) -> tuple[str, ...]:
    if workload == "full":
        return tuple(args.full_checks)
    if workload == "spf":
        return ("spf",)
    return ("greylist",)


def mxward_config(
    args: argparse.Namespace, workdir: Path, port: int, workload: str, nameserver: str = "127.0.0.1:53"
) -> str:
    if workload not in DNS_WORKLOADS:
        delay = "1s" if workload == "known" else "5m"
        return MXWARD_CONFIG.format(workdir=workdir, port=port, workers=args.workers, delay=delay)
    checks = mxward_checks(args, workload)
    head = MXWARD_DNS_CONFIG.format(
        workdir=workdir,
        port=port,
        workers=args.workers,
        nameserver=nameserver,
        reuse="false" if args.no_reuse else "true",
        checks=", ".join(f'"{name}"' for name in checks),
    )
    return head + check_tables(Path(args.checks_config).read_text(encoding="utf-8"), checks)


def start_mxward(
    args: argparse.Namespace, workdir: Path, workload: str, dns: FakeDns | None, core: int | None
) -> Server:
    sock = workdir / "redis.sock"
    redis_argv = [
        args.redis_server, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
    ]  # fmt: skip
    redis = Proc("redis-server", redis_argv, workdir / "redis.log", core)
    try:
        wait_until("redis-server", lambda: redis_ping(sock), [redis], args.ready_timeout)
        port = free_port()
        (workdir / "data").mkdir()
        config = workdir / "mxward.toml"
        nameserver = dns.nameserver if dns is not None else "127.0.0.1:53"
        config.write_text(mxward_config(args, workdir, port, workload, nameserver))
        proc = Proc("mxward", [args.mxward, "--config", str(config), "policyd"], workdir / "mxward.out", core)
    except BaseException:
        redis.stop()
        raise
    return Server("mxward", Target("127.0.0.1", port), [proc, redis], ["mxward", "redis"])


# In a private mount namespace: resolv.conf naming the benchmark's DNS server over /etc/resolv.conf
# (visible to this process tree only), then exec the spawner.
PRIVATE_RESOLV = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'


def start_spf_engine(args: argparse.Namespace, workdir: Path, dns: FakeDns, core: int | None) -> Server:
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {dns.host}\noptions timeout:2 attempts:2\n", encoding="utf-8")
    config = workdir / "policyd-spf.conf"
    shutil.copyfile(args.spf_engine_config, config)
    port = free_port()
    spawner = [
        args.socat,
        f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=128",
        f"EXEC:{args.spf_engine} {config},nofork",
    ]
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", PRIVATE_RESOLV, "sh"]
    proc = Proc("spf-engine", [*argv, str(resolv), *spawner], workdir / "spf-engine.log", core)
    return Server("spf-engine", Target("127.0.0.1", port), [proc], ["spf-engine"])


def start_dummy(workdir: Path, core: int | None) -> Server:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-dummy", f"127.0.0.1:{port}"]
    proc = Proc("dummy", argv, workdir / "dummy.log", core)
    return Server("dummy", Target("127.0.0.1", port), [proc], ["dummy"])


def start_server(
    kind: str,
    args: argparse.Namespace,
    workdir: Path,
    workload: str,
    *,
    dns: FakeDns | None,
    core: int | None,
) -> Server:
    """Start a fresh server for one workload and wait until it answers a policy request."""
    if kind == "postgrey":
        server = start_postgrey(args, workdir, 1 if workload == "known" else 300, core)
    elif kind == "mxward":
        server = start_mxward(args, workdir, workload, dns, core)
    elif kind == "spf-engine":
        if dns is None:
            raise BenchError("spf-engine needs the DNS server")
        server = start_spf_engine(args, workdir, dns, core)
    else:
        server = start_dummy(workdir, core)
    try:
        server.probe_reply = wait_until(
            kind, lambda: policy_load.probe(server.target), server.procs, args.ready_timeout
        )
    except BaseException:
        server.stop()
        raise
    return server


# endregion
# region #### dummy server ####


class DunnoProtocol(asyncio.Protocol):
    """Answers every policy request with DUNNO at once."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        count = buf.count(b"\n\n")
        if count and self.transport is not None:
            self.buf = buf[buf.rindex(b"\n\n") + 2 :]
            self.transport.write(b"action=DUNNO\n\n" * count)
        else:
            self.buf = buf


def serve_dummy(listen: str) -> int:
    target = Target.parse(listen)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        if target.path:
            server = await loop.create_unix_server(DunnoProtocol, target.path)
        else:
            server = await loop.create_server(DunnoProtocol, target.host, target.port)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())
    return 0


# endregion
# region #### measuring ####


@dataclass
class Measurement:
    server: str
    workload: str
    pinning: str
    summary: dict[str, Any]
    runs: list[dict[str, Any]]
    groups: list[str]
    warnings: list[str] = field(default_factory=list)
    setup: list[dict[str, Any]] = field(default_factory=list)


def run_generator(
    server: Server,
    name: str,
    load_args: list[str],
    *,
    workdir: Path,
    core: int | None,
    dns: FakeDns | None = None,
) -> dict[str, Any]:
    """Run policy_load.py in its own process; return its JSON document."""
    out = workdir / f"{name}.json"
    argv = [sys.executable, str(LOAD), str(server.target), *load_args, "--json", str(out)]
    argv += [f"--server-pid={proc.pid}" for proc in server.procs]
    if dns is not None:
        argv.append(f"--dns-stats={dns.control}")
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    print(f"\n$ {' '.join(argv)}", flush=True)
    result = subprocess.run(argv, check=False)
    if result.returncode == 130:
        raise KeyboardInterrupt
    helpers = [dns.proc] if dns is not None else []
    for proc in [*server.procs, *helpers]:
        proc.check_alive()
    if result.returncode != 0:
        tails = "\n".join(p.log_tail() for p in [*server.procs, *helpers])
        raise BenchError(f"policy_load failed with status {result.returncode}\n{tails}")
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def deferred_share(actions: dict[str, int]) -> float:
    """Share of replies that defer: DEFER, DEFER_IF_PERMIT, DEFER_IF_REJECT or a 4xx code."""
    total = sum(actions.values())
    deferred = sum(n for verb, n in actions.items() if verb.upper().startswith("DEFER") or verb[:1] == "4")
    return deferred / total if total else 0.0


def rejected_share(actions: dict[str, int]) -> float:
    """Share of replies that reject: REJECT or a 5xx code."""
    total = sum(actions.values())
    rejected = sum(n for verb, n in actions.items() if verb.upper().startswith("REJECT") or verb[:1] == "5")
    return rejected / total if total else 0.0


def expect(warnings: list[str], what: str, actions: dict[str, int], *, deferred: bool) -> None:
    if deferred and deferred_share(actions) < 1:
        warnings.append(f"{what}: expected every reply to defer, got {policy_load.format_actions(actions)}")
    if not deferred and deferred_share(actions) > 0:
        warnings.append(f"{what}: expected no deferral, got {policy_load.format_actions(actions)}")


def expect_share(
    warnings: list[str], what: str, actions: dict[str, int], kind: str, bounds: tuple[float, float]
) -> None:
    """Warn unless the share of ``kind`` ("defer" or "reject") replies is within ``bounds``."""
    low, high = bounds
    share = deferred_share(actions) if kind == "defer" else rejected_share(actions)
    if not low <= share <= high:
        warnings.append(
            f"{what}: expected {100 * low:g}-{100 * high:g} % of replies to {kind}, "
            f"got {policy_load.format_actions(actions)}"
        )


# Replies to the spf and full workloads: SPF fails half the pool (550), the block list adds one
# in twenty of the other half; nothing is deferred once the triplets are known.
REJECTED_SPF = (0.4, 0.6)
REJECTED_FULL = (0.4, 0.65)


def pool_args(args: argparse.Namespace, workload: str) -> list[str]:
    """The generator's triplet options of a workload."""
    return ["--pool=0"] if workload == "new" else [f"--pool={args.pool_size}"]


def setup_passes(
    args: argparse.Namespace,
    server: Server,
    workload: str,
    *,
    dns: FakeDns | None,
    workdir: Path,
    core: int | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The unmeasured passes before a measurement: their summaries and the warnings they raise."""
    if workload == "new":
        return [], []
    warm = [f"-n{args.pool_size}", *pool_args(args, workload), "-c4", "-q", f"--timeout={args.timeout:g}"]
    warnings: list[str] = []
    check = server.kind != "dummy"
    first = run_generator(server, "pass1", warm, workdir=workdir, core=core, dns=dns)["summary"]
    if workload == "spf":
        if check:
            expect(warnings, "spf, warm-up pass", first["actions"], deferred=False)
            expect_share(warnings, "spf, warm-up pass", first["actions"], "reject", REJECTED_SPF)
        return [first], warnings
    time.sleep(KNOWN_WAIT)  # the triplets must be older than the 1 s delay
    second = run_generator(server, "pass2", warm, workdir=workdir, core=core, dns=dns)["summary"]
    if check and workload == "known":
        expect(warnings, "known, first pass", first["actions"], deferred=True)
        expect(warnings, "known, second pass", second["actions"], deferred=False)
    elif check:
        # SPF pass clients not on the block list are greylisted; the others are rejected.
        expect_share(warnings, "full, first pass", first["actions"], "defer", (0.3, 0.6))
        expect(warnings, "full, second pass", second["actions"], deferred=False)
    return [first, second], warnings


def measure(args: argparse.Namespace, kind: str, workload: str, pinning: str, workdir: Path) -> Measurement:
    server_core, load_core = (0, 1) if pinning == "pinned" else (None, None)
    print(f"\n=== {kind}, workload {workload}, {pinning} ===", flush=True)
    workdir.mkdir()
    warmup = max(args.warmup, DNS_WARMUP) if workload in DNS_WORKLOADS else args.warmup
    std = [
        f"-c{args.connections}", f"-d{args.duration:g}", f"-w{warmup:g}",
        f"--repeat={args.runs}", f"--pause={args.pause:g}", f"--timeout={args.timeout:g}",
    ]  # fmt: skip
    dns = start_dns(args, workdir, load_core) if workload in DNS_WORKLOADS and kind != "dummy" else None
    try:
        server = start_server(kind, args, workdir, workload, dns=dns, core=server_core)
        try:
            print(f"{kind} ready on {server.target} (probe reply: {server.probe_reply.strip()!r})")
            if dns is not None:
                print(f"fake_dns on {dns.nameserver}, control {dns.control}")
            setup, warnings = setup_passes(args, server, workload, dns=dns, workdir=workdir, core=load_core)
            document = run_generator(
                server,
                "measure",
                [*std, *pool_args(args, workload)],
                workdir=workdir,
                core=load_core,
                dns=dns,
            )
        finally:
            server.stop()
    finally:
        if dns is not None:
            dns.stop()
    actions = document["summary"]["actions"]
    if kind != "dummy":
        expect(warnings, f"{workload}, measured", actions, deferred=workload == "new")
        if workload in DNS_WORKLOADS:
            bounds = REJECTED_SPF if workload == "spf" else REJECTED_FULL
            expect_share(warnings, f"{workload}, measured", actions, "reject", bounds)
    for warning in warnings:
        print(f"policy_bench: WARNING: {kind}: {warning}", file=sys.stderr)
    return Measurement(
        server=kind,
        workload=workload,
        pinning=pinning,
        summary=document["summary"],
        runs=document["runs"],
        groups=server.group_names,
        warnings=warnings,
        setup=setup,
    )


# endregion
# region #### report ####


def fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def ratio(a: float, b: float) -> str:
    return "-" if math.isnan(a) or math.isnan(b) or not b else f"{a / b:.2f}"


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def header(titles: list[str]) -> list[str]:
    return [row(titles), row(["---"] * len(titles))]


def results_table(measurements: list[Measurement]) -> list[str]:
    lines = header([
        "server", "workload", "pinning", "req/s min / med / max", "p50 ms", "p99 ms", "server CPU %",
        "CPU µs/req", "µs/req without Redis", "generator µs/req", "DNS q/req", "actions",
    ])  # fmt: skip
    for m in measurements:
        s = m.summary
        rps = s["req_s"]
        without = fmt(s["groups"][0]["cpu_us_per_req"], 1) if len(s["groups"]) > 1 else ""
        dns = fmt(median(m, "dns_queries_per_req"), 2)
        lines.append(row([
            m.server, m.workload, m.pinning,
            f"{fmt(rps['min'])} / {fmt(rps['median'])} / {fmt(rps['max'])}",
            fmt(s["p50_ms"]["median"], 2), fmt(s["p99_ms"]["median"], 2),
            fmt(s["server_cpu_pct"]["median"]), fmt(s["server_cpu_us_per_req"]["median"], 1),
            without, fmt(s["gen_cpu_us_per_req"]["median"], 1), "" if dns == "-" else dns,
            policy_load.format_actions(s["actions"]),
        ]))  # fmt: skip
    return lines


def median(m: Measurement | None, key: str) -> float:
    """The median of one metric, NaN when the measurement or the metric is missing."""
    if m is None or key not in m.summary:
        return float("nan")
    return float(m.summary[key]["median"])


def comparison_table(measurements: list[Measurement]) -> list[str]:
    by_key = {(m.server, m.workload, m.pinning): m for m in measurements}
    lines = header([
        "workload", "pinning", "postgrey req/s", "mxward req/s", "req/s ratio mxward/postgrey",
        "postgrey µs/req", "mxward µs/req (with Redis)", "µs/req ratio",
        "mxward µs/req without Redis", "µs/req ratio without Redis",
    ])  # fmt: skip
    seen = []
    for m in measurements:
        key = (m.workload, m.pinning)
        if key in seen:
            continue
        seen.append(key)
        pg, mx = by_key.get(("postgrey", *key)), by_key.get(("mxward", *key))
        if pg is None or mx is None:
            continue
        pg_rps, mx_rps = pg.summary["req_s"]["median"], mx.summary["req_s"]["median"]
        pg_us = pg.summary["server_cpu_us_per_req"]["median"]
        mx_us = mx.summary["server_cpu_us_per_req"]["median"]
        mx_alone = mx.summary["groups"][0]["cpu_us_per_req"]
        lines.append(row([
            m.workload, m.pinning, fmt(pg_rps), fmt(mx_rps), ratio(mx_rps, pg_rps),
            fmt(pg_us, 1), fmt(mx_us, 1), ratio(mx_us, pg_us),
            fmt(mx_alone, 1), ratio(mx_alone, pg_us),
        ]))  # fmt: skip
    return lines if len(lines) > 2 else []


TARGET_RATIO = 3.0  # issue 3: the full pipeline answers at least 3x spf-engine's requests/s
TARGET_P99_MS = 10.0  # with p99 below 10 ms at 16 connections


def spf_engine_table(measurements: list[Measurement]) -> list[str]:
    """mxward (spf only, and the full pipeline) against spf-engine, one row per pinning mode."""
    by_key = {(m.server, m.workload, m.pinning): m for m in measurements}
    lines = header([
        "pinning", "spf-engine req/s", "mxward spf req/s", "ratio", "mxward full req/s",
        "ratio full/spf-engine", "spf-engine µs/req", "mxward spf µs/req", "mxward full µs/req",
        "µs/req ratio full/spf-engine", "mxward full p50 / p99 ms",
        "DNS q/req spf-engine / mxward spf / full",
    ])  # fmt: skip
    for pinning in dict.fromkeys(m.pinning for m in measurements):
        engine = by_key.get(("spf-engine", "spf", pinning))
        spf, full = by_key.get(("mxward", "spf", pinning)), by_key.get(("mxward", "full", pinning))
        if engine is None or (spf is None and full is None):
            continue
        e_rps, s_rps, f_rps = (median(m, "req_s") for m in (engine, spf, full))
        e_us, s_us, f_us = (median(m, "server_cpu_us_per_req") for m in (engine, spf, full))
        dns = " / ".join(fmt(median(m, "dns_queries_per_req"), 2) for m in (engine, spf, full))
        lines.append(row([
            pinning, fmt(e_rps), fmt(s_rps), ratio(s_rps, e_rps), fmt(f_rps), ratio(f_rps, e_rps),
            fmt(e_us, 1), fmt(s_us, 1), fmt(f_us, 1), ratio(f_us, e_us),
            f"{fmt(median(full, 'p50_ms'), 2)} / {fmt(median(full, 'p99_ms'), 2)}", dns,
        ]))  # fmt: skip
    return lines if len(lines) > 2 else []


def target_lines(args: argparse.Namespace, measurements: list[Measurement]) -> list[str]:
    """Whether the full pipeline meets issue 3's target, per pinning mode."""
    by_key = {(m.server, m.workload, m.pinning): m for m in measurements}
    lines = []
    for pinning in dict.fromkeys(m.pinning for m in measurements):
        engine, full = by_key.get(("spf-engine", "spf", pinning)), by_key.get(("mxward", "full", pinning))
        if engine is None or full is None:
            continue
        times = median(full, "req_s") / median(engine, "req_s")
        p99 = median(full, "p99_ms")
        lines.append(
            f"* {pinning}: the full pipeline answers {times:.2f}x spf-engine's requests/s "
            f"(target >= {TARGET_RATIO:g}: {'met' if times >= TARGET_RATIO else 'NOT met'}); "
            f"p99 {p99:.2f} ms at {args.connections} connections "
            f"(target < {TARGET_P99_MS:g} ms: {'met' if p99 < TARGET_P99_MS else 'NOT met'})"
        )
    return lines


def command_output(argv: list[str]) -> str:
    """The command's stripped stdout, or "?" if it failed to run or printed nothing."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return result.stdout.strip() or "?"


def environment(args: argparse.Namespace) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    commit = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    changes = command_output(["git", "-C", str(REPO), "status", "--porcelain"])
    if changes != "?":
        commit += " plus uncommitted changes"
    servers = {server for _, server in args.plan}
    dns_workloads = [w for w, server in args.plan if w in DNS_WORKLOADS and server != "dummy"]
    env = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": f"{os.cpu_count()} × {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgrey": command_output(["dpkg-query", "-W", "-f=${Version}", "postgrey"]),
        "spf-engine": command_output(
            ["dpkg-query", "-W", "-f=${Package} ${Version}, ", "postfix-policyd-spf-python", "python3-spf"]
        ).removesuffix(","),
        "redis-server": command_output([args.redis_server, "--version"]),
        "mxward commit": commit,
        # "mxward 0.1.0 (compiled)" or "(pure Python)": which build of the request path ran.
        "mxward build": command_output([args.mxward, "--version"]),
        "mxward full pipeline": f"checks = {list(args.full_checks)}, settings from {args.checks_config}",
        "mxward reuse_results": "false" if args.no_reuse else "true",
        "generator": (
            f"-c {args.connections} -d {args.duration:g} -w {args.warmup:g} --repeat {args.runs} "
            f"--pause {args.pause:g}; known pool {args.pool_size}"
        ),
    }
    if "postgrey" not in servers:
        del env["postgrey"]
    if "spf-engine" not in servers:
        del env["spf-engine"]
    if "mxward" not in servers:
        del env["mxward build"]
    if ("full", "mxward") not in args.plan:
        del env["mxward full pipeline"]
    if not dns_workloads:
        del env["mxward reuse_results"]
    if dns_workloads:
        env["generator"] += f"; spf/full: the same pool, -w {max(args.warmup, DNS_WARMUP):g}"
        env["DNS"] = f"bench/fake_dns.py with {args.zone} and the generated pool data"
    return env


def report(args: argparse.Namespace, env: dict[str, str], measurements: list[Measurement]) -> str:
    lines = ["# Policy servers side by side", ""]
    lines += [f"* {key}: {value}" for key, value in env.items()]
    lines += [
        "",
        (
            "Medians of the runs unless stated. CPU µs/req counts the server's whole process tree "
            "(for mxward: plus its redis-server). 100 % CPU = one core."
        ),
        "",
        "## Results",
        "",
        *results_table(measurements),
    ]
    comparison = comparison_table(measurements)
    if comparison:
        lines += ["", "## mxward against postgrey", "", *comparison]
    spf_comparison = spf_engine_table(measurements)
    if spf_comparison:
        lines += ["", "## mxward against spf-engine", "", *spf_comparison]
        targets = target_lines(args, measurements)
        if targets:
            lines += ["", *targets]
    warnings = [f"* {m.server}, {m.workload}, {m.pinning}: {w}" for m in measurements for w in m.warnings]
    if warnings:
        lines += ["", "## Warnings", "", *warnings]
    if args.interrupted:
        lines += ["", f"Interrupted: {args.interrupted}"]
    return "\n".join(lines) + "\n"


def save(args: argparse.Namespace, env: dict[str, str], measurements: list[Measurement], text: str) -> None:
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    md, js = results / f"policy-{stamp}.md", results / f"policy-{stamp}.json"
    md.write_text(text, encoding="utf-8")
    document = {
        "environment": env,
        "measurements": [
            {
                "server": m.server,
                "workload": m.workload,
                "pinning": m.pinning,
                "cpu_groups": m.groups,
                "summary": m.summary,
                "runs": m.runs,
                "setup_passes": m.setup,
                "warnings": m.warnings,
            }
            for m in measurements
        ],
    }
    js.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nsaved {md} and {js}")


# endregion
# region #### main ####


def comma_list(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark postgrey, spf-engine and mxward policyd side by side."
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="servers: postgrey, mxward, spf-engine, dummy (repeatable or a,b; default all but dummy)",
    )
    parser.add_argument("--dummy", action="store_true", help="also run the built-in DUNNO server")
    parser.add_argument(
        "--workload",
        action="append",
        default=[],
        help="new, known, spf, full (repeatable or comma list; default all)",
    )
    parser.add_argument(
        "--pinning", choices=("unpinned", "pinned", "both"), default="unpinned", help="default unpinned"
    )
    parser.add_argument("--pin", action="store_true", help="same as --pinning pinned")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per workload (5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--connections", type=int, default=16, help="policy connections (16)")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds (1; at least 4 for spf and full)"
    )
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs (1)")
    parser.add_argument(
        "--pool-size", type=int, default=1000, help="triplets in the known, spf and full workloads (1000)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="fail after this many s without reply")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to start a server (30)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="mxward policyd workers (0: mxward's default, one per core it may run on: 1 when pinned)",
    )
    parser.add_argument(
        "--no-reuse",
        action="store_true",
        help="spf and full workloads: [dns] reuse_results = false (every check runs every time)",
    )
    parser.add_argument(
        "--full-checks",
        action="append",
        default=[],
        help=f"mxward's checks in the full workload, in order (default {','.join(FULL_CHECKS)})",
    )
    parser.add_argument(
        "--checks-config",
        default=str(DATA / "full-pipeline.toml"),
        help="[checks.*] tables for the spf and full workloads (bench/data/full-pipeline.toml)",
    )
    parser.add_argument(
        "--zone",
        default=str(DATA / "policy-bench.zone"),
        help="static DNS data (bench/data/policy-bench.zone)",
    )
    parser.add_argument("--mxward", default=str(REPO / ".venv" / "bin" / "mxward"), help="mxward executable")
    parser.add_argument("--postgrey", default="/usr/sbin/postgrey", help="postgrey executable")
    parser.add_argument("--spf-engine", default="/usr/bin/policyd-spf", help="spf-engine's policyd-spf")
    parser.add_argument(
        "--spf-engine-config",
        default="/etc/postfix-policyd-spf-python/policyd-spf.conf",
        help="policyd-spf configuration (copied; default Debian's)",
    )
    parser.add_argument("--socat", default="/usr/bin/socat", help="socat, the spawner for spf-engine")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server", help="redis-server executable")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where to save (bench/results)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, DBs)")
    parser.add_argument("--serve-dummy", metavar="ADDR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_dummy:
        return args
    only = comma_list(args.only) or [s for s in SERVERS if s != "dummy"]
    if args.dummy and "dummy" not in only:
        only.append("dummy")
    workloads = comma_list(args.workload) or list(WORKLOADS)
    for name in only:
        if name not in SERVERS:
            parser.error(f"--only: unknown server {name!r} (choose from {', '.join(SERVERS)})")
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"--workload: unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    args.servers = [s for s in SERVERS if s in only]
    args.workloads = [w for w in WORKLOADS if w in workloads]
    args.plan = [(w, s) for w in args.workloads for s in args.servers if s in RUNS_ON[w]]
    if not args.plan:
        runs_on = "; ".join(f"{w}: {', '.join(RUNS_ON[w])}" for w in args.workloads)
        parser.error(f"no selected server runs the selected workloads ({runs_on})")
    args.full_checks = tuple(comma_list(args.full_checks)) or FULL_CHECKS
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    if any(w in DNS_WORKLOADS for w in args.workloads) and args.pool_size > MAX_DNS_POOL:
        parser.error(f"--pool-size: at most {MAX_DNS_POOL} for the spf and full workloads")
    if args.pin:
        args.pinning = "pinned"
    args.pinnings = ["unpinned", "pinned"] if args.pinning == "both" else [args.pinning]
    args.interrupted = ""
    return args


def mxward_config_check(args: argparse.Namespace, workload: str) -> None:
    """The config the benchmark writes for ``workload`` must pass the CLI's own validation."""
    with tempfile.TemporaryDirectory(prefix="policy-bench-check-") as tmp:
        config = Path(tmp) / "mxward.toml"
        config.write_text(mxward_config(args, Path(tmp), free_port(), workload))
        check_argv = [args.mxward, "--config", str(config), "config-check"]
        result = subprocess.run(check_argv, capture_output=True, text=True, check=False, timeout=60)
    if result.returncode != 0:
        tail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-8:])
        hint = "run without it: --only postgrey,spf-engine [--dummy]"
        if workload == "full":
            hint = f"Adjust --full-checks (now {','.join(args.full_checks)}) or --checks-config, or {hint}"
        raise BenchError(
            f"mxward is not runnable for the {workload} workload "
            f"({' '.join(check_argv)} exited with {result.returncode}):\n{tail}\n{hint}"
        )


def preflight(args: argparse.Namespace) -> None:
    """Fail before starting anything if a server or tool is missing."""
    needed = {
        "postgrey": [args.postgrey],
        "mxward": [args.mxward, args.redis_server],
        "spf-engine": [args.spf_engine, args.socat, "unshare", "mount", "sh"],
        "dummy": [],
    }
    for server in args.servers:
        for path in needed[server]:
            if shutil.which(path) is None:
                raise BenchError(f"{server}: {path} not found or not executable")
    if "postgrey" in args.servers and os.geteuid() == 0:
        try:
            pwd.getpwnam("postgrey")
        except KeyError as exc:
            raise BenchError("postgrey: no 'postgrey' user to own its DB directory") from exc
    if any(server == "spf-engine" for _, server in args.plan):
        if os.geteuid() != 0:
            raise BenchError(
                "spf-engine needs root: its DNS server must listen on port 53 (resolv.conf has no port) "
                "and its resolv.conf is bind-mounted in a private mount namespace"
            )
        if not os.access(args.spf_engine_config, os.R_OK):
            raise BenchError(f"spf-engine: cannot read {args.spf_engine_config}")
    if any(workload in DNS_WORKLOADS and server != "dummy" for workload, server in args.plan):
        if not os.access(args.zone, os.R_OK):
            raise BenchError(f"DNS data: cannot read {args.zone}")
        try:
            tomllib.loads(Path(args.checks_config).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise BenchError(f"--checks-config {args.checks_config}: {exc}") from exc
    mxward_workloads = {w for w, server in args.plan if server == "mxward"}
    for workload in ("new", "spf", "full"):
        if workload in mxward_workloads or (workload == "new" and "known" in mxward_workloads):
            mxward_config_check(args, workload)
    if "pinned" in args.pinnings:
        if shutil.which("taskset") is None:
            raise BenchError("pinning needs taskset (util-linux)")
        if len(os.sched_getaffinity(0)) < 2:
            raise BenchError("pinning needs 2 CPUs (server on core 0, generator on core 1)")


def read_resolv_conf() -> bytes:
    try:
        return Path("/etc/resolv.conf").read_bytes()
    except OSError:
        return b""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_dummy:
        return serve_dummy(args.serve_dummy)
    try:
        preflight(args)
    except BenchError as exc:
        print(f"policy_bench: {exc}", file=sys.stderr)
        return 2
    env = environment(args)
    measurements: list[Measurement] = []
    tmp = Path(tempfile.mkdtemp(prefix="policy-bench-"))
    tmp.chmod(0o755)  # postgrey runs as its own user and must reach its DB directory
    status = 0
    resolv_conf = read_resolv_conf()
    try:
        with sigterm_as_interrupt():
            for pinning in args.pinnings:
                for workload, kind in args.plan:
                    workdir = tmp / f"{kind}-{workload}-{pinning}"
                    measurements.append(measure(args, kind, workload, pinning, workdir))
    except KeyboardInterrupt:
        args.interrupted = "stopped by signal; the table holds the workloads that finished"
        print("\npolicy_bench: interrupted; servers stopped", file=sys.stderr)
        status = 130
    except BenchError as exc:
        args.interrupted = f"stopped by an error: {str(exc).splitlines()[0]}"
        print(f"\npolicy_bench: error: {exc}", file=sys.stderr)
        status = 1
    finally:
        if args.keep_tmp or status == 1:
            print(f"policy_bench: logs and databases kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if read_resolv_conf() != resolv_conf:  # the private mount namespace should make this impossible
            print("policy_bench: WARNING: /etc/resolv.conf changed during the run", file=sys.stderr)
    if measurements:
        text = report(args, env, measurements)
        print("\n" + text)
        save(args, env, measurements, text)
    return status


if __name__ == "__main__":
    sys.exit(main())

# endregion
