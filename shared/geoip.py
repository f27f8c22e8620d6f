"""GeoIP lookups in MaxMind-format databases, reopened when a database file changes.

One :class:`GeoIP` per process holds up to three databases, each optional:

* **country** (GeoLite2-Country, GeoIP2-Country, DB-IP country lite): country and continent;
* **city** (GeoLite2-City, GeoIP2-City, GeoIP2-Enterprise, DB-IP city lite): also city name
  and coordinates; when configured it answers country and continent too;
* **asn** (GeoLite2-ASN, GeoIP2-ISP, DB-IP ASN lite): autonomous system number and organisation.

Lookups are local and synchronous: the files are memory-mapped by the ``maxminddb`` C extension
and one lookup costs tens of microseconds, so no thread is needed (``in_memory`` reads the file
into memory instead, with the pure-Python decoder: slower, but immune to in-place rewrites).

Hot reload
    Each file is checked with ``stat()`` at most every ``reload_interval`` seconds, at the next
    lookup. When its inode, size or modification time changed, the new file is opened and
    checked (format and database type) before it replaces the old reader, in one assignment:
    a lookup sees either the old or the new database, never a mix. A new file that cannot be
    opened, or is of the wrong type, is logged once and the old reader stays in service; the
    next change of the file is tried again. A file missing at start-up is logged and picked up
    when it appears.

    Replace database files atomically (write a temporary file, then rename it over the old
    one), as ``geoipupdate`` does: a memory-mapped file that is rewritten in place (``cp``
    onto it) can change under a running lookup. ``in_memory = true`` is the choice for sites
    that cannot avoid in-place copies.

Distance
    :func:`distance_km` is the great-circle distance by the haversine formula on a sphere of
    radius 6371 km (the mean Earth radius).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import geoip2.database
import geoip2.errors
import geoip2.models
import maxminddb

__all__ = [
    "EARTH_RADIUS_KM",
    "DatabaseKind",
    "GeoIP",
    "GeoIPError",
    "GeoIPSettings",
    "GeoInfo",
    "ReloadingDatabase",
    "distance_km",
    "is_routable",
]

log = logging.getLogger("mxward.geoip")

EARTH_RADIUS_KM: Final = 6371.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Location = geoip2.models.City | geoip2.models.Country
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Addresses that no GeoIP database places anywhere: looked up, they only cost time.
_UNROUTABLE: Final[tuple[Network, ...]] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
        "ff00::/8",
    )
)


class GeoIPError(Exception):
    """A database could not answer (the file is corrupt)."""


class DatabaseKind(enum.Enum):
    """What a configured database is used for; each accepts certain database types."""

    COUNTRY = "country"
    CITY = "city"
    ASN = "asn"


# Per kind: (substring of the database type, geoip2 Reader method), first match wins.
_METHODS: Final[dict[DatabaseKind, tuple[tuple[str, str], ...]]] = {
    DatabaseKind.COUNTRY: (("City", "city"), ("Enterprise", "enterprise"), ("Country", "country")),
    DatabaseKind.CITY: (("City", "city"), ("Enterprise", "enterprise")),
    DatabaseKind.ASN: (("GeoLite2-ASN", "asn"), ("ISP", "isp")),
}


def is_routable(ip: IPAddress) -> bool:
    """False for loopback, private (RFC 1918, RFC 6598, ULA), link-local, multicast, reserved."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not any(ip.version == net.version and ip in net for net in _UNROUTABLE)


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km between two points given in decimal degrees (haversine)."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True, slots=True)
class GeoInfo:
    """What the databases know about one address; empty strings and None when unknown."""

    country: str = ""  # ISO 3166-1 alpha-2, upper case
    continent: str = ""  # two-letter continent code (AF AN AS EU NA OC SA)
    city: str = ""  # English name
    latitude: float | None = None
    longitude: float | None = None
    asn: int = 0
    as_org: str = ""

    @property
    def found(self) -> bool:
        return bool(self.country or self.continent or self.city or self.asn)

    def distance_to(self, latitude: float, longitude: float) -> float | None:
        """Kilometres from this address's location to the given point, None without coordinates."""
        if self.latitude is None or self.longitude is None:
            return None
        return distance_km(latitude, longitude, self.latitude, self.longitude)


@dataclass(frozen=True, kw_only=True)
class GeoIPSettings:
    """Database paths (empty = not used) and reload behaviour."""

    country_db: str = ""
    city_db: str = ""
    asn_db: str = ""
    reload_interval: float = 5.0
    in_memory: bool = False


_Signature = tuple[int, int, int, int]  # device, inode, size, mtime in ns
_MISSING: Final[_Signature] = (0, 0, -1, 0)


