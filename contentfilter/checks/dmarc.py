"""dmarc: does the message's From domain authorise it, and what does its owner ask for if not?

Stage: content (the content filter, once per message, after the dkim check).

What and why
    DMARC (RFC 9989, which obsoletes RFC 7489 and RFC 9091) lets the owner of the domain in
    the From header (the Author Domain) say how to treat mail that its own authentication does
    not vouch for. A message passes when SPF passed for an envelope sender domain, or DKIM for
    a signing domain (``d=``), that is *aligned* with the Author Domain: the same domain
    (strict, ``aspf=s`` / ``adkim=s``) or the same Organizational Domain (relaxed, the
    default). It fails otherwise, and the owner's policy says what should happen then:
    ``none`` (only report), ``quarantine`` (treat as suspicious) or ``reject``. Spoofing a
    bank's or a colleague's address in From is exactly what this stops.

    Policy discovery follows ``standard``. ``"9989"`` (the default): the record at
    ``_dmarc.<author domain>``, else the DNS Tree Walk of RFC 9989 section 4.10 (at most 8
    questions, long names cut to 7 labels first, stopping at ``psd=y``/``psd=n``) finds the
    Organizational Domain's record, else a Public Suffix Domain's (``psd=y``) record; relaxed
    alignment compares Organizational Domains found by tree walks. ``"7489"``: the
    Organizational Domain comes from the Public Suffix List (the ``publicsuffixlist`` package's
    copy, or ``public_suffix_list``), as RFC 7489 did. Records that are not the Author
    Domain's own give a subdomain's policy: ``np`` when the Author Domain does not exist
    (NXDOMAIN), else ``sp``, else ``p``. ``t=y`` (testing, RFC 9989) applies the next policy
    down (reject -> quarantine -> none) and is honoured only in 9989 mode; ``pct`` (sampling,
    RFC 7489, removed by RFC 9989) only in 7489 mode: a message not selected gets the next
    policy down (override ``sampled_out``). The record rules (v=DMARC1 first, invalid values
    -> defaults, no valid ``p`` -> ``p=none`` with a ``rua``, else no DMARC) are in
    :mod:`mxward.contentfilter.dmarclib`.

    SPF: policyd's result through the queue-id join (``spf.result``, ``spf.domain``,
    ``spf.identity``; the HELO identity counts only for the null sender, RFC 7208 section
    2.4). When those facts are missing, SPF is computed here with the spf check's evaluation
    (pyspf through our resolver, default options) from the XFORWARD client address, HELO and
    envelope sender, the log says ``spf_computed=<result>``, and the result is added to
    Authentication-Results as ``spf=``. DKIM: the passing signing domains the dkim check found
    (``dkim.pass_domains``), at most 10 of them. The dkim check must be listed before this one
    in ``[filter] checks``; the filter refuses the configuration otherwise.

Skipped
    Mail from an authenticated client (a SASL login, from the policy daemon's facts) and from
    ``skip_networks`` is ours going out, not mail to judge (the dkim check signs it later):
    verdict skip, no facts, no DNS. qpsmtpd's dmarc plugin skipped relay clients likewise.

The From header
    The Author Domain is the domain of the From mailbox, lower-cased and in A-labels (IDNA).
    RFC 9989 ("Extract Author Domain") leaves a message with no Author Domain, or several, out
    of DMARC's scope. mxward reports ``dmarc=permerror`` for: no From field, a From without a
    readable address with a domain (a group with no members, an address literal, broken
    syntax). Several mailboxes of one domain (in one or several From fields) are one Author
    Domain. Several domains follow ``multiple_from``: ``"permerror"`` (the default) reports
    permerror; with ``"strictest"`` each domain (at most 5, else permerror) is evaluated as
    RFC 9989 ("Denial of DMARC Processing Attacks") and RFC 7489 section 6.6.1 recommend, the
    strictest failing policy applies, and each gets its own ``dmarc=`` entry in
    Authentication-Results. The headers check refuses From fields with several mailboxes and no
    Sender on its own.

Results
    ========== =================================================================== ========
    result     when                                                                verdict
    ========== =================================================================== ========
    pass       an aligned SPF or DKIM pass                                         pass
    fail       a policy applies and nothing aligned passed                         fail
    none       no DMARC record applies (or one without a valid policy or ``rua``)  skip
    temperror  a DNS question failed (SERVFAIL, timeout), or an SPF or DKIM        error
               temperror (or a missing DKIM result) for an identifier that could
               have aligned when nothing else did: our trouble, never the sender's
    permerror  no single Author Domain (see above)                                 fail
    ========== =================================================================== ========

What a failure does (the disposition)
    The policy that applies (after ``t``/``pct``) is the disposition, unless an override below
    sets it to ``none``:

    * ``none``: nothing. RFC 9989 ("Policy Enforcement Considerations"): a policy of none must
      not change how mail is handled, so no score either.
    * ``quarantine``: ``quarantine_action = "score"`` adds ``quarantine_score`` (5, the filter's
      ``tag_score``: the message is tagged as spam); ``"reject"`` refuses it like p=reject.
    * ``reject``: ``reject_action = "reject"`` refuses the message (a forced action): before
      queue the client gets ``reject_code reject_dsn reject_text``, after queue the filter's
      ``[filter] reject_action`` (quarantine by default) stands in, never a bounce.
      ``"quarantine"`` treats p=reject as p=quarantine (RFC 9989's "Interoperability
      Considerations" ask receivers that know nothing more to do so).

    Overrides (the receiver's local policy, RFC 9989 "Apply Policy If Appropriate"; the fact
    ``dmarc.override``), checked in this order, for a failing message whose disposition would
    not be none:

    * ``trusted_arc``: the arc check found a valid chain (``arc.cv = pass``) and one of its
      sealers (``arc.sealers``) is in ``trusted_arc_sealers`` (RFC 8617);
    * ``forwarded``: the client is in ``forwarder_networks``, or SPF passed for an envelope
      sender domain in ``forwarder_domains`` (an SPF pass, so a forged sender does not count);
    * ``local_policy``: the List-Id (RFC 2919) is in ``mailing_lists`` and SPF or DKIM passed
      for that list id's domain or a parent of it, so a forged List-Id does not count.

    ``sampled_out`` is set when only RFC 7489's ``pct`` lowered the disposition. The check
    reports ``dmarc.testing = true`` when ``t=y`` did.

    A DNS failure never refuses or scores: ``temperror_action = "accept"`` (the default, RFC
    9989 section 4.10.1 "fail open") delivers the message; ``"defer"`` answers ``451 4.4.3`` so
    the sender retries when our resolver works again.

Authentication-Results
    ``dmarc=<result> [reason="..."] header.from=<author domain> policy.dmarc=<policy after
    t/pct>`` (the properties RFC 9989's IANA considerations register; ``policy.dmarc`` only
    when a record applied, ``header.from`` whenever there is an Author Domain). The reason
    names the disposition and override for a failure, and the problem otherwise.

Options ([checks.dmarc]), besides enabled/timeout/on_error/mode:
    standard              string  "9989"      "9989": RFC 9989 tree walk; "7489": RFC 7489 with
                                              the Public Suffix List
    public_suffix_list    string  ""          7489 mode: a Public Suffix List file; empty = the
                                              copy shipped with the publicsuffixlist package
    reject_action         string  "reject"    p=reject: "reject" refuses; "quarantine" handles
                                              it as p=quarantine
    quarantine_action     string  "score"     p=quarantine: "score" adds quarantine_score;
                                              "reject" refuses
    quarantine_score      float   5.0         added for p=quarantine with action "score"
    pass_score            float   0.0         added on pass (negative: a good sign)
    permerror_score       float   0.0         added on permerror (no single Author Domain)
    temperror_action      string  "accept"    "accept" (fail open) or "defer" (451 4.4.3)
    reject_code           int     550         code of a refusal
    reject_dsn            string  "5.7.1"     its enhanced status code
    reject_text           string  "Email rejected per DMARC policy for {domain}"
                                              text of a refusal; {domain} is the Author
                                              Domain, {policy_domain} where the record was
    multiple_from         string  "permerror" several Author Domains: "permerror" or
                                              "strictest" (evaluate each, at most 5)
    trusted_arc_sealers   list    []          ARC sealing domains trusted to vouch for mail
                                              they forwarded (entries as in DomainList: a
                                              name covers its subdomains)
    forwarder_networks    list    []          client networks whose mail is forwarded (alumni
                                              forwarders, our own relays)
    forwarder_domains     list    []          envelope sender domains (with SPF pass) of
                                              forwarders
    mailing_lists         list    []          List-Id values of trusted mailing lists
    skip_networks         list    []          client networks not checked at all (our own
                                              submission or relay hosts that send without SMTP
                                              authentication)
    reports               bool    false       record every pass and fail for aggregate reports
                                              (``mxward dmarc report``)

Facts provided
    ``dmarc.result`` (pass|fail|none|temperror|permerror), ``dmarc.from_domain``,
    ``dmarc.policy_domain`` (where the record applied was found), ``dmarc.policy``
    (none|quarantine|reject: the p, sp or np that applies), ``dmarc.disposition`` (what mxward
    applied after t, pct and overrides), ``dmarc.override`` (""|forwarded|trusted_arc|
    local_policy|sampled_out), ``dmarc.spf_aligned`` and ``dmarc.dkim_aligned`` (bool),
    ``dmarc.rua`` (space-separated rua URIs of that record), ``dmarc.mode`` ("9989"|"7489"),
    and for aggregate reports the published values ``dmarc.p``, ``dmarc.sp``, ``dmarc.np``
    ("" when absent), ``dmarc.adkim``, ``dmarc.aspf``, ``dmarc.fo``, ``dmarc.pct`` (int),
    ``dmarc.testing`` (bool: t=y applied), ``dmarc.record`` (the record's text as published),
    and the SPF used: ``dmarc.spf_result``, ``dmarc.spf_domain``. Values not known are ""
    (False for booleans); a skipped message gets none. Needs ``dkim.pass_domains`` (and reads
    ``dkim.results``, ``arc.cv``, ``arc.sealers`` and the spf facts when present).

Log
    ``result``, ``from``, ``policy_domain``, ``policy``, ``disposition``, ``override``,
    ``spf`` and ``dkim`` (aligned|unaligned|none), ``spf_computed=<result>`` when SPF was
    computed here, ``questions`` (DNS questions of the evaluation), ``problems`` (what was not
    understood in the record), ``multiple`` (names with several DMARC records), ``error``.

Failure behaviour
    DNS trouble is ``temperror`` (verdict error, score 0, accepted unless ``temperror_action =
    "defer"``). Nothing in a message or a record makes the check raise; the pipeline's
    ``timeout`` (10 s: an SPF evaluation may take up to 8) and ``on_error`` cover the rest.
    With ``reports = true`` the after-hook stores each pass and fail through
    ``mxward.contentfilter.dmarcreports.record_evaluation``; a failure there is logged, never
    raised, and never delays the message (after-hooks run once the reply is sent).

Redis keys
    none of its own (the reports' keys belong to ``mxward dmarc report``).

RFCs: RFC 9989 (DMARC: 4.7 record format, 4.10 tree walk, 4.10.1 policy discovery, 4.10.2
alignment; "Mail Receiver Actions", "Policy Enforcement Considerations", "Interoperability
Considerations", "Denial of DMARC Processing Attacks", IANA considerations for A-R), RFC 7489
(6.3 record, 6.6.1 author domain, 6.6.3 policy discovery, 6.6.4 pct), RFC 9091 (np), RFC 8020
(NXDOMAIN), RFC 8601 (Authentication-Results), RFC 8617 (ARC), RFC 7960 (indirect mail flows),
RFC 5890 (A-labels), RFC 2919 (List-Id).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import re
import string
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Protocol, cast

from mxward.contentfilter.dmarclib import (
    Discovery,
    DmarcRecord,
    Mode,
    Policy,
    PolicyFound,
    author_domains,
    load_public_suffix_list,
    lower_policy,
    normalize_domain,
    sampled,
)
from mxward.policyd.checks.spf import Options as SpfOptions
from mxward.policyd.checks.spf import SpfCheck
from mxward.shared.authresults import AuthResult
from mxward.shared.dns import DnsTempError
from mxward.shared.matchers import DomainList
from mxward.shared.netutil import NetworkList
from mxward.shared.plugin import (
    Action,
    Check,
    Decision,
    LogValue,
    Result,
    Services,
    Stage,
    Transaction,
    Verdict,
)

if TYPE_CHECKING:
    from publicsuffixlist import PublicSuffixList

    from mxward.contentfilter.dmarcreports import ReportSettings
    from mxward.contentfilter.message import Message
    from mxward.shared.state import StateStore

__all__ = ["FACTS", "DmarcCheck", "Evaluation", "Options"]

log = logging.getLogger(__name__)

FACTS: Final = (
    "dmarc.result",
    "dmarc.from_domain",
    "dmarc.policy_domain",
    "dmarc.policy",
    "dmarc.disposition",
    "dmarc.override",
    "dmarc.spf_aligned",
    "dmarc.dkim_aligned",
    "dmarc.rua",
    "dmarc.mode",
    "dmarc.p",
    "dmarc.sp",
    "dmarc.np",
    "dmarc.adkim",
    "dmarc.aspf",
    "dmarc.fo",
    "dmarc.pct",
    "dmarc.testing",
    "dmarc.spf_result",
    "dmarc.spf_domain",
    "dmarc.record",
)
_PLACEHOLDERS: Final = frozenset({"domain", "policy_domain"})
_MAX_IDENTIFIERS: Final = 10
_MAX_AUTHORS: Final = 5
_REPORTS_MODULE: Final = "mxward.contentfilter.dmarcreports"
_DEFER_TEXT: Final = "DMARC policy could not be checked now, please try again later"
_LIST_ID = re.compile(r"<([^<>\s]{1,255})>")

Override = Literal["", "forwarded", "trusted_arc", "local_policy", "sampled_out"]
ResultWord = Literal["pass", "fail", "none", "temperror", "permerror"]


class RecordEvaluation(Protocol):
    """The signature of ``mxward.contentfilter.dmarcreports.record_evaluation``."""

    def __call__(
        self,
        state: StateStore,
        tx: Transaction,
        facts: Mapping[str, LogValue],
        *,
        now: float,
        settings: ReportSettings | None = None,
    ) -> Awaitable[None]: ...


@dataclass(frozen=True, kw_only=True)
class Options:
    standard: Mode = "9989"
    public_suffix_list: str = ""
    reject_action: Literal["reject", "quarantine"] = "reject"
    quarantine_action: Literal["score", "reject"] = "score"
    quarantine_score: float = 5.0
    pass_score: float = 0.0
    permerror_score: float = 0.0
    temperror_action: Literal["accept", "defer"] = "accept"
    reject_code: int = 550
    reject_dsn: str = "5.7.1"
    reject_text: str = "Email rejected per DMARC policy for {domain}"
    multiple_from: Literal["permerror", "strictest"] = "permerror"
    trusted_arc_sealers: tuple[str, ...] = ()
    forwarder_networks: tuple[str, ...] = ()
    forwarder_domains: tuple[str, ...] = ()
    mailing_lists: tuple[str, ...] = ()
    skip_networks: tuple[str, ...] = ()
    reports: bool = False

    def __post_init__(self) -> None:
        choices: dict[str, tuple[str, ...]] = {
            "standard": ("9989", "7489"),
            "reject_action": ("reject", "quarantine"),
            "quarantine_action": ("score", "reject"),
            "temperror_action": ("accept", "defer"),
            "multiple_from": ("permerror", "strictest"),
        }
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} {getattr(self, name)!r}: use one of {', '.join(valid)}")
        for name in ("quarantine_score", "pass_score", "permerror_score"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")
        if not 500 <= self.reject_code <= 599:
            raise ValueError(f"reject_code {self.reject_code} must be a 5xx code")
        if not re.fullmatch(r"5\.\d{1,3}\.\d{1,3}", self.reject_dsn):
            raise ValueError(f"reject_dsn {self.reject_dsn!r} must be an enhanced code 5.x.y")
        try:
            fields = {
                name for _, name, _, _ in string.Formatter().parse(self.reject_text) if name is not None
            }
        except ValueError as exc:
            raise ValueError(f"reject_text: {exc}") from None
        if fields - _PLACEHOLDERS:
            raise ValueError(
                f"reject_text: unknown placeholder(s) {sorted(fields - _PLACEHOLDERS)}"
                f" (valid: {sorted(_PLACEHOLDERS)})"
            )
        if not self.reject_text.strip() or any(c in self.reject_text for c in "\r\n\0"):
            raise ValueError("reject_text must be one non-empty line")
        for name in ("trusted_arc_sealers", "forwarder_domains", "mailing_lists"):
            try:
                DomainList(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        for name in ("forwarder_networks", "skip_networks"):
            try:
                NetworkList(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if self.public_suffix_list and not os.path.isfile(self.public_suffix_list):
            raise ValueError(f"public_suffix_list {self.public_suffix_list!r} is not a file")


@dataclass(frozen=True, slots=True)
class _Spf:
    """The SPF outcome DMARC uses: the result and the domain of the MAIL FROM identity."""

    result: str = ""
    domain: str = ""
    computed: bool = False
    property: tuple[str, str] = ("", "")  # for Authentication-Results: smtp.mailfrom or smtp.helo


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """The DMARC outcome for one Author Domain."""

    domain: str
    result: ResultWord
    reason: str = ""
    found: PolicyFound | None = None
    record: DmarcRecord | None = None
    policy: str = ""  # the p, sp or np that applies
    evaluated: str = ""  # after t=y / pct (policy.dmarc)
    disposition: str = ""  # what is applied, after overrides
    override: Override = ""
    testing: bool = False
    spf_aligned: bool = False
    dkim_aligned: bool = False
    error: str = ""

    @property
    def rank(self) -> int:
        """How strict the outcome is, for several Author Domains (the strictest decides)."""
        if self.result == "fail":
            return {"reject": 12, "quarantine": 11}.get(self.disposition, 9)
        return {"temperror": 10, "permerror": 8, "pass": 2}.get(self.result, 1)


class DmarcCheck(Check[Options]):
    name: ClassVar[str] = "dmarc"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONTENT})
    options_type: ClassVar[type[Any]] = Options
    needs: tuple[str, ...] = ("dkim.pass_domains",)
    provides: ClassVar[tuple[str, ...]] = FACTS
    timeout: ClassVar[float] = 10.0

    def __init__(self, options: Options, services: Services) -> None:
        super().__init__(options, services)
        self._sealers = DomainList(options.trusted_arc_sealers)
        self._forwarder_networks = NetworkList(options.forwarder_networks)
        self._skip = NetworkList(options.skip_networks)
        self._forwarder_domains = DomainList(options.forwarder_domains)
        self._lists = DomainList(options.mailing_lists)
        self._spf = SpfCheck(SpfOptions(), services)
        self._psl: PublicSuffixList | None = None

    async def start(self) -> None:
        if self.options.standard == "7489":
            self._psl = load_public_suffix_list(self.options.public_suffix_list)

    # -- checking ------------------------------------------------------------------------------

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        message = tx.message
        if message is None:
            return self.result(Verdict.SKIP, note="no message")
        if tx.sasl_username:
            return self.result(Verdict.SKIP, skipped="authenticated")
        if tx.client_ip is not None and tx.client_ip in self._skip:
            return self.result(Verdict.SKIP, skipped="network")
        authors = author_domains(message.get_all("From"))
        domains = authors.domains
        if authors.error or not domains:
            return self._permerror(authors.error or "no Author Domain")
        if len(domains) > 1 and (self.options.multiple_from == "permerror" or len(domains) > _MAX_AUTHORS):
            return self._permerror(f"From header has {len(domains)} Author Domains")
        if self.options.standard == "7489" and self._psl is None:
            self._psl = load_public_suffix_list(self.options.public_suffix_list)
        discovery = Discovery(self.services.dns, self.options.standard, self._psl)
        spf_cache: list[_Spf] = []
        evaluations = [await self._evaluate(d, tx, message, discovery, spf_cache) for d in domains]
        deciding = max(evaluations, key=lambda e: e.rank)
        spf = spf_cache[0] if spf_cache else _Spf()
        return self._report(deciding, evaluations, spf, discovery)

    async def _evaluate(
        self, author: str, tx: Transaction, message: Message, discovery: Discovery, spf_cache: list[_Spf]
    ) -> Evaluation:
        try:
            found = await discovery.policy(author)
        except DnsTempError as exc:
            return Evaluation(
                domain=author, result="temperror", reason="DNS error looking up the policy", error=str(exc)
            )
        if found is None:
            several = [n for n in discovery.multiple if n == author or author.endswith("." + n)]
            why = f"several DMARC records at {several[0]}" if several else "no DMARC record"
            return Evaluation(domain=author, result="none", reason=why)
        record = found.record.effective()
        if record is None:
            return Evaluation(
                domain=author,
                result="none",
                found=found,
                record=found.record,
                reason=f"record of {found.domain} has no valid policy and no rua",
            )
        if not spf_cache:
            spf_cache.append(await self._spf_outcome(tx))
        spf = spf_cache[0]
        spf_ok, dkim_ok, trouble = await self._alignment(author, record, spf, tx, discovery)
        result: ResultWord = "pass" if spf_ok or dkim_ok else ("temperror" if trouble else "fail")
        try:
            policy = await self._applicable_policy(found, record, author, discovery)
        except DnsTempError as exc:
            if result == "fail":
                result, trouble = "temperror", f"existence of {author}: {exc}"
            policy = (record.sp or record.p or "none") if found.subdomain else (record.p or "none")
        base = Evaluation(
            domain=author,
            result=result,
            found=found,
            record=record,
            policy=policy,
            spf_aligned=spf_ok,
            dkim_aligned=dkim_ok,
        )
        if result == "temperror":
            return _replace(base, reason="temporary failure: " + trouble, error=trouble)
        evaluated, testing, sampled_out = self._evaluated(policy, record, tx, message)
        if result == "pass":
            return _replace(base, evaluated=evaluated, testing=testing, disposition="none")
        override: Override = ""
        disposition = evaluated
        if evaluated != "none":
            override = self._override(tx, message, spf)
            if override:
                disposition = "none"
        if not override and sampled_out:
            override = "sampled_out"
        return _replace(
            base,
            evaluated=evaluated,
            testing=testing,
            disposition=disposition,
            override=override,
            reason=f"policy {evaluated}, disposition {disposition}" + (f" ({override})" if override else ""),
        )

    async def _applicable_policy(
        self, found: PolicyFound, record: DmarcRecord, author: str, discovery: Discovery
    ) -> Policy:
        """p for the Author Domain's own record; else np (non-existent), sp, p."""
        p: Policy = record.p or "none"
        if not found.subdomain:
            return p
        if record.np is not None and not await discovery.exists(author):
            return record.np
        return record.sp or p

    def _evaluated(
        self, policy: Policy, record: DmarcRecord, tx: Transaction, message: Message
    ) -> tuple[Policy, bool, bool]:
        """(the policy after t=y or pct, whether t=y lowered it, whether pct did)."""
        if policy == "none":
            return policy, False, False
        if self.options.standard == "9989":
            if record.t == "y":
                return lower_policy(policy), True, False
            return policy, False, False
        if record.pct < 100 and not sampled(record.pct, sample_key(tx, message)):
            return lower_policy(policy), False, True
        return policy, False, False

    async def _alignment(
        self, author: str, record: DmarcRecord, spf: _Spf, tx: Transaction, discovery: Discovery
    ) -> tuple[bool, bool, str]:
        """(SPF aligned, DKIM aligned, trouble): trouble names a temporary failure that could
        have hidden an aligned pass."""
        trouble: list[str] = []
        spf_ok = False
        if spf.domain and spf.result in ("pass", "temperror"):
            try:
                aligned = await discovery.aligned(author, spf.domain, record.aspf)
            except DnsTempError as exc:
                trouble.append(f"SPF alignment: {exc}")
            else:
                if aligned and spf.result == "pass":
                    spf_ok = True
                elif aligned:
                    trouble.append(f"SPF temperror for {spf.domain}")
        facts = tx.facts
        raw_pass = facts.get("dkim.pass_domains")
        dkim_ok = False
        for domain in _domains(raw_pass)[:_MAX_IDENTIFIERS]:
            try:
                if await discovery.aligned(author, domain, record.adkim):
                    dkim_ok = True
                    break
            except DnsTempError as exc:
                trouble.append(f"DKIM alignment: {exc}")
        if not dkim_ok:
            if not isinstance(raw_pass, str):
                trouble.append("no DKIM result")
            for domain in _dkim_temperrors(facts.get("dkim.results"))[:_MAX_IDENTIFIERS]:
                try:
                    if await discovery.aligned(author, domain, record.adkim):
                        trouble.append(f"DKIM temperror for {domain}")
                        break
                except DnsTempError as exc:
                    trouble.append(f"DKIM alignment: {exc}")
        return spf_ok, dkim_ok, "; ".join(trouble)

    async def _spf_outcome(self, tx: Transaction) -> _Spf:
        """policyd's SPF result from the join, else one computed here."""
        facts = tx.facts
        result = facts.get("spf.result")
        if isinstance(result, str) and result:
            identity = facts.get("spf.identity")
            domain = facts.get("spf.domain")
            usable = identity == "mailfrom" or (identity == "helo" and not tx.sender)
            name = normalize_domain(domain) if usable and isinstance(domain, str) else None
            return _Spf(result, name or "")
        if tx.client_ip is None:
            return _Spf()
        evaluation, _, _ = await self._spf.evaluate(tx.client_ip, tx.sender, tx.helo)
        name = normalize_domain(evaluation.domain) if evaluation.domain else None
        prop = ("smtp.helo", tx.helo) if evaluation.identity == "helo" else ("smtp.mailfrom", tx.sender)
        return _Spf(evaluation.result, name or "", computed=True, property=prop)

    def _override(self, tx: Transaction, message: Message, spf: _Spf) -> Override:
        facts = tx.facts
        if self._sealers and facts.get("arc.cv") == "pass":
            sealers = facts.get("arc.sealers")
            if isinstance(sealers, str) and any(self._sealers.matches(s) for s in sealers.lower().split()):
                return "trusted_arc"
        if tx.client_ip is not None and tx.client_ip in self._forwarder_networks:
            return "forwarded"
        if spf.result == "pass" and spf.domain and self._forwarder_domains.matches(spf.domain):
            return "forwarded"
        if self._lists:
            list_id = _list_id(message.get("List-Id"))
            if list_id and self._lists.matches(list_id):
                passed = [*_domains(facts.get("dkim.pass_domains"))]
                if spf.result == "pass" and spf.domain:
                    passed.append(spf.domain)
                if any(list_id == d or list_id.endswith("." + d) for d in passed):
                    return "local_policy"
        return ""

    # -- reporting ------------------------------------------------------------------------------

    def _permerror(self, why: str) -> Result:
        facts = _facts(Evaluation(domain="", result="permerror"), _Spf(), self.options.standard)
        auth = AuthResult("dmarc", "permerror", reason=why)
        return Result(
            check=self.name,
            verdict=Verdict.FAIL,
            score=self.options.permerror_score,
            log={"result": "permerror", "error": why},
            facts=facts,
            auth=(auth,),
        )

    def _report(
        self,
        ev: Evaluation,
        evaluations: list[Evaluation],
        spf: _Spf,
        discovery: Discovery,
    ) -> Result:
        opts = self.options
        auth: list[AuthResult] = []
        if spf.computed and spf.result:
            auth.append(AuthResult("spf", spf.result, properties=(spf.property,)))
        auth.extend(_auth(e) for e in evaluations)
        log_fields = _log(ev, spf, discovery)
        facts = _facts(ev, spf, opts.standard)
        verdict = {
            "pass": Verdict.PASS,
            "fail": Verdict.FAIL,
            "none": Verdict.SKIP,
            "temperror": Verdict.ERROR,
        }.get(ev.result, Verdict.FAIL)
        score = 0.0
        action: Action | None = None
        reason = ""
        text = opts.reject_text.format(domain=ev.domain, policy_domain=ev.found.domain if ev.found else "")
        if ev.result == "pass":
            score = opts.pass_score
        elif ev.result == "temperror" and opts.temperror_action == "defer":
            action = Action.defer(_DEFER_TEXT, 451, "4.4.3")
            reason = _DEFER_TEXT
        elif ev.result == "fail" and ev.disposition in ("quarantine", "reject"):
            handling = opts.quarantine_action
            if ev.disposition == "reject" and opts.reject_action == "reject":
                handling = "reject"
            reason = text
            if handling == "reject":
                action = Action.reject(text, opts.reject_code, opts.reject_dsn)
            else:
                score = opts.quarantine_score
        return Result(
            check=self.name,
            verdict=verdict,
            score=score,
            reason=reason,
            log=log_fields,
            facts=facts,
            action=action,
            auth=tuple(auth),
        )

    # -- afterwards -----------------------------------------------------------------------------

    async def after(self, tx: Transaction, decision: Decision) -> None:
        """With ``reports``: store the evaluation for the aggregate reports (never raises)."""
        if not self.options.reports:
            return
        mine = next((r for r in decision.results if r.check == self.name), None)
        if mine is None or mine.facts.get("dmarc.result") not in ("pass", "fail"):
            return
        record = _record_evaluation()
        if record is None:
            return
        try:
            config = self.services.config
            if config is None:
                await record(self.services.state, tx, mine.facts, now=self.services.clock.now())
            else:
                await record(
                    self.services.state,
                    tx,
                    mine.facts,
                    now=self.services.clock.now(),
                    settings=config.dmarc_reports,
                )
        except Exception as exc:
            log.warning(
                "queue=%s dmarc report record not stored: %s: %s", tx.queue_id, type(exc).__name__, exc
            )


