"""The check contract: stages, verdicts, results, actions and the :class:`Check` base class.

A check is a small module that reports facts about a transaction. It never writes a Postfix
action or an SMTP reply itself: it returns a :class:`Result`, and the pipeline
(:mod:`mxward.shared.pipeline`) turns the results of all checks into one decision.

Built-in checks are listed explicitly (``mxward.policyd.checks.CHECKS``); third-party checks are
Python packages that register a :class:`Check` subclass under the entry-point group
``mxward.checks`` and are imported only when the configuration names them.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import ipaddress
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    from mxward.contentfilter.message import Message
    from mxward.shared.authresults import AuthResult
    from mxward.shared.clock import Clock
    from mxward.shared.config import Config
    from mxward.shared.dns import Resolver
    from mxward.shared.state import StateStore

__all__ = [
    "ENTRY_POINT_GROUP",
    "Action",
    "ActionKind",
    "Check",
    "CheckLoadError",
    "Decision",
    "IPAddress",
    "LogValue",
    "NoOptions",
    "Result",
    "Services",
    "Stage",
    "Transaction",
    "Verdict",
    "load_check_class",
]

ENTRY_POINT_GROUP = "mxward.checks"

LogValue = str | int | float | bool | None
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


_T = TypeVar("_T")
_FACTORY: Any = object()  # the default of a parameter whose field has a default_factory


def _quick_init(cls: type[_T]) -> type[_T]:
    """Replace a frozen keyword-only dataclass's ``__init__`` with one that is about twice as fast.

    The generated ``__init__`` of a frozen dataclass sets each field with its own
    ``object.__setattr__`` call; this one takes the same keyword arguments with the same
    defaults and sets the instance's ``__dict__`` in one call. Instances stay frozen (the
    dataclass's ``__setattr__`` still refuses assignment). Used for the objects built on every
    request: transactions, results and decisions.
    """
    namespace: dict[str, Any] = {"_setattr": object.__setattr__, "_FACTORY": _FACTORY}
    params: list[str] = []
    items: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_d_{name}"] = f.default
            params.append(f"{name}=_d_{name}")
            items.append(f"{name!r}: {name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_f_{name}"] = f.default_factory
            params.append(f"{name}=_FACTORY")
            items.append(f"{name!r}: _f_{name}() if {name} is _FACTORY else {name}")
        else:
            params.append(name)
            items.append(f"{name!r}: {name}")
    body = ", ".join(items)
    source = f"def __init__(self, *, {', '.join(params)}):\n    _setattr(self, '__dict__', {{{body}}})\n"
    exec(source, namespace)  # noqa: S102 - code built from the class's own field names, as dataclasses does
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


class Stage(enum.Enum):
    """When the data a check needs is complete, in the order the stages occur."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    END_OF_MESSAGE = "end-of-message"
    CONTENT = "content"

    # Members are singletons compared by identity: hash them by identity too (Enum's own
    # __hash__ is Python code, and stages are dictionary keys on every request).
    __hash__ = object.__hash__

    @property
    def order(self) -> int:
        return _STAGE_ORDER[self]

    @classmethod
    def parse(cls, text: str) -> Stage:
        """Parse a stage name as written in the configuration (``rcpt``, ``end-of-message``)."""
        try:
            return cls(text.strip().lower().replace("_", "-"))
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown stage {text!r} (valid: {valid})") from None


_STAGE_ORDER = {stage: index for index, stage in enumerate(Stage)}


class Verdict(enum.Enum):
    """qpsmtpd's log words."""

    PASS = "pass"  # noqa: S105 - a verdict word, not a password
    FAIL = "fail"
    SKIP = "skip"
    ERROR = "error"

    __hash__ = object.__hash__  # as Stage's


class ActionKind(enum.IntEnum):
    """What the reply does, ordered by strength: a stronger action wins over a weaker one."""

    DUNNO = 0
    DEFER_IF_PERMIT = 1
    DEFER = 2
    REJECT = 3


