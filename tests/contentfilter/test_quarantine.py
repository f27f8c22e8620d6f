"""The quarantine: durable storage, the cluster-wide index in Redis, release, purge and the CLI.

Real Redis (the fixtures in support.redis_fixtures), real files in a temporary directory, and a
frozen clock; the only stand-in is the ``send`` callback, which records what it was asked to
deliver (reinjection itself is the filter's, tested with it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.redis_fixtures import BlackholeProxy, RedisServer

from mxward.contentfilter.quarantine import (
    Quarantine,
    QuarantineEntry,
    QuarantineError,
    add_parser,
    clean_subject,
    run_command,
    valid_id,
)
from mxward.shared.clock import FrozenClock
from mxward.shared.state import StateSettings, StateStore

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

DAY = 86400.0
NODE = "mx1.example.com"
OTHER = "mx2.example.com"
START = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
MESSAGE = (Path(__file__).parents[1] / "data" / "messages" / "quarantine-spam.eml").read_bytes()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


@pytest.fixture
def quarantine(tmp_path: Path, state_store: StateStore, clock: FrozenClock) -> Quarantine:
    return Quarantine(tmp_path / "quarantine", state_store, node=NODE, clock=clock)


@dataclass
class Outbox:
    """The ``send`` callback: records deliveries, or fails with ``error`` when it is set."""

    sent: list[tuple[QuarantineEntry, bytes]] = field(default_factory=list)
    error: Exception | None = None

    async def __call__(self, entry: QuarantineEntry, message: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((entry, message))


async def put(
    q: Quarantine,
    message: bytes = MESSAGE,
    *,
    sender: str = "offers@bulk.example.net",
    recipients: Sequence[str] = ("bob@example.com", "carol@example.com"),
    queue_id: str = "4Bx9Kq1Zz3z9sT",
    rcpt_options: Sequence[Sequence[str]] = (("NOTIFY=NEVER",), ("ORCPT=rfc822;carol@example.com",)),
) -> QuarantineEntry:
    """Store a message with the envelope of tests/data/messages/quarantine-spam.eml."""
    return await q.store(
        message,
        sender=sender,
        recipients=recipients,
        client_address="192.0.2.7",
        queue_id=queue_id,
        subject="=?utf-8?q?Gro=C3=9Fe_Preise_f=C3=BCr_Sie?=",
        reason="spam score 12.5 (bayes 99%)",
        score=12.5,
        mail_options=("SIZE=812", "BODY=8BITMIME"),
        rcpt_options=rcpt_options,
    )


def metadata(entry: QuarantineEntry) -> str:
    return Path(entry.path).with_suffix(".json").read_text()


def files_in(directory: Path) -> list[str]:
    """Every file below ``directory`` (temporary ones included), relative, sorted."""
    if not directory.exists():
        return []
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


async def keys_of(store: StateStore) -> list[str]:
    return sorted([key async for key in store.namespace("quarantine").scan()])


# --------------------------------------------------------------------------------------------
# Storing


async def test_store_writes_the_message_and_its_metadata(quarantine: Quarantine, tmp_path: Path) -> None:
    """The message is stored byte for byte, with a JSON metadata file holding the whole envelope."""
    entry = await put(quarantine)
    message_file = Path(entry.path)
    assert file_bytes(message_file) == MESSAGE
    assert message_file.parent.parent == tmp_path / "quarantine"
    meta = json.loads(metadata(entry))
    assert meta["sender"] == "offers@bulk.example.net"
    assert meta["recipients"] == ["bob@example.com", "carol@example.com"]
    assert meta["mail_options"] == ["SIZE=812", "BODY=8BITMIME"]
    assert meta["rcpt_options"] == [["NOTIFY=NEVER"], ["ORCPT=rfc822;carol@example.com"]]
    assert meta["node"] == NODE
    assert files_in(tmp_path / "quarantine") == [
        f"{entry.id[:8]}/{entry.id}.eml",
        f"{entry.id[:8]}/{entry.id}.json",
    ]


async def test_store_uses_private_modes(quarantine: Quarantine) -> None:
    """Files are 0600 and directories 0700: quarantined mail is private."""
    entry = await put(quarantine)
    path = Path(entry.path)
    assert mode(path) == 0o600
    assert mode(path.with_suffix(".json")) == 0o600
    assert mode(path.parent) == 0o700
    assert mode(quarantine.directory) == 0o700


async def test_store_returns_a_complete_entry(quarantine: Quarantine) -> None:
    """The entry records time, node, size, envelope, decoded subject, reason and score."""
    entry = await put(quarantine)
    assert entry.stored_at == START
    assert entry.node == NODE
    assert entry.size == len(MESSAGE)
    assert entry.recipients == ("bob@example.com", "carol@example.com")
    assert entry.client_address == "192.0.2.7"
    assert entry.queue_id == "4Bx9Kq1Zz3z9sT"
    assert entry.subject == "Große Preise für Sie"
    assert entry.reason == "spam score 12.5 (bayes 99%)"
    assert entry.score == 12.5
    assert entry.mail_options == ("SIZE=812", "BODY=8BITMIME")
    assert entry.rcpt_options == (("NOTIFY=NEVER",), ("ORCPT=rfc822;carol@example.com",))
    assert entry.id.startswith("20231114-221320-000-")


async def test_every_key_has_the_retention_as_ttl(
    tmp_path: Path, state_store: StateStore, clock: FrozenClock
) -> None:
    """The entry and the index expire after the retention; no quarantine key lives for ever."""
    q = Quarantine(tmp_path / "q", state_store, node=NODE, clock=clock, retention=7 * DAY)
    await put(q)
    keys = await keys_of(state_store)
    assert len(keys) == 2
    ns = state_store.namespace("quarantine")
    for key in keys:
        assert 7 * DAY - 5 <= await ns.ttl(key) <= 7 * DAY
    assert {d.pattern for d in state_store.declarations() if d.namespace == "quarantine"} == {
        "{q}:e:ID",
        "{q}:index",
    }


async def test_store_needs_a_recipient(quarantine: Quarantine) -> None:
    """A message without recipients cannot be released later, so it is refused clearly."""
    with pytest.raises(QuarantineError, match="at least one recipient"):
        await put(quarantine, recipients=[], rcpt_options=())


async def test_store_checks_rcpt_options_match_recipients(quarantine: Quarantine) -> None:
    """RCPT parameters come one list per recipient."""
    with pytest.raises(QuarantineError, match="rcpt_options has 1 items for 2 recipients"):
        await put(quarantine, rcpt_options=[["NOTIFY=NEVER"]])


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("Hello", "Hello"),
        ("=?utf-8?b?w4RwZmVs?=", "Äpfel"),
        ("=?iso-8859-1?q?Caf=E9?= au lait", "Café au lait"),
        ("=?bogus-charset?q?x?=", "=?bogus-charset?q?x?="),
        ("two\r\n\tlines", "two lines"),
        ("bell\x07 and \x1b[31mred", "bell and [31mred"),
        ("right\u202eto left", "right to left"),
        ("", ""),
    ],
)
def test_subjects_are_decoded_and_made_one_safe_line(raw: str, shown: str) -> None:
    """RFC 2047 words are decoded; line breaks, controls and bidi overrides are removed."""
    assert clean_subject(raw) == shown


def test_long_subjects_are_bounded() -> None:
    """A subject is cut at 200 characters."""
    subject = clean_subject("x" * 5000)
    assert len(subject) == 200
    assert subject.endswith("…")


# --------------------------------------------------------------------------------------------
# Failures while storing: nothing half-written, nothing orphaned


async def test_directory_that_is_a_file_fails_cleanly(
    tmp_path: Path, state_store: StateStore, clock: FrozenClock
) -> None:
    """If the quarantine path is a file, store raises and nothing reaches Redis."""
    blocker = tmp_path / "quarantine"
    blocker.write_text("not a directory")
    q = Quarantine(blocker, state_store, node=NODE, clock=clock)
    with pytest.raises(QuarantineError, match=f"cannot store the message in {blocker}"):
        await put(q)
    assert await keys_of(state_store) == []
    assert blocker.read_text() == "not a directory"


async def test_parent_that_is_a_file_fails_cleanly(
    tmp_path: Path, state_store: StateStore, clock: FrozenClock
) -> None:
    """A data directory that cannot exist (its parent is a file) fails the same way."""
    (tmp_path / "data").write_text("")
    q = Quarantine(tmp_path / "data" / "quarantine", state_store, node=NODE, clock=clock)
    with pytest.raises(QuarantineError, match="cannot store the message"):
        await put(q)
    assert await keys_of(state_store) == []


async def test_unwritable_day_directory_leaves_nothing(
    quarantine: Quarantine, state_store: StateStore
) -> None:
    """A day directory that cannot be used (a file in its place) fails without leftovers."""
    quarantine.directory.mkdir()
    (quarantine.directory / "20231114").write_text("")
    with pytest.raises(QuarantineError, match="cannot store"):
        await put(quarantine)
    assert files_in(quarantine.directory) == ["20231114"]
    assert await keys_of(state_store) == []


@pytest.fixture
async def private_store(
    redis_factory: Callable[..., RedisServer], clock: FrozenClock
) -> AsyncIterator[tuple[StateStore, RedisServer]]:
    """A store on a private server that the test may stop; its fail-fast window uses ``clock``."""
    server = redis_factory()
    settings = StateSettings(url=server.url, key_prefix=f"t{uuid.uuid4().hex[:12]}", timeout=1.0)
    async with StateStore(settings, clock=clock) as store:
        yield store, server


async def test_redis_down_fails_and_removes_the_files(
    tmp_path: Path, private_store: tuple[StateStore, RedisServer], clock: FrozenClock
) -> None:
    """With Redis stopped, store raises and the message file it wrote is removed again."""
    store, server = private_store
    q = Quarantine(tmp_path / "quarantine", store, node=NODE, clock=clock)
    server.stop()
    with pytest.raises(QuarantineError, match="cannot index the quarantined message"):
        await put(q)
    assert files_in(q.directory) == []


async def test_store_works_again_when_redis_is_back(
    tmp_path: Path, private_store: tuple[StateStore, RedisServer], clock: FrozenClock
) -> None:
    """A failed store leaves nothing that disturbs the next one."""
    store, server = private_store
    q = Quarantine(tmp_path / "quarantine", store, node=NODE, clock=clock)
    server.stop()
    with pytest.raises(QuarantineError):
        await put(q)
    server.start()
    clock.advance(5)  # past the state store's fail-fast window
    entry = await put(q)
    assert [e.id for e in await q.list()] == [entry.id]
    assert len(files_in(q.directory)) == 2


@pytest.mark.parametrize("settle", [0.0, 0.3], ids=["while-writing", "while-indexing"])
async def test_cancelled_store_leaves_no_files(
    tmp_path: Path, redis_factory: Callable[..., RedisServer], clock: FrozenClock, settle: float
) -> None:
    """A store cancelled while Redis hangs (the filter's deadline) removes its files."""
    server = redis_factory(tcp=True)
    proxy = BlackholeProxy(server.port)
    await proxy.start()
    settings = StateSettings(url=proxy.url, key_prefix="tcancel", timeout=30.0)
    try:
        async with StateStore(settings) as store:
            q = Quarantine(tmp_path / "quarantine", store, node=NODE, clock=clock)
            proxy.blackhole = True
            task = asyncio.create_task(put(q))
            async with asyncio.timeout(10):
                while not any(name.endswith(".json") for name in files_in(q.directory)):
                    await asyncio.sleep(0.005)  # wait for the files: the index call now hangs
            # 0: cancelled as the write thread finishes its last fsync; 0.3s: the thread is
            # done and the store waits for Redis.
            await asyncio.sleep(settle)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            async with asyncio.timeout(10):
                while files_in(q.directory):
                    await asyncio.sleep(0.005)
    finally:
        await proxy.aclose()


# --------------------------------------------------------------------------------------------
# Listing and looking up


async def test_list_is_newest_first(quarantine: Quarantine, clock: FrozenClock) -> None:
    """Entries come newest first, up to the limit."""
    ids = []
    for minute in range(4):
        ids.append((await put(quarantine, queue_id=f"Q{minute}AAAAA")).id)
        clock.advance(60)
    assert [e.id for e in await quarantine.list()] == ids[::-1]
    assert [e.id for e in await quarantine.list(limit=2)] == ids[:1:-1]
    assert sorted(ids) == ids  # ids sort by time


async def test_list_is_empty_at_first(quarantine: Quarantine) -> None:
    """A quarantine nobody used lists nothing (and needs no directory)."""
    assert await quarantine.list() == []


async def test_list_rejects_a_bad_limit(quarantine: Quarantine) -> None:
    """The limit is a positive number."""
    with pytest.raises(ValueError, match="limit"):
        await quarantine.list(limit=0)


async def test_list_leaves_out_expired_entries(quarantine: Quarantine, clock: FrozenClock) -> None:
    """Entries older than the retention are not listed even if Redis still holds them."""
    old = await put(quarantine)
    clock.advance(31 * DAY)
    new = await put(quarantine)
    assert [e.id for e in await quarantine.list()] == [new.id]
    assert old.id < new.id


async def test_list_skips_a_malformed_index_entry(
    quarantine: Quarantine, state_store: StateStore, redis_server: RedisServer
) -> None:
    """One unreadable entry in Redis does not hide the others."""
    good = await put(quarantine)
    bad_id = "20231114-221320-000-00000000"
    ns = state_store.namespace("quarantine")
    await ns.hset(ns.key("e", bad_id, tag="q"), {"v": "1", "entry": "{not json"}, 60)
    redis_server.command("ZADD", ns.key("index", tag="q"), str(START), bad_id)
    assert [e.id for e in await quarantine.list()] == [good.id]
    with pytest.raises(QuarantineError, match=f"index entry {bad_id} is malformed"):
        await quarantine.get(bad_id)


async def test_get_finds_a_stored_entry(quarantine: Quarantine) -> None:
    """get returns what store returned."""
    entry = await put(quarantine)
    assert await quarantine.get(entry.id) == entry


async def test_get_of_an_unknown_id_says_so(quarantine: Quarantine) -> None:
    """An id nobody stored is reported by name."""
    with pytest.raises(QuarantineError, match="no quarantined message 20231114-221320-000-12345678"):
        await quarantine.get("20231114-221320-000-12345678")


async def test_read_returns_the_message(quarantine: Quarantine) -> None:
    """read gives back the stored bytes."""
    entry = await put(quarantine)
    assert quarantine.read(entry) == MESSAGE
    assert quarantine.read(await quarantine.get(entry.id)) == MESSAGE


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        ("20240501-121530-123-9f3a6c01", True),
        ("../x", False),
        ("../../etc/passwd", False),
        ("20240501-121530-123-9f3a6c01/../../x", False),
        ("20240501-121530-123-9F3A6C01", False),
        ("20240501-121530-123-9f3a6c0", False),
        ("20240501-121530-123-9f3a6c01\n", False),
        ("", False),
    ],
)
def test_id_pattern(text: str, valid: bool) -> None:
    """Only the quarantine's own id shape is accepted."""
    assert valid_id(text) is valid


