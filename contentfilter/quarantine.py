"""The quarantine: messages the content filter kept instead of delivering, until someone decides.

When the filter's verdict is *quarantine*, the message is stored here **before** the filter
answers ``250`` to Postfix. If storing fails (disk unwritable or full, Redis down), :meth:`store`
raises :class:`QuarantineError` and leaves nothing behind; the filter then answers ``451 4.3.0``
and Postfix keeps the message and tries again later. Mail is never lost, and never half-stored.

On disk (the node that stored the message)
    ``<data_dir>/quarantine/YYYYMMDD/<id>.eml`` is the message exactly as the filter received it,
    ``<id>.json`` next to it is its metadata: the envelope (sender, recipients and their ESMTP
    MAIL and RCPT parameters, needed to deliver it later), client address, queue id, subject,
    reason and score. Both are written to a temporary file in the same directory, flushed to
    disk (``fsync``), renamed, and the directory is flushed too, so a power cut leaves either the
    complete file or none. The metadata file is renamed last: a message file without one is the
    trace of a crash in the middle of storing and is removed by :meth:`purge` after an hour.
    Directories are mode 0700, files 0600.

In Redis (namespace ``quarantine``, shared by every MX node)::

    quarantine:{q}:e:<id>   hash: v=1, entry=<the metadata as JSON>      TTL retention
    quarantine:{q}:index    sorted set of ids, scored by storage time     TTL retention, renewed

    Each entry names the node (host name) that holds the files, so ``mxward quarantine list`` on
    any node shows the whole cluster's quarantine, newest first. Reading, releasing and deleting
    need the files, so they run on the node that stored the message; elsewhere they fail with an
    error that names it. All keys share the hash tag ``{q}``, so the scripts that write an entry
    and the index together work on Redis Cluster.

Ids
    ``YYYYMMDD-HHMMSS-mmm-xxxxxxxx``: the UTC time of storage to the millisecond, then 32 random
    bits (``20240501-121530-123-9f3a6c01``). They sort by time, are safe as file names, and are
    checked against this pattern wherever they come in (the command line, Redis), so an id can
    never name a path outside the quarantine.

Retention
    ``[filter] quarantine_retention`` (default 30 days). The Redis entries expire on their own;
    :meth:`purge`, called by the filter every hour, removes the files of entries older than the
    retention whose index entry has expired, leftovers of interrupted writes, and empty day
    directories. A Redis that lost its data (no persistence, a new server) loses only the list:
    :meth:`reindex` restores it from the metadata files of the node it runs on.

Failures
    Every failure is a :class:`QuarantineError` with a message for people: what failed, on which
    file or node, and what to do. :meth:`store` removes what it wrote when the index cannot be
    written (and when it is cancelled). :meth:`release` delivers first and removes afterwards;
    if delivery fails nothing is removed. One release or delete of an entry runs at a time (a
    lock on the message file), so a message is never delivered twice by two administrators.

Command line: ``mxward quarantine list|show|release|delete|reindex`` (:func:`add_parser`,
:func:`run_command`), documented in ``docs/quarantine.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import calendar
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import re
import secrets
import sys
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

from mxward.shared.clock import Clock
from mxward.shared.state import Script, StateError, StateStore
from mxward.shared.units import format_duration, format_remaining

__all__ = [
    "NAMESPACE",
    "Quarantine",
    "QuarantineEntry",
    "QuarantineError",
    "add_parser",
    "run_command",
    "valid_id",
]

log = logging.getLogger(__name__)

NAMESPACE = "quarantine"
_TAG = "q"
_SCHEMA = 1
_ID = re.compile(r"(\d{8})-(\d{6})-(\d{3})-[0-9a-f]{8}")
_ID_EXAMPLE = "20240501-121530-123-9f3a6c01"
_DAY = re.compile(r"\d{8}")
_MAX_SUBJECT = 200
_MAX_REASON = 1000
_GRACE = 3600.0  # an unfinished write older than this was interrupted: remove its leftovers
_EXISTS_BATCH = 500

# KEYS[1] entry hash, KEYS[2] index. ARGV: entry ttl, index ttl, score (storage time), cutoff
# (entries stored before it have expired), id, entry JSON. The index lives as long as its
# newest entry, and loses its expired members whenever an entry is added.
_INDEX = Script(
    "mxward.quarantine.index",
    """
