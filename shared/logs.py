"""Logging set-up and the one-line decision summary.

Every decision produces exactly one INFO line of ``key=value`` pairs, for example::

    decision instance=5499.6b059fa5.c0eb7.0 queue=- client=unknown[192.0.2.7] helo=mx.example.net
      from=<alice@example.net> rcpt=<bob@example.com> state=RCPT action=DEFER_IF_PERMIT score=0
      checks=greylist:fail(forced,0.4ms) ms=0.6

(one line in the log). Values with spaces or quotes are quoted; control characters never reach
the log. A value is cut at 300 characters, except ``checks=``: there each check's part is cut
at 300, so every verdict stays in the line. Check words are qpsmtpd's: pass, fail, skip,
error; ``(observe)`` marks a check in observe mode, ``(forced)`` one whose action decided,
``(reused)`` a result given again from cached DNS answers instead of the check's time.
Message bodies and credentials are never logged.

Targets (``[mxward] log_target``): ``stderr`` (systemd's journal adds the time stamp),
``syslog`` / ``syslog:/dev/log`` (facility ``syslog_facility``, default ``mail``: the lines land
next to Postfix's) and ``file:/path`` (reopened when logrotate moves it).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import re
import sys
import time
from typing import TextIO

from mxward.shared.aio import running_loop
from mxward.shared.plugin import Action, Decision, LogValue, Result, Transaction

__all__ = ["LineHandler", "bound_part", "checks_value", "decision_line", "info_line", "kv", "setup_logging"]

# Values made only of these characters are logged bare (the definition; _safe() tests it).
_SAFE = re.compile(r"[A-Za-z0-9.\-_:@/+\[\]<>,()=*#%!?&~^{}|$']*")
_VALUE_MAX = 300  # characters of one logged value
_PART_MAX = 300  # characters of one check's part of checks=


def _safe(text: str) -> bool:
    """True if ``text`` is logged bare: only characters of ``_SAFE``.

    Those are the printable ASCII characters but space, ``"``, ``;``, ``\\`` and backquote; the
    string methods below test that in a fraction of the regex's time (``isascii`` reads a flag).
    """
    return (
        text.isascii()
        and text.isprintable()
        and " " not in text
        and '"' not in text
        and "\\" not in text
        and ";" not in text
        and "`" not in text
    )


def kv(value: LogValue) -> str:
    """One log value: bare when safe, else double-quoted with escapes; empty as ``-``.

    Longer values are cut at 300 characters (``...`` marks the cut).
    """
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if _safe(text):
        return text
    if len(text) > _VALUE_MAX:
        text = text[:_VALUE_MAX] + "..."
    return _quoted(text)


def _quoted(text: str) -> str:
    """``text`` in double quotes: quotes and backslashes escaped, unprintables as ``\\xNN``."""
    if text.isprintable():
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif not ch.isprintable():
            escaped.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def checks_value(parts: list[str]) -> str:
    """The ``checks=`` value: every check's part as one value, never cut as a whole.

    Each part is bounded by itself (:func:`bound_part`), so a check with a long log value
    cannot hide the verdicts of the checks after it.
    """
    if not parts:
        return "-"
    text = " ".join(parts)
    return text if _safe(text) else _quoted(text)


def bound_part(part: str) -> str:
    """One check's part of ``checks=``, cut at 300 characters (``...]`` marks the cut)."""
    return part if len(part) <= _PART_MAX else part[: _PART_MAX - 4] + "...]"


def _part(r: Result, forced: Action) -> str:
    """One check's part of the ``checks=`` value: ``name:verdict(extra)[log]``."""
    extra = "reused" if r.reused else f"{r.elapsed_ms:.1f}ms"
    if r.score:
        extra = f"{r.score:+g},{extra}"
    if r.observed:
        extra = "observe," + extra
    elif r.action is not None and r.action is forced:
        extra = "forced," + extra
    # (_value_ is the Enum's plain attribute; .value is a slower property)
    check: str = r.check
    verdict: str = r.verdict._value_
    part = check + ":" + verdict + "(" + extra + ")"
    if r.log:
        items = [k + "=" + (value if isinstance(value, str) else str(value)) for k, value in r.log.items()]
        part = bound_part(part + "[" + " ".join(items) + "]")
    return part


# A reused result is the same frozen object request after request (see Result.reused), so its
# part is made once and kept in the object itself, under a name that is not a field: equality,
# repr and dataclasses.replace look at fields only.
_PART_ATTR = "_logged_part"

# The logged form of each reply text seen lately (rejections and deferrals repeat their texts).
_REPLIES: dict[str, str] = {}