class ReloadingDatabase:
    """One database file and its open reader, replaced when the file changes."""

    def __init__(
        self,
        path: str,
        kind: DatabaseKind,
        *,
        reload_interval: float = 5.0,
        in_memory: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.kind = kind
        self.reload_interval = reload_interval
        self._mode = maxminddb.MODE_MEMORY if in_memory else maxminddb.MODE_AUTO
        self._monotonic = monotonic
        self._reader: geoip2.database.Reader | None = None
        self._method = ""
        self._signature: _Signature | None = None
        self._next_check = 0.0
        self.database_type = ""
        self.build_epoch = 0
        self.loads = 0
        self.problem = ""

    @property
    def loaded(self) -> bool:
        return self._reader is not None

    def open(self) -> bool:
        """Load the file now (start-up); True when a reader is in service afterwards."""
        self._next_check = self._monotonic() + self.reload_interval
        self._refresh()
        return self._reader is not None

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def reader(self) -> tuple[geoip2.database.Reader, str] | None:
        """The reader in service and its lookup method name, after a due change check."""
        now = self._monotonic()
        if now >= self._next_check:
            self._next_check = now + self.reload_interval
            self._refresh()
        if self._reader is None:
            return None
        return self._reader, self._method

    def _stat(self) -> _Signature:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return _MISSING
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh(self) -> None:
        try:
            signature = self._stat()
        except OSError as exc:
            failed: _Signature = (0, 0, -2, exc.errno or 0)
            if failed != self._signature:  # report once, not at every check
                self._signature = failed
                self._report(f"cannot stat: {exc.strerror}")
            return
        if signature == self._signature:
            return
        self._signature = signature
        if signature == _MISSING:
            keeping = "; keeping the loaded database" if self._reader else ""
            self._report(f"file not found{keeping}")
            return
        try:
            reader, method = self._open_checked()
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            keeping = "keeping the loaded database" if self._reader else "no database in service"
            self._report(f"cannot load: {exc}; {keeping}")
            return
        old = self._reader
        self._reader, self._method = reader, method
        metadata = reader.metadata()
        self.database_type = metadata.database_type
        self.build_epoch = metadata.build_epoch
        self.loads += 1
        self.problem = ""
        log.info(
            "geoip %s database %s loaded (type %s, built %s)",
            self.kind.value,
            self.path,
            self.database_type,
            time.strftime("%Y-%m-%d", time.gmtime(self.build_epoch)),
        )
        if old is not None:
            old.close()

    def _open_checked(self) -> tuple[geoip2.database.Reader, str]:
        reader = geoip2.database.Reader(self.path, mode=self._mode)
        database_type = reader.metadata().database_type
        for marker, method in _METHODS[self.kind]:
            if marker in database_type:
                return reader, method
        reader.close()
        raise ValueError(f"a {database_type} database cannot serve as the {self.kind.value} database")

    def _report(self, problem: str) -> None:
        self.problem = problem
        log.warning("geoip %s database %s: %s", self.kind.value, self.path, problem)


class GeoIP:
    """The configured databases of one process and the lookup that combines them."""

    def __init__(self, settings: GeoIPSettings, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings

        def database(path: str, kind: DatabaseKind) -> ReloadingDatabase | None:
            if not path:
                return None
            return ReloadingDatabase(
                path,
                kind,
                reload_interval=settings.reload_interval,
                in_memory=settings.in_memory,
                monotonic=monotonic,
            )

        self.city = database(settings.city_db, DatabaseKind.CITY)
        self.country = database(settings.country_db, DatabaseKind.COUNTRY)
        self.asn = database(settings.asn_db, DatabaseKind.ASN)

    @property
    def databases(self) -> tuple[ReloadingDatabase, ...]:
        return tuple(db for db in (self.city, self.country, self.asn) if db is not None)

    @property
    def loaded(self) -> bool:
        return any(db.loaded for db in self.databases)

    def open(self) -> None:
        """Load every configured file; missing or broken files are logged, not raised."""
        for db in self.databases:
            db.open()

    def close(self) -> None:
        for db in self.databases:
            db.close()

    def lookup(self, ip: IPAddress) -> GeoInfo:
        """Everything the databases know about ``ip`` (an empty :class:`GeoInfo` if nothing).

        Raises :class:`GeoIPError` when a database file is corrupt.
        """
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        try:
            location = self._location(ip)
            asn, as_org = self._asn(ip)
        except (maxminddb.InvalidDatabaseError, TypeError) as exc:
            raise GeoIPError(str(exc)) from exc
        if location is None:
            return GeoInfo(asn=asn, as_org=as_org)
        country = location.country.iso_code or location.registered_country.iso_code or ""
        city = ""
        latitude = longitude = None
        if isinstance(location, geoip2.models.City):
            city = location.city.name or ""
            latitude = location.location.latitude
            longitude = location.location.longitude
        return GeoInfo(
            country=country.upper(),
            continent=(location.continent.code or "").upper(),
            city=city,
            latitude=latitude,
            longitude=longitude,
            asn=asn,
            as_org=as_org,
        )

    def _location(self, ip: IPAddress) -> Location | None:
        for db in (self.city, self.country):
            found = db.reader() if db is not None else None
            if found is None:
                continue
            reader, method = found
            try:
                model: Location = getattr(reader, method)(ip)
            except (geoip2.errors.AddressNotFoundError, ValueError):
                continue  # ValueError: an IPv6 address asked of an IPv4-only database
            if model.country.iso_code or model.registered_country.iso_code or model.continent.code:
                return model
        return None

    def _asn(self, ip: IPAddress) -> tuple[int, str]:
        found = self.asn.reader() if self.asn is not None else None
        if found is None:
            return 0, ""
        reader, method = found
        try:
            model: geoip2.models.ASN = getattr(reader, method)(ip)
        except (geoip2.errors.AddressNotFoundError, ValueError):
            return 0, ""
        return model.autonomous_system_number or 0, model.autonomous_system_organization or ""