redis.call('HSET', KEYS[1], 'v', '1', 'entry', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
""",
)

# KEYS[1] entry hash, KEYS[2] index. ARGV: id. Returns 1 if the entry existed.
_UNINDEX = Script(
    "mxward.quarantine.unindex",
    """
local n = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return n
""",
)

# KEYS[1] index. ARGV: cutoff, offset, count. Ids stored since the cutoff, newest first.
_RANGE = Script(
    "mxward.quarantine.range",
    "return redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', ARGV[1], 'LIMIT', ARGV[2], ARGV[3])",
)


class QuarantineError(Exception):
    """A quarantine operation failed; the message says what, where, and what to do."""


@dataclass(frozen=True, slots=True)
class QuarantineEntry:
    """One quarantined message: where it is, its envelope, and why it was kept."""

    id: str
    stored_at: float
    node: str  # host name of the node holding the files
    path: str  # the message file on that node
    size: int
    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    client_address: str
    queue_id: str
    subject: str  # decoded, one line, at most 200 characters
    reason: str  # the checks' reasons
    score: float
    mail_options: tuple[str, ...] = ()  # ESMTP MAIL FROM parameters (SIZE=, BODY=, RET=, ...)
    rcpt_options: tuple[tuple[str, ...], ...] = ()  # per recipient: NOTIFY=, ORCPT=, ...

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object (the metadata file, the index, ``list --json``)."""
        data = dataclasses.asdict(self)
        data["v"] = _SCHEMA
        return data

    @classmethod
    def from_json(cls, data: object, *, source: str) -> QuarantineEntry:
        """Parse :meth:`to_json`'s output; QuarantineError names ``source`` if it is malformed."""
        try:
            return cls._parse(data)
        except (TypeError, ValueError) as exc:
            raise QuarantineError(f"{source} is malformed: {exc}") from None

    @classmethod
    def _parse(cls, data: object) -> QuarantineEntry:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if data.get("v") != _SCHEMA:
            raise ValueError(f"unknown format version {data.get('v')!r}")
        entry = cls(
            id=_str(data, "id"),
            stored_at=_number(data, "stored_at"),
            node=_str(data, "node"),
            path=_str(data, "path"),
            size=int(_number(data, "size")),
            sender=_str(data, "sender"),
            recipients=_strings(_field(data, "recipients"), "recipients"),
            client_address=_str(data, "client_address"),
            queue_id=_str(data, "queue_id"),
            subject=_str(data, "subject"),
            reason=_str(data, "reason"),
            score=_number(data, "score"),
            mail_options=_strings(data.get("mail_options", []), "mail_options"),
            rcpt_options=tuple(
                _strings(item, "rcpt_options") for item in _list(data.get("rcpt_options", []), "rcpt_options")
            ),
        )
        if not valid_id(entry.id):
            raise ValueError(f"bad id {entry.id!r}")
        return entry


# What delivers a released message (the filter's reinjection): the entry and the message.
Send = Callable[[QuarantineEntry, bytes], Awaitable[None]]


def _field(data: dict[str, Any], name: str) -> object:
    if name not in data:
        raise ValueError(f"{name} is missing")
    return data[name]


def _str(data: dict[str, Any], name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str):
        raise TypeError(f"{name} is not a string")
    return value


def _number(data: dict[str, Any], name: str) -> float:
    value = _field(data, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} is not a number")
    return float(value)


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{name} is not a list")
    return value


def _strings(value: object, name: str) -> tuple[str, ...]:
    items = _list(value, name)
    if not all(isinstance(item, str) for item in items):
        raise TypeError(f"{name} holds something other than strings")
    return tuple(items)


def valid_id(text: str) -> bool:
    """True if ``text`` has the shape of a quarantine id (and so is safe as a file name)."""
    return isinstance(text, str) and _ID.fullmatch(text) is not None


def _check_id(text: str) -> str:
    if not valid_id(text):
        raise QuarantineError(
            f"{_printable(str(text))!r} is not a quarantine id (ids look like {_ID_EXAMPLE})"
        )
    return text


def _new_id(now: float) -> str:
    millis = int(now * 1000)
    seconds, ms = divmod(millis, 1000)
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(seconds))}-{ms:03d}-{secrets.token_hex(4)}"


def _id_time(entry_id: str) -> float | None:
    """The storage time written in an id; None if it is no id or names no real time."""
    match = _ID.fullmatch(entry_id)
    if match is None:
        return None
    day, clock, ms = match.groups()
    try:
        return calendar.timegm(time.strptime(day + clock, "%Y%m%d%H%M%S")) + int(ms) / 1000
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Text for people: one line, no control or bidi characters, bounded


