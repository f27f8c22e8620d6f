"""greylist: postgrey's semantics with an injected clock and a real Redis."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mxward.policyd.checks.greylist import GreylistAdmin, GreylistCheck, Options, normalise_sender
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.plugin import ActionKind, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore, StateUnavailableError


@pytest.fixture
async def store(redis_server: Any) -> AsyncIterator[StateStore]:
    settings = StateSettings(url=f"unix://{redis_server.socket}", key_prefix=f"t{uuid.uuid4().hex[:8]}")
    async with StateStore(settings) as s:
        yield s


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(1_700_000_000.0)


def services(store: StateStore, clock: FrozenClock) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",))),
        state=store,
        clock=clock,
        hostname="mx.test.example",
    )


def tx(
    client: str = "192.0.2.7", sender: str = "alice@example.net", rcpt: str = "bob@example.com", **kw: Any
) -> Transaction:
    return Transaction(
        stage=Stage.RCPT,
        client_address=client,
        client_ip=ipaddress.ip_address(client),
        sender=sender,
        recipient=rcpt,
        **kw,
    )


async def check(c: GreylistCheck, t: Transaction) -> Result:
    return await c.check(Stage.RCPT, t)


def status(r: Result) -> object:
    return r.facts.get("greylist.status")


async def test_a_new_triplet_is_deferred_with_450_and_the_wait(store: StateStore, clock: FrozenClock) -> None:
    """The first attempt is answered DEFER_IF_PERMIT 4.7.1 with the seconds to wait."""
    c = GreylistCheck(Options(), services(store, clock))
    r = await check(c, tx())
    assert r.verdict is Verdict.FAIL and status(r) == "new"
    assert r.action is not None and r.action.kind is ActionKind.DEFER_IF_PERMIT
    assert (r.action.code, r.action.dsn) == (450, "4.7.1")
    assert r.action.text == "Greylisted, please try again in 300 seconds"


async def test_a_retry_before_the_delay_is_deferred_with_the_time_left(
    store: StateStore, clock: FrozenClock
) -> None:
    """A retry after 100 of 300 seconds is told to wait 200 more."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx())
    clock.advance(100)
    r = await check(c, tx())
    assert status(r) == "early" and r.action is not None
    assert "200 seconds" in r.action.text


async def test_a_retry_after_the_delay_passes_with_an_x_greylist_header(
    store: StateStore, clock: FrozenClock
) -> None:
    """After the delay the triplet passes, and the first pass carries X-Greylist."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx())
    clock.advance(301)
    r = await check(c, tx())
    assert r.verdict is Verdict.PASS and r.action is None
    assert r.header.startswith("X-Greylist: delayed 301 seconds by mxward at mx.test.example; ")
    clock.advance(60)
    again = await check(c, tx())
    assert again.verdict is Verdict.PASS and again.header == ""


async def test_a_retry_after_the_window_starts_over(store: StateStore, clock: FrozenClock) -> None:
    """A first retry later than delay + retry_window is treated as new."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx())
    clock.advance(300 + 2 * 86400 + 1)
    assert status(await check(c, tx())) == "new"