@pytest.mark.parametrize("bad", ["../x", "../../etc/passwd", "20240501-121530-123-9f3a6c01/.."])
async def test_bad_ids_are_refused_everywhere(quarantine: Quarantine, bad: str) -> None:
    """get, read, release and delete refuse an id that could name a path."""
    outbox = Outbox()
    with pytest.raises(QuarantineError, match="is not a quarantine id"):
        await quarantine.get(bad)
    with pytest.raises(QuarantineError, match="is not a quarantine id"):
        await quarantine.delete(bad)
    with pytest.raises(QuarantineError, match="is not a quarantine id"):
        await quarantine.release(bad, outbox)
    entry = await put(quarantine)
    with pytest.raises(QuarantineError, match="is not a quarantine id"):
        quarantine.read(dataclasses.replace(entry, id=bad))
    assert outbox.sent == []


# --------------------------------------------------------------------------------------------
# Several nodes


@pytest.fixture
def other_node(tmp_path: Path, state_store: StateStore, clock: FrozenClock) -> Quarantine:
    """A second MX node: same Redis, its own data directory."""
    return Quarantine(tmp_path / "other" / "quarantine", state_store, node=OTHER, clock=clock)


async def test_every_node_lists_every_entry(
    quarantine: Quarantine, other_node: Quarantine, clock: FrozenClock
) -> None:
    """The list comes from Redis, so each node sees the messages the other stored."""
    mine = await put(quarantine)
    clock.advance(1)
    theirs = await put(other_node)
    for q in (quarantine, other_node):
        assert [(e.id, e.node) for e in await q.list()] == [(theirs.id, OTHER), (mine.id, NODE)]


