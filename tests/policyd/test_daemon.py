"""The policy daemon as Postfix sees it: the real `mxward policyd` process on loopback."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.policy_client import MXWARD, PolicyClient, request, running, write_config


def test_many_requests_on_one_connection_are_answered_in_order(tmp_path: Path, redis_server: Any) -> None:
    """One persistent connection carries many requests; each gets its own answer, in order."""
    config, log, address = write_config(tmp_path, redis_server.url)
    with running(config, log, address) as daemon, PolicyClient(address) as client:
        assert len(daemon.workers()) == 2
        new = client.ask(request(recipient="new1@example.com"))
        assert new == "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again in 300 seconds"
        assert client.ask(request(recipient="postmaster@example.com")) == "DUNNO"
        assert client.ask(request(recipient="new1@example.com", protocol_state="VRFY")) == "DUNNO"
        assert client.ask(request(recipient="new1@example.com", sasl_username="joe")) == "DUNNO"
        # pipelined: three requests in one write
        from support.policy_client import encode

        client.send(b"".join(encode(request(recipient=f"p{n}@example.com")) for n in range(3)))
        assert [client.read_reply() for _ in range(3)] == [new] * 3
        line = daemon.wait_log("rcpt=<new1@example.com> state=RCPT action=DEFER_IF_PERMIT")
        assert 'checks="greylist:fail(forced,' in line
        assert "exempt=sasl" in line


def test_unix_socket_listener_answers(tmp_path: Path, redis_server: Any) -> None:
    """Postfix can reach the daemon over a unix socket with the configured mode."""
    sock = tmp_path / "run" / "policyd.sock"
    config, log, address = write_config(
        tmp_path, redis_server.url, listen=[f"unix:{sock}"], policyd='socket_mode = "0666"'
    )
    with running(config, log, address), PolicyClient(address) as client:
        assert client.ask(request(recipient="unix@example.com")).startswith("DEFER_IF_PERMIT 4.7.1")
        assert oct(sock.stat().st_mode & 0o777) == "0o666"
    assert not sock.exists()


def test_a_bad_request_closes_that_connection_only(tmp_path: Path, redis_server: Any) -> None:
    """Garbage is logged with the client and the connection closed without a reply."""
    config, log, address = write_config(tmp_path, redis_server.url, policyd="max_line_length = 1000")
    with running(config, log, address) as daemon:
        with PolicyClient(address) as bad:
            bad.send(b"GET / HTTP/1.0\r\n\r\n")
            assert bad.read_reply() is None
        with PolicyClient(address) as long:
            long.send(b"request=smtpd_access_policy\nsender=" + b"x" * 5000)
            assert long.read_reply() is None
        daemon.wait_log("bad request from [127.0.0.1]:")
        daemon.wait_log("line longer than 1000 bytes")
        with PolicyClient(address) as good:
            assert good.ask(request(recipient="postmaster@example.com")) == "DUNNO"


def test_clients_outside_allowed_networks_are_refused(tmp_path: Path, redis_server: Any) -> None:
    """Only configured client networks may talk to the daemon (default: loopback)."""
    config, log, address = write_config(
        tmp_path, redis_server.url, policyd='allowed_clients = ["127.0.0.1/32"]'
    )
    with running(config, log, address) as daemon:
        with PolicyClient(address, source="127.0.0.2") as stranger, pytest.raises(OSError):
            stranger.ask(request())
            raise ConnectionResetError
        daemon.wait_log("refused connection from [127.0.0.2]")


def test_sighup_reloads_and_keeps_the_old_config_when_the_new_one_is_bad(
    tmp_path: Path, redis_server: Any
) -> None:
    """A bad file on reload is logged and ignored; a good one takes effect without a restart."""
    config, log, address = write_config(tmp_path, redis_server.url)
    original = config.read_text()
    with running(config, log, address) as daemon:
        replace_file(config, original + "bogus_key = 1\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("configuration not reloaded")
        with PolicyClient(address) as client:
            assert "Greylisted, please try" in (client.ask(request(recipient="r1@example.com")) or "")
        replace_file(
            config,
            original.replace(
                "[checks.greylist]\n", '[checks.greylist]\nreply_text = "Come back in {seconds}s"\n'
            ),
        )
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        answer, attempt = "", 0
        while time.monotonic() < deadline:
            attempt += 1  # a new recipient each time: every answer is for a new triplet
            with PolicyClient(address) as client:
                answer = client.ask(request(recipient=f"r2-{attempt}@example.com")) or ""
            if "Come back" in answer and daemon.log_text().count("reloaded configuration") >= 2:
                break
            time.sleep(0.1)
        assert answer == "DEFER_IF_PERMIT 4.7.1 Come back in 300s"


def replace_file(path: Path, text: str) -> None:
    """Write a new version of a file atomically, as an editor or a deployment tool should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_sigterm_lets_requests_in_progress_finish(tmp_path: Path, redis_server: Any) -> None:
    """On SIGTERM a request being decided still gets its answer before the worker exits."""
    config, log, address = write_config(
        tmp_path,
        redis_server.url,
        policyd='checks = ["greylist", "sample"]',
        # postmaster@ is greylisting's allowed recipient; the pipeline must still run for it.
        extra='[checks.sample]\nsleep = "1.5s"\ntimeout = "5s"\n[policyd.exempt]\nrecipients = []\n',
    )
    with running(config, log, address) as daemon:
        answers: list[str | None] = []
        with PolicyClient(address) as client:
            thread = threading.Thread(
                target=lambda: answers.append(client.ask(request(recipient="postmaster@x.example")))
            )
            started = time.monotonic()
            thread.start()
            time.sleep(0.5)  # the sample check sleeps 1.5 s: the request is in progress now
            daemon.signal(signal.SIGTERM)
            thread.join(10)
        assert answers == ["DUNNO"]
        assert time.monotonic() - started >= 1.4
        assert daemon.proc.wait(15) == 0
        daemon.wait_log("mxward policyd stopped")


