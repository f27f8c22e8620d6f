"""Greylisting requests decided in-process: worker CPU per request, without sockets or noise.

Runs ``PolicyService.handle`` (the decision, its log line, the Redis call) for new-triplet
greylisting requests in concurrent loops against a private redis-server on a unix socket, and
prints the process's CPU per request. No policy protocol, no load generator: what it measures is
the Python side of a request, the part the code changes.

Under callgrind it counts instructions, which do not depend on what else the VM is doing; the
difference between two request counts leaves out the start-up::

    for n in 2000 6000; do
        valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n .venv/bin/python \\
            bench/policy_inproc.py --requests $n --rounds 1 --concurrency 1
    done   # instructions/request = (total(6000) - total(2000)) / 4000

``--concurrency 1`` sends every Redis call in a batch of its own (each batch's cost counts in
full); with more loops the batches grow, as in the daemon under load.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from policy_bench import MXWARD_CONFIG


def request(n: int) -> dict[str, str]:
    """A RCPT request of a triplet never seen before (number ``n``)."""
    return {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": f"198.{18 + (n >> 16) % 2}.{(n >> 8) & 255}.{n & 255}",
        "client_name": "unknown",
        "reverse_client_name": "unknown",
        "helo_name": "mail.example.test",
        "sender": f"user{n}@d{n % 100}.senders.test",
        "recipient": f"user{n}@example.test",
        "recipient_count": "0",
        "queue_id": "",
        "instance": f"{n:x}.1.1",
        "size": "0",
        "sasl_method": "",
        "sasl_username": "",
        "sasl_sender": "",
    }


async def measure(workdir: Path, args: argparse.Namespace) -> None:
    from mxward.policyd.daemon import open_runtime
    from mxward.shared.cli import load
    from mxward.shared.logs import setup_logging

    config = load(str(workdir / "mxward.toml"))
    setup_logging("info", f"file:{workdir}/mxward.log", ident="mxward")
    runtime = await open_runtime(config, None)
    service = runtime.service
    counter = iter(range(1, 1 << 40))

    async def loop(count: int) -> None:
        for _ in range(count):
            await service.handle(request(next(counter)))

    gc.freeze()  # as the daemon's workers do after start-up
    gc.set_threshold(20000, 20, 20)
    per_loop = args.requests // args.concurrency
    done = per_loop * args.concurrency
    for number in range(1, args.rounds + 1):
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(loop(per_loop) for _ in range(args.concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"round {number}: {1e6 * cpu / done:.1f} µs CPU/request, {done / wall:.0f} requests/s")
    await runtime.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=30000, help="requests per round (30000)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (3)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent request loops (16)")
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mxward-inproc-") as tmp:
        workdir = Path(tmp)
        (workdir / "data").mkdir()
        # policy_bench.py's greylisting configuration (its listener is not opened here).
        config = MXWARD_CONFIG.format(workdir=workdir, port=10040, workers=1, delay="5m")
        (workdir / "mxward.toml").write_text(config)
        sock = workdir / "redis.sock"
        redis = subprocess.Popen(
            [args.redis_server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if redis.poll() is not None or time.monotonic() > deadline:
                    print("redis-server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            run = asyncio.run
            try:  # optional, as in the daemon
                import uvloop

                run = uvloop.run
            except ImportError:
                pass
            run(measure(workdir, args))
        finally:
            redis.terminate()
            redis.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