@dataclass(frozen=True, slots=True)
class Action:
    """A decision to send: kind plus the SMTP code, enhanced status code and text.

    Every non-DUNNO action carries all three, because Postfix treats a bare code or an empty
    action as OK (see the policy protocol notes in docs/architecture.md).
    """

    kind: ActionKind
    code: int = 0
    dsn: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind is ActionKind.DUNNO:
            return
        if not (400 <= self.code <= 599) or not self.dsn or not self.text:
            raise ValueError(f"{self.kind.name} needs a code, an enhanced code and a text")
        if str(self.code)[0] != self.dsn[0]:
            raise ValueError(f"code {self.code} and enhanced code {self.dsn} disagree")
        if self.kind is ActionKind.REJECT and self.code < 500:
            raise ValueError("REJECT needs a 5xx code")
        if self.kind in (ActionKind.DEFER, ActionKind.DEFER_IF_PERMIT) and self.code >= 500:
            raise ValueError(f"{self.kind.name} needs a 4xx code")

    @classmethod
    def defer_if_permit(cls, text: str, dsn: str = "4.7.1") -> Action:
        return cls(ActionKind.DEFER_IF_PERMIT, 450, dsn, text)

    @classmethod
    def defer(cls, text: str, code: int = 450, dsn: str = "4.7.1") -> Action:
        return cls(ActionKind.DEFER, code, dsn, text)

    @classmethod
    def reject(cls, text: str, code: int = 550, dsn: str = "5.7.1") -> Action:
        return cls(ActionKind.REJECT, code, dsn, text)

    @property
    def reply(self) -> str:
        """``450 4.7.1 text``: the SMTP reply this action makes (empty for DUNNO)."""
        if self.kind is ActionKind.DUNNO:
            return ""
        return f"{self.code} {self.dsn} {self.text}"


DUNNO = Action(ActionKind.DUNNO)


@_quick_init
@dataclass(frozen=True, kw_only=True)
class Result:
    """What one check found.

    ``reason`` is client-facing and may go into the SMTP reply; ``log`` is operator-facing
    key=value data; ``facts`` are for later checks and for the content filter
    (``"greylist.status"``); ``action`` forces the reply (greylist deferral), otherwise the
    summed ``score`` decides at the configured stage. ``header`` is a header line to PREPEND
    (``X-Greylist: ...``) when the message is accepted.
    """

    check: str
    verdict: Verdict
    score: float = 0.0
    reason: str = ""
    log: Mapping[str, LogValue] = field(default_factory=dict)
    facts: Mapping[str, LogValue] = field(default_factory=dict)
    action: Action | None = None
    header: str = ""
    auth: tuple[AuthResult, ...] = ()
    elapsed_ms: float = 0.0
    observed: bool = False
    # Given again from an earlier request whose DNS answers are still cached (the pipeline's
    # reused results): the same object for every request that reuses it, elapsed_ms 0.
    reused: bool = False


@_quick_init
@dataclass(frozen=True, kw_only=True)
class Transaction:
    """One envelope as the checks see it: the same shape in policyd and in the content filter.

    Values come from Postfix unchanged (``sender`` is empty for the null sender ``<>``).
    ``attrs`` holds every attribute of the policy request; ``facts`` holds what earlier checks
    of this transaction provided (the pipeline adds to this dict as checks finish; a check
    only reads it). ``stage`` is the stage of the request (its protocol_state);
    the stage a check is run for is the ``stage`` argument of :meth:`Check.check`.

    In the content filter (stage CONTENT) ``message`` is the parsed message, shared by all
    checks, and ``recipients`` the envelope recipients (``recipient`` is empty there).
    """

    stage: Stage
    client_address: str = ""
    client_ip: IPAddress | None = None
    client_name: str = "unknown"
    reverse_client_name: str = "unknown"
    helo: str = ""
    sender: str = ""
    recipient: str = ""
    recipient_count: int = 0
    sasl_username: str = ""
    instance: str = ""
    queue_id: str = ""
    protocol_state: str = ""
    attrs: Mapping[str, str] = field(default_factory=dict)
    facts: Mapping[str, LogValue] = field(default_factory=dict)
    recipients: tuple[str, ...] = ()
    message: Message | None = None

    def with_facts(self, facts: Mapping[str, LogValue]) -> Transaction:
        return dataclasses.replace(self, facts=facts)


@_quick_init
@dataclass(frozen=True, kw_only=True)
class Decision:
    """The pipeline's answer for one request: the action, and everything that led to it."""

    action: Action
    score: float
    results: tuple[Result, ...]
    stage: Stage
    exempt: str = ""
    headers: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    elapsed_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Services:
    """What a check may touch: created once per process and passed in (no globals)."""

    dns: Resolver
    state: StateStore
    clock: Clock
    hostname: str = "localhost"
    # The whole configuration, for the few checks that read a global table (the filter's
    # authserv-id, [dmarc_reports]); a check's own settings are its options.
    config: Config | None = None


