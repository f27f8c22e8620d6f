"""Faults between Postfix and `mxward filter`: no message is ever lost.

In each test some messages are sent while something is broken; they must end up either
delivered or still in Postfix's queue (counted), and once the fault is gone and the queue is
flushed, every message is delivered exactly once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.filter_setup import FilterDaemon, FilterLab, filter_lab
from support.postfix import send_mail

pytestmark = pytest.mark.postfix


def _send(lab: FilterLab, rcpts: list[str], **kw: Any) -> None:
    for rcpt in rcpts:
        sent = send_mail(lab.postfix.smtpd_port, mail_from="alice@sender.example", rcpt_to=[rcpt], **kw)
        assert sent.data is not None and sent.data.code == 250, sent


def _queued(lab: FilterLab) -> set[str]:
    return {r.address for m in lab.postfix.queue() for r in m.recipients}


def _deferred(lab: FilterLab) -> set[str]:
    """Recipients that Postfix tried and deferred (in the deferred queue)."""
    return {r.address for m in lab.postfix.queue() if m.queue_name == "deferred" for r in m.recipients}


def _wait(predicate: Any, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def _all_delivered_once(lab: FilterLab, rcpts: list[str], timeout: float = 40.0) -> None:
    """Flush the queue until everything is out; each recipient got exactly one copy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lab.postfix.flush()
        if all(lab.postfix.sink.delivered_to(r) for r in rcpts) and not lab.postfix.queue():
            break
        time.sleep(0.5)
    counts = {r: len(lab.postfix.sink.delivered_to(r)) for r in rcpts}
    assert counts == dict.fromkeys(rcpts, 1), (counts, lab.postfix.queue(), lab.daemon.log_text()[-2000:])


def test_reinjection_smtpd_stopped(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    rcpts = [f"r{n}@sink.test" for n in range(4)]
    with filter_lab(tmp_path, postfix, redis_server.url, forward=True) as lab:
        assert lab.forwarder is not None
        lab.forwarder.stop()
        _send(lab, rcpts)
        _wait(lambda: _deferred(lab) == set(rcpts), what="all messages deferred")
        assert all(not lab.postfix.sink.delivered_to(r) for r in rcpts)
        assert "451 4.3.0" in lab.postfix.maillog()
        lab.forwarder.start()
        _all_delivered_once(lab, rcpts)


def test_state_store_stopped(tmp_path: Path, postfix: Any, redis_factory: Any) -> None:
    """Without Redis, clean mail still flows (facts marked unavailable); quarantine defers."""
    redis = redis_factory()
    rcpts = ["clean@sink.test"]
    dateless = b"From: <alice@sender.example>\r\nTo: <q@sink.test>\r\nSubject: q\r\n\r\nbody\r\n"
    with filter_lab(tmp_path, postfix, redis.url) as lab:
        redis.stop()
        _send(lab, rcpts)
        lab.postfix.sink.wait_delivered("clean@sink.test", timeout=30)
        _send(lab, ["q@sink.test"], message=dateless)
        _wait(lambda: "q@sink.test" in _deferred(lab), what="the quarantine-bound message deferred")
        redis.start()
        deadline = time.monotonic() + 40
        while "q@sink.test" in _queued(lab) and time.monotonic() < deadline:
            lab.postfix.flush()
            time.sleep(0.5)
        assert "q@sink.test" not in _queued(lab)
        assert "action=quarantine" in lab.daemon.log_text()


def test_quarantine_directory_unwritable(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    dateless = b"From: <alice@sender.example>\r\nTo: <q@sink.test>\r\nSubject: q\r\n\r\nbody\r\n"
    with filter_lab(tmp_path, postfix, redis_server.url) as lab:
        target = tmp_path / "data" / "quarantine"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.rename(tmp_path / "quarantine.old")
        target.write_text("a file where the directory should be")  # unwritable even for root
        _send(lab, ["q@sink.test"], message=dateless)
        _wait(lambda: "q@sink.test" in _deferred(lab), what="the message deferred")
        assert "451 4.3.0" in lab.postfix.maillog()
        target.unlink()
        deadline = time.monotonic() + 40
        while "q@sink.test" in _queued(lab) and time.monotonic() < deadline:
            lab.postfix.flush()
            time.sleep(0.5)
        assert "q@sink.test" not in _queued(lab)
        assert "quarantined as" in lab.postfix.maillog()


def test_filter_killed_in_the_middle_of_a_message(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """SIGKILL while the filter holds messages: Postfix keeps them; a new filter delivers them once."""
    rcpts = [f"k{n}@sink.test" for n in range(3)]
    slow = 'checks = ["headers", "slowcontent"]\n'
    with filter_lab(
        tmp_path, postfix, redis_server.url, filter_extra=slow, extra='[checks.slowcontent]\nsleep = "60s"\n'
    ) as lab:
        _send(lab, rcpts)
        lab.postfix.wait_for_log(r"from=<alice@sender\.example>.*queue active", timeout=20)
        time.sleep(1.5)  # the filter has the messages and sleeps in its check
        workers = lab.daemon.workers()
        os.kill(lab.daemon.proc.pid, signal.SIGKILL)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        lab.daemon.proc.wait()
        _wait(lambda: _deferred(lab) == set(rcpts), what="deferred")
        assert all(not lab.postfix.sink.delivered_to(r) for r in rcpts)
        lab.config.write_text(lab.config.read_text().replace(slow, 'checks = ["headers"]\n'))
        lab.daemon = FilterDaemon(lab.config, lab.log, lab.port)
        lab.daemon.wait_ready()
        _all_delivered_once(lab, rcpts)


def test_sigterm_lets_a_message_in_progress_finish(tmp_path: Path, postfix: Any, redis_server: Any) -> None:
    """A graceful stop waits for the transaction in progress: delivered, nothing left queued."""
    slow = 'checks = ["headers", "slowcontent"]\n'
    with filter_lab(
        tmp_path, postfix, redis_server.url, filter_extra=slow, extra='[checks.slowcontent]\nsleep = "2s"\n'
    ) as lab:
        _send(lab, ["graceful@sink.test"])
        lab.postfix.wait_for_log(r"from=<alice@sender\.example>.*queue active", timeout=20)
        time.sleep(0.5)
        lab.daemon.signal(signal.SIGTERM)
        assert lab.daemon.proc.wait(timeout=30) == 0
        lab.postfix.sink.wait_delivered("graceful@sink.test", timeout=10)
        assert "graceful@sink.test" not in _queued(lab)
