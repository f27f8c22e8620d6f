"""One mail transaction as the filter receives and relays it (sender, recipients, ESMTP
parameters byte for byte, and the XFORWARD attributes of the original client)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Envelope"]


@dataclass(slots=True)
class Envelope:
    """One mail transaction as the filter relays it."""

    sender: str
    mail_params: tuple[str, ...]
    xforward: dict[str, str]
    peer: str
    recipients: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    broken: str = ""

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(address for address, _ in self.recipients)