async def test_a_passed_triplet_is_remembered_for_max_age_since_last_seen(
    store: StateStore, clock: FrozenClock
) -> None:
    """Known triplets pass for 35 days after their last mail, and are new after that."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx())
    clock.advance(400)
    assert status(await check(c, tx())) == "pass"
    clock.advance(30 * 86400)
    assert status(await check(c, tx())) == "pass"
    ttl = await store.namespace("greylist").ttl(
        c.triplet_keys("192.0.2.0/24", "alice@example.net", "bob@example.com")[0]
    )
    assert 35 * 86400 - 5 <= ttl <= 35 * 86400


@pytest.mark.parametrize(
    ("first", "retry", "same"),
    [
        ("192.0.2.7", "192.0.2.200", True),  # same /24
        ("192.0.2.7", "192.0.3.7", False),  # other /24
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True),  # same /64
        ("2001:db8:1:2::1", "2001:db8:1:3::1", False),  # other /64
        ("::ffff:192.0.2.7", "192.0.2.8", True),  # IPv4-mapped IPv6 is IPv4
    ],
)
async def test_the_client_network_groups_a_senders_pool(
    store: StateStore, clock: FrozenClock, first: str, retry: str, same: bool
) -> None:
    """A retry from another address of the same /24 (IPv4) or /64 (IPv6) counts as a retry."""
    from mxward.shared.netutil import parse_ip

    c = GreylistCheck(Options(), services(store, clock))
    await c.check(
        Stage.RCPT,
        Transaction(
            stage=Stage.RCPT,
            client_address=first,
            client_ip=parse_ip(first),
            sender="a@example.net",
            recipient="b@example.com",
        ),
    )
    clock.advance(301)
    r = await c.check(
        Stage.RCPT,
        Transaction(
            stage=Stage.RCPT,
            client_address=retry,
            client_ip=parse_ip(retry),
            sender="a@example.net",
            recipient="b@example.com",
        ),
    )
    assert (status(r) == "pass") is same


@pytest.mark.parametrize(
    ("sender", "normalised"),
    [
        ("Alice@Example.NET", "alice@example.net"),
        ("alice+news@example.net", "alice@example.net"),
        ("prvs=1234abcdef=alice@example.net", "alice@example.net"),
        ("bounce-12345-67@lists.example.net", "bounce-#-#@lists.example.net"),
        ("", ""),
        ("MAILER-DAEMON", "mailer-daemon"),
    ],
)
def test_senders_are_normalised_like_postgrey(sender: str, normalised: str) -> None:
    """Case, +extensions, BATV tags and VERP numbers do not make a new triplet."""
    assert normalise_sender(sender) == normalised


def test_sender_normalisation_can_be_turned_off() -> None:
    """With strip_batv and strip_verp off, only case and the extension are normalised."""
    assert (
        normalise_sender("prvs=1=a+b7@x.example", strip_batv=False, strip_verp=False) == "prvs=1=a@x.example"
    )


async def test_verp_senders_share_one_triplet(store: StateStore, clock: FrozenClock) -> None:
    """A retry with another VERP bounce number is the same triplet."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx(sender="bounce-111@lists.example.net"))
    clock.advance(301)
    assert status(await check(c, tx(sender="bounce-222@lists.example.net"))) == "pass"


async def test_client_is_auto_allowed_after_five_passes_counted_hourly(
    store: StateStore, clock: FrozenClock
) -> None:
    """Five passes in five different hours allow the client network for every triplet."""
    c = GreylistCheck(Options(), services(store, clock))
    for n in range(5):
        rcpt = f"user{n}@example.com"
        await check(c, tx(rcpt=rcpt))
        clock.advance(301)
        assert status(await check(c, tx(rcpt=rcpt))) == "pass"
        if n < 4:  # a second pass in the same hour is not counted: still not allowed
            assert status(await check(c, tx(rcpt=rcpt))) == "pass"
        clock.advance(3600)
    r = await check(c, tx(rcpt="brand-new@example.com", client="192.0.2.99"))
    assert status(r) == "awl" and r.action is None


async def test_auto_allow_can_be_turned_off(store: StateStore, clock: FrozenClock) -> None:
    """auto_allow_clients = 0 greylists every new triplet forever."""
    c = GreylistCheck(Options(auto_allow_clients=0), services(store, clock))
    for n in range(7):
        await check(c, tx(rcpt=f"u{n}@example.com"))
        clock.advance(3601)
        await check(c, tx(rcpt=f"u{n}@example.com"))
    assert status(await check(c, tx(rcpt="new@example.com"))) == "new"


