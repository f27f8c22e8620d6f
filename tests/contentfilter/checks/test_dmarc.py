"""dmarc: policy discovery, alignment and the disposition, against the test DNS server.

The policies live in tests/data/dns/dmarc.zone. SPF comes from policyd's facts (as the
queue-id join gives them) unless a test leaves them out, when the check computes SPF itself;
DKIM results are the facts the dkim check would provide, set on the transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from support.dns_fixtures import DNS_DATA
from support.dnsserver import DnsServer

from mxward.contentfilter.checks import CHECKS
from mxward.contentfilter.checks.dmarc import FACTS, DmarcCheck, Options, sample_key
from mxward.contentfilter.dmarclib import sample_value
from mxward.contentfilter.message import Message
from mxward.shared.authresults import build_header
from mxward.shared.cli import resolve_check
from mxward.shared.clock import FrozenClock
from mxward.shared.config import ConfigError, build_settings, parse_config
from mxward.shared.dns import DnsSettings, Resolver
from mxward.shared.netutil import parse_ip
from mxward.shared.pipeline import ActiveCheck, Pipeline, PipelineSettings
from mxward.shared.plugin import (
    Action,
    ActionKind,
    Check,
    Decision,
    LogValue,
    Result,
    Services,
    Stage,
    Transaction,
    Verdict,
)
from mxward.shared.state import StateSettings, StateStore

DMARC_ZONE = DNS_DATA / "dmarc.zone"
NOW = 1_700_000_000.0
NO_SPF: dict[str, LogValue] = {}

Factory = Callable[..., DmarcCheck]


@pytest.fixture
async def dns(dns_server: DnsServer) -> DnsServer:
    dns_server.add_zone(DMARC_ZONE)
    return dns_server


@pytest.fixture
async def make(dns: DnsServer) -> AsyncIterator[Factory]:
    """Build started DmarcCheck instances on the test DNS server; closed after the test."""
    made: list[DmarcCheck] = []

    def factory(*, lifetime: float = 2.0, **options: Any) -> DmarcCheck:
        resolver = Resolver(
            DnsSettings(nameservers=(dns.nameserver,), timeout=min(1.0, lifetime), lifetime=lifetime)
        )
        services = Services(
            dns=resolver,
            state=StateStore(StateSettings(url="unix:///nonexistent/never-used.sock")),
            clock=FrozenClock(NOW),
            hostname="mx.test",
        )
        check = DmarcCheck(Options(**options), services)
        made.append(check)
        return check

    yield factory
    for check in made:
        await check.aclose()


def message(*fields: str, body: str = "Hello.\r\n") -> Message:
    text = "".join(f"{f}\r\n" for f in fields) + "\r\n" + body
    return Message.parse(text.encode("utf-8"))


def spf_facts(
    result: str = "pass", domain: str = "other.test", identity: str = "mailfrom"
) -> dict[str, LogValue]:
    return {"spf.result": result, "spf.domain": domain, "spf.identity": identity}


def tx(
    author: str | tuple[str, ...] = "alice@aligned.test",
    *,
    dkim: str | None = "",
    spf: Mapping[str, LogValue] | None = None,
    client: str = "127.0.3.1",
    sender: str = "bounce@other.test",
    helo: str = "mail.other.test",
    headers: tuple[str, ...] = (),
    facts: Mapping[str, LogValue] | None = None,
    message_id: str = "<1@test>",
    queue_id: str = "",
) -> Transaction:
    """A content transaction: From (one field per entry), policyd's SPF facts, DKIM facts."""
    all_facts: dict[str, LogValue] = dict(spf_facts() if spf is None else spf)
    if dkim is not None:
        all_facts["dkim.pass_domains"] = dkim
    all_facts.update(facts or {})
    froms = (author,) if isinstance(author, str) else author
    fields = [f"From: {a}" for a in froms]
    if message_id:
        fields.append(f"Message-ID: {message_id}")
    return Transaction(
        stage=Stage.CONTENT,
        client_address=client,
        client_ip=parse_ip(client),
        helo=helo,
        sender=sender,
        queue_id=queue_id,
        facts=all_facts,
        message=message(*fields, "Subject: test", *headers),
        recipients=("bob@mx.test",),
    )


async def run(check: DmarcCheck, transaction: Transaction) -> Result:
    return await check.check(Stage.CONTENT, transaction)


def ar(result: Result) -> str:
    """The Authentication-Results field the filter would write for this result alone."""
    return build_header("mx.test", result.auth)


# ---------------------------------------------------------------------------------------------
# The table: RFC 9989 mode


@dataclass(frozen=True)
class Case:
    author: str
    spf: str  # the SPF-passing MAIL FROM domain ("" = SPF did not pass)
    dkim: str  # the passing DKIM domains
    result: str
    policy: str = ""
    disposition: str = ""
    forced: bool = False  # a forced refusal
    score: float = 0.0


