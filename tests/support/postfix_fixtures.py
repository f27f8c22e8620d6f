"""Pytest fixture ``postfix``: private Postfix instances on loopback (see ``support.postfix``).

``postfix(**options)`` builds and starts a :class:`~support.postfix.PostfixInstance` and returns
it; every instance a test started is stopped at teardown, and if the test failed its maillog
tail is added to the report. Postfix is required, not optional: without it (or without root)
the fixture fails with the install command instead of skipping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ParamSpec, Protocol

import pytest

from support.postfix import DEFAULT_POLICY_ACTION, PostfixError, PostfixInstance, postfix_missing_reason

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator, Mapping, Sequence

__all__ = ["PostfixFactory", "postfix"]

_P = ParamSpec("_P")
_INSTANCES = pytest.StashKey[list[PostfixInstance]]()


class PostfixFactory(Protocol):
    """Start a private Postfix; the keywords are those of :class:`PostfixInstance`."""

    def __call__(
        self,
        *,
        policy_service: str | None = None,
        policy_timeout: str = "10s",
        policy_data: bool = False,
        policy_end_of_data: bool = False,
        policy_default_action: str = DEFAULT_POLICY_ACTION,
        extra_main_cf: Mapping[str, str] | None = None,
        extra_master_cf: Sequence[str] = (),
        xclient_hosts: str = "",
        local_users: Sequence[str] = ("user",),
        smtpd_port: int | None = None,
        sink_smtputf8: bool = True,
        start_timeout: float = 20.0,
    ) -> PostfixInstance: ...


def _starting(
    make: Callable[_P, PostfixInstance], started: list[PostfixInstance]
) -> Callable[_P, PostfixInstance]:
    """Wrap the constructor: record the instance for teardown, then start it."""

    def start(*args: _P.args, **kwargs: _P.kwargs) -> PostfixInstance:
        instance = make(*args, **kwargs)
        started.append(instance)
        instance.start()
        return instance

    return start


@pytest.fixture
def postfix(request: pytest.FixtureRequest) -> Iterator[PostfixFactory]:
    """A factory that starts private Postfix instances and stops them all after the test."""
    if reason := postfix_missing_reason():
        pytest.fail(reason, pytrace=False)
    started: list[PostfixInstance] = []
    request.node.stash[_INSTANCES] = started
    factory: PostfixFactory = _starting(PostfixInstance, started)  # mypy checks the two signatures agree
    yield factory
    errors: list[str] = []
    for instance in reversed(started):
        try:
            instance.stop()
        except PostfixError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("stopping private Postfix: " + "; ".join(errors), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failed test, append each running instance's maillog tail to the report."""
    report = yield
    if report.failed and call.when == "call" and _INSTANCES in item.stash:
        started = item.stash[_INSTANCES]
        for number, instance in enumerate(started, start=1):
            if instance.running:
                report.sections.append(
                    (f"private Postfix #{number} maillog (tail)", instance.maillog_tail(60))
                )
    return report
