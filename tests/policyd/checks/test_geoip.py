"""geoip check: facts, country lists, distance, header, skips, reload, with generated databases."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, cast

import pytest
from support.mmdb import ASN_RECORDS, CITY_RECORDS, Place, write_db

from mxward.policyd.checks.geoip import GeoipCheck, Options
from mxward.policyd.service import PolicyService
from mxward.shared.clock import FrozenClock
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.headers import header_params
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import ActionKind, Check, Result, Services, Stage, Transaction, Verdict
from mxward.shared.state import StateSettings, StateStore

BERLIN = {"latitude": 52.52, "longitude": 13.405}
US, DE, BR, CN, JP = "192.0.2.7", "198.51.100.7", "203.0.113.5", "203.0.113.200", "2001:db8:1::25"


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def dbs(tmp_path: Path) -> dict[str, str]:
    return {
        "city_db": str(write_db(tmp_path / "city.mmdb", "city", CITY_RECORDS)),
        "asn_db": str(write_db(tmp_path / "asn.mmdb", "asn", ASN_RECORDS)),
    }


def services(clock: FrozenClock) -> Services:
    return Services(
        dns=Resolver(DnsSettings(nameservers=("127.0.0.1:9",))),
        state=StateStore(StateSettings(url="unix:///nonexistent/redis.sock")),
        clock=clock,
    )


async def started(options: dict[str, Any], clock: FrozenClock | None = None) -> GeoipCheck:
    check = GeoipCheck(Options(**options), services(clock or FrozenClock()))
    await check.start()
    return check


def tx(client: str | None) -> Transaction:
    if client is None:
        return Transaction(stage=Stage.CONNECT, client_address="unknown")
    return Transaction(stage=Stage.CONNECT, client_address=client, client_ip=ipaddress.ip_address(client))


async def run(options: dict[str, Any], client: str | None) -> Result:
    check = await started(options)
    try:
        return await check.check(Stage.CONNECT, tx(client))
    finally:
        await check.aclose()


@pytest.mark.parametrize(
    ("client", "options", "expected"),
    [
        # (verdict, score, forced reject, client-facing reason)
        (US, {}, (Verdict.PASS, 0.0, False, "")),
        (
            US,
            {"deny_countries": ("US",)},
            (Verdict.FAIL, 10.0, False, "Mail from country US is not accepted here"),
        ),
        (
            US,
            {"deny_countries": ("us", "ru")},
            (Verdict.FAIL, 10.0, False, "Mail from country US is not accepted here"),
        ),
        (
            US,
            {"deny_countries": ("US",), "deny_action": "reject"},
            (Verdict.FAIL, 0.0, True, "Mail from country US is not accepted here"),
        ),
        (
            US,
            {"deny_countries": ("US",), "deny_score": 4.0},
            (Verdict.FAIL, 4.0, False, "Mail from country US is not accepted here"),
        ),
        (DE, {"deny_countries": ("US",)}, (Verdict.PASS, 0.0, False, "")),
        (DE, {"allow_countries": ("DE", "AT")}, (Verdict.PASS, -1.0, False, "")),
        (DE, {"allow_countries": ("DE",), "allow_score": 0.0}, (Verdict.PASS, 0.0, False, "")),
        (US, {"allow_countries": ("DE",)}, (Verdict.PASS, 0.0, False, "")),
        # distance from Berlin: Syracuse about 6334 km, Berlin 0 km
        (US, {**BERLIN, "too_far_km": 5000.0}, (Verdict.FAIL, 1.0, False, "client location 6334 km away")),
        (US, {**BERLIN, "too_far_km": 7000.0}, (Verdict.PASS, 0.0, False, "")),
        (DE, {**BERLIN, "too_far_km": 1.0}, (Verdict.PASS, 0.0, False, "")),
        (
            US,
            {**BERLIN, "too_far_km": 5000.0, "too_far_score": 3.0},
            (Verdict.FAIL, 3.0, False, "client location 6334 km away"),
        ),
        (
            US,
            {**BERLIN, "too_far_km": 5000.0, "deny_countries": ("US",)},
            (
                Verdict.FAIL,
                11.0,
                False,
                "Mail from country US is not accepted here; client location 6334 km away",
            ),
        ),
        # a country-level record has no coordinates: no distance, never "too far"
        (CN, {**BERLIN, "too_far_km": 10.0}, (Verdict.PASS, 0.0, False, "")),
        (
            JP,
            {"deny_countries": ("JP",)},
            (Verdict.FAIL, 10.0, False, "Mail from country JP is not accepted here"),
        ),
    ],
)
async def test_verdicts(
    dbs: dict[str, str], client: str, options: dict[str, Any], expected: tuple[Verdict, float, bool, str]
) -> None:
    """Deny lists score or reject, allow lists score negatively, distance beyond too_far_km scores."""
    r = await run({**dbs, **options}, client)
    assert (r.verdict, r.score, r.action is not None, r.reason) == expected


async def test_a_rejected_country_gets_a_postfix_style_reply(dbs: dict[str, str]) -> None:
    """deny_action = "reject" forces deny_code deny_dsn deny_text."""
    r = await run({**dbs, "deny_countries": ("US",), "deny_action": "reject"}, US)
    assert r.action is not None and r.action.kind is ActionKind.REJECT
    assert r.action.reply == "550 5.7.1 Mail from country US is not accepted here"
    options = {"deny_code": 554, "deny_dsn": "5.7.0", "deny_text": "{country}: no thanks"}
    r = await run({**dbs, "deny_countries": ("US",), "deny_action": "reject", **options}, US)
    assert r.action is not None and r.action.reply == "554 5.7.0 US: no thanks"


@pytest.mark.parametrize(
    ("client", "options", "note"),
    [
        ("127.0.4.2", {}, "unroutable address"),  # qpsmtpd acceptance 2: loopback, no lookup
        ("10.20.30.40", {"deny_countries": ("US",)}, "unroutable address"),
        ("fd00::25", {}, "unroutable address"),
        ("2001:db8:2::1", {"deny_countries": ("US",)}, "not in database"),  # acceptance 3
        ("198.18.0.1", {}, "not in database"),
        (US, {"city_db": "/nonexistent/city.mmdb", "asn_db": ""}, "no database loaded"),
        (US, {"city_db": "", "asn_db": "", "country_db": ""}, "no database loaded"),
        (None, {}, "no client address"),
    ],
)
async def test_unknown_and_private_addresses_are_skipped(
    dbs: dict[str, str], client: str | None, options: dict[str, Any], note: str
) -> None:
    """Skip, score 0, no facts, no header: never an error for the sender."""
    r = await run({**dbs, "add_header": True, **options}, client)
    assert (r.verdict, r.score, r.action, dict(r.facts), r.header) == (Verdict.SKIP, 0.0, None, {}, "")
    assert r.log["note"] == note


async def test_a_corrupt_database_is_an_error_without_score(tmp_path: Path) -> None:
    """A damaged file is our problem: verdict error (on_error decides), score 0, no action."""
    path = write_db(tmp_path / "city.mmdb", "city", CITY_RECORDS)
    data = bytearray(path.read_bytes())
    data[:600] = b"\xee" * 600
    path.write_bytes(bytes(data))
    r = await run({"city_db": str(path), "asn_db": "", "deny_countries": ("US",)}, US)
    assert (r.verdict, r.score, r.action) == (Verdict.ERROR, 0.0, None)
    assert "corrupt" in str(r.log["error"])


@pytest.mark.parametrize(
    ("client", "options", "facts"),
    [
        (
            US,
            BERLIN,
            {
                "geoip.country": "US",
                "geoip.continent": "NA",
                "geoip.city": "Syracuse",
                "geoip.asn": 64500,
                "geoip.as_org": "Example Transit; Inc.",
                "geoip.distance_km": 6334,
            },
        ),
        (
            US,
            {},
            {
                "geoip.country": "US",
                "geoip.continent": "NA",
                "geoip.city": "Syracuse",
                "geoip.asn": 64500,
                "geoip.as_org": "Example Transit; Inc.",
            },
        ),
        (
            DE,
            BERLIN,
            {
                "geoip.country": "DE",
                "geoip.continent": "EU",
                "geoip.city": "Berlin",
                "geoip.asn": 64501,
                "geoip.as_org": "Beispiel Netz GmbH",
                "geoip.distance_km": 0,
            },
        ),
        (BR, {"asn_db": ""}, {"geoip.country": "BR", "geoip.continent": "SA", "geoip.city": "São Paulo"}),
        (CN, BERLIN, {"geoip.country": "CN", "geoip.continent": "AS"}),
        (US, {"city_db": ""}, {"geoip.asn": 64500, "geoip.as_org": "Example Transit; Inc."}),  # ASN only
    ],
)
async def test_facts_for_later_checks(
    dbs: dict[str, str], client: str, options: dict[str, Any], facts: dict[str, Any]
) -> None:
    """Country, continent, city, ASN, AS organisation and distance, each only when known."""
    r = await run({**dbs, **options}, client)
    assert dict(r.facts) == facts


@pytest.mark.parametrize(
    ("client", "options", "header"),
    [
        (US, {}, ""),  # off by default
        (
            US,
            {"add_header": True, **BERLIN},
            (
                'X-GeoIP: country=US; continent=NA; city=Syracuse; asn=64500; as_org="Example Transit Inc.";'
                " distance_km=6334"
            ),
        ),
        (BR, {"add_header": True, "asn_db": ""}, 'X-GeoIP: country=BR; continent=SA; city="Sao Paulo"'),
        (CN, {"add_header": True}, "X-GeoIP: country=CN; continent=AS"),
    ],
)
async def test_the_optional_header_is_one_ascii_line(
    dbs: dict[str, str], client: str, options: dict[str, Any], header: str
) -> None:
    """add_header gives one X-GeoIP line: known fields, accents folded, separators removed."""
    r = await run({**dbs, **options}, client)
    assert r.header == header
    assert r.header.isascii()


@pytest.mark.parametrize(
    ("fields", "line"),
    [
        ((("a", "x"), ("b", None), ("c", "")), "H: a=x"),
        ((("a", 'q"uo;te\\'), ("b", "two  words")), 'H: a=quote; b="two words"'),
        ((("a", "line\r\nBcc: x"),), 'H: a="lineBcc: x"'),
        ((("a", "Zürich"), ("n", 7)), "H: a=Zurich; n=7"),
        ((("a", None),), ""),
    ],
)
def test_header_params_are_safe(fields: tuple[tuple[str, Any], ...], line: str) -> None:
    """Values cannot end a parameter or the header line; unknown values are left out."""
    assert header_params("H", fields) == line


async def test_a_replaced_database_is_used_by_the_running_check(
    dbs: dict[str, str], clock: FrozenClock
) -> None:
    """Hot reload: after the file changes and reload_interval passes, the new data decides."""
    check = await started({**dbs, "deny_countries": ("DE",), "reload_interval": 5.0}, clock)
    try:
        assert (await check.check(Stage.CONNECT, tx(US))).verdict is Verdict.PASS
        write_db(Path(dbs["city_db"]), "city", {"192.0.2.0/24": Place("DE", "EU", "Berlin")})
        clock.advance(5)
        r = await check.check(Stage.CONNECT, tx(US))
    finally:
        await check.aclose()
    assert (r.verdict, r.facts["geoip.country"]) == (Verdict.FAIL, "DE")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"deny_countries": ("USA",)}, "deny_countries: 'USA' is not a two-letter ISO 3166 country code"),
        ({"allow_countries": ("1x",)}, "allow_countries: '1x' is not"),
        (
            {"deny_countries": ("DE",), "allow_countries": ("de",)},
            "on both deny_countries and allow_countries",
        ),
        ({"too_far_km": 100.0}, "too_far_km needs our own location"),
        ({"too_far_km": -1.0, **BERLIN}, "too_far_km must be 0"),
        ({"latitude": 91.0}, "latitude must be -90..90"),
        ({"longitude": -181.0}, "longitude -180..180"),
        ({"deny_code": 450}, "deny_code must be a 5xx"),
        ({"deny_dsn": "4.7.1"}, "deny_dsn"),
        ({"deny_text": "from {where}"}, "unknown placeholder"),
        ({"reload_interval": -1.0}, "reload_interval"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    """Country codes, coordinates, codes and texts are validated when the configuration loads."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Options(**options)


