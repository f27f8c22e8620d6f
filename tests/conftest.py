"""Test-wide fixtures: real servers on loopback (Redis/Valkey, DNS, Postfix), never fixed ports."""

from __future__ import annotations

pytest_plugins = [
    "support.dns_fixtures",
    "support.redis_fixtures",
    "support.postfix_fixtures",
    "support.rbldnsd",
    "support.p0f_server",
]