def test_redis_down_still_answers_within_the_deadline(tmp_path: Path) -> None:
    """With the state store unreachable, greylisting fails open and the answer comes fast."""
    dead = f"unix://{tmp_path}/no-redis.sock"
    config, log, address = write_config(tmp_path, dead)
    with running(config, log, address) as daemon, PolicyClient(address) as client:
        started = time.monotonic()
        assert client.ask(request(recipient="r@example.com")) == "DUNNO"
        assert client.ask(request(recipient="r2@example.com")) == "DUNNO"
        assert time.monotonic() - started < 3
        daemon.wait_log("greylist:error(")


def test_redis_down_with_on_error_tempfail_defers(tmp_path: Path) -> None:
    """A site that prefers to fail closed gets 451 4.3.0 while Redis is away."""
    config, log, address = write_config(
        tmp_path, f"unix://{tmp_path}/no-redis.sock", greylist='on_error = "tempfail"'
    )
    with running(config, log, address), PolicyClient(address) as client:
        answer = client.ask(request(recipient="r@example.com"))
        assert answer == "451 4.3.0 Temporary local problem, please try again later"


def test_embedded_state_server_starts_persists_and_stops(tmp_path: Path) -> None:
    """Without [state] url, `mxward run` brings its own Valkey, keeps data, and stops it."""
    config, log, address = write_config(tmp_path, "")
    with running(config, log, address, command="run") as daemon, PolicyClient(address) as client:
        assert client.ask(request(recipient="emb@example.com")).startswith("DEFER_IF_PERMIT")
        daemon.wait_log("embedded state server on")
    assert "embedded state server stopped" in log.read_text()
    with running(config, log, address, command="run") as daemon, PolicyClient(address) as client:
        # the triplet survived the restart: it is a retry now ("early"), not a new triplet
        answer = client.ask(request(recipient="emb@example.com")) or ""
        assert answer.startswith("DEFER_IF_PERMIT")
        # the log holds both runs: wait for the second decision line, then read it
        deadline = time.monotonic() + 10
        while daemon.log_text().count("rcpt=<emb@example.com> state=RCPT") < 2:
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.02)
        assert "[status=early" in daemon.log_text().rsplit("rcpt=<emb@example.com>", 1)[1]


def test_idle_connections_are_closed(tmp_path: Path, redis_server: Any) -> None:
    """A connection that stays silent past idle_timeout is closed by the daemon."""
    config, log, address = write_config(tmp_path, redis_server.url, policyd='idle_timeout = "1s"')
    with running(config, log, address), PolicyClient(address) as client:
        assert client.ask(request(recipient="postmaster@example.com")) == "DUNNO"
        client.sock.settimeout(5)
        started = time.monotonic()
        assert client.sock.recv(10) == b""
        assert 0.9 < time.monotonic() - started < 4


def test_a_busy_port_is_a_clear_error(tmp_path: Path, redis_server: Any) -> None:
    """Listening on a port already in use fails at start-up with the address in the message."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _, _ = write_config(tmp_path, redis_server.url, listen=[f"127.0.0.1:{port}"])
        import subprocess

        from support.policy_client import MXWARD

        out = subprocess.run(
            [MXWARD, "--config", str(config), "policyd"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_connections_are_spread_over_the_workers(tmp_path: Path, redis_server: Any) -> None:
    """Each worker accepts on its own SO_REUSEPORT socket: a burst does not land on one worker."""
    config, log, address = write_config(tmp_path, redis_server.url)
    with running(config, log, address) as daemon:
        clients = [PolicyClient(address) for _ in range(24)]
        try:
            for client in clients:
                client.__enter__()
                assert client.ask(request(recipient="postmaster@example.com")) == "DUNNO"
            port = address.rsplit(":", 1)[1]
            owners = subprocess.run(
                ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            pids = {int(pid) for pid in re.findall(r"pid=(\d+)", owners)}
            assert pids == set(daemon.workers()), owners
        finally:
            for client in clients:
                client.__exit__(None, None, None)


def test_a_second_daemon_on_the_same_port_refuses_to_start(tmp_path: Path, redis_server: Any) -> None:
    """The port is probed without SO_REUSEPORT first, so nobody silently shares it."""
    config, log, address = write_config(tmp_path, redis_server.url)
    with running(config, log, address):
        out = subprocess.run(
            [MXWARD, "--config", str(config), "policyd"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode != 0
        assert f"cannot listen on {address}" in out.stdout + out.stderr
