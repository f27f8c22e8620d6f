"""StateStore: URLs, namespaces and TTLs, scripts, auto-pipelining, outages (real Redis on loopback)."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from support.redis_fixtures import BlackholeProxy, RedisServer, server_stopped

from mxward.shared.clock import FrozenClock
from mxward.shared.state import (
    Declaration,
    Script,
    StateError,
    StateSettings,
    StateStore,
    StateUnavailableError,
    _PipelinedBackend,
    parse_state_url,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

SLACK = 0.2  # scheduling slack on a busy test machine, on top of a configured time limit

ECHO = Script("test.echo", "return ARGV[1]")
INCR = Script("test.incr", "return redis.call('INCRBY', KEYS[1], ARGV[1])")
PAIR = Script(
    "test.pair",
    """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
""",
)


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def private_store(
    redis_factory: Callable[..., RedisServer],
) -> AsyncIterator[tuple[StateStore, RedisServer, FrozenClock]]:
    """A store on a server of its own (which the test may stop), with a frozen clock."""
    server = redis_factory()
    clock = FrozenClock()
    settings = StateSettings(url=server.url, timeout=0.3, connect_timeout=0.3, retry_after=5.0)
    store = StateStore(settings, clock=clock)
    await store.connect()
    yield store, server, clock
    await store.aclose()


# --------------------------------------------------------------------------------------------
# URLs and settings


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", {"topology": "standalone", "hosts": (("localhost", 6379),), "db": 0}),
        (
            "redis://user:p%40ss@10.0.0.1:6380/2",
            {"hosts": (("10.0.0.1", 6380),), "db": 2, "username": "user", "password": "p@ss"},
        ),
        (
            "rediss://h:6390/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
            {"tls": True, "options": {"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required"}},
        ),
        ("unix:///run/redis/redis.sock?db=3", {"path": "/run/redis/redis.sock", "db": 3, "hosts": ()}),
        ("unix://:secret@/run/redis.sock", {"path": "/run/redis.sock", "password": "secret"}),
        (
            "redis+sentinel://s1:26380,s2/mymaster/1",
            {"topology": "sentinel", "hosts": (("s1", 26380), ("s2", 26379)), "master": "mymaster", "db": 1},
        ),
        (
            "redis+sentinel://u:p@s1/mx?sentinel_password=x",
            {"master": "mx", "username": "u", "options": {"sentinel_password": "x"}},
        ),
        (
            "redis+cluster://n1:7000,n2:7001,[::1]:7002",
            {"topology": "cluster", "hosts": (("n1", 7000), ("n2", 7001), ("::1", 7002)), "tls": False},
        ),
        ("rediss+cluster://n1?ssl_check_hostname=false", {"topology": "cluster", "tls": True}),
    ],
)
def test_valid_url_forms_parse(url: str, expected: dict[str, Any]) -> None:
    """Every documented URL form parses into the topology, hosts, database and options it names."""
    parsed = parse_state_url(url)
    for name, value in expected.items():
        assert getattr(parsed, name) == value, name


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://localhost", "unsupported scheme"),
        ("redis://", "host is missing"),
        ("redis://h:99999", "bad port"),
        ("redis://h/abc", "not a number"),
        ("redis://a,b", "takes one host"),
        ("redis://h/1?db=2", "not both"),
        ("redis://::1:6379", "brackets"),
        ("unix://relative.sock", "three slashes"),
        ("unix://", "absolute path"),
        ("redis+sentinel://s1", "master-name"),
        ("redis+sentinel://s1/m/1/2", "master-name"),
        ("redis+cluster://n1/1", "database 0 only"),
        ("redis://h?ssl_ca_certs=/x", "need rediss"),
        ("redis://h?socket_timeout=1", "unknown option"),
        ("redis://h?db=1&db=2", "given twice"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("rediss://h?ssl_check_hostname=perhaps", "ssl_check_hostname"),
        ("redis://h#frag", "fragment"),
    ],
)
def test_invalid_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    """A malformed or unsupported URL raises ValueError that says what is wrong."""
    with pytest.raises(ValueError, match=message):
        parse_state_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:s3cret@h:99999",
        "unix://:s3cret@/x?bad=1",
        "redis+sentinel://h/m?sentinel_password=s3cret&x=1",
    ],
)
def test_url_errors_never_show_the_password(url: str) -> None:
    """The ValueError for a bad URL shows it with its passwords replaced by ***."""
    with pytest.raises(ValueError, match=r"\*\*\*") as info:
        parse_state_url(url)
    assert "s3cret" not in str(info.value)


async def test_tls_options_reach_the_redis_connection() -> None:
    """rediss:// query options become redis-py SSL connection settings (nothing is connected)."""
    query = "ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=optional&ssl_check_hostname=false&client_name=mx"
    store = StateStore(StateSettings(url=f"rediss://u:p@h:6390/2?{query}"))
    backend = store._make_backend()
    try:
        assert isinstance(backend, _PipelinedBackend)
        assert backend.pool.connection_class.__name__ == "SSLConnection"
        kwargs = backend.pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == "/etc/ca.pem"
        assert kwargs["ssl_cert_reqs"] == "optional"
        assert kwargs["ssl_check_hostname"] is False
        assert (kwargs["client_name"], kwargs["username"], kwargs["password"], kwargs["db"]) == (
            "mx",
            "u",
            "p",
            2,
        )
    finally:
        await backend.aclose()