async def test_read_on_another_node_names_the_node(quarantine: Quarantine, other_node: Quarantine) -> None:
    """Reading a message stored elsewhere says which node holds it."""
    entry = await put(quarantine)
    with pytest.raises(QuarantineError, match=f"stored on node {NODE}.*run `mxward quarantine show"):
        other_node.read(await other_node.get(entry.id))


async def test_release_and_delete_on_another_node_change_nothing(
    quarantine: Quarantine, other_node: Quarantine
) -> None:
    """Release and delete must run on the node with the file; elsewhere they fail and keep it."""
    entry = await put(quarantine)
    outbox = Outbox()
    with pytest.raises(QuarantineError, match=f"stored on node {NODE}.*quarantine release {entry.id}"):
        await other_node.release(entry.id, outbox)
    with pytest.raises(QuarantineError, match=f"stored on node {NODE}.*quarantine delete {entry.id}"):
        await other_node.delete(entry.id)
    assert outbox.sent == []
    assert await quarantine.get(entry.id) == entry
    assert quarantine.read(entry) == MESSAGE


# --------------------------------------------------------------------------------------------
# Release and delete


async def test_release_delivers_then_removes(quarantine: Quarantine, state_store: StateStore) -> None:
    """send gets the original envelope and message; afterwards files and index are gone."""
    entry = await put(quarantine)
    outbox = Outbox()
    released = await quarantine.release(entry.id, outbox)
    assert released == entry
    assert outbox.sent == [(entry, MESSAGE)]
    assert files_in(quarantine.directory) == []
    assert await quarantine.list() == []
    with pytest.raises(QuarantineError, match="no quarantined message"):
        await quarantine.get(entry.id)
    assert [k for k in await keys_of(state_store) if ":e:" in k] == []


