"""A small Postfix policy protocol client and a helper that runs the real daemon."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

MXWARD = str(Path(sys.executable).with_name("mxward"))
PLUGINS = Path(__file__).resolve().parents[1] / "data" / "plugins"


def request(**attrs: str) -> dict[str, str]:
    """A RCPT-stage request with the attributes Postfix 3.7 always sends, overridable."""
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.7",
        "client_name": "unknown",
        "reverse_client_name": "unknown",
        "helo_name": "mail.example.net",
        "sender": "alice@example.net",
        "recipient": "bob@example.com",
        "recipient_count": "0",
        "queue_id": "",
        "instance": "a1b2.6939ad4b.35f1a.0",
        "size": "0",
        "sasl_method": "",
        "sasl_username": "",
    }
    base.update(attrs)
    return base


def encode(attrs: Mapping[str, str]) -> bytes:
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


class PolicyClient:
    """One persistent connection; ``ask`` sends a request and returns the action text."""

    def __init__(self, address: str, *, source: str | None = None, timeout: float = 15.0) -> None:
        if address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address[5:])
        else:
            host, port = address.rsplit(":", 1)
            self.sock = socket.create_connection(
                (host, int(port)), timeout=timeout, source_address=(source, 0) if source else None
            )
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> str | None:
        """The next action, or None if the server closed the connection."""
        while b"\n\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        reply, self.buf = self.buf.split(b"\n\n", 1)
        text = reply.decode()
        assert text.startswith("action="), text
        return text[len("action=") :]

    def ask(self, attrs: Mapping[str, str]) -> str | None:
        self.send(encode(attrs))
        return self.read_reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PolicyClient:  # noqa: PYI034 - final class
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Daemon:
    """``mxward --config FILE policyd`` as a subprocess, with its log file."""

    def __init__(self, config: Path, log: Path, address: str, command: str = "policyd") -> None:
        self.config, self.log, self.address = config, log, address
        env = dict(os.environ, PYTHONPATH=str(PLUGINS))
        self.proc = subprocess.Popen(
            [MXWARD, "--config", str(config), command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                raise RuntimeError(f"mxward exited with {self.proc.returncode}: {out}\n{self.log_text()}")
            with contextlib.suppress(OSError), PolicyClient(self.address, timeout=2) as c:
                if c.ask(request(recipient="postmaster@example.com")) is not None:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"mxward not ready on {self.address}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the log:\n{self.log_text()}")

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(config: Path, log: Path, address: str, command: str = "policyd") -> Iterator[Daemon]:
    daemon = Daemon(config, log, address, command)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def write_config(
    tmp_path: Path,
    state_url: str,
    *,
    listen: list[str] | None = None,
    extra: str = "",
    policyd: str = "",
    greylist: str = "",
) -> tuple[Path, Path, str]:
    from support.postfix import find_free_port

    port = find_free_port()
    listen = listen or [f"127.0.0.1:{port}"]
    log = tmp_path / "mxward.log"
    config = tmp_path / "mxward.toml"
    listen_toml = ", ".join(f'"{x}"' for x in listen)
    # Only greylisting unless the test names its checks: the default list asks DNS questions.
    checks = "" if re.search(r"^\s*checks\s*=", policyd, re.MULTILINE) else 'checks = ["greylist"]\n'
    config.write_text(
        f'[mxward]\ndata_dir = "{tmp_path}/data"\nlog_target = "file:{log}"\n'
        f'[state]\nurl = "{state_url}"\nkey_prefix = "t{uuid.uuid4().hex[:10]}"\n'
        f"[policyd]\nlisten = [{listen_toml}]\nworkers = 2\n{checks}{policyd}\n"
        f"[checks.greylist]\n{greylist}\n{extra}"
        # `mxward run` starts the content filter too: on a free port, with no DNS-asking checks
        + (
            ""
            if "[filter]" in extra
            else f'\n[filter]\nlisten = ["127.0.0.1:{find_free_port()}"]\nchecks = ["headers"]\n'
        )
    )
    address = listen[0] if listen[0].startswith("unix:") else f"127.0.0.1:{port}"
    return config, log, address