def decision_line(tx: Transaction, decision: Decision, action_text: str) -> str:
    """The decision summary for one request (see the module docstring)."""
    parts = []
    forced = decision.action
    for r in decision.results:
        if r.reused and r.action is None and not r.observed:
            own = r.__dict__
            part = own.get(_PART_ATTR)
            if part is None:
                part = own[_PART_ATTR] = _part(r, forced)
            parts.append(part)
        else:
            parts.append(_part(r, forced))
    action_word = action_text.split(" ", 1)[0]
    fields = [
        tx.instance,
        tx.queue_id,
        f"{tx.client_name}[{tx.client_address}]",
        tx.helo,
        f"<{tx.sender}>",
        f"<{tx.recipient}>" if tx.recipient else "",
        tx.protocol_state,
        action_word,
    ]
    # One test over all eight values (joined by a safe character) instead of one each: on
    # nearly every request none needs quoting, and only empty values become "-".
    if _safe("=".join(fields)):
        v: list[str] = [f or "-" for f in fields]
    else:
        v = [kv(f) for f in fields]
    # (One join of str pieces: compiled, an f-string would call str.format for each value.)
    line = "".join(
        [
            "decision instance=", v[0], " queue=", v[1], " client=", v[2], " helo=", v[3],
            " from=", v[4], " rcpt=", v[5], " state=", v[6], " action=", v[7],
            f" score={decision.score:g}",
        ]
    )  # fmt: skip
    exempt: str = decision.exempt
    if exempt:
        line += " exempt=" + exempt
    line += " checks=" + checks_value(parts) + f" ms={decision.elapsed_ms:.1f}"
    if action_word not in ("DUNNO", "PREPEND"):
        reply = _REPLIES.get(action_text)
        if reply is None:  # a few distinct texts (deferrals count their seconds): keep them
            if len(_REPLIES) >= 1024:
                _REPLIES.clear()
            reply = _REPLIES[action_text] = kv(action_text)
        line += " reply=" + reply
    return line


class LineHandler(logging.Handler):
    """Writes log lines to stderr or a file, buffered for one event-loop iteration.

    At a few thousand decisions per second, formatting and writing each line separately
    costs more than deciding; this handler writes everything logged during one loop
    iteration with one write (at once when no event loop runs). A file is reopened when
    logrotate has moved it away (checked at most once a second).
    """

    def __init__(self, ident: str, path: str = "") -> None:
        super().__init__()
        self.ident = ident
        self.path = path
        self.stream: TextIO = open(path, "a", encoding="utf-8") if path else sys.stderr  # noqa: SIM115
        self._id = self._identity()
        self._buf: list[str] = []
        self._scheduled = False
        self._second = -1
        self._stamp = ""
        self._ident = ""
        self._checked = 0.0
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # A worker must not repeat its parent's buffered lines, nor its pid.
        self._buf = []
        self._scheduled = False
        self._second = -1

    def _identity(self) -> tuple[int, int]:
        if not self.path:
            return (0, 0)
        st = os.fstat(self.stream.fileno())
        return (st.st_dev, st.st_ino)

    def _prefix(self, level: str) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # once a second: the time stamp, and the pid (forks change it)
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._ident = f"{self.ident}[{os.getpid()}]:"
        stamp: str = self._stamp
        ident: str = self._ident
        millis = str(int((now - second) * 1000) + 1000)[1:]  # 0..999 as three digits
        return f"{stamp},{millis} {ident} {level} "

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(record.levelname, self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, level: str, message: str) -> None:
        self._buf.append(self._prefix(level) + message + "\n")
        if self._scheduled:
            return
        try:
            loop = running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf:
            return
        data = "".join(self._buf)
        self._buf.clear()
        if self.path:
            now = time.monotonic()
            if now - self._checked >= 1.0:
                self._checked = now
                self._reopen_if_moved()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed stream must not stop mail flow

    def _reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != self._id
        except FileNotFoundError:
            moved = True
        if moved:
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._id = self._identity()

    def close(self) -> None:
        self.flush()
        if self.path:
            with contextlib.suppress(OSError):
                self.stream.close()
        super().close()


_line_handler: LineHandler | None = None


def info_line(logger: logging.Logger, message: str) -> None:
    """Log one INFO line; through the buffered handler's fast path when it is installed."""
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _line_handler
    if handler is not None:
        handler.write_line("INFO", message)
    else:
        logger.info("%s", message)


def setup_logging(level: str, target: str, *, ident: str, facility: str = "mail") -> None:
    """Configure the root logger once per process."""
    global _line_handler  # noqa: PLW0603 - logging configuration is process-wide by nature
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if target == "stderr" or target.startswith("file:"):
        handler = _line_handler = LineHandler(ident, target[5:] if target.startswith("file:") else "")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        _line_handler = None
        address = target[7:] if target.startswith("syslog:") else "/dev/log"
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.facility_names[facility]
        )
        handler.setFormatter(logging.Formatter(f"{ident}[%(process)d]: %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
