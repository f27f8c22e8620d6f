"""geoip: where the client is, by MaxMind-format databases; country lists and distance.

Stage: connect (the client address is all it needs; with Postfix's default
``smtpd_delay_reject = yes`` it runs at the first RCPT request, once per message).

What and why
    The client address is looked up in local GeoIP databases (GeoLite2/GeoIP2 or DB-IP's
    MaxMind-format files, kept current by ``geoipupdate``): country, continent, city and
    coordinates, autonomous system. The results are facts for later checks (greylisting can
    exempt or single out countries, karma can weigh distance) and for the content filter.
    On their own they may add to the score: a country on ``deny_countries`` is rejected or
    scored, a country on ``allow_countries`` gets a (by default small negative) score, and a
    client farther than ``too_far_km`` from our own location gets ``too_far_score``
    (qpsmtpd's ``too_far`` karma). Mail from any country is legitimate somewhere: deny lists
    suit sites whose correspondents are known to be local.

    Loopback, private (RFC 1918, RFC 6598 shared address space, IPv6 ULA), link-local,
    multicast and reserved addresses are not looked up (skip). The lookup is local and takes
    microseconds; database files are reloaded when they change (see Reload).

Options ([checks.geoip]), besides enabled/timeout/on_error/mode:
    country_db       string    ""        country database (GeoLite2-Country.mmdb); "" = none.
                                         Not needed when city_db is set: the city database
                                         answers the country too
    city_db          string    "/var/lib/GeoIP/GeoLite2-City.mmdb"
                                         city database: country, continent, city, coordinates;
                                         "" = none
    asn_db           string    "/var/lib/GeoIP/GeoLite2-ASN.mmdb"
                                         ASN database (GeoLite2-ASN or GeoIP2-ISP); "" = none
    reload_interval  duration  "5s"      a database file is checked for changes (stat) at most
                                         this often, at the next lookup
    in_memory        bool      false     read the files into memory instead of mapping them:
                                         safe when a file is overwritten in place (cp), but
                                         slower lookups and memory per worker process
    deny_countries   list      []        ISO 3166-1 alpha-2 codes ("CN", "RU") whose clients
                                         are denied
    deny_action      string    "score"   "score": add deny_score (the reply comes at RCPT with
                                         all reasons); "reject": reject with deny_code/deny_dsn
    deny_score       float     10.0      score of a denied country (10 = the default reject
                                         threshold: rejected unless good signs outweigh it)
    deny_code        int       550       SMTP code when deny_action = "reject"
    deny_dsn         string    "5.7.1"   enhanced status code when deny_action = "reject"
    deny_text        string    "Mail from country {country} is not accepted here"
                                         client-facing text; {country} is the ISO code
    allow_countries  list      []        ISO codes whose clients get allow_score
    allow_score      float     -1.0      score of an allowed country (negative = good sign;
                                         0 = facts only)
    latitude         float     0.0       our own location in decimal degrees (north positive)
    longitude        float     0.0       our own location in decimal degrees (east positive).
                                         Distances are computed when latitude or longitude is
                                         not 0 (0, 0 lies in the Atlantic)
    too_far_km       float     0.0       clients farther than this many km get too_far_score;
                                         0 = off. Needs latitude/longitude and city_db
    too_far_score    float     1.0       score of a client that is too far away
    add_header       bool      false     PREPEND one ``X-GeoIP: country=US; continent=NA;
                                         city=Syracuse; asn=64500; as_org="..."; distance_km=612``
                                         line (known fields only, ASCII) to accepted mail

    A country on both lists is a configuration error. Lists are matched case-insensitively.

Facts provided (only those the databases know)
    ``geoip.country`` (ISO 3166-1 alpha-2, upper case), ``geoip.continent`` (AF AN AS EU NA
    OC SA), ``geoip.city`` (English name), ``geoip.asn`` (int), ``geoip.as_org``,
    ``geoip.distance_km`` (int, when our location is configured and the city database has
    coordinates for the client).

Verdicts
    pass: found, nothing counted against it (an allowed country scores allow_score);
    fail: denied country, or too far; skip: no client address, unroutable address, no database
    loaded, or the address is in no database; error: a database file is corrupt.

Reload
    Each file is checked at most every ``reload_interval``; a changed file is opened and
    verified before it replaces the old one. A new file that is broken or of the wrong type is
    logged and the old database stays in service; a file missing at start-up is logged and
    used once it appears. Replace files atomically (``geoipupdate`` does: temporary file, then
    rename), or set ``in_memory = true``.

Failure behaviour
    No database, an unknown or private address: skip, score 0, mail flows. A corrupt database
    file: verdict error (``on_error`` decides; the default lets mail through) with the reason
    in the log. The sender is never scored for our missing or broken data.

Redis keys: none.

References: ISO 3166-1 alpha-2 country codes; MaxMind DB file format 2.0; haversine
great-circle distance on a sphere of radius 6371 km.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from mxward.shared.geoip import GeoInfo, GeoIP, GeoIPError, GeoIPSettings, is_routable
from mxward.shared.headers import header_params
from mxward.shared.plugin import Action, Check, LogValue, Result, Services, Stage, Transaction, Verdict
from mxward.shared.units import Duration

__all__ = ["GeoipCheck", "Options"]

_COUNTRY = re.compile(r"[A-Za-z]{2}")


def _countries(entries: tuple[str, ...], option: str) -> frozenset[str]:
    for entry in entries:
        if not _COUNTRY.fullmatch(entry.strip()):
            raise ValueError(f"{option}: {entry!r} is not a two-letter ISO 3166 country code")
    return frozenset(entry.strip().upper() for entry in entries)


@dataclass(frozen=True, kw_only=True)
class Options:
    country_db: str = ""
    city_db: str = "/var/lib/GeoIP/GeoLite2-City.mmdb"
    asn_db: str = "/var/lib/GeoIP/GeoLite2-ASN.mmdb"
    reload_interval: Duration = 5.0
    in_memory: bool = False
    deny_countries: tuple[str, ...] = ()
    deny_action: Literal["score", "reject"] = "score"
    deny_score: float = 10.0
    deny_code: int = 550
    deny_dsn: str = "5.7.1"
    deny_text: str = "Mail from country {country} is not accepted here"
    allow_countries: tuple[str, ...] = ()
    allow_score: float = -1.0
    latitude: float = 0.0
    longitude: float = 0.0
    too_far_km: float = 0.0
    too_far_score: float = 1.0
    add_header: bool = False

    def __post_init__(self) -> None:
        deny = _countries(self.deny_countries, "deny_countries")
        allow = _countries(self.allow_countries, "allow_countries")
        if deny & allow:
            raise ValueError(f"countries on both deny_countries and allow_countries: {sorted(deny & allow)}")
        if not 500 <= self.deny_code <= 599:
            raise ValueError("deny_code must be a 5xx SMTP code")
        if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", self.deny_dsn):
            raise ValueError(f"deny_dsn {self.deny_dsn!r} must be an enhanced status code 5.x.y")
        fields = {name for _, name, _, _ in string.Formatter().parse(self.deny_text) if name is not None}
        if fields - {"country"}:
            raise ValueError(f"deny_text: unknown placeholder(s) {sorted(fields - {'country'})}")
        if not self.deny_text.strip():
            raise ValueError("deny_text must not be empty")
        if not -90.0 <= self.latitude <= 90.0 or not -180.0 <= self.longitude <= 180.0:
            raise ValueError("latitude must be -90..90 and longitude -180..180 (decimal degrees)")
        if self.too_far_km < 0 or not math.isfinite(self.too_far_km):
            raise ValueError("too_far_km must be 0 (off) or a positive number of kilometres")
        if self.too_far_km and not self.has_location:
            raise ValueError("too_far_km needs our own location: set latitude and longitude")
        if self.reload_interval < 0:
            raise ValueError("reload_interval must not be negative")

    @property
    def has_location(self) -> bool:
        return self.latitude != 0.0 or self.longitude != 0.0


class GeoipCheck(Check[Options]):
    name: ClassVar[str] = "geoip"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONNECT})
    options_type: ClassVar[type[Any]] = Options
    provides: ClassVar[tuple[str, ...]] = (
        "geoip.country",
        "geoip.continent",
        "geoip.city",
        "geoip.asn",
        "geoip.as_org",
        "geoip.distance_km",
    )
    timeout: ClassVar[float] = 1.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._deny = _countries(options.deny_countries, "deny_countries")
        self._allow = _countries(options.allow_countries, "allow_countries")
        self.geoip = GeoIP(
            GeoIPSettings(
                country_db=options.country_db,
                city_db=options.city_db,
                asn_db=options.asn_db,
                reload_interval=options.reload_interval,
                in_memory=options.in_memory,
            ),
            monotonic=services.clock.monotonic,
        )

    async def start(self) -> None:
        self.geoip.open()

    async def aclose(self) -> None:
        self.geoip.close()

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        ip = tx.client_ip
        if ip is None:
            return self.result(Verdict.SKIP, note="no client address")
        if not is_routable(ip):
            return self.result(Verdict.SKIP, note="unroutable address")
        try:
            info = self.geoip.lookup(ip)
        except GeoIPError as exc:
            return self.result(Verdict.ERROR, error=f"database: {exc}")
        if not info.found:
            note = "not in database" if self.geoip.loaded else "no database loaded"
            return self.result(Verdict.SKIP, note=note)
        return self._judge(info)

    def _distance(self, info: GeoInfo) -> int | None:
        opts = self.options
        if not opts.has_location:
            return None
        km = info.distance_to(opts.latitude, opts.longitude)
        return None if km is None else round(km)

    def _judge(self, info: GeoInfo) -> Result:
        opts = self.options
        distance = self._distance(info)
        verdict = Verdict.PASS
        score = 0.0
        reasons: list[str] = []
        action: Action | None = None
        listed = ""
        if info.country in self._deny:
            listed, verdict = "deny", Verdict.FAIL
            text = opts.deny_text.format(country=info.country)
            reasons.append(text)
            if opts.deny_action == "reject":
                action = Action.reject(text, opts.deny_code, opts.deny_dsn)
            else:
                score += opts.deny_score
        elif info.country in self._allow:
            listed = "allow"
            score += opts.allow_score
        too_far = bool(opts.too_far_km and distance is not None and distance > opts.too_far_km)
        if too_far:
            verdict = Verdict.FAIL
            score += opts.too_far_score
            reasons.append(f"client location {distance} km away")
        fields = _fields(info, distance)
        facts = {f"geoip.{key}": value for key, value in fields if value is not None}
        header = header_params("X-GeoIP", fields) if opts.add_header else ""
        log: dict[str, LogValue] = {"country": info.country or None, "asn": info.asn or None}
        log.update(distance_km=distance, list=listed or None, too_far="yes" if too_far else None)
        return self.result(
            verdict,
            score,
            "; ".join(reasons),
            facts=facts,
            action=action,
            header=header,
            **{key: value for key, value in log.items() if value is not None},
        )


def _fields(info: GeoInfo, distance: int | None) -> tuple[tuple[str, LogValue], ...]:
    """The known facts about the client, in header order (unknown ones as None)."""
    return (
        ("country", info.country or None),
        ("continent", info.continent or None),
        ("city", info.city or None),
        ("asn", info.asn or None),
        ("as_org", info.as_org or None),
        ("distance_km", distance),
    )