CASES = {
    # aligned and unaligned identifiers, relaxed (the default)
    "spf aligned relaxed": Case("a@aligned.test", "bounce.aligned.test", "", "pass", "reject", "none"),
    "spf aligned exact": Case("a@aligned.test", "aligned.test", "", "pass", "reject", "none"),
    "dkim aligned relaxed": Case("a@aligned.test", "", "mail.aligned.test", "pass", "reject", "none"),
    "dkim aligned, other first": Case(
        "a@aligned.test", "", "other.test aligned.test", "pass", "reject", "none"
    ),
    "spf and dkim unaligned": Case(
        "a@aligned.test", "other.test", "other.test", "fail", "reject", "reject", forced=True
    ),
    "nothing passed": Case("a@aligned.test", "", "", "fail", "reject", "reject", forced=True),
    "a look-alike suffix is not aligned": Case(
        "a@aligned.test", "", "notaligned.test", "fail", "reject", "reject", forced=True
    ),
    # strict alignment
    "strict: dkim of a subdomain fails": Case(
        "a@strict.test", "", "mail.strict.test", "fail", "reject", "reject", forced=True
    ),
    "strict: spf of a subdomain fails": Case(
        "a@strict.test", "mail.strict.test", "", "fail", "reject", "reject", forced=True
    ),
    "strict: exact dkim passes": Case("a@strict.test", "", "strict.test", "pass", "reject", "none"),
    "strict: exact spf passes": Case("a@strict.test", "strict.test", "", "pass", "reject", "none"),
    "strict, upper-case tags": Case(
        "a@upper.test", "", "sub.upper.test", "fail", "reject", "reject", forced=True
    ),
    # p, sp and np
    "p for the domain itself": Case("a@sub.test", "", "", "fail", "quarantine", "quarantine", score=5.0),
    "sp for an existing subdomain": Case("a@exists.sub.test", "", "", "fail", "none", "none"),
    "np for a subdomain that does not exist": Case(
        "a@ghost.sub.test", "", "", "fail", "reject", "reject", forced=True
    ),
    "aligned pass from a subdomain": Case("a@exists.sub.test", "", "sub.test", "pass", "none", "none"),
    "p=none fails without consequence": Case("a@none.test", "", "", "fail", "none", "none"),
    # the tree walk finds the Organizational Domain's record
    "record at the org domain, sp": Case(
        "a@a.b.org.test", "", "", "fail", "quarantine", "quarantine", score=5.0
    ),
    "org domain record, aligned dkim of the org": Case(
        "a@a.b.org.test", "", "org.test", "pass", "quarantine", "none"
    ),
    "deep name, record 10 labels up": Case(
        "a@l1.l2.l3.l4.l5.l6.l7.l8.l9.deep.test", "", "", "fail", "reject", "reject", forced=True
    ),
    # psd=n: its own Organizational Domain
    "psd=n: the parent's dkim is not aligned": Case(
        "a@x.dept.corp.test", "", "corp.test", "fail", "reject", "reject", forced=True
    ),
    "psd=n: its own dkim is": Case("a@x.dept.corp.test", "", "dept.corp.test", "pass", "reject", "none"),
    # a public suffix operator's record (psd=y at a top-level label)
    "psd: registered domain without a record": Case(
        "a@registrant.example", "", "", "fail", "quarantine", "quarantine", score=5.0
    ),
    "psd: np for a name that does not exist": Case(
        "a@ghost.example", "", "", "fail", "reject", "reject", forced=True
    ),
    "psd: org domain is one label below": Case(
        "a@a.registrant.example", "", "registrant.example", "pass", "quarantine", "none"
    ),
    "psd: a sibling is not aligned": Case(
        "a@a.registrant.example", "", "owned.example", "fail", "quarantine", "quarantine", score=5.0
    ),
    "psd: own record wins over the psd's": Case("a@owned.example", "", "", "fail", "none", "none"),
    # two-label public suffix: the walk finds example.co.uk
    "co.uk subdomain": Case("a@news.example.co.uk", "", "example.co.uk", "pass", "reject", "none"),
    "co.uk: another registrant": Case(
        "a@news.example.co.uk", "", "other.co.uk", "fail", "reject", "reject", forced=True
    ),
    # no policy
    "no record": Case("a@norecord.test", "", "", "none"),
    "no such domain, no record anywhere": Case("a@nowhere.test", "", "", "none"),
    "two records, nothing above": Case("a@two.test", "", "", "none"),
    "two records, the walk goes on": Case("a@sub.twin.test", "", "", "fail", "reject", "reject", forced=True),
    # records that are not valid
    "v=DMARC2": Case("a@notdmarc.test", "", "", "none"),
    "v not first": Case("a@vsecond.test", "", "", "none"),
    "v=dmarc1 in lower case": Case("a@lowerv.test", "", "", "none"),
    "no p, a rua: p=none": Case("a@nop.test", "", "", "fail", "none", "none"),
    "no p, no rua": Case("a@nopnorua.test", "", "", "none"),
    "bad p, no rua": Case("a@badp.test", "", "", "none"),
    "bad sp, a rua: p=none": Case("a@badsp.test", "", "", "fail", "none", "none"),
    "junk values fall back to defaults": Case("a@junk.test", "", "mail.junk.test", "pass", "reject", "none"),
    "a record in two strings": Case("a@split.test", "", "", "fail", "reject", "reject", forced=True),
    # t=y: testing, one step down
    "t=y: reject becomes quarantine": Case(
        "a@testing.test", "", "", "fail", "reject", "quarantine", score=5.0
    ),
    "t=y: quarantine becomes none": Case("a@testq.test", "", "", "fail", "quarantine", "none"),
    # pct is RFC 7489's; RFC 9989 ignores it
    "pct=0 is not honoured in 9989 mode": Case(
        "a@pct0.test", "", "", "fail", "reject", "reject", forced=True
    ),
    # an internationalised domain
    "IDN From, dkim in A-labels": Case(
        "olaf@bücher.test", "", "xn--bcher-kva.test", "pass", "reject", "none"
    ),
    "IDN From, unaligned": Case(
        "olaf@BÜCHER.test", "", "other.test", "fail", "reject", "reject", forced=True
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_rfc9989_decision_table(make: Factory, case: Case) -> None:
    """Result, policy, disposition and what it does, for each case of the table."""
    spf = spf_facts("pass", case.spf) if case.spf else spf_facts("fail", "stranger.test")
    result = await run(make(), tx(case.author, dkim=case.dkim, spf=spf))
    facts = result.facts
    assert facts["dmarc.result"] == case.result
    assert facts["dmarc.policy"] == case.policy
    assert facts["dmarc.disposition"] == case.disposition
    assert facts["dmarc.mode"] == "9989"
    if case.forced:
        assert result.action is not None
        assert result.action.kind is ActionKind.REJECT
        assert (
            result.action.reply
            == f"550 5.7.1 Email rejected per DMARC policy for {facts['dmarc.from_domain']}"
        )
        assert result.score == 0
    else:
        assert result.action is None
        assert result.score == case.score
    expected_verdict = {"pass": Verdict.PASS, "fail": Verdict.FAIL, "none": Verdict.SKIP}[case.result]
    assert result.verdict is expected_verdict
    assert set(facts) == set(FACTS)


async def test_a_pass_reports_its_aligned_identifiers(make: Factory) -> None:
    """Facts name both alignments, the record's published values and its report URIs."""
    result = await run(
        make(), tx("a@aligned.test", dkim="aligned.test", spf=spf_facts("pass", "bounce.aligned.test"))
    )
    facts = result.facts
    assert facts["dmarc.spf_aligned"] is True
    assert facts["dmarc.dkim_aligned"] is True
    assert facts["dmarc.from_domain"] == "aligned.test"
    assert facts["dmarc.policy_domain"] == "aligned.test"
    assert facts["dmarc.rua"] == "mailto:dmarc@aligned.test mailto:agg@reports.test"
    assert (facts["dmarc.p"], facts["dmarc.sp"], facts["dmarc.np"]) == ("reject", "", "")
    assert (facts["dmarc.adkim"], facts["dmarc.aspf"], facts["dmarc.pct"]) == ("r", "r", 100)
    assert (facts["dmarc.spf_result"], facts["dmarc.spf_domain"]) == ("pass", "bounce.aligned.test")
    assert facts["dmarc.override"] == ""
    assert facts["dmarc.record"] == (
        "v=DMARC1; p=reject; rua=mailto:dmarc@aligned.test,mailto:agg@reports.test!10m;"
        " ruf=mailto:f@aligned.test"
    )
    assert result.log["spf"] == "aligned"
    assert result.log["dkim"] == "aligned"


async def test_authentication_results_entry(make: Factory) -> None:
    """dmarc=<result> header.from=<domain> policy.dmarc=<policy>, a reason for failures."""
    passed = await run(make(), tx("a@aligned.test", dkim="aligned.test"))
    assert (
        ar(passed)
        == "Authentication-Results: mx.test;\r\n\tdmarc=pass header.from=aligned.test policy.dmarc=reject"
    )
    failed = await run(make(), tx("a@testing.test"))
    assert ar(failed) == (
        "Authentication-Results: mx.test;\r\n"
        '\tdmarc=fail reason="policy quarantine, disposition quarantine"\r\n'
        "\t  header.from=testing.test policy.dmarc=quarantine"
    )
    several = await run(make(), tx("a@two.test"))
    assert 'dmarc=none reason="several DMARC records at two.test"' in ar(several)
    nothing = await run(make(), tx("a@norecord.test"))
    assert ar(nothing) == (
        'Authentication-Results: mx.test;\r\n\tdmarc=none reason="no DMARC record" header.from=norecord.test'
    )


async def test_subdomain_policy_facts(make: Factory) -> None:
    """A policy found at the Organizational Domain names that domain and its sp."""
    result = await run(make(), tx("a@a.b.org.test"))
    assert result.facts["dmarc.policy_domain"] == "org.test"
    assert result.facts["dmarc.sp"] == "quarantine"
    assert result.log["policy_domain"] == "org.test"


async def test_the_psd_record_is_the_policy_domain(make: Factory) -> None:
    """For registrant.example the record applied is the PSD's, with its rua."""
    result = await run(make(), tx("a@registrant.example"))
    assert result.facts["dmarc.policy_domain"] == "example"
    assert result.facts["dmarc.rua"] == "mailto:psd@registry.example"


async def test_testing_flag_is_a_fact(make: Factory) -> None:
    """t=y lowered the policy: dmarc.testing is true, no override is claimed."""
    result = await run(make(), tx("a@testing.test"))
    assert result.facts["dmarc.testing"] is True
    assert result.facts["dmarc.override"] == ""


# ---------------------------------------------------------------------------------------------
# DNS questions: the tree walk's bounds


async def test_a_record_at_the_author_domain_needs_one_question(make: Factory, dns: DnsServer) -> None:
    """With strict alignment (or an identical identifier) nothing else is asked."""
    dns.reset_queries()
    result = await run(make(), tx("a@strict.test", dkim="strict.test"))
    assert result.facts["dmarc.result"] == "pass"
    asked = {name for name, rtype in dns.queries if rtype == "TXT"}
    assert asked == {"_dmarc.strict.test"}


async def test_the_walk_asks_each_parent_once(make: Factory, dns: DnsServer) -> None:
    """a.b.org.test: four TXT questions, down to the top-level label."""
    dns.reset_queries()
    await run(make(), tx("a@a.b.org.test"))
    asked = [name for name, rtype in dns.queries if rtype == "TXT"]
    assert sorted(asked) == sorted(
        ["_dmarc.a.b.org.test", "_dmarc.b.org.test", "_dmarc.org.test", "_dmarc.test"]
    )


async def test_a_long_author_domain_costs_at_most_eight_questions(make: Factory, dns: DnsServer) -> None:
    """11 labels: the full name, then 7 labels and down: 8 questions, labels 8..10 skipped."""
    dns.reset_queries()
    result = await run(make(), tx("a@l1.l2.l3.l4.l5.l6.l7.l8.l9.deep.test"))
    asked = [name for name, rtype in dns.queries if rtype == "TXT"]
    assert len(asked) == 8
    assert "_dmarc.l2.l3.l4.l5.l6.l7.l8.l9.deep.test" not in asked
    assert "_dmarc.l5.l6.l7.l8.l9.deep.test" in asked
    assert result.log["questions"] == 8


async def test_the_walk_stops_at_a_psd_record(make: Factory, dns: DnsServer) -> None:
    """x.dept.corp.test: psd=n at dept.corp.test ends the walk; corp.test is never asked."""
    dns.reset_queries()
    await run(make(), tx("a@x.dept.corp.test", dkim="dept.corp.test"))
    asked = {name for name, rtype in dns.queries if rtype == "TXT"}
    assert "_dmarc.dept.corp.test" in asked
    assert "_dmarc.corp.test" not in asked


async def test_existence_is_asked_only_for_np(make: Factory, dns: DnsServer) -> None:
    """np present and a subdomain's policy: one A question for the Author Domain."""
    dns.reset_queries()
    await run(make(), tx("a@ghost.sub.test"))
    assert dns.queries[("ghost.sub.test", "A")] == 1
    dns.reset_queries()
    await run(make(), tx("a@a.b.org.test"))
    assert ("a.b.org.test", "A") not in dns.queries


# ---------------------------------------------------------------------------------------------
# RFC 7489 mode


CASES_7489 = {
    "pct=0: never selected, one step down": Case(
        "a@pct0.test", "", "", "fail", "reject", "quarantine", score=5.0
    ),
    "t=y is not honoured": Case("a@testing.test", "", "", "fail", "reject", "reject", forced=True),
    "two records stop discovery": Case("a@sub.twin.test", "", "", "none"),
    "psd=n is not honoured: the PSL's org domain aligns": Case(
        "a@x.dept.corp.test", "", "corp.test", "pass", "reject", "none"
    ),
    "psd=y is not honoured: no record at the PSL's org domain": Case("a@registrant.example", "", "", "none"),
    "PSL org of news.example.co.uk": Case(
        "a@news.example.co.uk", "", "example.co.uk", "pass", "reject", "none"
    ),
    "PSL: another registrant under co.uk": Case(
        "a@news.example.co.uk", "", "other.co.uk", "fail", "reject", "reject", forced=True
    ),
    "sp of the org domain": Case("a@a.b.org.test", "", "", "fail", "quarantine", "quarantine", score=5.0),
    "np still applies": Case("a@ghost.sub.test", "", "", "fail", "reject", "reject", forced=True),
    "strict": Case("a@strict.test", "", "mail.strict.test", "fail", "reject", "reject", forced=True),
}


@pytest.mark.parametrize("case", CASES_7489.values(), ids=CASES_7489.keys())
async def test_rfc7489_decision_table(make: Factory, case: Case) -> None:
    """The Public Suffix List instead of the tree walk; pct instead of t."""
    spf = spf_facts("pass", case.spf) if case.spf else spf_facts("fail", "stranger.test")
    result = await run(make(standard="7489"), tx(case.author, dkim=case.dkim, spf=spf))
    facts = result.facts
    assert (facts["dmarc.result"], facts["dmarc.policy"], facts["dmarc.disposition"]) == (
        case.result,
        case.policy,
        case.disposition,
    )
    assert facts["dmarc.mode"] == "7489"
    assert (result.action is not None) == case.forced
    assert result.score == case.score


async def test_rfc7489_asks_the_psl_org_domain_directly(make: Factory, dns: DnsServer) -> None:
    """news.example.co.uk: _dmarc at the Author Domain, then at example.co.uk, nothing else."""
    dns.reset_queries()
    await run(make(standard="7489"), tx("a@news.example.co.uk"))
    asked = {name for name, rtype in dns.queries if rtype == "TXT"}
    assert asked == {"_dmarc.news.example.co.uk", "_dmarc.example.co.uk"}


def _message_ids(selected: bool, pct: int, count: int) -> list[str]:
    ids = (f"<m{n}@pct.test>" for n in range(10_000))
    return [i for i in ids if (sample_value(i) < pct) == selected][:count]


async def test_pct_sampling_is_per_message_and_deterministic(make: Factory) -> None:
    """pct=50: selected messages get reject; the others quarantine, override sampled_out."""
    check = make(standard="7489")
    for message_id in _message_ids(True, 50, 3):
        result = await run(check, tx("a@pct.test", message_id=message_id))
        assert result.facts["dmarc.disposition"] == "reject"
        assert result.facts["dmarc.override"] == ""
        assert result.action is not None
    for message_id in _message_ids(False, 50, 3):
        result = await run(check, tx("a@pct.test", message_id=message_id))
        assert result.facts["dmarc.disposition"] == "quarantine"
        assert result.facts["dmarc.override"] == "sampled_out"
        assert result.facts["dmarc.pct"] == 50
        assert result.action is None
        assert result.score == 5.0
        again = await run(check, tx("a@pct.test", message_id=message_id))
        assert again.facts["dmarc.disposition"] == "quarantine"


def test_the_sampling_key() -> None:
    """Message-ID, else the queue id, else the hash of the message."""
    with_id = tx("a@pct.test", message_id="<x@y>", queue_id="Q1")
    assert with_id.message is not None
    assert sample_key(with_id, with_id.message) == "<x@y>"
    no_id = tx("a@pct.test", message_id="", queue_id="Q1")
    assert no_id.message is not None
    assert sample_key(no_id, no_id.message) == "Q1"
    bare = tx("a@pct.test", message_id="")
    assert bare.message is not None
    assert len(sample_key(bare, bare.message)) == 64


async def test_pct_is_ignored_in_9989_mode(make: Factory) -> None:
    """A message pct=50 would not select still gets reject in RFC 9989 mode."""
    message_id = _message_ids(False, 50, 1)[0]
    result = await run(make(), tx("a@pct.test", message_id=message_id))
    assert result.facts["dmarc.disposition"] == "reject"


async def test_a_public_suffix_list_file(make: Factory, tmp_path: Path) -> None:
    """With a list that makes org.test a suffix, a.b.org.test's org domain is b.org.test."""
    path = tmp_path / "psl.dat"
    path.write_text("test\norg.test\n")
    check = make(standard="7489", public_suffix_list=str(path))
    await check.start()
    result = await run(check, tx("a@a.b.org.test"))
    assert result.facts["dmarc.result"] == "none"  # _dmarc.b.org.test does not exist


# ---------------------------------------------------------------------------------------------
# SPF: from policyd, or computed here


async def test_spf_is_computed_when_policyd_facts_are_missing(make: Factory, dns: DnsServer) -> None:
    """No spf.* facts: SPF from the client address and sender; logged and in A-R."""
    result = await run(
        make(), tx("a@aligned.test", spf=NO_SPF, client="127.0.3.1", sender="bounce@bounce.aligned.test")
    )
    assert result.facts["dmarc.result"] == "pass"
    assert result.facts["dmarc.spf_aligned"] is True
    assert result.facts["dmarc.spf_result"] == "pass"
    assert result.log["spf_computed"] == "pass"
    assert result.auth[0].method == "spf"
    assert ar(result).startswith(
        "Authentication-Results: mx.test;\r\n"
        "\tspf=pass smtp.mailfrom=bounce@bounce.aligned.test;\r\n\tdmarc=pass"
    )


async def test_computed_spf_fail_from_a_stranger(make: Factory) -> None:
    """A client the sender domain does not designate: SPF fail, DMARC fail."""
    result = await run(make(), tx("a@aligned.test", spf=NO_SPF, client="127.0.3.99", sender="x@aligned.test"))
    assert result.facts["dmarc.spf_result"] == "fail"
    assert result.facts["dmarc.result"] == "fail"
    assert result.log["spf_computed"] == "fail"


async def test_computed_spf_for_the_null_sender_uses_helo(make: Factory) -> None:
    """The null sender's SPF identity is postmaster@HELO (RFC 7208 section 2.4)."""
    result = await run(make(), tx("a@aligned.test", spf=NO_SPF, sender="", helo="mail.aligned.test"))
    assert result.facts["dmarc.result"] == "pass"
    assert result.facts["dmarc.spf_domain"] == "mail.aligned.test"
    assert "smtp.helo=mail.aligned.test" in ar(result)


async def test_spf_is_not_computed_without_a_policy(make: Factory, dns: DnsServer) -> None:
    """No DMARC record: no SPF questions at all."""
    dns.reset_queries()
    result = await run(make(), tx("a@norecord.test", spf=NO_SPF, sender="x@norecord.test"))
    assert result.facts["dmarc.result"] == "none"
    assert ("norecord.test", "TXT") not in dns.queries
    assert "spf_computed" not in result.log


async def test_policyd_helo_identity_counts_only_for_the_null_sender(make: Factory) -> None:
    """spf.identity=helo with a real sender (HELO checked first): not a MAIL FROM pass."""
    helo_pass = spf_facts("pass", "aligned.test", "helo")
    assert (await run(make(), tx("a@aligned.test", spf=helo_pass, sender="x@other.test"))).facts[
        "dmarc.result"
    ] == "fail"
    assert (await run(make(), tx("a@aligned.test", spf=helo_pass, sender=""))).facts["dmarc.result"] == "pass"


async def test_no_client_address_no_spf(make: Factory) -> None:
    """Without XFORWARD and policyd facts SPF is unknown: DKIM alone decides."""
    transaction = tx("a@aligned.test", spf=NO_SPF, dkim="aligned.test", client="")
    assert transaction.client_ip is None
    result = await run(make(), transaction)
    assert result.facts["dmarc.result"] == "pass"
    assert result.facts["dmarc.spf_result"] == ""


# ---------------------------------------------------------------------------------------------
# temperror: our trouble, never the sender's


async def test_servfail_for_the_record_is_temperror(make: Factory, dns: DnsServer) -> None:
    """SERVFAIL at _dmarc: temperror, verdict error, no score, accepted by default."""
    dns.servfail("_dmarc.broken.test")
    result = await run(make(), tx("a@broken.test"))
    assert result.facts["dmarc.result"] == "temperror"
    assert result.verdict is Verdict.ERROR
    assert result.score == 0
    assert result.action is None
    assert "servfail" in str(result.log["error"]).lower()
    assert ar(result).startswith("Authentication-Results: mx.test;\r\n\tdmarc=temperror")


async def test_temperror_defers_when_configured(make: Factory, dns: DnsServer) -> None:
    """temperror_action = "defer": 451 4.4.3, so the sender retries."""
    dns.servfail("_dmarc.broken.test")
    result = await run(make(temperror_action="defer"), tx("a@broken.test"))
    assert result.action is not None
    assert result.action.kind is ActionKind.DEFER
    assert result.action.reply.startswith("451 4.4.3 ")


async def test_servfail_in_the_walk_is_temperror(make: Factory, dns: DnsServer) -> None:
    """A parent that cannot be asked: the walk cannot finish, temperror."""
    dns.servfail("_dmarc.org.test")
    result = await run(make(), tx("a@a.b.org.test"))
    assert result.facts["dmarc.result"] == "temperror"


async def test_servfail_for_existence_is_temperror_only_for_a_failure(make: Factory, dns: DnsServer) -> None:
    """np needs the A answer; it failing matters only when nothing aligned."""
    dns.servfail("ghost.sub.test")
    failed = await run(make(), tx("a@ghost.sub.test"))
    assert failed.facts["dmarc.result"] == "temperror"
    assert failed.action is None
    passed = await run(make(), tx("a@ghost.sub.test", dkim="sub.test"))
    assert passed.facts["dmarc.result"] == "pass"
    assert passed.facts["dmarc.policy"] == "none"  # sp, as the existence was not known


async def test_spf_temperror_for_an_aligned_domain_is_temperror(make: Factory, dns: DnsServer) -> None:
    """SPF could not be evaluated for an aligned envelope domain: not a DMARC fail."""
    dns.servfail("spf-broken.aligned.test")
    result = await run(make(), tx("a@aligned.test", spf=NO_SPF, sender="x@spf-broken.aligned.test"))
    assert result.facts["dmarc.spf_result"] == "temperror"
    assert result.facts["dmarc.result"] == "temperror"
    assert result.action is None


async def test_spf_temperror_for_an_unaligned_domain_is_still_a_fail(make: Factory) -> None:
    """policyd's SPF temperror for another domain could never have aligned: fail."""
    result = await run(make(), tx("a@aligned.test", spf=spf_facts("temperror", "other.test")))
    assert result.facts["dmarc.result"] == "fail"


async def test_a_dkim_temperror_for_an_aligned_signature_is_temperror(make: Factory) -> None:
    """dkim.results has an aligned signature whose key lookup failed: temperror, not fail."""
    facts: dict[str, LogValue] = {"dkim.results": "other.test:s1:pass aligned.test:sel:temperror"}
    result = await run(make(), tx("a@aligned.test", dkim="other.test", facts=facts))
    assert result.facts["dmarc.result"] == "temperror"
    unaligned: dict[str, LogValue] = {"dkim.results": "other.test:s1:temperror"}
    assert (await run(make(), tx("a@aligned.test", dkim="", facts=unaligned))).facts["dmarc.result"] == "fail"


async def test_a_missing_dkim_result_is_temperror_not_fail(make: Factory) -> None:
    """The dkim check gave no facts (it failed): we cannot tell, so no fail is reported."""
    result = await run(make(), tx("a@aligned.test", dkim=None))
    assert result.facts["dmarc.result"] == "temperror"
    assert "no DKIM result" in str(result.log["error"])
    passed = await run(make(), tx("a@aligned.test", dkim=None, spf=spf_facts("pass", "aligned.test")))
    assert passed.facts["dmarc.result"] == "pass"


async def test_a_timeout_is_temperror(make: Factory, dns: DnsServer) -> None:
    """No answer at all within the lifetime: temperror."""
    dns.drop("_dmarc.broken.test")
    result = await run(make(lifetime=0.3), tx("a@broken.test"))
    assert result.facts["dmarc.result"] == "temperror"


# ---------------------------------------------------------------------------------------------
# The From header


async def test_no_from_is_permerror(make: Factory) -> None:
    """No From field: no Author Domain, permerror, no policy, no score by default."""
    transaction = Transaction(
        stage=Stage.CONTENT, message=message("Subject: x"), facts={"dkim.pass_domains": ""}
    )
    result = await run(make(), transaction)
    assert result.facts["dmarc.result"] == "permerror"
    assert result.verdict is Verdict.FAIL
    assert result.score == 0
    assert result.action is None
    assert ar(result) == 'Authentication-Results: mx.test;\r\n\tdmarc=permerror reason="no From header"'


@pytest.mark.parametrize(
    "author",
    ["undisclosed-recipients:;", "Alice", "alice@[127.0.3.1]", "<alice@aligned.test"],
)
async def test_a_from_without_a_domain_is_permerror(make: Factory, author: str) -> None:
    """A group without members, no address, an address literal, broken syntax."""
    result = await run(make(permerror_score=2.0), tx(author))
    assert result.facts["dmarc.result"] == "permerror"
    assert result.facts["dmarc.from_domain"] == ""
    assert result.score == 2.0


async def test_several_author_domains_are_permerror_by_default(make: Factory) -> None:
    """Two domains in From (RFC 9989: out of scope): permerror, the count in the reason."""
    result = await run(make(), tx("a@aligned.test, b@other.test"))
    assert result.facts["dmarc.result"] == "permerror"
    assert "2 Author Domains" in str(result.log["error"])
    fields = await run(make(), tx(("a@aligned.test", "b@other.test")))
    assert fields.facts["dmarc.result"] == "permerror"


async def test_several_mailboxes_of_one_domain_are_one_author_domain(make: Factory) -> None:
    """a@ and b@ the same domain, even in two fields: evaluated normally."""
    result = await run(make(), tx("a@aligned.test, b@Aligned.test", dkim="aligned.test"))
    assert result.facts["dmarc.result"] == "pass"
    assert result.facts["dmarc.from_domain"] == "aligned.test"


async def test_strictest_evaluates_every_author_domain(make: Factory) -> None:
    """multiple_from = "strictest": the strictest failing policy decides, one A-R entry each."""
    check = make(multiple_from="strictest")
    result = await run(check, tx("a@none.test, b@aligned.test", dkim="none.test"))
    assert result.facts["dmarc.result"] == "fail"
    assert result.facts["dmarc.from_domain"] == "aligned.test"
    assert result.action is not None and result.action.kind is ActionKind.REJECT
    assert [a.result for a in result.auth] == ["pass", "fail"]
    both = await run(check, tx("a@none.test, b@aligned.test", dkim="none.test aligned.test"))
    assert both.facts["dmarc.result"] == "pass"
    too_many = ", ".join(f"a@d{n}.test" for n in range(6))
    assert (await run(check, tx(too_many))).facts["dmarc.result"] == "permerror"


async def test_the_idn_author_domain_is_written_in_a_labels(make: Factory) -> None:
    """header.from carries the A-label form."""
    result = await run(make(), tx("Olaf <olaf@bücher.test>"))
    assert result.facts["dmarc.from_domain"] == "xn--bcher-kva.test"
    assert "header.from=xn--bcher-kva.test" in ar(result)


async def test_authenticated_and_internal_mail_is_skipped(make: Factory, dns: DnsServer) -> None:
    """A SASL login or a skip_networks client: ours going out, no DNS, no facts."""
    check = make(skip_networks=("127.0.3.0/24",))
    dns.reset_queries()
    spoofy = tx("a@aligned.test", client="192.0.2.1")
    authenticated = Transaction(
        stage=Stage.CONTENT,
        client_ip=spoofy.client_ip,
        sasl_username="alice",
        facts=spoofy.facts,
        message=spoofy.message,
    )
    result = await run(check, authenticated)
    assert result.verdict is Verdict.SKIP
    assert result.log == {"skipped": "authenticated"}
    assert result.facts == {}
    internal = await run(check, tx("a@aligned.test", client="127.0.3.7"))
    assert internal.verdict is Verdict.SKIP
    assert internal.log == {"skipped": "network"}
    assert not dns.queries
    outside = await run(check, tx("a@aligned.test", client="192.0.2.1"))
    assert outside.facts["dmarc.result"] == "fail"


async def test_an_author_domain_too_long_for_a_dmarc_name_has_no_policy(make: Factory) -> None:
    """A 250-character domain: "_dmarc." would pass DNS's 253, so there is no record: none."""
    long_domain = ".".join(["a" * 61] * 4) + ".test"
    assert len(long_domain) > 246
    result = await run(make(), tx(f"x@{long_domain}"))
    assert result.facts["dmarc.result"] == "none"


async def test_no_message_is_skipped(make: Factory) -> None:
    """Outside the content stage there is nothing to look at."""
    result = await run(make(), Transaction(stage=Stage.RCPT))
    assert result.verdict is Verdict.SKIP


# ---------------------------------------------------------------------------------------------
# Policy actions


async def test_reject_action_quarantine_treats_p_reject_as_quarantine(make: Factory) -> None:
    """reject_action = "quarantine": p=reject scores like p=quarantine (RFC 9989 section 8.4)."""
    result = await run(make(reject_action="quarantine"), tx("a@aligned.test"))
    assert result.action is None
    assert result.score == 5.0
    assert result.facts["dmarc.disposition"] == "reject"
    assert result.reason == "Email rejected per DMARC policy for aligned.test"


async def test_quarantine_action_reject_refuses(make: Factory) -> None:
    """quarantine_action = "reject": p=quarantine is a forced refusal too."""
    result = await run(make(quarantine_action="reject", quarantine_score=7.0), tx("a@quar.test"))
    assert result.action is not None and result.action.kind is ActionKind.REJECT
    assert result.score == 0


async def test_reply_code_and_text_are_configurable(make: Factory) -> None:
    """reject_code, reject_dsn and reject_text with both placeholders."""
    check = make(reject_code=554, reject_dsn="5.7.26", reject_text="DMARC: {domain} via {policy_domain}")
    result = await run(check, tx("a@a.b.org.test"))
    assert result.action is None  # sp=quarantine scores
    result = await run(check, tx("a@ghost.sub.test"))
    assert result.action is not None
    assert result.action.reply == "554 5.7.26 DMARC: ghost.sub.test via sub.test"


async def test_pass_score(make: Factory) -> None:
    """pass_score is added on pass."""
    result = await run(make(pass_score=-1.5), tx("a@aligned.test", dkim="aligned.test"))
    assert result.score == -1.5


# ---------------------------------------------------------------------------------------------
# Overrides (local policy)


async def test_a_trusted_arc_sealer_overrides_a_fail(make: Factory) -> None:
    """arc.cv=pass and a trusted sealer: the fail is not enforced, override trusted_arc."""
    facts: dict[str, LogValue] = {"arc.cv": "pass", "arc.sealers": "lists.other.test forwarder.test"}
    result = await run(make(trusted_arc_sealers=("forwarder.test",)), tx("a@aligned.test", facts=facts))
    assert result.facts["dmarc.result"] == "fail"
    assert result.facts["dmarc.policy"] == "reject"
    assert result.facts["dmarc.disposition"] == "none"
    assert result.facts["dmarc.override"] == "trusted_arc"
    assert result.action is None and result.score == 0
    assert 'reason="policy reject, disposition none (trusted_arc)"' in ar(result)


@pytest.mark.parametrize(
    "facts",
    [
        {"arc.cv": "fail", "arc.sealers": "forwarder.test"},
        {"arc.cv": "pass", "arc.sealers": "stranger.test"},
        {"arc.cv": "pass"},
        {},
    ],
)
async def test_arc_without_a_valid_trusted_seal_changes_nothing(
    make: Factory, facts: dict[str, LogValue]
) -> None:
    """A failed chain or an untrusted sealer: the policy stands."""
    result = await run(make(trusted_arc_sealers=("forwarder.test",)), tx("a@aligned.test", facts=facts))
    assert result.facts["dmarc.override"] == ""
    assert result.action is not None


async def test_a_forwarder_network_overrides(make: Factory) -> None:
    """The client is a listed forwarder: override forwarded."""
    result = await run(make(forwarder_networks=("127.0.3.60/32",)), tx("a@aligned.test", client="127.0.3.60"))
    assert result.facts["dmarc.override"] == "forwarded"
    assert result.action is None
    other = await run(make(forwarder_networks=("127.0.3.60/32",)), tx("a@aligned.test", client="127.0.3.99"))
    assert other.facts["dmarc.override"] == ""


async def test_a_forwarder_domain_needs_an_spf_pass(make: Factory) -> None:
    """The envelope sender domain is listed and SPF passed for it; a forged one does not count."""
    check = make(forwarder_domains=("fwd.test",))
    passed = await run(check, tx("a@aligned.test", spf=NO_SPF, client="127.0.3.60", sender="srs@fwd.test"))
    assert passed.facts["dmarc.override"] == "forwarded"
    forged = await run(check, tx("a@aligned.test", spf=NO_SPF, client="127.0.3.99", sender="srs@fwd.test"))
    assert forged.facts["dmarc.override"] == ""
    assert forged.action is not None


async def test_a_mailing_list_overrides_when_its_list_id_is_authenticated(make: Factory) -> None:
    """List-Id listed and the list's domain passed DKIM or SPF: override local_policy."""
    check = make(mailing_lists=("dev.list.test",))
    headers = ("List-Id: Developers <dev.list.test>",)
    by_dkim = await run(check, tx("a@aligned.test", dkim="list.test", headers=headers))
    assert by_dkim.facts["dmarc.override"] == "local_policy"
    by_spf = await run(check, tx("a@aligned.test", spf=spf_facts("pass", "list.test"), headers=headers))
    assert by_spf.facts["dmarc.override"] == "local_policy"
    forged = await run(check, tx("a@aligned.test", dkim="other.test", headers=headers))
    assert forged.facts["dmarc.override"] == ""
    unlisted = await run(
        check, tx("a@aligned.test", dkim="list.test", headers=("List-Id: <other.list.test>",))
    )
    assert unlisted.facts["dmarc.override"] == ""


async def test_overrides_do_not_touch_p_none_or_pass(make: Factory) -> None:
    """Nothing to override for p=none failures and for passes."""
    check = make(forwarder_networks=("127.0.3.0/24",))
    assert (await run(check, tx("a@none.test"))).facts["dmarc.override"] == ""
    assert (await run(check, tx("a@aligned.test", dkim="aligned.test"))).facts["dmarc.override"] == ""


async def test_a_local_override_wins_over_sampled_out(make: Factory) -> None:
    """pct sampled the message out and it came from a forwarder: the override says forwarded."""
    message_id = _message_ids(False, 50, 1)[0]
    check = make(standard="7489", forwarder_networks=("127.0.3.1",))
    result = await run(check, tx("a@pct.test", message_id=message_id))
    assert result.facts["dmarc.override"] == "forwarded"
    assert result.facts["dmarc.disposition"] == "none"


# ---------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    ("table", "message_part"),
    [
        ({"standard": "2015"}, "standard"),
        ({"reject_action": "bounce"}, "reject_action"),
        ({"quarantine_action": "quarantine"}, "quarantine_action"),
        ({"temperror_action": "reject"}, "temperror_action"),
        ({"multiple_from": "first"}, "multiple_from"),
        ({"reject_code": 451}, "reject_code"),
        ({"reject_dsn": "4.7.1"}, "reject_dsn"),
        ({"reject_text": "rejected {sender}"}, "unknown placeholder"),
        ({"reject_text": "bad {"}, "reject_text"),
        ({"reject_text": " "}, "reject_text"),
        ({"forwarder_networks": ["300.1.2.3"]}, "forwarder_networks"),
        ({"skip_networks": ["not a network"]}, "skip_networks"),
        ({"trusted_arc_sealers": ["/(/"]}, "trusted_arc_sealers"),
        ({"mailing_lists": [""]}, "mailing_lists"),
        ({"public_suffix_list": "/nonexistent/psl.dat"}, "public_suffix_list"),
        ({"quarantine_score": float("nan")}, "quarantine_score"),
        ({"report": True}, "unknown key"),
    ],
)
def test_bad_options_are_clear_config_errors(table: dict[str, Any], message_part: str) -> None:
    """Every bad option names itself."""
    with pytest.raises(ConfigError, match=message_part):
        build_settings(Options, table, source="mxward.toml", table="checks.dmarc")


def test_default_options_load() -> None:
    """The defaults are the documented ones."""
    options = build_settings(Options, {}, source="mxward.toml", table="checks.dmarc")
    assert options == Options()
    assert (options.standard, options.reject_action, options.quarantine_action) == ("9989", "reject", "score")


def test_the_common_mode_key_and_the_standard_option_are_apart() -> None:
    """[checks.dmarc] mode is enforce/observe (the pipeline's); standard picks the RFC."""
    data = {
        "filter": {"checks": ["dmarc"]},
        "checks": {"dmarc": {"mode": "observe", "standard": "7489", "timeout": "3s"}},
    }
    config = parse_config(data, source="mxward.toml", resolve_check=resolve_check)
    dmarc = config.filter_checks["dmarc"]
    assert dmarc.common.mode == "observe"
    assert dmarc.common.timeout == 3.0
    assert dmarc.options.standard == "7489"
    default = parse_config({"filter": {"checks": ["dmarc"]}}, source="", resolve_check=resolve_check)
    assert default.filter_checks["dmarc"].common.timeout == 10.0


def test_dmarc_is_a_builtin_content_check_that_needs_dkim() -> None:
    """Registered; it needs dkim.pass_domains and provides the agreed facts."""
    assert DmarcCheck in CHECKS
    assert DmarcCheck.needs == ("dkim.pass_domains",)
    assert DmarcCheck.stages == frozenset({Stage.CONTENT})
    for fact in ("dmarc.result", "dmarc.disposition", "dmarc.override", "dmarc.rua", "dmarc.mode"):
        assert fact in DmarcCheck.provides


class _DkimFacts(Check[Any]):
    """Stands where the dkim check runs: provides its facts from the transaction's headers."""

    name = "dkimfacts"
    stages = frozenset({Stage.CONTENT})
    provides = ("dkim.pass_domains",)

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        assert tx.message is not None
        return self.result(Verdict.PASS, facts={"dkim.pass_domains": tx.message.get("X-Test-Dkim") or ""})


async def test_the_pipeline_refuses_dmarc_without_a_dkim_check_before_it(make: Factory) -> None:
    """needs: dmarc alone, or before the provider, is a configuration error."""
    check = make()
    with pytest.raises(ValueError, match=r"needs \['dkim.pass_domains'\]"):
        Pipeline(
            [ActiveCheck(check=cast("Check[Any]", check), timeout=5.0)],
            PipelineSettings(reject_stage=Stage.CONTENT),
        )
    provider = _DkimFacts(None, check.services)
    with pytest.raises(ValueError, match="needs"):
        Pipeline(
            [
                ActiveCheck(check=cast("Check[Any]", check), timeout=5.0),
                ActiveCheck(check=provider, timeout=5.0),
            ],
            PipelineSettings(reject_stage=Stage.CONTENT),
        )


async def test_through_the_pipeline_a_fail_becomes_the_decision(make: Factory) -> None:
    """After the DKIM facts' provider, dmarc's forced refusal is the pipeline's decision."""
    check = make()
    provider = _DkimFacts(None, check.services)
    pipeline = Pipeline(
        [ActiveCheck(check=provider, timeout=5.0), ActiveCheck(check=cast("Check[Any]", check), timeout=5.0)],
        PipelineSettings(reject_stage=Stage.CONTENT),
    )
    spoofed = tx("a@aligned.test", dkim=None, headers=("X-Test-Dkim: other.test",))
    results = await pipeline.run([Stage.CONTENT], spoofed, asyncio.get_running_loop().time() + 10)
    decision = pipeline.decide(Stage.CONTENT, results)
    assert decision.action.kind is ActionKind.REJECT
    assert decision.action.reply == "550 5.7.1 Email rejected per DMARC policy for aligned.test"
    signed = tx("a@aligned.test", dkim=None, headers=("X-Test-Dkim: aligned.test",))
    results = await pipeline.run([Stage.CONTENT], signed, asyncio.get_running_loop().time() + 10)
    assert pipeline.decide(Stage.CONTENT, results).action.kind is ActionKind.DUNNO


# ---------------------------------------------------------------------------------------------
# Aggregate report records (the after-hook)


def _decision(result: Result) -> Decision:
    action = result.action or Action(ActionKind.DUNNO)
    return Decision(action=action, score=result.score, results=(result,), stage=Stage.CONTENT)


@pytest.fixture
def reports_module(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[Any, Transaction, dict[str, LogValue], float]]:
    """A stand-in for mxward.contentfilter.dmarcreports that records its calls (the contract)."""
    calls: list[tuple[Any, Transaction, dict[str, LogValue], float]] = []
    module = types.ModuleType("mxward.contentfilter.dmarcreports")

    async def record_evaluation(
        state: Any, tx: Transaction, facts: Mapping[str, LogValue], *, now: float
    ) -> None:
        if facts.get("dmarc.from_domain") == "broken.example":
            raise RuntimeError("state store down")
        calls.append((state, tx, dict(facts), now))

    module.record_evaluation = record_evaluation  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mxward.contentfilter.dmarcreports", module)
    return calls


async def test_after_records_passes_and_fails_when_reports_are_on(
    make: Factory, reports_module: list[tuple[Any, Transaction, dict[str, LogValue], float]]
) -> None:
    """reports = true: record_evaluation(state, tx, facts, now=clock) for pass and fail only."""
    check = make(reports=True)
    for transaction in (
        tx("a@aligned.test", dkim="aligned.test"),
        tx("a@aligned.test"),
        tx("a@norecord.test"),
    ):
        result = await run(check, transaction)
        await check.after(transaction, _decision(result))
    assert [c[2]["dmarc.result"] for c in reports_module] == ["pass", "fail"]
    state, _, facts, now = reports_module[0]
    assert state is check.services.state
    assert now == NOW
    assert facts["dmarc.rua"] == "mailto:dmarc@aligned.test mailto:agg@reports.test"


async def test_after_does_nothing_when_reports_are_off(
    make: Factory, reports_module: list[tuple[Any, Transaction, dict[str, LogValue], float]]
) -> None:
    """The default: nothing recorded."""
    check = make()
    transaction = tx("a@aligned.test")
    await check.after(transaction, _decision(await run(check, transaction)))
    assert reports_module == []


async def test_after_never_raises(
    make: Factory,
    reports_module: list[tuple[Any, Transaction, dict[str, LogValue], float]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failing recorder is logged, not raised."""
    check = make(reports=True)
    result = await run(check, tx("a@aligned.test"))
    broken = Result(
        check="dmarc", verdict=Verdict.FAIL, facts={**result.facts, "dmarc.from_domain": "broken.example"}
    )
    with caplog.at_level(logging.WARNING):
        await check.after(tx("a@aligned.test"), _decision(broken))
    assert "dmarc report record not stored: RuntimeError: state store down" in caplog.text


async def test_after_without_the_reports_module(make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reports module not installed: nothing happens, nothing raises."""
    monkeypatch.setitem(sys.modules, "mxward.contentfilter.dmarcreports", cast("types.ModuleType", None))
    check = make(reports=True)
    transaction = tx("a@aligned.test")
    await check.after(transaction, _decision(await run(check, transaction)))