# ---------------------------------------------------------------------------------------------
# helpers


def _replace(ev: Evaluation, **changes: Any) -> Evaluation:
    values = {f: getattr(ev, f) for f in Evaluation.__dataclass_fields__}
    values.update(changes)
    return Evaluation(**values)


def _domains(value: LogValue) -> list[str]:
    """Normalised, distinct domains of a space-separated fact."""
    if not isinstance(value, str):
        return []
    out: list[str] = []
    for item in value.split():
        domain = normalize_domain(item)
        if domain and domain not in out:
            out.append(domain)
    return out


def _dkim_temperrors(value: LogValue) -> list[str]:
    """The domains of ``dkim.results`` entries ("domain:selector:result") that are temperror."""
    if not isinstance(value, str):
        return []
    out: list[str] = []
    for entry in value.split():
        domain, _, rest = entry.partition(":")
        if rest.rpartition(":")[2] == "temperror":
            name = normalize_domain(domain)
            if name and name not in out:
                out.append(name)
    return out


def _list_id(value: str | None) -> str:
    """The list id of a List-Id field (``Name <id>``), lower-case; "" when there is none."""
    if not value:
        return ""
    match = _LIST_ID.search(value)
    return match.group(1).lower().rstrip(".") if match else ""


def sample_key(tx: Transaction, message: Message) -> str:
    """What pct sampling hashes: the Message-ID, else the queue id, else the message's hash."""
    message_id = (message.get("Message-ID") or "").strip()
    if message_id:
        return message_id
    if tx.queue_id:
        return tx.queue_id
    return hashlib.sha256(message.raw).hexdigest()


