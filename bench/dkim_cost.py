#!/usr/bin/env python3
"""dkim_cost: what DKIM signing and verifying cost per message in mxward's dkim check.

Run from the repository root::

    .venv/bin/python bench/dkim_cost.py                    # pinned to core 0 if it may, 7 rounds
    .venv/bin/python bench/dkim_cost.py --size 51200 --no-pin --repeat 11

What is measured, on one message of ``--size`` payload bytes (the filter benchmark's prepared
message: a full header set, 80-byte lines) and with each key type:

sign        ``DkimCheck.outgoing(tx, message)``, the step the filter runs before delivering a
            message of an authenticated submitter: parse the message, find the From domain,
            pick the keys, canonicalize and hash body and header (dkimpy), sign (OpenSSL through
            cryptography for RSA, PyNaCl for Ed25519). One check per
            row: an RSA-2048 key, an Ed25519 key, and both keys of one domain (the dual-signing
            set-up RFC 8463 suggests, two DKIM-Signature fields).
verify      ``DkimCheck.check(CONTENT, tx)`` on a message signed in the row above with that key:
            read the signature, look up the key (from the resolver's cache after the first
            message, and the parsed key from the check's own cache), hash body and header,
            verify. Each call gets a freshly parsed message (parsed before the timing, so the
            filter's parsing, shared by all checks, is not counted; it is shown on its own
            row).
dmarc       ``DmarcCheck.check`` of the same message after a dkim pass (``dkim.pass_domains``
            set as the dkim check sets it; no SPF facts): policy record from the resolver's
            cache, alignment, result.
Mail::DKIM  Perl's Mail::DKIM signing the same message with the same RSA key
            (``bench/dkim_sign.pl --time``), for comparison; skipped when Perl or Mail::DKIM is
            missing. Debian 12's Mail::DKIM has no Ed25519 signer.

Keys are made at start: RSA-2048 with ``openssl genrsa`` and Ed25519 with PyNaCl (mxward's
``generate_key``), written with mode 0600 to a temporary directory and loaded by the check's own
``start()``. Their records (and ``_dmarc``: ``v=DMARC1; p=reject``) are served by the tests' DNS
server (``tests/support/dnsserver.py``) on 127.0.0.1 in this process; the resolver caches them,
so after the first message no question goes out.

Timing: each row runs ``--number`` messages in a loop (default: as many as take about
``--min-time`` seconds, found by a calibration pass) inside one coroutine, with perf_counter
around the loop; this is one round. ``--repeat`` rounds; the median and the fastest round are
printed in µs per message. The garbage collector stays on (the filter runs with it). With
pinning (the default when this process may use core 0) the process and the Perl signer run on
``--core``.

Output: a table on standard output, also saved as ``bench/results/dkim-cost-<UTC timestamp>.md``
(and ``.json`` with every round).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filter_bench import prepared_message
from policy_bench import command_output

from mxward.contentfilter.checks.dkim import DkimCheck, SigningKey
from mxward.contentfilter.checks.dkim import Options as DkimOptions
from mxward.contentfilter.checks.dmarc import DmarcCheck
from mxward.contentfilter.checks.dmarc import Options as DmarcOptions
from mxward.contentfilter.dkimkeys import generate_key, load_private_key, txt_strings, write_key_file
from mxward.contentfilter.message import Message
from mxward.shared.clock import SystemClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import Services, Stage, Transaction
from mxward.shared.state import StateSettings, StateStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DKIM_SIGN = HERE / "dkim_sign.pl"
DOMAIN = "cost.bench.test"
SENDER = f"bench@{DOMAIN}"
KEYS = {"rsa": ("rsa2048", "rsa-sha256"), "ed25519": ("ed25519", "ed25519-sha256")}


class CostError(Exception):
    """Something the measurement needs is missing or did not work; the text says what."""


@dataclass
class Row:
    """One measured operation: µs per message of each round."""

    name: str
    detail: str
    number: int = 0
    rounds: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rounds) if self.rounds else float("nan")

    @property
    def best(self) -> float:
        return min(self.rounds) if self.rounds else float("nan")


# region #### set-up ####


def make_keys(directory: Path) -> dict[str, Path]:
    """An RSA-2048 and an Ed25519 key file (mode 0600), made as ``mxward dkim keygen`` makes them."""
    files = {}
    for kind, (selector, _) in KEYS.items():
        data = generate_key("rsa" if kind == "rsa" else "ed25519", 2048)
        files[kind] = write_key_file(directory, f"{DOMAIN}.{selector}.key", data)
    return files


def zone_text(files: dict[str, Path]) -> str:
    lines = [
        "$TTL 86400",
        f"$ORIGIN {DOMAIN}.",
        "@ SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 604800 3600",
        "@ NS ns.bench.test.",
        '_dmarc TXT "v=DMARC1; p=reject"',
    ]
    for kind, (selector, _) in KEYS.items():
        record = load_private_key(str(files[kind])).record
        strings = " ".join(f'"{part}"' for part in txt_strings(record, 250))
        lines.append(f"{selector}._domainkey TXT {strings}")
    return "\n".join(lines) + "\n"


def load_dns_server() -> Any:
    """The tests' DNS server class (tests/support is no package: imported by path)."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.dnsserver import DnsServer

    return DnsServer


