"""dmarc's building blocks without DNS: records, Author Domains, tree-walk names, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest

from mxward.contentfilter.dmarclib import (
    MAX_WALK_QUERIES,
    DmarcRecord,
    author_domains,
    is_dmarc_record,
    load_public_suffix_list,
    lower_policy,
    normalize_domain,
    parse_record,
    sample_value,
    sampled,
    select_organizational_domain,
    walk_names,
)

# ---------------------------------------------------------------------------------------------
# Records


@pytest.mark.parametrize(
    "text",
    [
        "v=DMARC1; p=reject",
        "v=DMARC1",
        "v=DMARC1;",
        "V = DMARC1 ; p=none",
        " v=DMARC1;p=none",
    ],
)
def test_a_record_starts_with_v_dmarc1(text: str) -> None:
    """v=DMARC1 first (tag name in any case, spaces around '=') makes a DMARC record."""
    assert is_dmarc_record(text)
    assert parse_record(text) is not None


@pytest.mark.parametrize(
    "text",
    [
        "p=reject; v=DMARC1",
        "v=dmarc1; p=reject",
        "v=DMARC2; p=reject",
        "v=DMARC10; p=reject",
        "v=spf1 -all",
        "",
        "v=DMARC1x",
    ],
)
def test_anything_else_is_not_a_dmarc_record(text: str) -> None:
    """v not first, a version other than exactly DMARC1 (case-sensitive): not a record."""
    assert parse_record(text) is None


def test_tags_and_values_are_read_case_insensitively() -> None:
    """Tag names and keyword values are RFC 5234 strings: any case."""
    record = parse_record("v=DMARC1; P=Reject; SP=QUARANTINE; NP=None; ADKIM=S; ASPF=s; PSD=N; T=Y")
    assert record is not None
    assert (record.p, record.sp, record.np) == ("reject", "quarantine", "none")
    assert (record.adkim, record.aspf, record.psd, record.t) == ("s", "s", "n", "y")
    assert record.has_policy


def test_defaults_for_absent_tags() -> None:
    """adkim/aspf r, psd u, t n, pct 100, fo 0, no sp/np, no URIs."""
    record = parse_record("v=DMARC1; p=none")
    assert record == DmarcRecord(raw="v=DMARC1; p=none", p="none")


def test_invalid_values_fall_back_to_defaults_and_are_noted() -> None:
    """Syntax errors in optional tags give the default values (RFC 9989 section 4.7)."""
    record = parse_record("v=DMARC1; p=reject; adkim=x; aspf=strict; pct=abc; t=maybe; psd=q; fo=z")
    assert record is not None
    assert record.p == "reject"
    assert (record.adkim, record.aspf, record.pct, record.t, record.psd, record.fo) == (
        "r",
        "r",
        100,
        "n",
        "u",
        "0",
    )
    assert set(record.problems) == {"bad adkim=", "bad aspf=", "bad pct=", "bad t=", "bad psd=", "bad fo="}


def test_unknown_tags_and_junk_are_ignored() -> None:
    """Unknown tags (and parts that are no tag) do not spoil the record."""
    record = parse_record("v=DMARC1; p=quarantine; foo=bar; x-new=1; ;; nonsense; ri=86400")
    assert record is not None
    assert record.p == "quarantine"
    assert record.problems == ("bad tag 'x-new=1'", "bad tag 'nonsense'")


def test_a_repeated_tag_counts_with_its_first_value() -> None:
    """p=reject; p=none keeps reject."""
    record = parse_record("v=DMARC1; p=reject; p=none")
    assert record is not None and record.p == "reject"


def test_pct_and_fo_values() -> None:
    """pct 0..100 (else 100); fo a colon-separated list of 0, 1, d, s."""
    assert parse_record("v=DMARC1; p=reject; pct=0").pct == 0  # type: ignore[union-attr]
    assert parse_record("v=DMARC1; p=reject; pct=101").pct == 100  # type: ignore[union-attr]
    assert parse_record("v=DMARC1; p=reject; pct=-5").pct == 100  # type: ignore[union-attr]
    assert parse_record("v=DMARC1; p=reject; fo=d:S").fo == "d:s"  # type: ignore[union-attr]


def test_report_uris_are_split_and_size_suffixes_dropped() -> None:
    """rua/ruf are comma-separated URIs; RFC 7489's !size is removed; non-URIs are dropped."""
    record = parse_record(
        "v=DMARC1; p=none; rua=mailto:a@example.com!10m, mailto:b@example.net ,not a uri,"
        " https://r.example/x; ruf=mailto:f@example.com"
    )
    assert record is not None
    assert record.rua == ("mailto:a@example.com", "mailto:b@example.net", "https://r.example/x")
    assert record.ruf == ("mailto:f@example.com",)
    assert "bad rua URI" in record.problems


