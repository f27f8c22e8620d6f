"""Small MaxMind-format databases written at test time (no downloads), with mmdb-writer.

The records follow MaxMind's GeoIP2 layout (``country.iso_code``, ``city.names.en``,
``location.latitude``, ``autonomous_system_number``...), so geoip2's reader accepts them as
GeoLite2 databases. Data lives in the documentation ranges only (RFC 5737, RFC 3849).

``write_db(path, kind, records)`` writes atomically (temporary file, then rename), the way
geoipupdate replaces a database; ``records`` maps networks to :class:`Place` or :class:`AS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mmdb_writer import MmdbF64, MmdbU32, MMDBWriter
from netaddr import IPSet  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["AS", "ASN_RECORDS", "CITY_RECORDS", "Place", "write_db"]

DB_TYPES = {"city": "GeoLite2-City", "country": "GeoLite2-Country", "asn": "GeoLite2-ASN"}
CONTINENT_NAMES = {
    "NA": "North America",
    "EU": "Europe",
    "AS": "Asia",
    "OC": "Oceania",
    "SA": "South America",
}


@dataclass(frozen=True)
class Place:
    country: str
    continent: str
    city: str = ""
    latitude: float | None = None
    longitude: float | None = None

    def record(self, *, with_city: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "continent": {"code": self.continent, "names": {"en": CONTINENT_NAMES[self.continent]}},
            "country": {"iso_code": self.country, "names": {"en": self.country}},
        }
        if with_city:
            if self.city:
                rec["city"] = {"names": {"en": self.city}}
            if self.latitude is not None and self.longitude is not None:
                rec["location"] = {"latitude": MmdbF64(self.latitude), "longitude": MmdbF64(self.longitude)}
        return rec


@dataclass(frozen=True)
class AS:
    number: int
    org: str

    def record(self) -> dict[str, Any]:
        return {"autonomous_system_number": MmdbU32(self.number), "autonomous_system_organization": self.org}


# Syracuse NY (qpsmtpd's own test expectation for its sample address), Berlin, Sao Paulo.
CITY_RECORDS: Mapping[str, Place] = {
    "192.0.2.0/24": Place("US", "NA", "Syracuse", 43.0481, -76.1474),
    "198.51.100.0/24": Place("DE", "EU", "Berlin", 52.52, 13.405),
    "203.0.113.0/25": Place("BR", "SA", "São Paulo", -23.5475, -46.6361),
    "203.0.113.128/25": Place("CN", "AS"),  # country only: no city, no coordinates
    "2001:db8:1::/48": Place("JP", "AS", "Tokyo", 35.6895, 139.6917),
}

ASN_RECORDS: Mapping[str, AS] = {
    "192.0.2.0/24": AS(64500, "Example Transit; Inc."),
    "198.51.100.0/24": AS(64501, "Beispiel Netz GmbH"),
    "2001:db8:1::/48": AS(64502, "Example IPv6 Networks"),
}


def write_db(path: Path, kind: str, records: Mapping[str, Place | AS], *, ip_version: int = 6) -> Path:
    """Write a ``kind`` (city, country, asn) database to ``path`` atomically and return it."""
    writer = MMDBWriter(
        ip_version=ip_version,
        database_type=DB_TYPES[kind],
        languages=["en"],
        description={"en": f"mxward test {kind} database"},
        ipv4_compatible=ip_version == 6,
    )
    for network, value in records.items():
        if ip_version == 4 and ":" in network:
            continue
        data = value.record() if isinstance(value, AS) else value.record(with_city=kind == "city")
        writer.insert_network(IPSet([network]), data)
    tmp = path.with_name(f".{path.name}.tmp")
    writer.to_db_file(str(tmp))
    os.replace(tmp, path)
    return path