async def test_release_to_other_recipients(quarantine: Quarantine) -> None:
    """Given recipients replace the original ones, and their RCPT parameters are dropped."""
    entry = await put(quarantine)
    outbox = Outbox()
    released = await quarantine.release(entry.id, outbox, recipients=["postmaster@example.com"])
    assert released.recipients == ("postmaster@example.com",)
    assert released.rcpt_options == ()
    assert released.mail_options == entry.mail_options
    assert outbox.sent == [(released, MESSAGE)]


async def test_release_refuses_bad_recipients(quarantine: Quarantine) -> None:
    """An empty or malformed replacement recipient list is refused before anything is sent."""
    entry = await put(quarantine)
    outbox = Outbox()
    with pytest.raises(QuarantineError, match="at least one recipient"):
        await quarantine.release(entry.id, outbox, recipients=[])
    with pytest.raises(QuarantineError, match="is not a mail address"):
        await quarantine.release(entry.id, outbox, recipients=["a@b\r\nRSET"])
    assert outbox.sent == []
    assert quarantine.read(entry) == MESSAGE


async def test_failing_send_keeps_the_entry(quarantine: Quarantine) -> None:
    """If delivery fails, the message stays on disk and in the index, and can be released later."""
    entry = await put(quarantine)
    outbox = Outbox(error=ConnectionRefusedError("reinjection smtpd at 127.0.0.1:10026 refused"))
    with pytest.raises(QuarantineError, match="stays in the quarantine: reinjection smtpd"):
        await quarantine.release(entry.id, outbox)
    assert await quarantine.get(entry.id) == entry
    assert quarantine.read(entry) == MESSAGE
    outbox.error = None
    await quarantine.release(entry.id, outbox)
    assert len(outbox.sent) == 1