@pytest.mark.parametrize(
    ("text", "effective_p"),
    [
        ("v=DMARC1; p=reject", "reject"),
        ("v=DMARC1; rua=mailto:d@example.com", "none"),  # no p, a rua: p=none
        ("v=DMARC1; p=bogus; rua=mailto:d@example.com", "none"),
        ("v=DMARC1; p=reject; sp=maybe; rua=mailto:d@example.com", "none"),
        ("v=DMARC1; p=reject; np=x; rua=mailto:d@example.com", "none"),
        ("v=DMARC1", None),  # no p and no rua: no DMARC processing
        ("v=DMARC1; p=bogus", None),
        ("v=DMARC1; p=reject; sp=maybe", None),
        ("v=DMARC1; p=none; rua=not-a-uri", "none"),
        ("v=DMARC1; rua=not-a-uri", None),
    ],
)
def test_records_without_a_valid_policy(text: str, effective_p: str | None) -> None:
    """RFC 9989 section 4.10.1: no valid p (or a bad sp/np) is p=none with a rua, else nothing."""
    record = parse_record(text)
    assert record is not None
    effective = record.effective()
    if effective_p is None:
        assert effective is None
    else:
        assert effective is not None and effective.p == effective_p
        if effective_p == "none" and record.p != "none":
            assert effective.sp is None and effective.np is None


def test_an_overlong_txt_value_is_not_read() -> None:
    """A record of several kilobytes is not parsed (no work for junk)."""
    assert parse_record("v=DMARC1; p=reject; " + "x" * 5000) is None


def test_lower_policy() -> None:
    """reject -> quarantine -> none (t=y and pct)."""
    assert lower_policy("reject") == "quarantine"
    assert lower_policy("quarantine") == "none"
    assert lower_policy("none") == "none"


# ---------------------------------------------------------------------------------------------
# Author Domains


@pytest.mark.parametrize(
    ("value", "domains"),
    [
        ("alice@example.com", ("example.com",)),
        ("Alice <alice@Example.COM>", ("example.com",)),
        ('"Smith, Alice (HR)" <alice@example.com>', ("example.com",)),
        ('"a@evil.example"@example.com', ("example.com",)),
        ("alice@example.com (Alice <alice@evil.example>)", ("example.com",)),
        ("(comment (nested)) Alice <alice @ example . com>", ("example.com",)),
        ("<@relay.example,@other.example:alice@example.com>", ("example.com",)),
        ("a@example.com, b@example.com", ("example.com",)),
        ("a@example.com, b@example.net", ("example.com", "example.net")),
        ("Team: a@example.com, b@example.org;", ("example.com", "example.org")),
        ("a@example.com,, ,b@example.com", ("example.com",)),
        ("Ölaf <olaf@bücher.example>", ("xn--bcher-kva.example",)),
        ("olaf@xn--bcher-kva.example", ("xn--bcher-kva.example",)),
        ("alice@mail_gw.example.com", ("mail_gw.example.com",)),
    ],
)
def test_author_domains_are_read_from_the_address(value: str, domains: tuple[str, ...]) -> None:
    """The domain of each mailbox (never of display names or comments), normalised, once."""
    found = author_domains([value])
    assert found.error == ""
    assert found.domains == domains


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ([], "no From header"),
        ([""], "From header: no address"),
        (["undisclosed-recipients:;"], "From header: no address"),
        (["Alice"], "From header: mailbox without a domain"),
        (["alice@[192.0.2.1]"], "From header: address literal: no domain name"),
        (["alice@"], "From header: bad domain"),
        (["@example.com"], "From header: bad local part"),
        (["alice@example..com"], "From header: bad domain"),
        (["Alice <alice@example.com"], "From header: unclosed '<'"),
        (['"Alice <alice@example.com>'], "From header: unclosed quoted string"),
        (["alice@exa mple.com"], "From header: bad domain"),
        (["alice@example.123"], "From header: domain is not a DNS name"),
        (["alice@" + "a" * 64 + ".example"], "From header: domain is not a DNS name"),
        (["a@example.com", "b@"], "From header: bad domain"),
    ],
)
def test_from_fields_without_an_author_domain(values: list[str], error: str) -> None:
    """No field, no address, an address literal or bad syntax: no Author Domain, and why."""
    found = author_domains(values)
    assert found.domains == ()
    assert found.error == error


