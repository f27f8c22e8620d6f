#!/usr/bin/env python3
"""policy_bench: postgrey and mxward policyd side by side, same workloads, one invocation.

Run from the repository root::

    .venv/bin/python bench/policy_bench.py                 # unpinned, both servers, both workloads
    .venv/bin/python bench/policy_bench.py --pinning both  # unpinned, then pinned (server on core 0)
    .venv/bin/python bench/policy_bench.py --only postgrey --dummy   # without mxward

For each pinning mode and each workload, each server is started fresh in a temporary directory on a
free loopback port, made ready (polled with a deadline), loaded with ``policy_load.py`` in a separate
process, and stopped. Workloads:

new    ``--pool 0``: a new client/sender/recipient triplet on every request, so every request is
       greylisted. postgrey runs with ``--delay=300``, mxward with ``[checks.greylist] delay = "5m"``.
known  ``--pool 1000``: 1000 triplets that have already passed greylisting. The server starts with a
       1-second delay (postgrey ``--delay=1``, mxward ``delay = "1s"``); one pass over the pool (each
       triplet deferred), 2 s wait, a second pass (each triplet passes), then the measurement.

Servers:
postgrey  ``/usr/sbin/postgrey --inet=127.0.0.1:PORT --dbdir=DIR --delay=N``; its DB directory is
          owned by the ``postgrey`` user (postgrey drops root to it). One process.
mxward    a private ``redis-server`` on a unix socket (no TCP, no persistence), then
          ``mxward --config FILE policyd`` with ``workers = 2`` and ``checks = ["greylist"]``. The
          CPU of the whole mxward process tree is counted, and Redis's CPU is reported both
          included and apart.
dummy     (``--dummy`` or ``--only dummy``) a DUNNO server in this file: the protocol ceiling.

Pinning: ``unpinned`` (default) pins nothing. ``pinned`` runs the server and its Redis with
``taskset -c 0`` and the generator with ``taskset -c 1``.

The generator's settings match the baseline (perf-baseline.md): 16 connections, 1 s warm-up, 5 runs
of 5 s, 1 s pause. The table and the JSON go to ``bench/results/`` (gitignored). Everything started
is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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
SERVERS = ("postgrey", "mxward", "dummy")
WORKLOADS = ("new", "known")
KNOWN_WAIT = 2.0  # seconds between the two passes of the known workload (delay is 1 s)


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


def mxward_config(args: argparse.Namespace, workdir: Path, port: int, delay: str) -> str:
    return MXWARD_CONFIG.format(workdir=workdir, port=port, workers=args.workers, delay=delay)


def start_mxward(args: argparse.Namespace, workdir: Path, delay: str, core: int | None) -> Server:
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
        config.write_text(mxward_config(args, workdir, port, delay))
        proc = Proc("mxward", [args.mxward, "--config", str(config), "policyd"], workdir / "mxward.out", core)
    except BaseException:
        redis.stop()
        raise
    return Server("mxward", Target("127.0.0.1", port), [proc, redis], ["mxward", "redis"])


def start_dummy(workdir: Path, core: int | None) -> Server:
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve-dummy", f"127.0.0.1:{port}"]
    proc = Proc("dummy", argv, workdir / "dummy.log", core)
    return Server("dummy", Target("127.0.0.1", port), [proc], ["dummy"])


def start_server(
    kind: str, args: argparse.Namespace, workdir: Path, workload: str, core: int | None
) -> Server:
    """Start a fresh server for one workload and wait until it answers a policy request."""
    workdir.mkdir()
    known = workload == "known"
    if kind == "postgrey":
        server = start_postgrey(args, workdir, 1 if known else 300, core)
    elif kind == "mxward":
        server = start_mxward(args, workdir, "1s" if known else "5m", core)
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
    server: Server, name: str, load_args: list[str], *, workdir: Path, core: int | None
) -> dict[str, Any]:
    """Run policy_load.py in its own process; return its JSON document."""
    out = workdir / f"{name}.json"
    argv = [sys.executable, str(LOAD), str(server.target), *load_args, "--json", str(out)]
    argv += [f"--server-pid={proc.pid}" for proc in server.procs]
    if core is not None:
        argv = ["taskset", "-c", str(core), *argv]
    print(f"\n$ {' '.join(argv)}", flush=True)
    result = subprocess.run(argv, check=False)
    if result.returncode == 130:
        raise KeyboardInterrupt
    for proc in server.procs:
        proc.check_alive()
    if result.returncode != 0:
        tails = "\n".join(p.log_tail() for p in server.procs)
        raise BenchError(f"policy_load failed with status {result.returncode}\n{tails}")
    document: dict[str, Any] = json.loads(out.read_text())
    return document


def deferred_share(actions: dict[str, int]) -> float:
    """Share of replies that defer: DEFER, DEFER_IF_PERMIT, DEFER_IF_REJECT or a 4xx code."""
    total = sum(actions.values())
    deferred = sum(n for verb, n in actions.items() if verb.upper().startswith("DEFER") or verb[:1] == "4")
    return deferred / total if total else 0.0


def expect(warnings: list[str], what: str, actions: dict[str, int], *, deferred: bool) -> None:
    if deferred and deferred_share(actions) < 1:
        warnings.append(f"{what}: expected every reply to defer, got {policy_load.format_actions(actions)}")
    if not deferred and deferred_share(actions) > 0:
        warnings.append(f"{what}: expected no deferral, got {policy_load.format_actions(actions)}")


def measure(args: argparse.Namespace, kind: str, workload: str, pinning: str, workdir: Path) -> Measurement:
    server_core, load_core = (0, 1) if pinning == "pinned" else (None, None)
    print(f"\n=== {kind}, workload {workload}, {pinning} ===", flush=True)
    server = start_server(kind, args, workdir, workload, server_core)
    warnings: list[str] = []
    setup: list[dict[str, Any]] = []
    std = [
        f"-c{args.connections}", f"-d{args.duration:g}", f"-w{args.warmup:g}",
        f"--repeat={args.runs}", f"--pause={args.pause:g}", f"--timeout={args.timeout:g}",
    ]  # fmt: skip
    try:
        print(f"{kind} ready on {server.target} (probe reply: {server.probe_reply.strip()!r})")
        if workload == "known":
            warm = [
                f"-n{args.pool_size}",
                f"--pool={args.pool_size}",
                "-c4",
                "-q",
                f"--timeout={args.timeout:g}",
            ]
            first = run_generator(server, "pass1", warm, workdir=workdir, core=load_core)
            time.sleep(KNOWN_WAIT)  # the triplets must be older than the 1 s delay
            second = run_generator(server, "pass2", warm, workdir=workdir, core=load_core)
            setup = [first["summary"], second["summary"]]
            if kind != "dummy":
                expect(warnings, "known, first pass", first["summary"]["actions"], deferred=True)
                expect(warnings, "known, second pass", second["summary"]["actions"], deferred=False)
            pool = args.pool_size
        else:
            pool = 0
        document = run_generator(server, "measure", [*std, f"--pool={pool}"], workdir=workdir, core=load_core)
    finally:
        server.stop()
    if kind != "dummy":
        expect(warnings, f"{workload}, measured", document["summary"]["actions"], deferred=workload == "new")
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
        "CPU µs/req", "µs/req without Redis", "generator µs/req", "actions",
    ])  # fmt: skip
    for m in measurements:
        s = m.summary
        rps = s["req_s"]
        without = fmt(s["groups"][0]["cpu_us_per_req"], 1) if len(s["groups"]) > 1 else ""
        lines.append(row([
            m.server, m.workload, m.pinning,
            f"{fmt(rps['min'])} / {fmt(rps['median'])} / {fmt(rps['max'])}",
            fmt(s["p50_ms"]["median"], 2), fmt(s["p99_ms"]["median"], 2),
            fmt(s["server_cpu_pct"]["median"]), fmt(s["server_cpu_us_per_req"]["median"], 1),
            without, fmt(s["gen_cpu_us_per_req"]["median"], 1),
            policy_load.format_actions(s["actions"]),
        ]))  # fmt: skip
    return lines


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
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpu": f"{os.cpu_count()} × {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgrey": command_output(["dpkg-query", "-W", "-f=${Version}", "postgrey"]),
        "redis-server": command_output([args.redis_server, "--version"]),
        "mxward commit": commit,
        "generator": (
            f"-c {args.connections} -d {args.duration:g} -w {args.warmup:g} --repeat {args.runs} "
            f"--pause {args.pause:g}; known pool {args.pool_size}"
        ),
    }


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark postgrey and mxward policyd side by side.")
    parser.add_argument(
        "--only", action="append", default=[], help="servers: postgrey, mxward, dummy (repeatable or a,b)"
    )
    parser.add_argument("--dummy", action="store_true", help="also run the built-in DUNNO server")
    parser.add_argument(
        "--workload", action="append", default=[], help="new, known (repeatable or comma list; default both)"
    )
    parser.add_argument(
        "--pinning", choices=("unpinned", "pinned", "both"), default="unpinned", help="default unpinned"
    )
    parser.add_argument("--pin", action="store_true", help="same as --pinning pinned")
    parser.add_argument("--runs", type=int, default=5, help="measured runs per workload (5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (5)")
    parser.add_argument("--connections", type=int, default=16, help="policy connections (16)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds (1)")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between runs (1)")
    parser.add_argument("--pool-size", type=int, default=1000, help="triplets in the known workload (1000)")
    parser.add_argument("--timeout", type=float, default=10.0, help="fail after this many s without reply")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to start a server (30)")
    parser.add_argument("--workers", type=int, default=2, help="mxward policyd workers (2)")
    parser.add_argument("--mxward", default=str(REPO / ".venv" / "bin" / "mxward"), help="mxward executable")
    parser.add_argument("--postgrey", default="/usr/sbin/postgrey", help="postgrey executable")
    parser.add_argument("--redis-server", default="/usr/bin/redis-server", help="redis-server executable")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where to save (bench/results)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (logs, DBs)")
    parser.add_argument("--serve-dummy", metavar="ADDR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_dummy:
        return args
    only = [s.strip() for item in args.only for s in item.split(",") if s.strip()] or ["postgrey", "mxward"]
    if args.dummy and "dummy" not in only:
        only.append("dummy")
    workloads = [s.strip() for item in args.workload for s in item.split(",") if s.strip()] or list(WORKLOADS)
    for name in only:
        if name not in SERVERS:
            parser.error(f"--only: unknown server {name!r} (choose from {', '.join(SERVERS)})")
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"--workload: unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    args.servers = [s for s in SERVERS if s in only]
    args.workloads = [w for w in WORKLOADS if w in workloads]
    if args.pin:
        args.pinning = "pinned"
    args.pinnings = ["unpinned", "pinned"] if args.pinning == "both" else [args.pinning]
    args.interrupted = ""
    return args


def preflight(args: argparse.Namespace) -> None:
    """Fail before starting anything if a server or tool is missing."""
    needed = {"postgrey": [args.postgrey], "mxward": [args.mxward, args.redis_server], "dummy": []}
    for server in args.servers:
        for path in needed[server]:
            if shutil.which(path) is None:
                raise BenchError(f"{server}: {path} not found or not executable")
    if "postgrey" in args.servers and os.geteuid() == 0:
        try:
            pwd.getpwnam("postgrey")
        except KeyError as exc:
            raise BenchError("postgrey: no 'postgrey' user to own its DB directory") from exc
    if "mxward" in args.servers:
        # The config the benchmark writes must pass the CLI's own validation.
        with tempfile.TemporaryDirectory(prefix="policy-bench-check-") as tmp:
            config = Path(tmp) / "mxward.toml"
            config.write_text(mxward_config(args, Path(tmp), free_port(), "5m"))
            check_argv = [args.mxward, "--config", str(config), "config-check"]
            result = subprocess.run(check_argv, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            tail = "\n".join((result.stderr + result.stdout).strip().splitlines()[-8:])
            raise BenchError(
                f"mxward is not runnable ({' '.join(check_argv)} exited with {result.returncode}):\n"
                f"{tail}\nRun without it: --only postgrey [--dummy]"
            )
    if "pinned" in args.pinnings:
        if shutil.which("taskset") is None:
            raise BenchError("pinning needs taskset (util-linux)")
        if len(os.sched_getaffinity(0)) < 2:
            raise BenchError("pinning needs 2 CPUs (server on core 0, generator on core 1)")


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
    try:
        with sigterm_as_interrupt():
            for pinning in args.pinnings:
                for workload in args.workloads:
                    for kind in args.servers:
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
    if measurements:
        text = report(args, env, measurements)
        print("\n" + text)
        save(args, env, measurements, text)
    return status


if __name__ == "__main__":
    sys.exit(main())

# endregion
