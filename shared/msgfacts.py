"""The policy-to-filter join: one message's envelope facts, keyed by Postfix's queue id.

The policy daemon sees the SMTP session (client, HELO, SPF, karma, GeoIP, p0f, SASL login, its
own decisions per recipient); the content filter sees the message. Postfix tells the filter the
queue id in XFORWARD IDENT, so policyd stores what it knows under that id at DATA and again at
END-OF-MESSAGE (the same record, overwritten: Postfix may ask twice), and the filter reads it
when the message arrives. Nothing is visible to recipients, and nothing can be forged by a
sender (a PREPENDed header could be).

Storage (namespace ``msg``)::

    msg:QUEUE_ID       JSON object (below)      TTL [policyd] message_facts_ttl (default 6h)

The object holds ``client_address``, ``client_name``, ``reverse_client_name``, ``helo``,
``sender``, ``sasl_username``, ``sasl_method``, ``recipient_count``, ``size``, ``instance``,
``stage`` (``DATA`` or ``END-OF-MESSAGE``), ``decisions`` (policyd's per-request summaries,
``"rcpt=<a@b> DUNNO score=-1"``) and ``facts`` (every fact the envelope checks provided:
``spf.result``, ``karma.known``, ``geoip.country``, ``p0f.genre``, ``iprev.result``, ...).
A mail that sat in the queue longer than the TTL, or was submitted locally (no IDENT), has no
record; the filter logs ``policy=missing`` and treats every envelope fact as unknown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mxward.shared.state import StateStore

__all__ = ["NAMESPACE", "MessageFacts", "valid_queue_id"]

NAMESPACE = "msg"
_MAX_RECORD = 65536
# Postfix queue ids: short (hex) or long (enable_long_queue_ids: base 52 + 'z' + ...).
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{6,32}")


def valid_queue_id(text: str) -> bool:
    return bool(_QUEUE_ID.fullmatch(text))


class MessageFacts:
    """Writes (policyd) and reads (filter) the per-message record."""

    def __init__(self, state: StateStore, ttl: float = 6 * 3600.0) -> None:
        self.ns = state.namespace(NAMESPACE)
        self.ttl = int(ttl)
        self.ns.declare("QUEUE_ID", self.ttl, "envelope facts of one queued message, for the content filter")

    def key(self, queue_id: str) -> str:
        return self.ns.key(queue_id)

    async def save(self, queue_id: str, record: Mapping[str, Any]) -> None:
        """Store the record (idempotent: the same id overwrites); ignores ids that are no queue id."""
        if not valid_queue_id(queue_id):
            return
        text = json.dumps(record, separators=(",", ":"), default=str)
        if len(text) > _MAX_RECORD:  # bounded: drop the per-request log first
            trimmed = dict(record)
            trimmed["decisions"] = ["(too many to keep)"]
            text = json.dumps(trimmed, separators=(",", ":"), default=str)[:_MAX_RECORD]
        await self.ns.set(self.key(queue_id), text, self.ttl)

    async def load(self, queue_id: str) -> dict[str, Any] | None:
        """The record for ``queue_id``, or None if there is none (or it is unreadable)."""
        if not valid_queue_id(queue_id):
            return None
        text = await self.ns.get(self.key(queue_id))
        if not text:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None