def _facts(ev: Evaluation, spf: _Spf, mode: str) -> dict[str, LogValue]:
    record = ev.record
    return {
        "dmarc.result": ev.result,
        "dmarc.from_domain": ev.domain,
        "dmarc.policy_domain": ev.found.domain if ev.found else "",
        "dmarc.policy": ev.policy,
        "dmarc.disposition": ev.disposition,
        "dmarc.override": ev.override,
        "dmarc.spf_aligned": ev.spf_aligned,
        "dmarc.dkim_aligned": ev.dkim_aligned,
        "dmarc.rua": " ".join(record.rua) if record else "",
        "dmarc.mode": mode,
        "dmarc.p": (record.p or "") if record else "",
        "dmarc.sp": (record.sp or "") if record else "",
        "dmarc.np": (record.np or "") if record else "",
        "dmarc.adkim": record.adkim if record else "",
        "dmarc.aspf": record.aspf if record else "",
        "dmarc.fo": record.fo if record else "",
        "dmarc.pct": record.pct if record else 100,
        "dmarc.testing": ev.testing,
        "dmarc.spf_result": spf.result,
        "dmarc.spf_domain": spf.domain,
        "dmarc.record": ev.found.record.raw if ev.found else "",
    }


def _auth(ev: Evaluation) -> AuthResult:
    props: list[tuple[str, str]] = [("header.from", ev.domain)]
    if ev.evaluated:
        props.append(("policy.dmarc", ev.evaluated))
    reason = "" if ev.result == "pass" else ev.reason
    return AuthResult("dmarc", ev.result, reason=reason, properties=tuple(props))