def test_redacted_url_hides_the_password() -> None:
    """The URL shown in logs keeps hosts and master name but never the password."""
    text = parse_state_url("redis+sentinel://u:secret@s1,s2:26380/mx/2").redacted()
    assert "secret" not in text
    assert text == "redis+sentinel://u:***@s1:26379,s2:26380/mx/2"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timeout": 0}, "timeout must be positive"),
        ({"timeout": -1.0}, "timeout must be positive"),
        ({"connect_timeout": math.nan}, "connect_timeout must be a number"),
        ({"retry_after": -1.0}, "retry_after must be positive"),
        ({"key_prefix": "a:b"}, "key_prefix"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"url": "memcached://x"}, "unsupported scheme"),
    ],
)
def test_settings_are_validated(changes: dict[str, Any], message: str) -> None:
    """StateSettings refuses bad values with a ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        StateSettings(**changes)


def test_store_needs_a_url_or_an_embedded_socket() -> None:
    """Without a URL and without the embedded server's socket the store cannot be built."""
    with pytest.raises(ValueError, match="no embedded server socket"):
        StateStore(StateSettings())


def test_building_a_store_connects_nothing() -> None:
    """StateStore() outside any event loop opens no socket and starts no task (fork rule)."""
    store = StateStore(StateSettings(), unix_socket="/nonexistent/state.sock")
    assert store._backend is None
    assert store.url.path == "/nonexistent/state.sock"


def test_a_store_built_before_fork_connects_in_the_child(redis_server: RedisServer) -> None:
    """A store built (not connected) in the parent is connected and used by a forked child."""
    store = StateStore(StateSettings(url=redis_server.url, key_prefix=_prefix()))
    store.declare("fork", "k", 60, "test key")

    async def child() -> None:
        async with store:
            ns = store.namespace("fork")
            await ns.set(ns.key("k"), os.getpid(), 60)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            asyncio.run(child())
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert redis_server.command("GET", store.namespace("fork").key("k")) == str(pid)


async def test_calls_before_connect_raise_state_error() -> None:
    """Using a store that was never connected raises StateError, not a redis-py error."""
    store = StateStore(StateSettings(), unix_socket="/nonexistent/state.sock")
    with pytest.raises(StateError, match="not connected"):
        await store.namespace("x").get(store.namespace("x").key("k"))


# --------------------------------------------------------------------------------------------
# Namespaces, keys and declarations


