"""Test-wide fixtures: real servers on loopback (Redis/Valkey, DNS, Postfix), never fixed ports."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from mxward.shared import logs

pytest_plugins = [
    "support.dns_fixtures",
    "support.redis_fixtures",
    "support.postfix_fixtures",
    "support.rbldnsd",
    "support.p0f_server",
]


@pytest.fixture(autouse=True)
def _logging_as_found() -> Iterator[None]:
    """Tests that run `mxward` in-process configure logging for the process; undo it after
    each test, so later tests' log captures see the decision lines again."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    line_handler = logs._line_handler
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logs._line_handler = line_handler