def services(nameserver: str) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=(nameserver,))),
        state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),  # never connected
        clock=SystemClock(),
        hostname="cost.bench.test",
    )


def signing_check(kinds: tuple[str, ...], files: dict[str, Path], svc: Services) -> DkimCheck:
    keys = tuple(
        SigningKey(domain=DOMAIN, selector=KEYS[k][0], key_file=str(files[k]), algorithm=KEYS[k][1])  # type: ignore[arg-type]
        for k in kinds
    )
    return DkimCheck(DkimOptions(keys=keys, check_published_keys=False), svc)


def submission(message: Message | None = None) -> Transaction:
    """A transaction as the filter builds it for an authenticated submitter's message."""
    return Transaction(
        stage=Stage.CONTENT,
        sasl_username="bench",
        sender=SENDER,
        recipients=("user1@example.test",),
        recipient_count=1,
        queue_id="4BenchQ1",
        message=message,
    )


def inbound(message: Message, facts: dict[str, Any] | None = None) -> Transaction:
    """A transaction of an incoming message (no SASL login, no policyd facts)."""
    return Transaction(
        stage=Stage.CONTENT,
        sender=SENDER,
        recipients=("user1@example.test",),
        recipient_count=1,
        queue_id="4BenchQ2",
        facts=facts or {},
        message=message,
    )


def with_fields(fields: tuple[str, ...], message: bytes) -> bytes:
    return (
        b"".join(f.replace("\r\n", "\n").replace("\n", "\r\n").encode("ascii") + b"\r\n" for f in fields)
        + message
    )


# endregion
# region #### timing ####


async def measure(
    row: Row,
    step: Callable[[int], Awaitable[object]],
    args: argparse.Namespace,
    prepare: Callable[[int], None],
) -> Row:
    """Rounds of ``number`` calls of ``step(i)``; ``prepare(number)`` runs before each round, untimed."""
    number = args.number
    if not number:
        number = 1
        while True:  # calibrate: grow until one pass takes min_time
            prepare(number)
            started = time.perf_counter()
            for i in range(number):
                await step(i)
            took = time.perf_counter() - started
            if took >= args.min_time or number >= 1_000_000:
                break
            number = min(1_000_000, max(number * 2, int(number * 1.2 * args.min_time / max(took, 1e-6))))
    row.number = number
    for _ in range(args.repeat):
        prepare(number)
        started = time.perf_counter()
        for i in range(number):
            await step(i)
        row.rounds.append((time.perf_counter() - started) * 1e6 / number)
    return row