@pytest.mark.parametrize(
    ("parts", "tag", "expected"),
    [
        (("t", "a@b/c@d"), "198.51.100.0/24", "mxward:greylist:{198.51.100.0/24}:t:a@b/c@d"),
        (("c",), "2001:db8::/48", "mxward:greylist:{2001:db8::/48}:c"),
        ((), "4Bx1y2", "mxward:greylist:{4Bx1y2}"),
        (("t", "x"), None, "mxward:greylist:t:x"),
    ],
)
def test_key_places_the_hash_tag_right_after_the_namespace(
    parts: tuple[str, ...], tag: str | None, expected: str
) -> None:
    """key() joins parts with ':' and puts the Cluster hash tag first, after the namespace."""
    store = StateStore(StateSettings(), unix_socket="/x.sock")
    assert store.namespace("greylist").key(*parts, tag=tag) == expected


@pytest.mark.parametrize(("parts", "tag"), [((), None), (("a",), ""), (("a",), "x}y"), (("a",), "{x")])
def test_bad_keys_are_refused(parts: tuple[str, ...], tag: str | None) -> None:
    """A key with no parts and no tag, or a tag that is empty or holds braces, raises ValueError."""
    store = StateStore(StateSettings(), unix_socket="/x.sock")
    with pytest.raises(ValueError, match=r"tag|part"):
        store.namespace("greylist").key(*parts, tag=tag)


@pytest.mark.parametrize("name", ["", "a:b", "a{b}", "white space"])
def test_bad_namespace_names_are_refused(name: str) -> None:
    """Namespace names are plain words: no ':', braces or spaces."""
    store = StateStore(StateSettings(), unix_socket="/x.sock")
    with pytest.raises(ValueError, match="namespace"):
        store.namespace(name)


async def test_keys_outside_the_namespace_are_refused(state_store: StateStore) -> None:
    """A handle refuses to read or write a key that is not in its namespace."""
    ns, other = state_store.namespace("a"), state_store.namespace("b")
    with pytest.raises(ValueError, match="outside namespace"):
        await ns.get(other.key("k"))
    with pytest.raises(ValueError, match="outside namespace"):
        await ns.set("k", "v", 10)
    with pytest.raises(ValueError, match="outside namespace"):
        await ns.run(ECHO, [other.key("k")], ["x"])


def test_declarations_are_listed_sorted_with_full_key_shapes() -> None:
    """declare() records key shapes and TTLs; declarations() lists them by key, last one winning."""
    store = StateStore(StateSettings(key_prefix="mx"), unix_socket="/x.sock")
    store.declare("greylist", "{net}:t:<sender>/<rcpt>", "35d", "triplet")
    store.namespace("karma").declare("{ip}", 86400, "counters")
    store.declare("greylist", "{net}:t:<sender>/<rcpt>", "40d", "triplet")
    assert store.declarations() == [
        Declaration(
            namespace="greylist",
            pattern="{net}:t:<sender>/<rcpt>",
            key="mx:greylist:{net}:t:<sender>/<rcpt>",
            ttl="40d",
            description="triplet",
        ),
        Declaration(
            namespace="karma", pattern="{ip}", key="mx:karma:{ip}", ttl="86400s", description="counters"
        ),
    ]


# --------------------------------------------------------------------------------------------
# Reads, writes and the TTL rule


@pytest.mark.parametrize("ttl", [0, -5])
async def test_writes_refuse_a_ttl_that_is_not_positive(state_store: StateStore, ttl: int) -> None:
    """set, hset and expire raise ValueError for ttl <= 0 and write nothing."""
    ns = state_store.namespace("ttl")
    key = ns.key("k")
    with pytest.raises(ValueError, match="TTL"):
        await ns.set(key, "v", ttl)
    with pytest.raises(ValueError, match="TTL"):
        await ns.hset(key, {"a": 1}, ttl)
    with pytest.raises(ValueError, match="TTL"):
        await ns.expire(key, ttl)
    assert not await ns.exists(key)


async def test_every_write_leaves_a_ttl_on_the_key(state_store: StateStore) -> None:
    """Keys written by set and hset carry the TTL given, and expire replaces it."""
    ns = state_store.namespace("ttl")
    await ns.set(ns.key("s"), "v", 100)
    await ns.hset(ns.key("h"), {"a": 1, "b": "two"}, 200)
    assert 0 < await ns.ttl(ns.key("s")) <= 100
    assert 100 < await ns.ttl(ns.key("h")) <= 200
    assert await ns.expire(ns.key("s"), 5000)
    assert 200 < await ns.ttl(ns.key("s")) <= 5000
    assert not await ns.expire(ns.key("missing"), 10)
    assert await ns.ttl(ns.key("missing")) == -2


