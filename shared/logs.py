"""Logging set-up and the one-line decision summary.

Every decision produces exactly one INFO line of ``key=value`` pairs, for example::

    decision instance=5499.6b059fa5.c0eb7.0 queue=- client=unknown[192.0.2.7] helo=mx.example.net
      from=<alice@example.net> rcpt=<bob@example.com> state=RCPT action=DEFER_IF_PERMIT score=0
      checks="greylist:fail(forced,0.4ms)" ms=0.6

(one line in the log). Values with spaces or quotes are quoted; control characters never reach
the log. Check words are qpsmtpd's: pass, fail, skip, error; ``(observe)`` marks a check in
observe mode, ``(forced)`` one whose action decided. Message bodies and credentials are never
logged.

Targets (``[mxward] log_target``): ``stderr`` (systemd's journal adds the time stamp),
``syslog`` / ``syslog:/dev/log`` (facility ``syslog_facility``, default ``mail``: the lines land
next to Postfix's) and ``file:/path`` (reopened when logrotate moves it).
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Mapping

from mxward.shared.plugin import Decision, LogValue, Transaction

__all__ = ["decision_line", "kv", "setup_logging"]

_SAFE = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:@/+[]<>,()=*#%!?&~^{}|$'"
)


def kv(value: LogValue) -> str:
    """One log value: bare when safe, else double-quoted with escapes; empty as ``-``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    if all(ch in _SAFE for ch in text):
        return text
    if len(text) > 300:
        text = text[:300] + "..."
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif not ch.isprintable():
            escaped.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'


def _fields(data: Mapping[str, LogValue]) -> str:
    return " ".join(f"{k}={kv(v)}" for k, v in data.items())


def decision_line(tx: Transaction, decision: Decision, action_text: str) -> str:
    """The decision summary for one request (see the module docstring)."""
    parts = []
    forced = decision.action
    for r in decision.results:
        notes = []
        if r.observed:
            notes.append("observe")
        elif r.action is not None and r.action is forced:
            notes.append("forced")
        if r.score:
            notes.append(f"{r.score:+g}")
        notes.append(f"{r.elapsed_ms:.1f}ms")
        extra = ",".join(notes)
        detail = " ".join(f"{k}={v}" for k, v in r.log.items()) if r.log else ""
        parts.append(f"{r.check}:{r.verdict.value}({extra})" + (f"[{detail}]" if detail else ""))
    action_word = action_text.split(" ", 1)[0]
    return (
        f"decision instance={kv(tx.instance)} queue={kv(tx.queue_id)}"
        f" client={kv(f'{tx.client_name}[{tx.client_address}]')} helo={kv(tx.helo)}"
        f" from={kv(f'<{tx.sender}>')} rcpt={kv(f'<{tx.recipient}>' if tx.recipient else '')}"
        f" state={kv(tx.protocol_state)} action={kv(action_word)}"
        f" score={decision.score:g}"
        + (f" exempt={decision.exempt}" if decision.exempt else "")
        + f" checks={kv(' '.join(parts))} ms={decision.elapsed_ms:.1f}"
        + (f" reply={kv(action_text)}" if action_word not in ("DUNNO", "PREPEND") else "")
    )


def setup_logging(level: str, target: str, *, ident: str, facility: str = "mail") -> None:
    """Configure the root logger once per process."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {ident}[%(process)d]: %(levelname)s %(message)s")
        )
    elif target.startswith("file:"):
        handler = logging.handlers.WatchedFileHandler(target[5:], encoding="utf-8")
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {ident}[%(process)d]: %(levelname)s %(message)s")
        )
    else:
        address = target[7:] if target.startswith("syslog:") else "/dev/log"
        handler = logging.handlers.SysLogHandler(
            address=address, facility=logging.handlers.SysLogHandler.facility_names[facility]
        )
        handler.setFormatter(logging.Formatter(f"{ident}[%(process)d]: %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
