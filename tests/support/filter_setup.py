"""A private Postfix with `mxward filter` in its path: after-queue (content_filter) or proxy.

    client 127.0.0.2 -> Postfix smtpd :S -> queue -> scan (smtp) -> mxward filter :F
                                         -> reinjection smtpd :R -> queue -> sink (sink.test)

In proxy mode the public smtpd has ``smtpd_proxy_filter = 127.0.0.1:F`` instead of the
content_filter, and mxward reinjects to the same reinjection smtpd.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.policy_client import Daemon
from support.postfix import find_free_ports


def filter_master_cf(reinject_port: int, *, maxproc: int = 10) -> list[str]:
    return [
        f"scan      unix  -       -       n       -       {maxproc}      smtp",
        "    -o smtp_send_xforward_command=yes",
        "    -o disable_mime_output_conversion=yes",
        "    -o smtp_generic_maps=",
        f"127.0.0.1:{reinject_port} inet n  -       n       -       {maxproc}      smtpd",
        "    -o content_filter=",
        "    -o smtpd_proxy_filter=",
        "    -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters",
        "    -o smtpd_helo_restrictions=",
        "    -o smtpd_client_restrictions=",
        "    -o smtpd_sender_restrictions=",
        "    -o smtpd_relay_restrictions=",
        "    -o smtpd_recipient_restrictions=permit_mynetworks,reject",
        "    -o smtpd_data_restrictions=",
        "    -o smtpd_end_of_data_restrictions=",
        "    -o mynetworks=127.0.0.0/8",
        "    -o smtpd_authorized_xforward_hosts=127.0.0.0/8",
    ]


def write_filter_config(
    tmp_path: Path,
    state_url: str,
    *,
    port: int,
    reinject_port: int,
    mode: str = "after-queue",
    filter_extra: str = "",
    extra: str = "",
    policyd_port: int = 0,
    policyd_extra: str = "",
) -> tuple[Path, Path]:
    log = tmp_path / "mxward.log"
    config = tmp_path / "mxward.toml"
    # Only the checks that ask no DNS unless the test names its own (never the real DNS).
    checks = "" if "checks" in filter_extra else 'checks = ["headers"]\n'
    policyd = (
        f'[policyd]\nlisten = ["127.0.0.1:{policyd_port}"]\nworkers = 1\n{policyd_extra}\n'
        if policyd_port
        else ""
    )
    config.write_text(
        f'[mxward]\ndata_dir = "{tmp_path}/data"\nlog_target = "file:{log}"\nhostname = "mx.test.example"\n'
        f'[state]\nurl = "{state_url}"\nkey_prefix = "t{uuid.uuid4().hex[:10]}"\n'
        f'[filter]\nlisten = ["127.0.0.1:{port}"]\nreinject = "127.0.0.1:{reinject_port}"\n'
        f'mode = "{mode}"\nworkers = 1\n{checks}{filter_extra}\n{policyd}{extra}'
    )
    return config, log


def _wait_policyd(port: int, timeout: float = 20.0) -> None:
    from support.policy_client import PolicyClient, request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), PolicyClient(f"127.0.0.1:{port}", timeout=2) as client:
            if client.ask(request(recipient="postmaster@example.com")) is not None:
                return
        time.sleep(0.05)
    raise TimeoutError(f"policyd not ready on {port}")


def smtp_ready(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.settimeout(2)
        return sock.recv(512).startswith(b"220")
    return False


class FilterDaemon(Daemon):
    """``mxward filter`` (or ``run``) as a subprocess."""

    def __init__(self, config: Path, log: Path, port: int, command: str = "filter") -> None:
        super().__init__(config, log, f"127.0.0.1:{port}", command)
        self.port = port

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"mxward exited with {self.proc.returncode}: {out}\n{self.log_text()}")
            if smtp_ready(self.port):
                return
            time.sleep(0.05)
        raise TimeoutError(f"mxward filter not ready on {self.port}\n{self.log_text()}")


@dataclass
class FilterLab:
    """The running pieces of one test: Postfix, the filter and its configuration."""

    postfix: Any
    daemon: FilterDaemon
    config: Path
    log: Path
    port: int
    reinject_port: int
    forwarder: Forwarder | None = None


@contextlib.contextmanager
def filter_lab(
    tmp_path: Path,
    postfix: Any,
    state_url: str,
    *,
    mode: str = "after-queue",
    filter_extra: str = "",
    extra: str = "",
    extra_main_cf: dict[str, str] | None = None,
    command: str = "filter",
    policyd_extra: str = "",
    forward: bool = False,
    xclient_hosts: str = "",
) -> Iterator[FilterLab]:
    """Start the filter, then a Postfix that uses it; stop both afterwards.

    ``forward``: the filter reinjects through a :class:`Forwarder` the test can stop.
    """
    port, reinject_port, policyd_port = find_free_ports(3)
    forwarder = Forwarder(reinject_port) if forward else None
    if forwarder is not None:
        forwarder.start()
    config, log = write_filter_config(
        tmp_path,
        state_url,
        port=port,
        reinject_port=forwarder.port if forwarder else reinject_port,
        mode=mode,
        filter_extra=filter_extra,
        extra=extra,
        policyd_port=policyd_port if command == "run" or policyd_extra else 0,
        policyd_extra=policyd_extra,
    )
    daemon = FilterDaemon(config, log, port, command)
    lab: FilterLab | None = None
    try:
        daemon.wait_ready()
        if policyd_extra or command == "run":
            _wait_policyd(policyd_port)
        main_cf = {"smtpd_authorized_xforward_hosts": "127.0.0.0/8"}
        public: list[str] = []
        if mode == "after-queue":
            main_cf |= {
                "content_filter": f"scan:[127.0.0.1]:{port}",
                "receive_override_options": "no_address_mappings",
            }
        main_cf |= extra_main_cf or {}
        kwargs: dict[str, Any] = {}
        if policyd_extra or command == "run":
            kwargs = {
                "policy_service": f"inet:127.0.0.1:{policyd_port}",
                "policy_data": True,
                "policy_end_of_data": True,
            }
        if mode == "proxy":
            public = [
                "smtp      inet  n       -       n       -       -       smtpd",
                f"    -o smtpd_proxy_filter=127.0.0.1:{port}",
                "    -o smtpd_proxy_timeout=60s",
            ]
        if xclient_hosts:
            kwargs["xclient_hosts"] = xclient_hosts
        pf = postfix(
            extra_main_cf=main_cf,
            extra_master_cf=filter_master_cf(reinject_port),
            public_service=public,
            **kwargs,
        )
        lab = FilterLab(
            postfix=pf,
            daemon=daemon,
            config=config,
            log=log,
            port=port,
            reinject_port=reinject_port,
            forwarder=forwarder,
        )
        yield lab
    finally:
        daemon.stop()
        if lab is not None and lab.daemon is not daemon:
            lab.daemon.stop()
        if forwarder is not None:
            forwarder.stop()


class Forwarder:
    """A loopback TCP forwarder that a test can stop and start: a reinjection smtpd that goes away.

    While stopped, its port refuses connections (nothing listens) and open connections are cut.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = find_free_ports(1)[0]
        self._server: socketserver.ThreadingTCPServer | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        forwarder = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    upstream = socket.create_connection(("127.0.0.1", forwarder.target_port), timeout=30)
                except OSError:
                    return
                with forwarder._lock:
                    forwarder._sockets |= {self.request, upstream}
                pump = threading.Thread(target=_pump, args=(upstream, self.request), daemon=True)
                pump.start()
                _pump(self.request, upstream)
                pump.join(timeout=30)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