async def test_hset_refreshes_the_ttl_of_an_existing_hash(state_store: StateStore) -> None:
    """hset sets fields and the TTL in one step, also on a hash that already exists."""
    ns = state_store.namespace("ttl")
    key = ns.key("h")
    await ns.hset(key, {"a": 1}, 10)
    await ns.hset(key, {"b": 2.5}, 1000)
    assert await ns.hgetall(key) == {"a": "1", "b": "2.5"}
    assert await ns.ttl(key) > 10


async def test_get_set_hgetall_exists_and_delete(state_store: StateStore) -> None:
    """The basic commands read back what was written and report missing keys plainly."""
    ns = state_store.namespace("crud")
    a, b = ns.key("a"), ns.key("b", tag="t")
    assert await ns.get(a) is None
    assert await ns.hgetall(b) == {}
    await ns.set(a, 42, 60)
    await ns.hset(b, {"x": "1", "y": "ü"}, 60)
    assert await ns.get(a) == "42"
    assert await ns.hgetall(b) == {"x": "1", "y": "ü"}
    assert await ns.exists(a)
    assert await ns.delete(a, b, ns.key("never")) == 2
    assert not await ns.exists(a)
    assert await ns.delete() == 0


async def test_hset_needs_fields(state_store: StateStore) -> None:
    """hset with an empty mapping is a ValueError, not an empty write."""
    ns = state_store.namespace("crud")
    with pytest.raises(ValueError, match="field"):
        await ns.hset(ns.key("h"), {}, 10)


async def test_scan_yields_only_the_namespace_keys_that_match(state_store: StateStore) -> None:
    """scan() walks every key of its namespace (past one SCAN page) and honours the glob."""
    ns, other = state_store.namespace("scan"), state_store.namespace("other")
    await asyncio.gather(*(ns.set(ns.key("t", str(i), tag=f"n{i % 3}"), i, 60) for i in range(250)))
    await ns.set(ns.key("c"), 1, 60)
    await other.set(other.key("t", "x"), 1, 60)
    keys = {key async for key in ns.scan(count=20)}
    assert len(keys) == 251
    assert all(key.startswith(ns.prefix) for key in keys)
    tagged = {key async for key in ns.scan("{n1}:*")}
    assert len(tagged) == 83
    assert {key async for key in ns.scan("c")} == {ns.key("c")}


async def test_a_server_error_raises_state_error_and_keeps_the_connection(state_store: StateStore) -> None:
    """WRONGTYPE becomes StateError (not unavailable) and the next call works as before."""
    ns = state_store.namespace("err")
    await ns.set(ns.key("s"), "v", 60)
    with pytest.raises(StateError, match="WRONGTYPE") as info:
        await ns.hgetall(ns.key("s"))
    assert not isinstance(info.value, StateUnavailableError)
    assert info.value.__cause__ is not None
    assert await ns.get(ns.key("s")) == "v"


async def test_a_value_that_cannot_be_encoded_fails_only_its_call(state_store: StateStore) -> None:
    """A value redis-py cannot encode fails its own call; calls batched with it still succeed."""
    ns = state_store.namespace("err")
    results = await asyncio.gather(
        ns.set(ns.key("a"), "1", 60),
        ns.set(ns.key("b"), None, 60),  # type: ignore[arg-type]
        ns.get(ns.key("a")),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], StateError)
    assert results[2] == "1"


# --------------------------------------------------------------------------------------------
# Scripts


async def test_scripts_run_and_are_registered(state_store: StateStore) -> None:
    """run() executes a Lua script on namespace keys and registers it with the store."""
    ns = state_store.namespace("lua")
    assert await ns.run(INCR, [ns.key("n")], [5]) == 5
    assert await ns.run(INCR, [ns.key("n")], [2]) == 7
    assert INCR in state_store.scripts()