async def test_a_repeated_request_changes_nothing(store: StateStore, clock: FrozenClock) -> None:
    """Postfix may send a request twice: a new triplet stays new, the wait does not restart."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx())
    clock.advance(200)
    assert status(await check(c, tx())) == "early"
    assert status(await check(c, tx())) == "early"
    clock.advance(101)
    assert status(await check(c, tx())) == "pass"


@pytest.mark.parametrize(
    ("options", "t", "why"),
    [
        ({"allow_networks": ("192.0.2.0/28",)}, tx(), "network"),
        ({"allow_client_hostnames": ("example.org",)}, tx(client_name="mx3.example.org"), "client_name"),
        ({"allow_client_hostnames": (".example.org",)}, tx(client_name="mx.example.org"), "client_name"),
        ({}, tx(rcpt="Postmaster@example.com"), "recipient"),
        ({"allow_recipients": ("@example.com",)}, tx(), "recipient"),
        ({"allow_recipients": ("/^bob@/",)}, tx(), "recipient"),
        ({"allow_sender_domains": ("example.net",)}, tx(sender="x@lists.example.net"), "sender_domain"),
    ],
)
async def test_allow_lists_skip_greylisting(
    store: StateStore, clock: FrozenClock, options: dict[str, Any], t: Transaction, why: str
) -> None:
    """Allow-listed networks, host names, recipients and sender domains are never deferred."""
    c = GreylistCheck(Options(**options), services(store, clock))
    r = await check(c, t)
    assert r.verdict is Verdict.SKIP and r.log["allowed"] == why and r.action is None


@pytest.mark.parametrize(
    ("options", "t"),
    [
        ({"allow_client_hostnames": ("example.org",)}, tx(client_name="unknown")),
        ({"allow_client_hostnames": (".example.org",)}, tx(client_name="example.org")),
        ({"allow_client_hostnames": ("example.org",)}, tx(client_name="badexample.org")),
        ({"allow_networks": ("192.0.2.0/29",)}, tx(client="192.0.2.9")),
    ],
)
async def test_near_misses_of_allow_lists_are_greylisted(
    store: StateStore, clock: FrozenClock, options: dict[str, Any], t: Transaction
) -> None:
    """Entries match exactly what they say and nothing that merely looks alike."""
    c = GreylistCheck(Options(**options), services(store, clock))
    assert status(await check(c, t)) == "new"


async def test_every_write_has_a_ttl(store: StateStore, clock: FrozenClock) -> None:
    """No greylisting key lives forever."""
    c = GreylistCheck(Options(), services(store, clock))
    await check(c, tx())
    clock.advance(301)
    await check(c, tx())
    ns = store.namespace("greylist")
    keys = [k async for k in ns.scan()]
    assert len(keys) == 2
    for key in keys:
        assert await ns.ttl(key) > 0


async def test_admin_lists_allows_and_removes(store: StateStore, clock: FrozenClock) -> None:
    """`mxward greylist` sees the check's entries, can pass a triplet and can forget a client."""
    svc = services(store, clock)
    c = GreylistCheck(Options(), svc)
    admin = GreylistAdmin(Options(), svc)
    await check(c, tx())
    [entry] = [e async for e in admin.entries()]
    assert (entry.network, entry.sender, entry.recipient, entry.passes) == (
        "192.0.2.0/24",
        "alice@example.net",
        "bob@example.com",
        0,
    )
    await admin.allow("192.0.2.50", "carol@example.net", "bob@example.com")
    assert status(await check(c, tx(sender="carol@example.net"))) == "pass"
    await admin.allow("198.51.100.1", None, None)
    assert status(await check(c, tx(client="198.51.100.20"))) == "awl"
    assert "removed 1 triplet" in await admin.remove("192.0.2.1", "carol@example.net", "bob@example.com")
    assert status(await check(c, tx(sender="carol@example.net"))) == "new"
    assert "removed" in await admin.remove("198.51.100.1", None, None)
    assert status(await check(c, tx(client="198.51.100.20"))) == "new"


async def test_an_unreachable_store_raises_state_unavailable(tmp_path: Any, clock: FrozenClock) -> None:
    """Without Redis the check raises StateUnavailableError, which the pipeline turns into ERROR."""
    settings = StateSettings(url=f"unix://{tmp_path}/nothing.sock", timeout=0.1, connect_timeout=0.1)
    s = StateStore(settings)
    with pytest.raises(StateUnavailableError):
        await s.connect()
    c = GreylistCheck(Options(), services(s, clock))
    with pytest.raises(StateUnavailableError):
        await check(c, tx())
    await s.aclose()


