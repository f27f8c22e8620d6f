"""Units written in the configuration, converted in one place: durations.

``Duration`` marks a settings field as seconds that may be written ``"250ms"``, ``"30s"``,
``"5m"``, ``"1h30m"``, ``"35d"``, ``"1w"`` or as a plain number of seconds.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

__all__ = ["Duration", "DurationMarker", "format_duration", "parse_duration"]


class DurationMarker:
    """Marks a float field as a duration in seconds written like ``"5m"``."""


Duration = Annotated[float, DurationMarker]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"5m"``, ``"1h30m"``, ``"35d"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "5m", "35d"')  # noqa: TRY004
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos, seconds, parts = 0, 0.0, 0
        while pos < len(text):
            match = _DURATION_PART.match(text, pos)
            if match is None:
                raise ValueError(f'{value!r} is not a duration (write e.g. "30s", "5m", "35d")')
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
            parts += 1
            while pos < len(text) and text[pos] == " ":
                pos += 1
        if parts == 0:
            raise ValueError("empty duration")
    else:
        # ValueError on purpose: the loader reports it as a bad value in the file.
        raise ValueError(f'expected a duration such as "30s", got {type(value).__name__}')  # noqa: TRY004
    if seconds < 0 or math.isnan(seconds):
        raise ValueError(f"duration {value!r} must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of ``seconds`` (``300`` → ``"5m"``), for docs and logs."""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_remaining(seconds: float) -> str:
    """A time left, for people: the two largest units (``86340`` → ``"23h59m"``, ``90`` → ``"1m30s"``)."""
    left = max(0, round(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        elif parts:
            break
        if len(parts) == 2:
            break
    return "".join(parts)