def _clean(text: str, limit: int) -> str:
    """One printable line of at most ``limit`` characters (controls become spaces)."""
    out = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cs":
            out.append("\ufffd")
        elif category in ("Cc", "Cf"):
            out.append(" ")
        else:
            out.append(char)
    line = " ".join("".join(out).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def clean_subject(raw: str) -> str:
    """A Subject for listings: RFC 2047 words decoded, one line, at most 200 characters."""
    text = raw
    if "=?" in text:
        # Not valid encoded words: they are shown as they are.
        with contextlib.suppress(HeaderParseError, UnicodeError, LookupError, ValueError):
            text = str(make_header(decode_header(text)))
    return _clean(text, _MAX_SUBJECT)


def _printable(text: str, keep: str = "") -> str:
    """``text`` with control, format and surrogate characters escaped, for terminals."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or char in keep:
            out.append(char)
        elif ord(char) < 0x100:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync; mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> bool:
    """Remove a file; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------------------------
# The quarantine


class Quarantine:
    """Stores, lists, releases and deletes quarantined messages (see the module docstring).

    ``directory`` is ``<data_dir>/quarantine`` (created on the first store); ``node`` is this
    host's name as the other nodes should see it; ``retention`` is in seconds.
    """

    def __init__(
        self,
        directory: Path,
        store: StateStore,
        *,
        node: str,
        retention: float = 30 * 86400,
        clock: Clock,
    ) -> None:
        if not isinstance(node, str) or not node or not node.isprintable() or any(c.isspace() for c in node):
            raise ValueError(f"node {node!r} must be a host name")
        if (
            isinstance(retention, bool)
            or not isinstance(retention, int | float)
            or not math.isfinite(retention)
        ):
            raise ValueError(f"retention must be a number of seconds, not {retention!r}")
        if retention < 1:
            raise ValueError(f"retention must be at least 1s, not {retention!r}")
        self.directory = Path(directory)
        self.node = node
        self.retention = float(retention)
        self.clock = clock
        self._ttl = math.ceil(self.retention)
        self._ns = store.namespace(NAMESPACE)
        ttl = format_duration(self._ttl)
        self._ns.declare(f"{{{_TAG}}}:e:ID", ttl, "quarantined message: node holding it, envelope, reason")
        self._ns.declare(f"{{{_TAG}}}:index", f"{ttl} after the newest", "quarantine ids by storage time")
        self._index_key = self._ns.key("index", tag=_TAG)

    def __repr__(self) -> str:
        return f"<Quarantine {self.directory} node={self.node}>"

    # -- paths ---------------------------------------------------------------------------------

    def _entry_key(self, entry_id: str) -> str:
        return self._ns.key("e", entry_id, tag=_TAG)

    def _paths(self, entry_id: str) -> tuple[Path, Path]:
        """(message file, metadata file) of an id, on this node."""
        day = self.directory / entry_id[:8]
        return day / f"{entry_id}.eml", day / f"{entry_id}.json"

    def _cutoff(self) -> float:
        return self.clock.now() - self.retention

    # -- store ---------------------------------------------------------------------------------

    async def store(
        self,
        message: bytes,
        *,
        sender: str,
        recipients: Sequence[str],
        client_address: str,
        queue_id: str,
        subject: str,
        reason: str,
        score: float,
        mail_options: Sequence[str] = (),
        rcpt_options: Sequence[Sequence[str]] = (),
    ) -> QuarantineEntry:
        """Store a message durably and index it; QuarantineError (and nothing left) on failure."""
        if not isinstance(message, bytes | bytearray | memoryview):
            raise QuarantineError("the message must be bytes")
        if isinstance(recipients, str) or not recipients:
            raise QuarantineError("a quarantined message needs at least one recipient")
        if rcpt_options and len(rcpt_options) != len(recipients):
            raise QuarantineError(
                f"rcpt_options has {len(rcpt_options)} items for {len(recipients)} recipients"
            )
        now = self.clock.now()
        entry_id = _new_id(now)
        path, _ = self._paths(entry_id)
        data = bytes(message)
        entry = QuarantineEntry(
            id=entry_id,
            stored_at=now,
            node=self.node,
            path=str(path),
            size=len(data),
            sender=str(sender),
            recipients=tuple(str(r) for r in recipients),
            client_address=str(client_address),
            queue_id=str(queue_id),
            subject=clean_subject(str(subject)),
            reason=_clean(str(reason), _MAX_REASON),
            score=float(score),
            mail_options=tuple(str(o) for o in mail_options),
            rcpt_options=tuple(tuple(str(o) for o in options) for options in rcpt_options),
        )
        meta = json.dumps(entry.to_json(), indent=1).encode() + b"\n"

        writing = asyncio.ensure_future(asyncio.to_thread(self._write, entry_id, data, meta))
        try:
            await asyncio.shield(writing)
        except asyncio.CancelledError:
            # The thread goes on writing: remove what it wrote once it is done.
            writing.add_done_callback(lambda done: self._discard_after(done, entry_id))
            raise
        except OSError as exc:
            where = exc.filename or self.directory
            raise QuarantineError(f"cannot store the message in {where}: {_reason(exc)}") from exc

        try:
            await self._index(entry, self._ttl)
        except BaseException as exc:
            # Not indexed (or not known to be): the caller answers 451 and Postfix retries, so
            # these files must go. If the script did run and only its reply was lost, the entry
            # shows as "file missing" until it expires or is deleted.
            self._discard(entry_id)
            if isinstance(exc, StateError):
                raise QuarantineError(
                    f"cannot index the quarantined message (files removed again): {exc}"
                ) from exc
            raise
        log.debug("quarantined id=%s queue=%s size=%d", entry_id, entry.queue_id, entry.size)
        return entry

    def _write(self, entry_id: str, message: bytes, meta: bytes) -> None:
        """Write the message and its metadata (both renamed into place), then flush the directory."""
        path, meta_path = self._paths(entry_id)
        day = path.parent
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            day.mkdir(mode=0o700)
        except FileExistsError:
            if not day.is_dir():
                raise
        else:
            _fsync_dir(self.directory)
        tmp_path = day / f".{entry_id}.eml.tmp"
        tmp_meta = day / f".{entry_id}.json.tmp"
        try:
            _write_durably(tmp_path, message)
            os.rename(tmp_path, path)
            _write_durably(tmp_meta, meta)
            os.rename(tmp_meta, meta_path)  # last: the entry is complete from here on
            _fsync_dir(day)
        except BaseException:
            self._discard(entry_id)
            raise

    def _discard_after(self, done: asyncio.Future[None], entry_id: str) -> None:
        if not done.cancelled():
            done.exception()  # retrieved: the caller was cancelled and no longer cares
        self._discard(entry_id)

    def _discard(self, entry_id: str) -> None:
        """Remove every file of an id (metadata first); log what could not be removed."""
        path, meta_path = self._paths(entry_id)
        day = path.parent
        for victim in (meta_path, day / f".{entry_id}.json.tmp", path, day / f".{entry_id}.eml.tmp"):
            try:
                _unlink(victim)
            except OSError as exc:
                log.error("quarantine: cannot remove %s: %s", victim, _reason(exc))  # noqa: TRY400

    async def _index(self, entry: QuarantineEntry, ttl: int) -> None:
        text = json.dumps(entry.to_json(), separators=(",", ":"))  # ASCII: any address survives
        await self._ns.run(
            _INDEX,
            [self._entry_key(entry.id), self._index_key],
            [ttl, max(ttl, self._ttl), repr(entry.stored_at), repr(self._cutoff()), entry.id, text],
        )

    # -- look up -------------------------------------------------------------------------------

    async def list(self, *, limit: int = 100) -> list[QuarantineEntry]:
        """The newest ``limit`` entries of the whole cluster, newest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive number, not {limit!r}")
        entries: list[QuarantineEntry] = []
        offset = 0
        try:
            while len(entries) < limit:
                want = limit - len(entries)
                found = await self._ns.run(_RANGE, [self._index_key], [repr(self._cutoff()), offset, want])
                if not found:
                    break
                offset += len(found)
                ids = [i for i in found if valid_id(i)]
                hashes = await asyncio.gather(*(self._ns.hgetall(self._entry_key(i)) for i in ids))
                for entry_id, fields in zip(ids, hashes, strict=True):
                    if not fields:  # expired or removed a moment ago
                        continue
                    try:
                        entries.append(self._parse(entry_id, fields))
                    except QuarantineError as exc:
                        log.warning("quarantine: skipping an entry: %s", exc)
                if len(found) < want:
                    break
        except StateError as exc:
            raise QuarantineError(f"cannot list the quarantine: its index is unavailable: {exc}") from exc
        return entries[:limit]

    def _parse(self, entry_id: str, fields: dict[str, str]) -> QuarantineEntry:
        source = f"index entry {entry_id}"
        try:
            data = json.loads(fields.get("entry", ""))
        except ValueError as exc:
            raise QuarantineError(f"{source} is malformed: {exc}") from None
        entry = QuarantineEntry.from_json(data, source=source)
        if entry.id != entry_id:
            raise QuarantineError(f"{source} is malformed: it holds id {entry.id}")
        return entry

    async def get(self, id: str) -> QuarantineEntry:  # noqa: A002 (the public API's name)
        """One entry from the index, else from this node's metadata file."""
        entry_id = _check_id(id)
        try:
            fields = await self._ns.hgetall(self._entry_key(entry_id))
        except StateError as exc:
            local = await asyncio.to_thread(self._local_entry, entry_id)
            if local is not None:
                return local
            raise QuarantineError(
                f"cannot look up {entry_id}: the quarantine index is unavailable ({exc}), "
                "and the message is not stored on this node"
            ) from exc
        if fields:
            return self._parse(entry_id, fields)
        local = await asyncio.to_thread(self._local_entry, entry_id)
        if local is not None:
            return local
        raise QuarantineError(f"no quarantined message {entry_id}")

    def _local_entry(self, entry_id: str) -> QuarantineEntry | None:
        """The entry from this node's metadata file; None if there is none."""
        path, meta_path = self._paths(entry_id)
        try:
            text = meta_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError) as exc:
            raise QuarantineError(f"cannot read {meta_path}: {exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise QuarantineError(f"{meta_path} is malformed: {exc}") from None
        entry = QuarantineEntry.from_json(data, source=str(meta_path))
        if entry.id != entry_id:
            raise QuarantineError(f"{meta_path} is malformed: it holds id {entry.id}")
        return dataclasses.replace(entry, path=str(path))

    def _elsewhere(self, entry: QuarantineEntry, command: str) -> QuarantineError:
        return QuarantineError(
            f"quarantined message {entry.id} is stored on node {_printable(entry.node)}, not on this node "
            f"({self.node}): run `mxward quarantine {command} {entry.id}` there"
        )

    def _missing(self, entry: QuarantineEntry, path: Path) -> QuarantineError:
        return QuarantineError(
            f"the file of quarantined message {entry.id} is missing on this node ({path}): "
            "it was released or deleted meanwhile, or removed by hand"
        )

    def read(self, entry: QuarantineEntry) -> bytes:
        """The message as stored; QuarantineError naming the node if it is on another one."""
        path, _ = self._paths(_check_id(entry.id))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if entry.node != self.node:
                raise self._elsewhere(entry, "show") from None
            raise self._missing(entry, path) from None
        except OSError as exc:
            raise QuarantineError(f"cannot read {path}: {_reason(exc)}") from exc
        with os.fdopen(fd, "rb") as file:
            return file.read()

    # -- release and delete --------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, entry: QuarantineEntry, command: str) -> Iterator[int]:
        """Hold the lock of an entry's message file (one release or delete at a time); yields its fd."""
        path, _ = self._paths(entry.id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if entry.node != self.node:
                raise self._elsewhere(entry, command) from None
            raise self._missing(entry, path) from None
        except OSError as exc:
            raise QuarantineError(f"cannot open {path}: {_reason(exc)}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QuarantineError(
                    f"quarantined message {entry.id} is being released or deleted by another process"
                ) from None
            try:
                still_there = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                still_there = False
            if not still_there:  # removed while we waited for the lock
                raise self._missing(entry, path)
            yield fd
        finally:
            os.close(fd)

    def _remove_files(self, entry_id: str) -> None:
        """Remove an entry's files (metadata first, so a crash leaves an unfinished entry)."""
        path, meta_path = self._paths(entry_id)
        try:
            _unlink(meta_path)
            _unlink(path)
            with contextlib.suppress(FileNotFoundError):
                _fsync_dir(path.parent)
        except OSError as exc:
            raise QuarantineError(f"cannot remove {exc.filename or path}: {_reason(exc)}") from exc

    async def _unindex(self, entry_id: str) -> bool:
        reply = await self._ns.run(_UNINDEX, [self._entry_key(entry_id), self._index_key], [entry_id])
        return bool(reply)

    async def release(
        self,
        id: str,  # noqa: A002 (the public API's name)
        send: Send,
        *,
        recipients: Sequence[str] | None = None,
    ) -> QuarantineEntry:
        """Deliver a message with ``send``, then remove it; if ``send`` fails, nothing is removed.

        ``recipients`` replaces the original recipients (their RCPT parameters are dropped). The
        entry returned, and the one ``send`` gets, carries the recipients actually used.
        """
        entry = await self.get(id)
        target = entry
        if recipients is not None:
            if isinstance(recipients, str) or not recipients:
                raise QuarantineError("release needs at least one recipient")
            for address in recipients:
                if not isinstance(address, str) or not address or not address.isprintable() or " " in address:
                    raise QuarantineError(f"{_printable(str(address))!r} is not a mail address")
            target = dataclasses.replace(entry, recipients=tuple(recipients), rcpt_options=())
        with self._locked(entry, "release") as fd:
            with os.fdopen(os.dup(fd), "rb") as file:
                message = file.read()
            try:
                await send(target, message)
            except Exception as exc:
                raise QuarantineError(
                    f"release of {entry.id} failed, the message stays in the quarantine: "
                    f"{exc or type(exc).__name__}"
                ) from exc
            try:
                self._remove_files(entry.id)
            except QuarantineError as exc:
                raise QuarantineError(
                    f"{entry.id} was delivered, but its files could not be removed ({exc}); "
                    f"delete it with `mxward quarantine delete {entry.id}` so it is not released twice"
                ) from exc
        log.info(
            "quarantine: released id=%s to %s",
            entry.id,
            ",".join(f"<{_printable(r)}>" for r in target.recipients),
        )
        try:
            await self._unindex(entry.id)
        except StateError as exc:
            raise QuarantineError(
                f"{entry.id} was delivered and its files removed, but the index could not be "
                f"updated ({exc}); the entry stays listed until it expires or "
                f"`mxward quarantine delete {entry.id}` succeeds"
            ) from exc
        return target

    async def delete(self, id: str) -> QuarantineEntry:  # noqa: A002 (the public API's name)
        """Remove a message without delivering it (files on this node, then the index entry)."""
        entry = await self.get(id)
        path, _ = self._paths(entry.id)
        if await asyncio.to_thread(path.exists):
            with self._locked(entry, "delete"):
                self._remove_files(entry.id)
        elif entry.node != self.node:
            raise self._elsewhere(entry, "delete")
        else:
            # Only the metadata file may be left (an interrupted removal): remove it too.
            self._remove_files(entry.id)
        try:
            await self._unindex(entry.id)
        except StateError as exc:
            raise QuarantineError(
                f"the files of {entry.id} were removed, but the index could not be updated ({exc}); "
                "the entry stays listed until it expires or a later delete succeeds"
            ) from exc
        log.info("quarantine: deleted id=%s", entry.id)
        return entry

    # -- maintenance ---------------------------------------------------------------------------

    def _scan(self) -> builtins.list[tuple[Path, str, str]]:
        """(day directory, id, kind) of every file this quarantine wrote: eml, json, tmp."""
        found: builtins.list[tuple[Path, str, str]] = []
        try:
            days = [d for d in self.directory.iterdir() if _DAY.fullmatch(d.name) and d.is_dir()]
        except FileNotFoundError:
            return found
        for day in days:
            try:
                names = os.listdir(day)
            except FileNotFoundError:
                continue
            for name in names:
                stem = name.removeprefix(".").removesuffix(".tmp")
                entry_id, _, suffix = stem.rpartition(".")
                if not valid_id(entry_id) or suffix not in ("eml", "json") or entry_id[:8] != day.name:
                    continue
                kind = "tmp" if name.endswith(".tmp") else suffix
                found.append((day, entry_id, kind))
        return found

    async def purge(self) -> int:
        """Remove expired messages of this node, and leftovers of interrupted writes.

        An entry older than the retention is removed once its index entry is gone (a longer
        retention in force when it was stored keeps it until then). Returns how many messages
        were removed.
        """
        now = self.clock.now()
        cutoff = now - self.retention
        try:
            files = await asyncio.to_thread(self._scan)
        except OSError as exc:
            raise QuarantineError(f"cannot read {self.directory}: {_reason(exc)}") from exc
        kinds: dict[str, set[str]] = {}
        for _, entry_id, kind in files:
            kinds.setdefault(entry_id, set()).add(kind)
        unfinished: list[str] = []  # leftovers of a write or removal that was cut short
        expired: list[str] = []
        for entry_id, present in kinds.items():
            stored = _id_time(entry_id)
            if stored is None:  # not a name this quarantine writes: leave it alone
                continue
            if stored < cutoff:
                expired.append(entry_id)
            elif stored < now - _GRACE and not {"eml", "json"} <= present:
                unfinished.append(entry_id)
        removed = 0
        if unfinished:
            await asyncio.to_thread(self._discard_many, unfinished)
            removed += sum(1 for i in unfinished if "eml" in kinds[i])
        gone: list[str] = []
        try:
            for start in range(0, len(expired), _EXISTS_BATCH):
                batch = expired[start : start + _EXISTS_BATCH]
                exists = await asyncio.gather(*(self._ns.exists(self._entry_key(i)) for i in batch))
                gone += [i for i, indexed in zip(batch, exists, strict=True) if not indexed]
        except StateError as exc:
            raise QuarantineError(
                f"purge: the quarantine index is unavailable, expired messages are kept for now: {exc}"
            ) from exc
        if gone:
            await asyncio.to_thread(self._discard_many, gone)
            removed += sum(1 for i in gone if "eml" in kinds[i])
        await asyncio.to_thread(self._remove_empty_days, cutoff)
        if removed:
            log.info("quarantine: purged %d message(s) older than %s", removed, format_duration(self._ttl))
        return removed

    def _discard_many(self, ids: Sequence[str]) -> None:
        days = set()
        for entry_id in ids:
            self._discard(entry_id)
            days.add(self._paths(entry_id)[0].parent)
        for day in days:
            with contextlib.suppress(OSError):
                _fsync_dir(day)

    def _remove_empty_days(self, cutoff: float) -> None:
        """Remove empty day directories of days that ended before the cutoff."""
        try:
            days = [d for d in self.directory.iterdir() if _DAY.fullmatch(d.name) and d.is_dir()]
        except FileNotFoundError:
            return
        for day in days:
            try:
                end = calendar.timegm(time.strptime(day.name, "%Y%m%d")) + 86400
            except ValueError:
                continue
            if end < cutoff:
                with contextlib.suppress(OSError):  # not empty, or gone: keep going
                    day.rmdir()

    async def reindex(self) -> int:
        """Index this node's stored messages that the index lost; returns how many."""
        cutoff = self._cutoff()
        try:
            files = await asyncio.to_thread(self._scan)
        except OSError as exc:
            raise QuarantineError(f"cannot read {self.directory}: {_reason(exc)}") from exc
        complete = sorted({i for _, i, k in files if k == "json"} & {i for _, i, k in files if k == "eml"})
        added = 0
        try:
            for entry_id in complete:
                entry = await asyncio.to_thread(self._local_entry, entry_id)
                if entry is None or entry.stored_at < cutoff:
                    continue
                if await self._ns.exists(self._entry_key(entry_id)):
                    continue
                left = math.ceil(entry.stored_at + self.retention - self.clock.now())
                if left < 1:
                    continue
                await self._index(dataclasses.replace(entry, node=self.node), left)
                added += 1
        except StateError as exc:
            raise QuarantineError(
                f"reindex stopped after {added} entries: the quarantine index is unavailable: {exc}"
            ) from exc
        if added:
            log.info("quarantine: reindexed %d message(s)", added)
        return added


# --------------------------------------------------------------------------------------------
# Command line: mxward quarantine ...


def _id_arg(text: str) -> str:
    if not valid_id(text):
        raise argparse.ArgumentTypeError(
            f"{_printable(text)!r} is not a quarantine id (ids look like {_ID_EXAMPLE})"
        )
    return text


def _limit_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 to 100000")
    return value


_ADDRESS = re.compile(r"[^\s<>@]+@[^\s<>@]+")


def _address_arg(text: str) -> str:
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not _ADDRESS.fullmatch(address) or not address.isprintable():
        raise argparse.ArgumentTypeError(f"{_printable(text)!r} is not a mail address (user@example.com)")
    return address


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``mxward quarantine`` and its actions."""
    top = subparsers.add_parser(
        "quarantine",
        help="list, show, release or delete quarantined messages",
        description="Messages the content filter kept instead of delivering. The list covers every "
        "node sharing the state store; show, release and delete run on the node that stored the "
        "message.",
    )
    actions = top.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the newest messages of all nodes, newest first")
    listing.add_argument("--limit", type=_limit_arg, default=100, metavar="N", help="at most N (100)")
    listing.add_argument("--json", action="store_true", help="print a JSON array with every field")
    show = actions.add_parser("show", help="a message's details and headers (--raw: the whole message)")
    show.add_argument("id", type=_id_arg, metavar="ID")
    show.add_argument("--raw", action="store_true", help="print the message exactly as stored")
    release = actions.add_parser("release", help="deliver a message, then remove it from the quarantine")
    release.add_argument("id", type=_id_arg, metavar="ID")
    release.add_argument(
        "--to",
        type=_address_arg,
        action="append",
        metavar="ADDR",
        help="deliver to ADDR instead of the original recipients (repeat for several)",
    )
    delete = actions.add_parser("delete", help="remove a message without delivering it")
    delete.add_argument("id", type=_id_arg, metavar="ID")
    actions.add_parser("reindex", help="list again this node's messages that the state store lost")


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def _size(size: int) -> str:
    """Bytes the way ``ls -h`` writes them: 812, 4.2K, 13M."""
    if size < 1024:
        return str(size)
    value = size / 1024
    for unit in ("K", "M"):
        if value < 1024:
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
        value /= 1024
    return f"{value:.1f}G" if value < 10 else f"{value:.0f}G"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _to(entry: QuarantineEntry) -> str:
    first = f"<{_printable(entry.recipients[0])}>" if entry.recipients else "-"
    more = len(entry.recipients) - 1
    return f"{first} (+{more})" if more > 0 else first


def _table(entries: Sequence[QuarantineEntry]) -> list[str]:
    head = ("ID", "DATE (UTC)", "SIZE", "NODE", "FROM", "TO", "REASON")
    rows = [
        (
            e.id,
            _utc(e.stored_at),
            _size(e.size),
            _cut(_printable(e.node), 24),
            _cut(f"<{_printable(e.sender)}>", 40),
            _cut(_to(e), 40),
            _cut(_printable(e.reason) or f"score {e.score:g}", 70),
        )
        for e in entries
    ]
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    lines = []
    for row in (head, *rows):
        cells = [
            cell.rjust(w) if i == 2 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _details(entry: QuarantineEntry, quarantine: Quarantine) -> list[str]:
    expires = entry.stored_at + quarantine.retention
    left = expires - quarantine.clock.now()
    recipients = ", ".join(f"<{_printable(r)}>" for r in entry.recipients)
    fields = [
        ("id", entry.id),
        ("stored", f"{_utc(entry.stored_at)} UTC"),
        ("expires", f"{_utc(expires)} UTC ({'in ' + format_remaining(left) if left > 0 else 'now'})"),
        ("node", _printable(entry.node) + ("" if entry.node == quarantine.node else " (another node)")),
        ("file", _printable(entry.path)),
        ("size", f"{entry.size} bytes"),
        ("from", f"<{_printable(entry.sender)}>"),
        ("to", recipients or "-"),
        ("client", _printable(entry.client_address) or "-"),
        ("queue id", _printable(entry.queue_id) or "-"),
        ("subject", _printable(entry.subject) or "-"),
        ("score", f"{entry.score:g}"),
        ("reason", _printable(entry.reason) or "-"),
    ]
    if entry.mail_options:
        fields.append(("mail params", _printable(" ".join(entry.mail_options))))
    return [f"{name + ':':<12} {value}" for name, value in fields]


def _headers(message: bytes) -> list[str]:
    """The header section of a message, one printable line per physical line."""
    end = len(message)
    for separator in (b"\r\n\r\n", b"\n\n"):
        at = message.find(separator)
        if at >= 0:
            end = min(end, at)
    text = message[:end].decode("utf-8", "replace")
    return [_printable(line.rstrip("\r"), keep="\t") for line in text.split("\n")]


async def run_command(args: argparse.Namespace, quarantine: Quarantine, send: Send | None) -> int:
    """Run ``mxward quarantine ACTION``; 0 on success, 1 (with a message on stderr) on failure."""
    action: str = args.action
    try:
        if action == "list":
            entries = await quarantine.list(limit=args.limit)
            if args.json:
                data = [e.to_json() | {"date": _utc(e.stored_at).replace(" ", "T") + "Z"} for e in entries]
                for item in data:
                    item.pop("v", None)
                print(json.dumps(data, indent=2))
            elif not entries:
                print("(no quarantined messages)")
            else:
                print("\n".join(_table(entries)))
                more = " (use --limit to see more)" if len(entries) == args.limit else ""
                print(f"{len(entries)} message(s), newest first{more}")
            return 0
        if action == "show":
            entry = await quarantine.get(args.id)
            if args.raw:
                message = await asyncio.to_thread(quarantine.read, entry)
                sys.stdout.flush()
                sys.stdout.buffer.write(message)
                sys.stdout.buffer.flush()
                return 0
            print("\n".join(_details(entry, quarantine)))
            try:
                message = await asyncio.to_thread(quarantine.read, entry)
            except QuarantineError as exc:
                print(f"mxward quarantine show: {exc}", file=sys.stderr)
                return 0 if entry.node != quarantine.node else 1
            print()
            print("\n".join(_headers(message)))
            return 0
        if action == "release":
            if send is None:
                print(
                    "mxward quarantine release: no reinjection is configured, so nothing can be delivered",
                    file=sys.stderr,
                )
                return 1
            entry = await quarantine.release(args.id, send, recipients=args.to)
            to = ", ".join(f"<{_printable(r)}>" for r in entry.recipients)
            print(f"released {entry.id} to {to}")
            return 0
        if action == "delete":
            entry = await quarantine.delete(args.id)
            print(f"deleted {entry.id}")
            return 0
        if action == "reindex":
            added = await quarantine.reindex()
            print(f"reindexed {added} message(s) stored on {quarantine.node}")
            return 0
    except QuarantineError as exc:
        print(f"mxward quarantine {action}: {exc}", file=sys.stderr)
        return 1
    print(f"mxward quarantine: unknown action {action!r}", file=sys.stderr)
    return 1