@dataclass(frozen=True, slots=True)
class NoOptions:
    """Options type for a check that has no options of its own."""


OptionsT = TypeVar("OptionsT")


class Check(abc.ABC, Generic[OptionsT]):
    """Base class of every check.

    Subclasses set ``name`` (= module name = ``[checks.<name>]`` = log key = Redis namespace),
    ``stages``, ``options_type`` (a frozen dataclass: the config schema, every field with a
    default) and optionally ``needs``/``provides`` (fact names) and ``timeout`` (seconds, the
    default budget; ``timeout`` in ``[checks.<name>]`` overrides it). The module docstring is
    the check's manual.
    """

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    options_type: ClassVar[type[Any]] = NoOptions
    # Facts this check reads from checks before it (the pipeline then runs it after them). A
    # class default that an instance may change from its options in __init__.
    needs: tuple[str, ...] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    timeout: ClassVar[float] = 5.0

    def __init__(self, options: OptionsT, services: Services) -> None:
        self.options = options
        self.services = services

    def active_stages(self) -> frozenset[Stage]:
        """The stages this instance runs at: ``stages``, less any that its options leave idle.

        Asked once, when the pipeline is built. A check whose work at a stage is switched off
        (karma's recipient limit) says so here, and is neither run nor logged there.
        """
        return self.stages

    async def start(self) -> None:
        """Prepare before the first request (load files, register scripts)."""

    async def aclose(self) -> None:
        """Release what :meth:`start` acquired."""

    @abc.abstractmethod
    async def check(self, stage: Stage, tx: Transaction) -> Result:
        """Examine the transaction at ``stage`` and report."""

    def reuse_key(self, stage: Stage, tx: Transaction) -> Hashable | None:
        """The request values this check's result depends on, for reuse; None: never reused.

        Only for a check whose result at ``stage`` follows from these values, its options and
        DNS answers alone: nothing from Redis, no clock, no file reloaded while running. The
        pipeline then keeps a result that the check computed without waiting (every DNS
        answer from the cache) and gives it again for the same key until the first of those
        answers expires (see ``Reused results`` in :mod:`mxward.shared.dns`).
        """
        return None

    async def after(self, tx: Transaction, decision: Decision) -> None:
        """Bookkeeping once the decision is known.

        Its first step runs as soon as the decision is made; whatever it then waits for (a
        Redis write) finishes after the reply is sent, under the check's ``timeout``.
        """

    async def outgoing(self, tx: Transaction, message: bytes) -> tuple[str, ...]:
        """Header fields to add on top of a message the content filter is about to deliver.

        ``message`` is the message as it will leave, with every header change of the filter
        and of the checks before this one already made (their fields are on top), so a
        signature computed here covers them (DKIM signing, ARC sealing). Called only for mail
        that is delivered (pass, tag), in check order; a check that raises follows its
        ``on_error``: ``tempfail`` defers the message, ``ignore`` delivers it without.
        """
        return ()

    def result(
        self,
        verdict: Verdict,
        score: float = 0.0,
        reason: str = "",
        *,
        facts: Mapping[str, LogValue] | None = None,
        action: Action | None = None,
        header: str = "",
        **log: LogValue,
    ) -> Result:
        """A result of this check; ``log`` keywords become the operator's key=value data.

        (A check that reports Authentication-Results builds its ``Result`` with ``auth=``.)
        """
        return Result(
            check=self.name,
            verdict=verdict,
            score=score,
            reason=reason,
            log=log,
            facts=facts or {},
            action=action,
            header=header,
        )


class CheckLoadError(Exception):
    """A check named in the configuration cannot be found or is not a valid check."""


def load_check_class(name: str, builtins: Mapping[str, type[Check[Any]]]) -> type[Check[Any]]:
    """Return the check class called ``name``: a built-in, else an ``mxward.checks`` entry point."""
    if name in builtins:
        return builtins[name]
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = ", ".join(sorted(builtins))
        raise CheckLoadError(
            f"unknown check {name!r}: not built in ({known}) and no package registers it "
            f"in the entry-point group {ENTRY_POINT_GROUP!r}"
        )
    try:
        cls = found[0].load()
    except Exception as exc:
        raise CheckLoadError(f"check {name!r}: cannot import {found[0].value}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Check)):
        raise CheckLoadError(f"check {name!r}: {found[0].value} is not a subclass of mxward Check")
    if getattr(cls, "name", None) != name:
        raise CheckLoadError(f"check {name!r}: {found[0].value} declares name {cls.name!r}")
    return cls