async def rcpt(service: PolicyService, client: str, instance: str) -> str:
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "client_address": client,
        "sender": "alice@example.net",
        "recipient": "bob@example.com",
        "instance": instance,
    }
    text, _, _ = await service.decide(attrs)
    return text


@pytest.mark.parametrize(
    ("options", "reply"),
    [
        (
            {"deny_countries": ("US",), "deny_action": "reject"},
            "550 5.7.1 Mail from country US is not accepted here",
        ),
        # score mode: 10 reaches the default reject threshold at RCPT, with the same reason
        ({"deny_countries": ("US",)}, "550 5.7.1 Mail from country US is not accepted here"),
        ({"deny_countries": ("US",), "deny_score": 5.0}, "DUNNO"),
    ],
)
async def test_a_denied_country_through_the_policy_service(
    dbs: dict[str, str], options: dict[str, Any], reply: str
) -> None:
    """The connect-stage result decides Postfix's answer to the first RCPT."""
    check = await started({**dbs, **options})
    service = PolicyService(
        Pipeline([ActiveCheck(check=cast("Check[object]", check), timeout=1.0)], PipelineSettings())
    )
    try:
        assert await rcpt(service, US, "geo.1") == reply
    finally:
        await check.aclose()


async def test_the_header_is_prepended_once_per_message(dbs: dict[str, str]) -> None:
    """qpsmtpd acceptance 1 (as one line): the first RCPT PREPENDs X-GeoIP, the second does not."""
    check = await started({**dbs, "add_header": True})
    service = PolicyService(
        Pipeline([ActiveCheck(check=cast("Check[object]", check), timeout=1.0)], PipelineSettings())
    )
    try:
        first = await rcpt(service, US, "geo.2")
        second = await rcpt(service, US, "geo.2")
    finally:
        await check.aclose()
    assert first.startswith("PREPEND X-GeoIP: country=US; continent=NA; city=Syracuse; asn=64500")
    assert second == "DUNNO"