def test_several_from_fields_are_read_together() -> None:
    """Two From fields: the domains of both (a repeated field is not a way around DMARC)."""
    found = author_domains(["a@example.com", "b@example.net"])
    assert found.domains == ("example.com", "example.net")
    assert found.mailboxes == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Example.COM.", "example.com"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        ("", None),
        ("exa mple.com", None),
        ("-bad.example", None),
        ("192.0.2.1", None),
        ("a" * 250 + ".example", None),
    ],
)
def test_normalize_domain(text: str, expected: str | None) -> None:
    """Lower case, A-labels, no trailing dot; None for what is no DNS host name."""
    assert normalize_domain(text) == expected


# ---------------------------------------------------------------------------------------------
# Tree walk and Organizational Domain (RFC 9989 section 4.10)


def test_walk_names_of_a_short_domain_go_one_label_at_a_time() -> None:
    """a.mail.example.com: itself, then every parent down to the top-level label."""
    assert walk_names("a.mail.example.com") == [
        "a.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]
    assert walk_names("com") == ["com"]


def test_walk_names_of_a_long_domain_are_cut_to_seven_labels() -> None:
    """RFC 9989's example: 13 labels give exactly 8 questions, the second at 7 labels."""
    names = walk_names("a.b.c.d.e.f.g.h.i.j.mail.example.com")
    assert names == [
        "a.b.c.d.e.f.g.h.i.j.mail.example.com",
        "g.h.i.j.mail.example.com",
        "h.i.j.mail.example.com",
        "i.j.mail.example.com",
        "j.mail.example.com",
        "mail.example.com",
        "example.com",
        "com",
    ]
    for labels in range(1, 40):
        assert len(walk_names(".".join(["x"] * labels))) <= MAX_WALK_QUERIES


def test_a_name_of_eight_labels_walks_from_its_parent() -> None:
    """x = 8: the parent (7 labels) either way."""
    names = walk_names("1.2.3.4.5.6.7.com")
    assert names[1] == "2.3.4.5.6.7.com"
    assert len(names) == 8


def _rec(text: str) -> DmarcRecord:
    record = parse_record(text)
    assert record is not None
    return record


@pytest.mark.parametrize(
    ("found", "org"),
    [
        # RFC 9989's examples for a.mail.example.com
        ([("mail.example.com", "v=DMARC1; p=none"), ("example.com", "v=DMARC1; p=none")], "example.com"),
        ([("mail.example.com", "v=DMARC1; p=none; psd=n")], "mail.example.com"),
        ([("com", "v=DMARC1; p=none; psd=y")], "example.com"),
        # no record at all: the name is its own Organizational Domain
        ([], "a.mail.example.com"),
        # a psd=y record at the starting name does not count as a PSD
        ([("a.mail.example.com", "v=DMARC1; p=none; psd=y")], "a.mail.example.com"),
        # a plain record below a PSD: the name one label below the PSD
        ([("mail.example.com", "v=DMARC1; p=none"), ("com", "v=DMARC1; p=none; psd=y")], "example.com"),
    ],
)
def test_organizational_domain_selection(found: list[tuple[str, str]], org: str) -> None:
    """psd=n, then psd=y (one label below), then the record with the fewest labels."""
    records = [(name, _rec(text)) for name, text in found]
    assert select_organizational_domain("a.mail.example.com", records) == org


# ---------------------------------------------------------------------------------------------
# pct sampling


def test_sampling_is_deterministic_and_follows_pct() -> None:
    """The same key always gets the same answer; pct 0 and 100 are never and always."""
    keys = [f"<{n}@example.com>" for n in range(2000)]
    values = [sample_value(k) for k in keys]
    assert values == [sample_value(k) for k in keys]
    assert all(0 <= v < 100 for v in values)
    assert not any(sampled(0, k) for k in keys)
    assert all(sampled(100, k) for k in keys)
    share = sum(sampled(30, k) for k in keys) / len(keys)
    assert 0.25 < share < 0.35
    assert all(sampled(30, k) == (sample_value(k) < 30) for k in keys)


# ---------------------------------------------------------------------------------------------
# The Public Suffix List


def test_the_shipped_public_suffix_list_knows_two_label_suffixes() -> None:
    """co.uk is a suffix: the Organizational Domain of news.example.co.uk is example.co.uk."""
    psl = load_public_suffix_list()
    assert psl.privatesuffix("news.example.co.uk") == "example.co.uk"
    assert psl.privatesuffix("a.b.example.com") == "example.com"


def test_a_public_suffix_list_file_can_be_given(tmp_path: Path) -> None:
    """An operator's own copy of the list is read instead of the packaged one."""
    path = tmp_path / "psl.dat"
    path.write_text("// test list\ncom\nbig.com\n")
    psl = load_public_suffix_list(str(path))
    assert psl.privatesuffix("a.shop.big.com") == "shop.big.com"