@pytest.mark.parametrize(
    ("options", "facts", "allowed"),
    [
        ({}, {"karma.good": True}, "karma"),
        ({"skip_good_karma": False}, {"karma.good": True}, None),
        ({}, {"karma.good": False}, None),
        ({}, {"dnswl.trusted": True}, "dnswl"),
        ({"skip_dnswl": False}, {"dnswl.trusted": True}, None),
        ({"skip_countries": ("de", "AT")}, {"geoip.country": "DE"}, "country"),
        ({"skip_countries": ("DE",)}, {"geoip.country": "US"}, None),
        ({"skip_countries": ("DE",)}, {}, None),
        ({"only_os": ("/^windows/",)}, {"p0f.genre": "Windows 7 or 8"}, None),
        ({"only_os": ("/^windows/",)}, {"p0f.genre": "Linux 3.11 and newer"}, "os"),
        ({"only_os": ("Windows XP",)}, {"p0f.genre": "windows xp"}, None),
        ({"only_os": ("Windows",)}, {"p0f.genre": "Windows 7 or 8", "p0f.os": "Windows"}, None),
        ({"only_os": ("Windows",)}, {"p0f.genre": "Linux 3.x", "p0f.os": "Linux"}, "os"),
        ({"only_os": ("Windows XP",)}, {}, "os"),  # p0f saw nothing: not greylisted
    ],
)
async def test_facts_of_other_checks_exempt_clients(
    store: StateStore, clock: FrozenClock, options: dict[str, Any], facts: dict[str, Any], allowed: str | None
) -> None:
    """Good karma, a DNSWL listing, a country or an OS rule spare a client greylisting."""
    c = GreylistCheck(Options(**options), services(store, clock))
    r = await check(c, tx(facts=facts))
    if allowed is None:
        assert status(r) == "new"
    else:
        assert status(r) == "allowed" and r.log["allowed"] == allowed


async def test_an_spf_pass_pool_retries_from_another_network(store: StateStore, clock: FrozenClock) -> None:
    """The domain stands in for the network: the retry from a different /24 of the pool passes."""
    c = GreylistCheck(Options(), services(store, clock))
    spf = {"spf.pass_domain": "Pool.example.net"}
    first = await check(c, tx("192.0.2.7", facts=spf))
    assert status(first) == "new"
    clock.advance(400)
    retry = await check(c, tx("198.51.100.20", facts={"spf.pass_domain": "pool.example.net"}))
    assert status(retry) == "pass"
    # Without SPF pass the other network is a new triplet, as in postgrey.
    assert status(await check(c, tx("203.0.113.5"))) == "new"


async def test_the_spf_pool_can_be_turned_off(store: StateStore, clock: FrozenClock) -> None:
    c = GreylistCheck(Options(spf_pool=False), services(store, clock))
    spf = {"spf.pass_domain": "pool.example.net"}
    await check(c, tx("192.0.2.7", facts=spf))
    clock.advance(400)
    assert status(await check(c, tx("198.51.100.20", facts=spf))) == "new"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"skip_countries": ("Germany",)}, "two-letter"),
        ({"only_os": ("/(/",)}, "not a valid regular expression"),
    ],
)
def test_bad_exemption_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Options(**options)


@pytest.mark.parametrize("net", ["192.0.2.0/24", "2001:db8::/64", "spf:example.net"])
def test_triplet_keys_are_the_keys_the_namespace_builds(net: str) -> None:
    """The check builds its keys inline (every request); they must equal Namespace.key's."""
    store = StateStore(StateSettings(), unix_socket="/nonexistent.sock")
    c = GreylistCheck(Options(), services(store, FrozenClock(0.0)))
    ns = store.namespace("greylist")
    assert c.triplet_keys(net, "a@example.net", "b@example.com") == (
        ns.key("t", "a@example.net/b@example.com", tag=net),
        ns.key("c", tag=net),
    )


@pytest.mark.parametrize("net", ["", "x{y}"])
def test_triplet_keys_refuse_what_the_namespace_refuses(net: str) -> None:
    store = StateStore(StateSettings(), unix_socket="/nonexistent.sock")
    c = GreylistCheck(Options(), services(store, FrozenClock(0.0)))
    with pytest.raises(ValueError, match="hash tag"):
        c.triplet_keys(net, "a@example.net", "b@example.com")