async def test_noscript_after_script_flush_is_recovered(
    state_store: StateStore, redis_server: RedisServer
) -> None:
    """After SCRIPT FLUSH the next run succeeds by sending the source once, which caches it again."""
    ns = state_store.namespace("lua")
    script = state_store.script(f"return '{uuid.uuid4().hex}'")
    first = await ns.run(script, [], [])
    redis_server.command("SCRIPT", "FLUSH")
    assert redis_server.command("SCRIPT", "EXISTS", script.sha) == [0]
    assert await ns.run(script, [], []) == first
    assert redis_server.command("SCRIPT", "EXISTS", script.sha) == [1]


async def test_a_script_touching_two_tagged_keys(state_store: StateStore) -> None:
    """A script may read and write several keys that share a hash tag."""
    ns = state_store.namespace("lua")
    keys = [ns.key("a", tag="198.51.100.0/24"), ns.key("b", tag="198.51.100.0/24")]
    assert await ns.run(PAIR, keys, ["x", "y", 60]) == ["x", "y"]
    assert 0 < await ns.ttl(keys[1]) <= 60


async def test_a_lua_error_is_a_state_error(state_store: StateStore) -> None:
    """A script that fails raises StateError, not StateUnavailableError."""
    ns = state_store.namespace("lua")
    bad = state_store.script("return redis.call('NOSUCHCOMMAND')", name="test.bad")
    with pytest.raises(StateError) as info:
        await ns.run(bad, [], [])
    assert not isinstance(info.value, StateUnavailableError)


def test_two_different_scripts_may_not_share_a_name() -> None:
    """Registering a second script under a taken name raises ValueError; the same one is fine."""
    store = StateStore(StateSettings(), unix_socket="/x.sock")
    first = store.script("return 1", name="s")
    assert store.script("return 1", name="s") is first
    with pytest.raises(ValueError, match="named 's'"):
        store.script("return 2", name="s")


# --------------------------------------------------------------------------------------------
# Auto-pipelining


async def test_concurrent_calls_each_get_their_own_reply(state_store: StateStore) -> None:
    """Hundreds of concurrent calls of different kinds are answered, each with its own result."""
    ns = state_store.namespace("pipe")
    await asyncio.gather(*(ns.set(ns.key(str(i)), i, 60) for i in range(300)))
    gets = [ns.get(ns.key(str(i))) for i in range(300)]
    echoes = [ns.run(ECHO, [], [f"e{i}"]) for i in range(300)]
    results = await asyncio.gather(*(x for pair in zip(gets, echoes, strict=True) for x in pair))
    assert results[0::2] == [str(i) for i in range(300)]
    assert results[1::2] == [f"e{i}" for i in range(300)]


async def test_concurrent_calls_share_one_connection_and_few_writes(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """500 calls issued together travel over one connection in a handful of socket reads."""
    store, server, _ = private_store
    ns = store.namespace("pipe")
    reads_before = int(server.info("stats")["total_reads_processed"])
    results = await asyncio.gather(*(ns.run(INCR, [ns.key("n")], [1]) for _ in range(500)))
    reads = int(server.info("stats")["total_reads_processed"]) - reads_before
    assert sorted(results) == list(range(1, 501))
    clients = server.command("CLIENT", "LIST").splitlines()
    assert len(clients) == 2  # the store's one connection, and this admin query
    assert reads <= 10, f"{reads} reads for 500 calls"


async def test_a_caller_that_gives_up_does_not_disturb_the_batch(state_store: StateStore) -> None:
    """Cancelling one waiting call leaves the other calls of its batch with correct replies."""
    ns = state_store.namespace("pipe")
    tasks = [asyncio.ensure_future(ns.run(ECHO, [], [str(i)])) for i in range(50)]
    tasks[10].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[10], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 10] == [str(i) for i in range(50) if i != 10]
    assert await ns.run(ECHO, [], ["after"]) == "after"


# --------------------------------------------------------------------------------------------
# Outages, fail-fast and recovery