async def test_one_release_at_a_time(quarantine: Quarantine) -> None:
    """While a release is delivering, a second release of the same message is refused."""
    entry = await put(quarantine)
    started, finish = asyncio.Event(), asyncio.Event()
    deliveries: list[bytes] = []

    async def slow_send(_: QuarantineEntry, message: bytes) -> None:
        started.set()
        await finish.wait()
        deliveries.append(message)

    first = asyncio.create_task(quarantine.release(entry.id, slow_send))
    await started.wait()
    async with asyncio.timeout(5):  # without the lock, the second release would wait for `finish`
        with pytest.raises(QuarantineError, match="being released or deleted by another process"):
            await quarantine.release(entry.id, slow_send)
        with pytest.raises(QuarantineError, match="being released or deleted by another process"):
            await quarantine.delete(entry.id)
    finish.set()
    await first
    assert deliveries == [MESSAGE]
    with pytest.raises(QuarantineError, match="no quarantined message"):
        await quarantine.release(entry.id, slow_send)


async def test_delete_removes_files_and_index(quarantine: Quarantine, state_store: StateStore) -> None:
    """delete removes the message without delivering it; a second delete finds nothing."""
    keep = await put(quarantine)
    entry = await put(quarantine)
    assert await quarantine.delete(entry.id) == entry
    assert [e.id for e in await quarantine.list()] == [keep.id]
    assert not exists(entry.path)
    assert exists(keep.path)
    with pytest.raises(QuarantineError, match=f"no quarantined message {entry.id}"):
        await quarantine.delete(entry.id)


async def test_delete_clears_an_entry_whose_file_is_gone(quarantine: Quarantine) -> None:
    """An index entry without its file (removed by hand) can still be deleted."""
    entry = await put(quarantine)
    os.unlink(entry.path)
    with pytest.raises(QuarantineError, match="is missing on this node"):
        quarantine.read(entry)
    await quarantine.delete(entry.id)
    assert await quarantine.list() == []
    assert files_in(quarantine.directory) == []


# --------------------------------------------------------------------------------------------
# Without Redis data: the metadata files


async def _forget_index(store: StateStore) -> None:
    ns = store.namespace("quarantine")
    await ns.delete(*await keys_of(store))


async def test_get_and_release_work_from_the_metadata_file(
    quarantine: Quarantine, state_store: StateStore
) -> None:
    """When Redis lost an entry, this node still finds and releases it from its own files."""
    entry = await put(quarantine)
    await _forget_index(state_store)
    assert await quarantine.list() == []
    assert await quarantine.get(entry.id) == entry
    outbox = Outbox()
    await quarantine.release(entry.id, outbox)
    assert outbox.sent == [(entry, MESSAGE)]
    assert files_in(quarantine.directory) == []


