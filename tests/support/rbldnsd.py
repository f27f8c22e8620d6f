"""A real ``rbldnsd`` on loopback serving the DNS list test zones, and its pytest fixture.

``rbldnsd`` (Debian package ``rbldnsd``) answers DNSBL/DNSWL/RHSBL questions from its own
dataset files (ip4set, ip6trie, dnset: A values and TXT templates where ``$`` becomes the
listed address or domain). The zones and their files are listed in
``tests/data/rbldnsd/zones``. It speaks UDP only, on a free loopback port picked at start.

The Resolver asks one set of nameservers, so tests point it at the test DNS server
(:mod:`support.dnsserver`) and let that server forward the list zones here:
``rbldnsd.forward_from(dns_server)``. Fault injection (SERVFAIL, drop, delay) then works on
list names too, in the test DNS server, before forwarding.

The fixture ``rbldnsd`` is session-scoped: the data never changes during a run. Without the
``rbldnsd`` binary the fixture fails with the install command (it is required, not optional).
The fixture ``dns_lists`` is the test DNS server (``dns_server``) forwarding rbldnsd's zones
and serving ``tests/data/dns/dnsbl.zone`` (answers rbldnsd cannot give) itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Self

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import TracebackType

    from support.dnsserver import DnsServer

__all__ = ["DNSBL_ZONE", "RBLDNSD_DATA", "Rbldnsd", "dns_lists", "rbldnsd", "read_zone_specs"]

RBLDNSD_DATA = Path(__file__).resolve().parent.parent / "data" / "rbldnsd"
DNSBL_ZONE = Path(__file__).resolve().parent.parent / "data" / "dns" / "dnsbl.zone"
LOOPBACK = "127.0.0.1"


class _Forwarder(Protocol):
    def forward(self, zone: str, host: str, port: int) -> None: ...


def read_zone_specs(path: Path) -> list[str]:
    """The ``zone:type:file,...`` lines of a zones file (comments and blank lines left out)."""
    specs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            specs.append(text)
    return specs


def _free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Rbldnsd:
    """One ``rbldnsd -n`` process: ``with Rbldnsd(specs, workdir) as server: ...``."""

    def __init__(self, specs: list[str], workdir: Path, *, host: str = LOOPBACK) -> None:
        self.specs = specs
        self.workdir = workdir
        self.host = host
        self.port = 0
        self.zones = tuple(dict.fromkeys(spec.split(":", 1)[0].lower() for spec in specs))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"

    def _command(self, port: int) -> list[str]:
        binary = shutil.which("rbldnsd") or "/usr/sbin/rbldnsd"
        command = [binary, "-n", "-b", f"{self.host}/{port}", "-w", str(self.workdir), "-t", "60", "-c", "0"]
        if os.geteuid() == 0:
            command += ["-u", "rbldns"]  # it refuses to run as root
        return [*command, *self.specs]

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free UDP port and wait until it answers."""
        for _ in range(5):
            port = _free_udp_port(self.host)
            proc = subprocess.Popen(self._command(port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self._proc, self.port = proc, port
            if self._wait_ready(timeout):
                return
            output = self._stop_process()
            if "Address already in use" not in output:
                raise RuntimeError(f"rbldnsd did not start: {output}")
        raise RuntimeError("rbldnsd: no free UDP port found")

    def _wait_ready(self, timeout: float) -> bool:
        assert self._proc is not None
        probe = dns.message.make_query(f"2.0.0.127.{self.zones[0]}", "A")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(OSError, dns.exception.Timeout):
                reply = dns.query.udp(probe, self.host, port=self.port, timeout=0.2)
                if reply.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                    return True
            time.sleep(0.05)
        return False

    def _stop_process(self) -> str:
        proc, self._proc = self._proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.stdout.read().decode(errors="replace") if proc.stdout else ""

    def stop(self) -> None:
        """Stop the process."""
        self._stop_process()

    def forward_from(self, server: _Forwarder) -> None:
        """Make the test DNS ``server`` pass questions about every zone served here to us."""
        for zone in self.zones:
            server.forward(zone, self.host, self.port)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def rbldnsd() -> Iterator[Rbldnsd]:
    """rbldnsd on 127.0.0.1 serving tests/data/rbldnsd (session-wide: the data never changes)."""
    if shutil.which("rbldnsd") is None and not Path("/usr/sbin/rbldnsd").exists():
        pytest.fail("rbldnsd is required for the DNS list tests: apt-get install rbldnsd", pytrace=False)
    with Rbldnsd(read_zone_specs(RBLDNSD_DATA / "zones"), RBLDNSD_DATA) as server:
        yield server


@pytest.fixture
def dns_lists(dns_server: DnsServer, rbldnsd: Rbldnsd) -> DnsServer:
    """The test DNS server with the list zones: rbldnsd's forwarded, tests/data/dns/dnsbl.zone served."""
    rbldnsd.forward_from(dns_server)
    dns_server.add_zone(DNSBL_ZONE)
    return dns_server