def _log(ev: Evaluation, spf: _Spf, discovery: Discovery) -> dict[str, LogValue]:
    out: dict[str, LogValue] = {"result": ev.result, "from": ev.domain}
    if ev.found is not None:
        out["policy_domain"] = ev.found.domain
    if ev.policy:
        out["policy"] = ev.policy
    if ev.disposition:
        out["disposition"] = ev.disposition
    if ev.override:
        out["override"] = ev.override
    if ev.record is not None:
        out["spf"] = "aligned" if ev.spf_aligned else ("unaligned" if spf.result == "pass" else "none")
        out["dkim"] = "aligned" if ev.dkim_aligned else "unaligned"
    if spf.computed:
        out["spf_computed"] = spf.result or "none"
    out["questions"] = discovery.questions
    if ev.found is not None and ev.found.record.problems:
        out["problems"] = ",".join(ev.found.record.problems)
    if discovery.multiple:
        out["multiple"] = ",".join(discovery.multiple)
    if ev.error:
        out["error"] = ev.error
    return out


def _record_evaluation() -> RecordEvaluation | None:
    """The reports module's ``record_evaluation``, when that module is installed."""
    try:
        module = importlib.import_module(_REPORTS_MODULE)
    except ImportError:
        return None
    function = getattr(module, "record_evaluation", None)
    if not callable(function):
        log.warning("%s has no record_evaluation(); dmarc reports are not recorded", _REPORTS_MODULE)
        return None
    return cast("RecordEvaluation", function)
