"""StateStore against Redis Sentinel and Redis Cluster, each started on free loopback ports."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest
from support.redis_fixtures import RedisServer, resp_command

from mxward.shared.clock import FrozenClock
from mxward.shared.state import Script, StateSettings, StateStore, StateUnavailableError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.skipif(
    not (shutil.which("redis-server") and shutil.which("redis-cli")),
    reason="needs redis-server and redis-cli (Debian: redis-server, redis-tools)",
)

PAIR = Script(
    "test.topology.pair",
    """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
return {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])}
""",
)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    """Poll a server-side condition (readiness, not logical time) until true or time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (OSError, ConnectionError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------------
# Sentinel


class SentinelSetup:
    def __init__(self, master: RedisServer, replica: RedisServer, sentinel: RedisServer) -> None:
        self.master, self.replica, self.sentinel = master, replica, sentinel

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/mymaster"

    def master_port(self) -> int:
        """The master's port in SENTINEL MASTERS (what clients ask; it changes at +switch-master)."""
        masters = resp_command(("127.0.0.1", self.sentinel.port), "SENTINEL", "MASTERS")
        fields = dict(zip(masters[0][0::2], masters[0][1::2], strict=True))
        return int(fields["port"])

    def replica_ready(self) -> bool:
        """Sentinel has reached the replica and could promote it."""
        replicas = resp_command(("127.0.0.1", self.sentinel.port), "SENTINEL", "REPLICAS", "mymaster")
        fields = dict(zip(replicas[0][0::2], replicas[0][1::2], strict=True)) if replicas else {}
        return fields.get("flags") == "slave" and fields.get("master-link-status") == "ok"


@pytest.fixture
def sentinel_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    """A master, its replica and one Sentinel monitoring them (quorum 1)."""
    base = tmp_path_factory.mktemp("sentinel")
    plain = ["--save", "", "--appendonly", "no"]
    master = RedisServer(base / "master", tcp=True, args=[*plain, "--repl-diskless-sync-delay", "0"])
    master.start()
    replica = RedisServer(
        base / "replica", tcp=True, args=[*plain, "--replicaof", "127.0.0.1", str(master.port)]
    )
    replica.start()
    config = base / "sentinel.conf"
    config.write_text(
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    sentinel = RedisServer(base / "sentinel", tcp=True, config_file=config, args=["--sentinel"])
    sentinel.start()
    setup = SentinelSetup(master, replica, sentinel)
    try:
        wait_for(setup.replica_ready, "sentinel to reach the replica")
        yield setup
    finally:
        for server in (sentinel, replica, master):
            server.stop()


async def test_sentinel_url_writes_to_the_master_sentinel_names(sentinel_setup: SentinelSetup) -> None:
    """redis+sentinel:// asks the Sentinel for the master and writes and reads there."""
    settings = StateSettings(url=sentinel_setup.url, key_prefix=f"t{uuid.uuid4().hex[:8]}")
    async with StateStore(settings) as store:
        ns = store.namespace("s")
        key = ns.key("k", tag="x")
        await ns.hset(key, {"a": "1"}, 60)
        assert await ns.hgetall(key) == {"a": "1"}
        assert sentinel_setup.master.command("HGETALL", key) == ["a", "1"]


async def test_after_failover_readonly_is_unavailable_then_the_new_master_is_used(
    sentinel_setup: SentinelSetup,
) -> None:
    """A write to the demoted master raises StateUnavailableError once; the next probe uses the new master."""
    clock = FrozenClock()
    settings = StateSettings(url=sentinel_setup.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", retry_after=1.0)
    async with StateStore(settings, clock=clock) as store:
        ns = store.namespace("s")
        await ns.set(ns.key("before"), "1", 60)
        new_port = sentinel_setup.replica.port
        resp_command(("127.0.0.1", sentinel_setup.sentinel.port), "SENTINEL", "FAILOVER", "mymaster")
        wait_for(lambda: sentinel_setup.master_port() == new_port, "the failover")
        # What Sentinel does to the old master once it sees it again: make it a replica.
        sentinel_setup.master.command("REPLICAOF", "127.0.0.1", new_port)
        with pytest.raises(StateUnavailableError, match=r"now a slave|READONLY|ReadOnlyError"):
            await ns.set(ns.key("during"), "2", 60)
        clock.advance(settings.retry_after)
        await ns.set(ns.key("after"), "3", 60)
        assert sentinel_setup.replica.command("GET", ns.key("after")) == "3"


async def test_sentinel_without_a_known_master_is_unavailable(sentinel_setup: SentinelSetup) -> None:
    """A master name the Sentinel does not know makes connect() raise StateUnavailableError."""
    url = f"redis+sentinel://127.0.0.1:{sentinel_setup.sentinel.port}/nosuchmaster"
    store = StateStore(StateSettings(url=url))
    try:
        with pytest.raises(StateUnavailableError, match=r"MasterNotFound|No master"):
            await store.connect()
    finally:
        await store.aclose()


# --------------------------------------------------------------------------------------------
# Cluster


class Cluster:
    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def ok(self) -> bool:
        return all("cluster_state:ok" in n.command("CLUSTER", "INFO") for n in self.nodes if n.running)


def _cluster_node(directory: Path) -> RedisServer:
    return RedisServer(
        directory,
        tcp=True,
        args=[
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000",
            "--save", "",
            "--appendonly", "no",
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three masters (no replicas) joined with redis-cli --cluster create."""
    base = tmp_path_factory.mktemp("cluster")
    nodes = [_cluster_node(base / f"n{i}") for i in range(3)]
    try:
        for node in nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        setup = Cluster(nodes)
        wait_for(setup.ok, "cluster_state:ok")
        yield setup
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
async def cluster_store(cluster: Cluster) -> Any:
    """A connected store on the cluster with a key prefix of its own."""
    settings = StateSettings(url=cluster.url, key_prefix=f"t{uuid.uuid4().hex[:8]}", timeout=0.5)
    async with StateStore(settings) as store:
        yield store


async def test_cluster_reads_and_writes_keys_on_every_node(
    cluster: Cluster, cluster_store: StateStore
) -> None:
    """Keys with many hash tags spread over all masters and read back with their TTLs."""
    ns = cluster_store.namespace("c")
    await asyncio.gather(*(ns.set(ns.key("k", tag=f"n{i}"), i, 60) for i in range(60)))
    await asyncio.gather(*(ns.hset(ns.key("h", tag=f"n{i}"), {"i": i}, 90) for i in range(60)))
    assert [await ns.get(ns.key("k", tag=f"n{i}")) for i in range(60)] == [str(i) for i in range(60)]
    assert await ns.hgetall(ns.key("h", tag="n7")) == {"i": "7"}
    assert 60 < await ns.ttl(ns.key("h", tag="n7")) <= 90
    assert all(int(node.command("DBSIZE")) > 0 for node in cluster.nodes)


async def test_cluster_scan_covers_every_master(cluster_store: StateStore) -> None:
    """scan() in Cluster mode walks every master and finds all keys of the namespace."""
    ns = cluster_store.namespace("c")
    await asyncio.gather(*(ns.set(ns.key("s", tag=f"n{i}"), i, 60) for i in range(100)))
    found = {key async for key in ns.scan("*:s", count=10)}
    assert found == {ns.key("s", tag=f"n{i}") for i in range(100)}


async def test_cluster_script_on_two_hash_tagged_keys(cluster_store: StateStore) -> None:
    """A Lua script touching two keys with one hash tag runs on their common slot."""
    ns = cluster_store.namespace("c")
    keys = [ns.key("a", tag="198.51.100.0/24"), ns.key("b", tag="198.51.100.0/24")]
    assert await ns.run(PAIR, keys, ["x", "y", 60]) == ["x", "y"]
    assert await ns.get(keys[1]) == "y"


async def test_cluster_delete_spans_slots(cluster_store: StateStore) -> None:
    """delete() removes keys that live in different slots in one call."""
    ns = cluster_store.namespace("c")
    keys = [ns.key("d", tag=f"n{i}") for i in range(10)]
    await asyncio.gather(*(ns.set(key, 1, 60) for key in keys))
    assert await ns.delete(*keys, ns.key("d", tag="none")) == 10
    assert not await ns.exists(keys[0])


async def test_cluster_node_down_is_unavailable_within_the_timeout(
    cluster: Cluster, cluster_store: StateStore
) -> None:
    """With the node of a key's slot stopped, calls for that key fail within the timeout."""
    ns = cluster_store.namespace("c")
    node = cluster.nodes[2]
    key = next(
        ns.key("x", tag=f"n{i}") for i in range(1000) if _owner(cluster, ns.key("x", tag=f"n{i}")) is node
    )
    await ns.set(key, 1, 60)
    node.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailableError):
            await ns.get(key)
        assert time.monotonic() - started < cluster_store.settings.timeout + 0.3
    finally:
        node.start()
        wait_for(cluster.ok, "the cluster to recover")


def _owner(cluster: Cluster, key: str) -> RedisServer:
    slot = int(cluster.nodes[0].command("CLUSTER", "KEYSLOT", key))
    for start, end, master, *_ in cluster.nodes[0].command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return next(n for n in cluster.nodes if n.port == master[1])
    raise AssertionError(f"no node serves slot {slot}")