async def test_get_works_from_the_metadata_file_while_redis_is_down(
    tmp_path: Path, private_store: tuple[StateStore, RedisServer], clock: FrozenClock
) -> None:
    """With Redis down, a message on this node can still be looked up and read."""
    store, server = private_store
    q = Quarantine(tmp_path / "quarantine", store, node=NODE, clock=clock)
    entry = await put(q)
    server.stop()
    assert await q.get(entry.id) == entry
    assert q.read(entry) == MESSAGE
    with pytest.raises(QuarantineError, match="index is unavailable"):
        await q.list()
    with pytest.raises(QuarantineError, match=r"index is unavailable.*not stored on this node"):
        await q.get("20231114-221320-000-12345678")


async def test_reindex_restores_lost_entries(
    quarantine: Quarantine, state_store: StateStore, clock: FrozenClock
) -> None:
    """reindex puts this node's stored messages back into the list, with their remaining TTL."""
    first = await put(quarantine)
    clock.advance(10 * DAY)
    second = await put(quarantine)
    await _forget_index(state_store)
    assert await quarantine.reindex() == 2
    assert [e.id for e in await quarantine.list()] == [second.id, first.id]
    ns = state_store.namespace("quarantine")
    assert 20 * DAY - 5 <= await ns.ttl(ns.key("e", first.id, tag="q")) <= 20 * DAY
    assert await quarantine.reindex() == 0


# --------------------------------------------------------------------------------------------
# Purge


async def test_purge_removes_expired_messages(
    quarantine: Quarantine, state_store: StateStore, clock: FrozenClock
) -> None:
    """Files older than the retention whose index entry expired are removed, day directory too."""
    old = await put(quarantine)
    clock.advance(31 * DAY)
    new = await put(quarantine)
    ns = state_store.namespace("quarantine")
    await ns.delete(ns.key("e", old.id, tag="q"))  # what Redis's TTL does after 30 days
    assert await quarantine.purge() == 1
    assert files_in(quarantine.directory) == [
        f"{new.id[:8]}/{new.id}.eml",
        f"{new.id[:8]}/{new.id}.json",
    ]
    assert not (quarantine.directory / old.id[:8]).exists()


async def test_purge_keeps_what_the_index_still_holds(quarantine: Quarantine, clock: FrozenClock) -> None:
    """An old message still indexed (stored under a longer retention) is kept."""
    entry = await put(quarantine)
    clock.advance(31 * DAY)
    assert await quarantine.purge() == 0
    assert exists(entry.path)


async def test_purge_keeps_messages_within_the_retention(quarantine: Quarantine, clock: FrozenClock) -> None:
    """Fresh messages are never purged."""
    entry = await put(quarantine)
    clock.advance(29 * DAY)
    assert await quarantine.purge() == 0
    assert exists(entry.path)


async def test_purge_removes_leftovers_of_interrupted_writes(quarantine: Quarantine) -> None:
    """A message without metadata, or a temporary file, older than an hour is a crash's leftover."""
    complete = await put(quarantine)
    day = quarantine.directory / complete.id[:8]
    crashed = "20231114-201320-000-0000000a"  # two hours earlier
    (day / f"{crashed}.eml").write_bytes(MESSAGE)
    (day / f".{crashed}.json.tmp").write_bytes(b"{")
    writing = "20231114-221300-000-0000000b"  # twenty seconds earlier: may still be written
    (day / f".{writing}.eml.tmp").write_bytes(MESSAGE)
    (day / "README").write_text("not ours")
    assert await quarantine.purge() == 1
    assert sorted(p.name for p in day.iterdir()) == sorted(
        [f"{complete.id}.eml", f"{complete.id}.json", f".{writing}.eml.tmp", "README"]
    )


async def test_purge_keeps_expired_files_while_redis_is_down(
    tmp_path: Path, private_store: tuple[StateStore, RedisServer], clock: FrozenClock
) -> None:
    """Without the index, purge cannot tell what expired: it raises and removes nothing."""
    store, server = private_store
    q = Quarantine(tmp_path / "quarantine", store, node=NODE, clock=clock)
    entry = await put(q)
    clock.advance(31 * DAY)
    server.stop()
    with pytest.raises(QuarantineError, match="purge: the quarantine index is unavailable"):
        await q.purge()
    assert exists(entry.path)


async def test_purge_of_a_quarantine_never_used(quarantine: Quarantine) -> None:
    """No directory yet: nothing to do, no error."""
    assert await quarantine.purge() == 0


def test_constructor_checks_its_arguments(
    state_store: StateStore, clock: FrozenClock, tmp_path: Path
) -> None:
    """A node name with spaces or a retention below a second are programming errors."""
    with pytest.raises(ValueError, match="host name"):
        Quarantine(tmp_path, state_store, node="mx 1", clock=clock)
    with pytest.raises(ValueError, match="retention"):
        Quarantine(tmp_path, state_store, node=NODE, clock=clock, retention=0.5)