def perl_signing(args: argparse.Namespace, key: Path, message: Path, number: int) -> Row:
    row = Row("sign", "Mail::DKIM (Perl), RSA-2048")
    if shutil.which(args.perl) is None:
        row.note = f"skipped: {args.perl} not found"
        return row
    argv = [
        args.perl, str(DKIM_SIGN), "--key", str(key), "--domain", DOMAIN, "--selector", KEYS["rsa"][0],
        "--in", str(message), "--time", str(number), "--repeat", str(args.repeat),
    ]  # fmt: skip
    if args.pin:
        argv = ["taskset", "-c", str(args.core), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if done.returncode != 0:
        row.note = f"skipped: {(done.stderr.strip().splitlines() or ['failed'])[-1]}"
        return row
    result = json.loads(done.stdout)
    row.number = int(result["n"])
    row.rounds = [float(v) for v in result["rounds"]]
    row.detail += f" (Mail::DKIM {result['mail_dkim']})"
    return row


# endregion
# region #### the measurement ####


async def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    files = make_keys(tmp / "keys")
    raw = prepared_message(args.size, SENDER)
    rows: list[Row] = []
    server = load_dns_server()([zone_text(files)])
    await server.start()
    try:
        svc = services(server.nameserver)
        verifier = DkimCheck(DkimOptions(), svc)
        dmarc = DmarcCheck(DmarcOptions(), svc)
        await verifier.start()
        await dmarc.start()
        parsed: list[Message] = []

        def fresh(number: int) -> None:
            parsed[:] = [Message.parse(signed) for _ in range(number)]

        rows.append(await measure(Row("parse", "Message.parse (the filter's, once per message)"),
                                  _parse_step(raw), args, lambda _: None))  # fmt: skip
        for kinds, label in ((("rsa",), "RSA-2048"), (("ed25519",), "Ed25519"), (("rsa", "ed25519"), "both")):
            signer = signing_check(kinds, files, svc)
            await signer.start()
            tx = submission()
            fields = await signer.outgoing(tx, raw)
            if len(fields) != len(kinds):
                raise CostError(
                    f"outgoing() gave {len(fields)} signatures for {label}, {len(kinds)} expected"
                )
            signed = with_fields(fields, raw)
            result = await verifier.check(Stage.CONTENT, inbound(Message.parse(signed)))
            if result.facts.get("dkim.result") != "pass":
                raise CostError(f"mxward's own {label} signature does not verify: {result.log}")

            async def sign_step(_: int, signer: DkimCheck = signer, tx: Transaction = tx) -> object:
                return await signer.outgoing(tx, raw)

            rows.append(
                await measure(Row("sign", f"mxward outgoing(), {label}"), sign_step, args, lambda _: None)
            )

            async def verify_step(i: int) -> object:
                return await verifier.check(Stage.CONTENT, inbound(parsed[i]))

            detail = f"mxward check(), {label}" + (" (two signatures)" if len(kinds) > 1 else "")
            rows.append(await measure(Row("verify", detail), verify_step, args, fresh))
            await signer.aclose()
            if kinds == ("rsa",):
                facts = dict(result.facts)
                dmarc_result = await dmarc.check(Stage.CONTENT, inbound(Message.parse(signed), facts))
                if dmarc_result.facts.get("dmarc.result") != "pass":
                    raise CostError(f"dmarc did not pass after a dkim pass: {dmarc_result.log}")

                async def dmarc_step(i: int, facts: dict[str, Any] = facts) -> object:
                    return await dmarc.check(Stage.CONTENT, inbound(parsed[i], facts))

                rows.append(
                    await measure(Row("dmarc", "mxward check() after a dkim pass"), dmarc_step, args, fresh)
                )
        message_file = tmp / "message.eml"
        message_file.write_bytes(raw)
        sign_rows = [r for r in rows if r.name == "sign" and r.rounds]
        number = args.number or max(20, sign_rows[0].number if sign_rows else 200)
        rows.append(perl_signing(args, files["rsa"], message_file, number))
        await verifier.aclose()
        await dmarc.aclose()
    finally:
        await server.stop()
    return rows


def _parse_step(raw: bytes) -> Callable[[int], Awaitable[object]]:
    async def step(_: int) -> object:
        return Message.parse(raw)

    return step


# endregion
# region #### report ####


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
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} × {cpu}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dkimpy, PyNaCl": f"{version('dkimpy')}, {version('PyNaCl')}",
        "mxward commit": commit,
        "message": f"{args.size} payload bytes ({len(prepared_message(args.size, SENDER))} bytes in all)",
        "pinning": f"core {args.core}" if args.pin else "none",
        "rounds": f"{args.repeat}, "
        + (
            f"{args.number} messages each" if args.number else f"calibrated to about {args.min_time:g} s each"
        ),
    }


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| step | what | µs/msg (median) | µs/msg (best) | msgs per round |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if not r.rounds:
            lines.append(f"| {r.name} | {r.detail} | {r.note or '-'} | | |")
            continue
        lines.append(f"| {r.name} | {r.detail} | {r.median:.1f} | {r.best:.1f} | {r.number} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DKIM signing and verifying cost per message in mxward.")
    parser.add_argument("--size", type=int, default=5120, help="payload bytes of the message (5120)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per step (7)")
    parser.add_argument("--number", type=int, default=0, help="messages per round (0: calibrate)")
    parser.add_argument("--min-time", type=float, default=0.3, help="calibrated length of a round (0.3 s)")
    parser.add_argument("--core", type=int, default=0, help="the core to pin to (0)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin")
    parser.add_argument("--perl", default="perl", help="perl with Mail::DKIM, for the comparison")
    parser.add_argument("--results-dir", default=str(HERE / "results"), help="where to save (bench/results)")
    args = parser.parse_args(argv)
    if args.size < 1 or args.repeat < 1 or args.number < 0 or args.min_time <= 0:
        parser.error("--size and --repeat must be positive, --number not negative, --min-time above 0")
    if args.pin:
        try:
            allowed = os.sched_getaffinity(0)
        except OSError:
            allowed = set()
        if args.core not in allowed or shutil.which("taskset") is None:
            print(f"dkim_cost: core {args.core} not available (or no taskset): not pinning", file=sys.stderr)
            args.pin = False
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, {args.core})
    env = environment(args)
    with tempfile.TemporaryDirectory(prefix="dkim-cost-") as tmp:
        try:
            rows = asyncio.run(run(args, Path(tmp)))
        except (CostError, OSError) as exc:
            print(f"dkim_cost: {exc}", file=sys.stderr)
            return 1
        except Exception as exc:  # a key or check that cannot be used: say which
            print(f"dkim_cost: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    text = "\n".join(
        ["# DKIM and DMARC cost per message", "", *[f"* {k}: {v}" for k, v in env.items()], "", *table(rows)]
    )
    print(text)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (results / f"dkim-cost-{stamp}.md").write_text(text + "\n", encoding="utf-8")
    document = {"environment": env, "rows": [asdict(r) | {"median": r.median, "best": r.best} for r in rows]}
    (results / f"dkim-cost-{stamp}.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"\nsaved {results}/dkim-cost-{stamp}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# endregion