async def test_a_connection_closed_while_idle_is_replaced_without_an_error(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """When the server drops the idle connection (its timeout, CLIENT KILL), the next call reconnects."""
    store, server, _ = private_store
    ns = store.namespace("idle")
    await ns.set(ns.key("k"), "v", 60)
    server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert len(server.command("CLIENT", "LIST").splitlines()) == 1  # only this admin query is left
    await asyncio.sleep(0)  # one loop turn: the store's transport reads the EOF
    assert await ns.get(ns.key("k")) == "v"
    assert not store._breaker.open


async def test_a_stopped_server_raises_unavailable_within_the_timeout(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """With the server gone, a call raises StateUnavailableError within its time limit."""
    store, server, _ = private_store
    ns = store.namespace("down")
    server.stop()
    started = time.monotonic()
    with pytest.raises(StateUnavailableError):
        await ns.get(ns.key("k"))
    assert time.monotonic() - started < store.settings.timeout + SLACK


async def test_a_server_that_stops_answering_fails_the_call_within_the_timeout(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """A hung server (SIGSTOP: the connection stays open, nothing comes back): the batch's time
    budget ends the call with StateUnavailableError, and the store works again once it resumes."""
    store, server, clock = private_store
    ns = store.namespace("hung")
    await ns.set(ns.key("k"), "v", 60)
    assert server.process is not None
    server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailableError, match="did not answer in time"):
            await ns.get(ns.key("k"))
        assert store.settings.timeout <= time.monotonic() - started < store.settings.timeout + SLACK
    finally:
        server.process.send_signal(signal.SIGCONT)
    clock.advance(store.settings.retry_after + 1)
    assert await ns.get(ns.key("k")) == "v"


async def test_after_a_failure_calls_fail_fast_until_retry_after(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """Inside the retry_after window calls fail at once, even once the server is back."""
    store, server, clock = private_store
    ns = store.namespace("down")
    with server_stopped(server), pytest.raises(StateUnavailableError):
        await ns.get(ns.key("k"))
    started = time.monotonic()
    for _ in range(100):
        with pytest.raises(StateUnavailableError, match="failing fast"):
            await ns.get(ns.key("k"))
    assert time.monotonic() - started < 0.1
    clock.advance(store.settings.retry_after - 0.5)
    with pytest.raises(StateUnavailableError, match="failing fast"):
        await ns.get(ns.key("k"))


async def test_the_store_recovers_after_a_restart(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """Once retry_after has passed, the next call reconnects to the restarted server and succeeds."""
    store, server, clock = private_store
    ns = store.namespace("down")
    server.stop()
    with pytest.raises(StateUnavailableError):
        await ns.set(ns.key("k"), "v", 60)
    server.start()
    clock.advance(store.settings.retry_after)
    await ns.set(ns.key("k"), "v", 60)
    assert await ns.get(ns.key("k")) == "v"
    assert not store._breaker.open


async def test_a_failed_probe_opens_a_new_window(
    private_store: tuple[StateStore, RedisServer, FrozenClock],
) -> None:
    """When the probe after the window fails, calls fail fast again for another retry_after."""
    store, server, clock = private_store
    ns = store.namespace("down")
    server.stop()
    with pytest.raises(StateUnavailableError):
        await ns.get(ns.key("k"))
    clock.advance(store.settings.retry_after)
    with pytest.raises(StateUnavailableError) as probe:
        await ns.get(ns.key("k"))
    assert "failing fast" not in str(probe.value)
    with pytest.raises(StateUnavailableError, match="failing fast"):
        await ns.get(ns.key("k"))


async def test_connect_fails_when_the_server_is_down_but_the_store_recovers(
    redis_factory: Callable[..., RedisServer],
) -> None:
    """connect() raises StateUnavailableError; the store works once the server is up and the window passed."""
    server = redis_factory()
    server.stop()
    clock = FrozenClock()
    store = StateStore(StateSettings(url=server.url, timeout=0.3, connect_timeout=0.3), clock=clock)
    try:
        with pytest.raises(StateUnavailableError):
            await store.connect()
        server.start()
        clock.advance(store.settings.retry_after)
        await store.ping()
    finally:
        await store.aclose()


async def test_a_blackholed_server_times_out_on_connect() -> None:
    """A listener that accepts and never answers makes connect() raise within its time limits."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    listener = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    settings = StateSettings(url=f"redis://127.0.0.1:{port}", timeout=0.2, connect_timeout=0.2)
    store = StateStore(settings)
    started = time.monotonic()
    try:
        with pytest.raises(StateUnavailableError):
            await store.connect()
        assert time.monotonic() - started < settings.timeout + settings.connect_timeout + SLACK
    finally:
        await store.aclose()
        listener.close()


@pytest.fixture
async def proxied_store(
    redis_tcp_server: RedisServer,
) -> AsyncIterator[tuple[StateStore, BlackholeProxy, FrozenClock]]:
    """A store that reaches the TCP server through a proxy the test can blackhole."""
    proxy = BlackholeProxy(redis_tcp_server.port)
    await proxy.start()
    clock = FrozenClock()
    settings = StateSettings(url=proxy.url, timeout=0.2, connect_timeout=0.2, key_prefix=_prefix())
    store = StateStore(settings, clock=clock)
    await store.connect()
    yield store, proxy, clock
    await store.aclose()
    await proxy.aclose()


async def test_a_server_that_stops_answering_times_out_within_the_timeout(
    proxied_store: tuple[StateStore, BlackholeProxy, FrozenClock],
) -> None:
    """On a live connection that goes silent, every waiting call fails within the timeout."""
    store, proxy, _ = proxied_store
    ns = store.namespace("hole")
    await ns.set(ns.key("k"), "v", 60)
    proxy.blackhole = True
    started = time.monotonic()
    results = await asyncio.gather(*(ns.get(ns.key("k")) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, StateUnavailableError) for r in results)
    assert time.monotonic() - started < store.settings.timeout + SLACK


async def test_only_one_probe_runs_while_the_others_fail_fast(
    proxied_store: tuple[StateStore, BlackholeProxy, FrozenClock],
) -> None:
    """After the window, one call probes the silent server; calls meanwhile fail at once."""
    store, proxy, clock = proxied_store
    ns = store.namespace("hole")
    proxy.blackhole = True
    with pytest.raises(StateUnavailableError):
        await ns.get(ns.key("k"))
    clock.advance(store.settings.retry_after)
    probe = asyncio.create_task(ns.get(ns.key("k")))
    await asyncio.sleep(0)  # let the probe start; no logical time passes
    with pytest.raises(StateUnavailableError, match="probe is running"):
        await ns.get(ns.key("k"))
    with pytest.raises(StateUnavailableError):
        await probe
    proxy.blackhole = False
    clock.advance(store.settings.retry_after)
    assert await ns.get(ns.key("k")) is None


async def test_cancellation_propagates_to_the_caller(
    proxied_store: tuple[StateStore, BlackholeProxy, FrozenClock],
) -> None:
    """A caller cancelled while waiting gets CancelledError, never a StateError."""
    store, proxy, _ = proxied_store
    ns = store.namespace("hole")
    proxy.blackhole = True
    task = asyncio.create_task(ns.get(ns.key("k")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not store._breaker.probing


async def test_closing_fails_calls_in_flight_and_refuses_new_ones(
    proxied_store: tuple[StateStore, BlackholeProxy, FrozenClock],
) -> None:
    """aclose() answers waiting calls with StateUnavailableError; later calls raise StateError."""
    store, proxy, _ = proxied_store
    ns = store.namespace("hole")
    proxy.blackhole = True
    waiting = asyncio.create_task(ns.get(ns.key("k")))
    await asyncio.sleep(0)
    await store.aclose()
    with pytest.raises(StateUnavailableError, match="closed"):
        await waiting
    with pytest.raises(StateError, match="not connected"):
        await ns.get(ns.key("k"))


async def test_a_redis_url_over_tcp_works(redis_tcp_server: RedisServer) -> None:
    """A redis:// URL with a database number reaches the TCP server and that database."""
    settings = StateSettings(url=f"{redis_tcp_server.url}/3", key_prefix=_prefix())
    async with StateStore(settings) as store:
        ns = store.namespace("tcp")
        await ns.set(ns.key("k"), "v", 60)
        assert await ns.get(ns.key("k")) == "v"
    assert redis_tcp_server.command("SELECT", "3") == "OK"