# --------------------------------------------------------------------------------------------
# Command line


def parse(*argv: str) -> argparse.Namespace:
    top = argparse.ArgumentParser(prog="mxward")
    add_parser(top.add_subparsers(dest="command", required=True))
    return top.parse_args(["quarantine", *argv])


async def test_cli_list_when_empty(quarantine: Quarantine, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty quarantine says so."""
    assert await run_command(parse("list"), quarantine, None) == 0
    assert capsys.readouterr().out == "(no quarantined messages)\n"


async def test_cli_list_prints_aligned_columns(
    quarantine: Quarantine, other_node: Quarantine, capsys: pytest.CaptureFixture[str], clock: FrozenClock
) -> None:
    """One line per message under a header, columns aligned, newest first."""
    first = await put(quarantine)
    clock.advance(3600)
    second = await put(other_node, MESSAGE * 20, sender="", recipients=["dave@example.com"], rcpt_options=[])
    assert await run_command(parse("list"), quarantine, None) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "DATE", "(UTC)", "SIZE", "NODE", "FROM", "TO", "REASON"]
    assert lines[1].startswith(second.id)
    assert lines[2].startswith(first.id)
    assert "2023-11-14 23:13:20" in lines[1]
    assert "2023-11-14 22:13:20" in lines[2]
    assert "<>" in lines[1]
    assert "<bob@example.com> (+1)" in lines[2]
    assert f"{len(MESSAGE) * 20 / 1024:.0f}K" in lines[1]
    assert OTHER in lines[1]
    for column in ("DATE", "NODE", "FROM", "TO", "REASON"):
        at = lines[0].index(column)
        assert lines[1][at - 1] == " "
        assert lines[1][at] != " "
        assert lines[2][at] != " "
    assert lines[3] == "2 message(s), newest first"


async def test_cli_list_json(quarantine: Quarantine, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints every field, for scripts."""
    entry = await put(quarantine)
    assert await run_command(parse("list", "--json", "--limit", "5"), quarantine, None) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1
    assert data[0]["id"] == entry.id
    assert data[0]["date"] == "2023-11-14T22:13:20Z"
    assert data[0]["recipients"] == ["bob@example.com", "carol@example.com"]
    assert data[0]["subject"] == "Große Preise für Sie"


async def test_cli_show_prints_details_and_headers(
    quarantine: Quarantine, capsys: pytest.CaptureFixture[str]
) -> None:
    """show prints the metadata, then the message's headers, never its body."""
    entry = await put(quarantine)
    assert await run_command(parse("show", entry.id), quarantine, None) == 0
    out = capsys.readouterr().out
    assert f"id:          {entry.id}" in out
    assert "stored:      2023-11-14 22:13:20 UTC" in out
    assert "expires:     2023-12-14 22:13:20 UTC (in 30d)" in out
    assert "to:          <bob@example.com>, <carol@example.com>" in out
    assert "subject:     Große Preise für Sie" in out
    assert "reason:      spam score 12.5 (bayes 99%)" in out
    assert "Subject: =?utf-8?q?Gro=C3=9Fe_Preise_f=C3=BCr_Sie?=" in out
    assert "\tby mx1.example.com (Postfix)" in out
    assert "You have won" not in out


async def test_cli_show_raw_prints_the_message(
    quarantine: Quarantine, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """show --raw writes the message exactly as stored."""
    entry = await put(quarantine)
    assert await run_command(parse("show", entry.id, "--raw"), quarantine, None) == 0
    assert capsysbinary.readouterr().out == MESSAGE


async def test_cli_show_on_another_node(
    quarantine: Quarantine, other_node: Quarantine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Elsewhere, show prints the metadata and says where the message is."""
    entry = await put(quarantine)
    assert await run_command(parse("show", entry.id), other_node, None) == 0
    captured = capsys.readouterr()
    assert f"node:        {NODE} (another node)" in captured.out
    assert f"stored on node {NODE}" in captured.err
    assert await run_command(parse("show", entry.id, "--raw"), other_node, None) == 1


async def test_cli_show_escapes_control_characters(
    quarantine: Quarantine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Header lines and envelope values cannot send escape sequences to the terminal."""
    entry = await put(
        quarantine, b"Subject: \x1b]0;owned\x07\r\n\r\nbody\r\n", sender="evil\x1b[2J@example.net"
    )
    assert await run_command(parse("show", entry.id), quarantine, None) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "Subject: \\x1b]0;owned\\x07" in out
    assert "<evil\\x1b[2J@example.net>" in out


async def test_cli_show_unknown(quarantine: Quarantine, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown id exits 1 with the reason on stderr."""
    assert await run_command(parse("show", "20231114-221320-000-12345678"), quarantine, None) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "mxward quarantine show: no quarantined message 20231114-221320-000-12345678\n"


async def test_cli_release(quarantine: Quarantine, capsys: pytest.CaptureFixture[str]) -> None:
    """release delivers to the original recipients and says so."""
    entry = await put(quarantine)
    outbox = Outbox()
    assert await run_command(parse("release", entry.id), quarantine, outbox) == 0
    assert capsys.readouterr().out == f"released {entry.id} to <bob@example.com>, <carol@example.com>\n"
    assert outbox.sent == [(entry, MESSAGE)]
    assert await quarantine.list() == []


async def test_cli_release_to(quarantine: Quarantine, capsys: pytest.CaptureFixture[str]) -> None:
    """--to delivers to the given addresses instead."""
    entry = await put(quarantine)
    outbox = Outbox()
    args = parse("release", entry.id, "--to", "<admin@example.com>", "--to", "bob@example.org")
    assert await run_command(args, quarantine, outbox) == 0
    assert capsys.readouterr().out == f"released {entry.id} to <admin@example.com>, <bob@example.org>\n"
    assert outbox.sent[0][0].recipients == ("admin@example.com", "bob@example.org")


async def test_cli_release_failure_keeps_the_message(
    quarantine: Quarantine, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed delivery exits 1, says why, and the message stays."""
    entry = await put(quarantine)
    outbox = Outbox(error=OSError("connection refused"))
    assert await run_command(parse("release", entry.id), quarantine, outbox) == 1
    assert "stays in the quarantine: connection refused" in capsys.readouterr().err
    assert await quarantine.get(entry.id) == entry


async def test_cli_release_without_reinjection(
    quarantine: Quarantine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a way to deliver, release refuses and keeps the message."""
    entry = await put(quarantine)
    assert await run_command(parse("release", entry.id), quarantine, None) == 1
    assert "no reinjection is configured" in capsys.readouterr().err
    assert await quarantine.get(entry.id) == entry


async def test_cli_delete(quarantine: Quarantine, capsys: pytest.CaptureFixture[str]) -> None:
    """delete removes the message and says so; a second delete exits 1."""
    entry = await put(quarantine)
    assert await run_command(parse("delete", entry.id), quarantine, None) == 0
    assert capsys.readouterr().out == f"deleted {entry.id}\n"
    assert await run_command(parse("delete", entry.id), quarantine, None) == 1
    assert f"no quarantined message {entry.id}" in capsys.readouterr().err


async def test_cli_reindex(
    quarantine: Quarantine, state_store: StateStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """reindex reports how many entries it restored."""
    await put(quarantine)
    await _forget_index(state_store)
    assert await run_command(parse("reindex"), quarantine, None) == 0
    assert capsys.readouterr().out == f"reindexed 1 message(s) stored on {NODE}\n"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["show", "../x"], "'../x' is not a quarantine id (ids look like 20240501-121530-123-9f3a6c01)"),
        (["delete", "../../etc/passwd"], "is not a quarantine id"),
        (["release", "20240501-121530-123-9f3a6c01", "--to", "not an address"], "is not a mail address"),
        (["release", "20240501-121530-123-9f3a6c01", "--to", "a@b>\r\nRSET"], "is not a mail address"),
        (["list", "--limit", "0"], "'0' is not a number from 1 to 100000"),
        (["list", "--limit", "many"], "'many' is not a number"),
        (["purge-everything"], "invalid choice"),
    ],
)
def test_cli_refuses_bad_arguments(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad ids, addresses and limits are usage errors (exit 2) that say what is wrong."""
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2
    assert error in capsys.readouterr().err


async def test_cli_list_with_redis_down(
    tmp_path: Path,
    private_store: tuple[StateStore, RedisServer],
    clock: FrozenClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With Redis down, list exits 1 and says the index is unavailable."""
    store, server = private_store
    q = Quarantine(tmp_path / "quarantine", store, node=NODE, clock=clock)
    server.stop()
    assert await run_command(parse("list"), q, None) == 1
    assert capsys.readouterr().err.startswith(
        "mxward quarantine list: cannot list the quarantine: its index is unavailable: "
    )


async def test_modes_do_not_depend_on_the_umask(quarantine: Quarantine) -> None:
    """Even under umask 000 the files are 0600 and the directories 0700."""
    old = os.umask(0)
    try:
        entry = await put(quarantine)
    finally:
        os.umask(old)
    assert mode(entry.path) == 0o600
    assert mode(Path(entry.path).parent) == 0o700
