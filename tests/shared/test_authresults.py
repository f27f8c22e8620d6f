"""Authentication-Results (RFC 8601): one safe field built from any input, and the fields that
claim our authserv-id found for removal.

The round-trip tests read what was built with a small parser written here from RFC 8601's
grammar, independent of the module under test.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import pytest

from mxward.shared.authresults import (
    MAX_VALUE,
    AuthResult,
    authserv_id_of,
    build_header,
    claims_authserv_id,
    ours,
)

SPF = AuthResult("spf", "pass", properties=(("smtp.mailfrom", "example.com"),))
IPREV = AuthResult("iprev", "pass", properties=(("policy.iprev", "192.0.2.1"),))
DKIM = AuthResult(
    "dkim",
    "fail",
    reason="signature did not verify",
    properties=(("header.d", "example.com"), ("header.s", "sel"), ("header.b", "abcdEFGH")),
)


# ---------------------------------------------------------------------------------------------
# An independent reader: unfold, tokenise (quoted-strings, comments), split at ";"


@dataclass
class Parsed:
    authserv_id: str
    entries: list[tuple[str, str, str | None, list[tuple[str, str]]]]


def _tokens(text: str) -> list[str]:
    """Words, quoted-strings (kept with a leading '"' marker) and the specials ; = ."""
    out: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in " \t":
            i += 1
        elif c == "(":
            depth = 0
            while True:
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
        elif c == '"':
            j, buf = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                buf.append(text[j])
                j += 1
            out.append('"' + "".join(buf))
            i = j + 1
        elif c in ";=":
            out.append(c)
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in ' \t;=()"':
                j += 1
            out.append(text[i:j])
            i = j
    return out


def parse_field(field: str) -> Parsed:
    name, _, value = field.partition(":")
    assert name == "Authentication-Results"
    assert "\r\n" not in value.replace("\r\n\t", ""), "every line break is a fold"
    tokens = _tokens(value.replace("\r\n", ""))
    groups: list[list[str]] = [[]]
    for token in tokens:
        if token == ";":
            groups.append([])
        else:
            groups[-1].append(token)
    head = groups[0]
    assert len(head) == 1
    authserv = head[0].lstrip('"')
    entries: list[tuple[str, str, str | None, list[tuple[str, str]]]] = []
    if groups[1:] == [["none"]]:
        return Parsed(authserv, entries)
    for group in groups[1:]:
        assert len(group) % 3 == 0 and all(group[k] == "=" for k in range(1, len(group), 3)), group
        pairs = [(group[k], group[k + 2]) for k in range(0, len(group), 3)]
        (method, result), rest = pairs[0], pairs[1:]
        reason = None
        if rest and rest[0][0] == "reason":
            reason = rest[0][1].removeprefix('"')
            rest = rest[1:]
        props = [(key, val.removeprefix('"')) for key, val in rest]
        assert all("." in key for key, _ in props)
        entries.append((method, result.removeprefix('"'), reason, props))
    return Parsed(authserv, entries)


def lines(field: str) -> list[str]:
    return field.split("\r\n")


# ---------------------------------------------------------------------------------------------
# building


def test_examples_are_written_one_entry_per_line() -> None:
    """SPF, iprev and DKIM entries each start a folded line, in the order given."""
    field = build_header("mx.example.org", [SPF, IPREV, DKIM])
    assert field == (
        "Authentication-Results: mx.example.org;\r\n"
        "\tspf=pass smtp.mailfrom=example.com;\r\n"
        "\tiprev=pass policy.iprev=192.0.2.1;\r\n"
        '\tdkim=fail reason="signature did not verify" header.d=example.com header.s=sel\r\n'
        "\t  header.b=abcdEFGH"
    )


def test_no_results_say_none() -> None:
    """An empty list gives the RFC 8601 'none' form."""
    assert build_header("mx.example.org", []) == "Authentication-Results: mx.example.org; none"


def test_round_trip_of_the_examples() -> None:
    """The independent reader gets every method, result, reason and property back."""
    parsed = parse_field(build_header("mx.example.org", [SPF, IPREV, DKIM]))
    assert parsed.authserv_id == "mx.example.org"
    assert parsed.entries == [
        ("spf", "pass", None, [("smtp.mailfrom", "example.com")]),
        ("iprev", "pass", None, [("policy.iprev", "192.0.2.1")]),
        (
            "dkim",
            "fail",
            "signature did not verify",
            [("header.d", "example.com"), ("header.s", "sel"), ("header.b", "abcdEFGH")],
        ),
    ]


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("example.com", "example.com"),
        ("user@example.com", "user@example.com"),
        ("first.last+tag@mail.example.com", "first.last+tag@mail.example.com"),
        ("@example.com", "@example.com"),
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", '"2001:db8::1"'),
        ("exa;mple.com", '"exa;mple.com"'),
        ('ex"ample.com', '"ex\\"ample.com"'),
        ("ex(ample).com", '"ex(ample).com"'),
        ("back\\slash", '"back\\\\slash"'),
        ("two words", '"two words"'),
        ('"quoted local"@example.com', '"\\"quoted local\\"@example.com"'),
        ("user@exa_mple.com", '"user@exa_mple.com"'),
        ("", '""'),
    ],
)
def test_values_are_tokens_addresses_or_quoted_strings(value: str, written: str) -> None:
    """Tokens and local-part@domain stay bare; anything else is a quoted-string with escapes."""
    field = build_header("mx", [AuthResult("spf", "pass", properties=(("smtp.mailfrom", value),))])
    assert field.endswith(f"smtp.mailfrom={written}")


@pytest.mark.parametrize(
    "value",
    [
        'evil.example"; dkim=pass header.d=bank.example',
        "x); dkim=pass (",
        "a\\",
        "a=b;c=d",
        'with\\"both',
    ],
)
def test_printable_values_round_trip_exactly(value: str) -> None:
    """Quotes, semicolons, parentheses and backslashes come back as they went in: nothing leaks
    out of the value into the field's structure."""
    result = AuthResult("dkim", "fail", reason=value, properties=(("header.d", value),))
    parsed = parse_field(build_header("mx.example.org", [result, SPF]))
    assert parsed.entries[0] == ("dkim", "fail", value, [("header.d", value)])
    assert parsed.entries[1][0] == "spf"


@pytest.mark.parametrize(
    ("mailfrom", "written"),
    [
        ("example.com\r\nX-Injected: yes", "example.com X-Injected: yes"),
        ("example.com\nX-Injected: yes", "example.com X-Injected: yes"),
        ("example.com\rX-Injected: yes", "example.com X-Injected: yes"),
        ("example.com\r\n\r\nbody", "example.com body"),
        ("example.com\x00\x01\x1b[31m\x7f", "example.com???[31m?"),
        ("example.com\u2028X-Injected: yes", "example.com X-Injected: yes"),
        ("example.com\x85X-Injected: yes", "example.com X-Injected: yes"),
    ],
)
def test_line_breaks_and_controls_cannot_be_injected(mailfrom: str, written: str) -> None:
    """CR, LF, NUL and other controls never reach the field: the only line breaks are folds."""
    field = build_header(
        "mx.example.org", [AuthResult("spf", "fail", properties=(("smtp.mailfrom", mailfrom),))]
    )
    for line in lines(field)[1:]:
        assert line.startswith("\t")
    for char in field.replace("\r\n\t", ""):
        assert 0x20 <= ord(char) <= 0x7E, repr(char)
    parsed = parse_field(field)
    assert parsed.entries[0][3] == [("smtp.mailfrom", written)]


def test_white_space_runs_become_one_space() -> None:
    """CR LF TAB runs inside a value are one space; leading and trailing ones are dropped."""
    parsed = parse_field(build_header("mx", [AuthResult("x", "y", reason="  a\r\n\t b\t", properties=())]))
    assert parsed.entries[0][2] == "a b"


def test_long_values_are_cut_marked_and_quoted() -> None:
    """A 5000-character value ends up MAX_VALUE characters long, ends in '...' and is quoted."""
    long_domain = "a" * 5000 + ".example.com"
    field = build_header(
        "mx.example.org",
        [AuthResult("dkim", "fail", reason="r" * 5000, properties=(("header.d", long_domain),))],
    )
    parsed = parse_field(field)
    _, _, reason, props = parsed.entries[0]
    assert reason is not None and len(reason) == MAX_VALUE and reason.endswith("...")
    assert len(props[0][1]) == MAX_VALUE and props[0][1].endswith("...")
    assert 'header.d="aaa' in field
    assert all(len(line) <= 998 for line in lines(field))


def test_a_huge_value_of_white_space_is_still_marked_as_cut() -> None:
    """Input over the work bound is marked cut even when cleaning leaves little of it."""
    parsed = parse_field(build_header("mx", [AuthResult("x", "y", reason="a" + " " * 100_000 + "b")]))
    assert parsed.entries[0][2] == "a..."


def test_lines_stay_short_where_words_allow() -> None:
    """Many properties fold into lines of at most 78 characters."""
    props = tuple((f"header.p{i}", f"value-{i:04d}.example.com") for i in range(40))
    field = build_header("mx.example.org", [AuthResult("dkim", "pass", properties=props), SPF])
    assert all(len(line) <= 78 for line in lines(field))
    assert parse_field(field).entries[0][3] == [(k, v) for k, v in props]


def test_non_ascii_domains_become_a_labels_and_other_text_question_marks() -> None:
    """A Unicode domain is written in its xn-- form; other non-ASCII characters become '?'."""
    field = build_header(
        "mx",
        [
            AuthResult(
                "spf",
                "pass",
                reason="Grüße",
                properties=(("smtp.mailfrom", "bücher.example"), ("header.from", "jösé@bücher.example")),
            )
        ],
    )
    parsed = parse_field(field)
    assert parsed.entries[0][2] == "Gr??e"
    assert parsed.entries[0][3] == [
        ("smtp.mailfrom", "xn--bcher-kva.example"),
        ("header.from", "j?s?@xn--bcher-kva.example"),
    ]
    assert field.isascii()


def test_undecodable_bytes_and_invalid_idn_become_question_marks() -> None:
    """Surrogate escapes (8-bit junk) and names that are no valid IDN are replaced, not raised."""
    junk = b"ex\xff\xfeample.com".decode("utf-8", "surrogateescape")
    field = build_header(
        "mx", [AuthResult("spf", "pass", properties=(("smtp.mailfrom", junk), ("x.y", "é" * 70)))]
    )
    parsed = parse_field(field)
    assert parsed.entries[0][3] == [("smtp.mailfrom", "ex??ample.com"), ("x.y", "?" * 70)]


@pytest.mark.parametrize(
    "bad",
    [
        AuthResult("sp f", "pass"),
        AuthResult("spf", "pass;dkim=pass"),
        AuthResult("", "pass"),
        AuthResult("spf", ""),
        AuthResult("spf\r\n", "pass"),
        AuthResult("spf/1", "pass"),
        AuthResult("x" * 65, "pass"),
    ],
)
def test_entries_with_invalid_method_or_result_are_dropped(
    bad: AuthResult, caplog: pytest.LogCaptureFixture
) -> None:
    """An invalid method or result drops its entry (logged); the others are written."""
    with caplog.at_level(logging.WARNING, logger="mxward.shared.authresults"):
        field = build_header("mx", [bad, SPF])
    assert [e[0] for e in parse_field(field).entries] == ["spf"]
    assert "entry dropped" in caplog.text
    assert build_header("mx", [bad]) == "Authentication-Results: mx; none"


@pytest.mark.parametrize(
    "name", ["mailfrom", "smtp.", ".mailfrom", "smtp.mail from", "smtp.mail=from", "a;b.c"]
)
def test_properties_with_invalid_names_are_dropped_alone(name: str) -> None:
    """An invalid property name drops that property; the entry and its other properties stay."""
    result = AuthResult("spf", "pass", properties=((name, "bad.example"), ("smtp.mailfrom", "example.com")))
    parsed = parse_field(build_header("mx", [result]))
    assert parsed.entries == [("spf", "pass", None, [("smtp.mailfrom", "example.com")])]


def test_names_are_written_in_lower_case() -> None:
    """Method, result and property names are case-insensitive; they are written in lower case."""
    field = build_header("mx", [AuthResult("SPF", "Pass", properties=(("SMTP.MailFrom", "Example.COM"),))])
    assert field.endswith("spf=pass smtp.mailfrom=Example.COM")


@pytest.mark.parametrize(
    "authserv_id", ["", "mx example.org", "mx;example.org", "mx\r\n.org", "mx.exämple.org", "(x)", "a" * 256]
)
def test_an_invalid_authserv_id_is_refused(authserv_id: str) -> None:
    """The authserv-id comes from the configuration: a non-token is an error, not a header."""
    with pytest.raises(ValueError, match="authserv-id"):
        build_header(authserv_id, [SPF])


def test_random_input_always_gives_a_well_formed_field() -> None:
    """Fuzz: random values from a hostile alphabet never break the field's structure."""
    alphabet = 'ab.@;=()"\\ \t\r\n\x00\x7fé\u2028-_/<>,:[]?'
    rng = random.Random(8601)
    for _ in range(500):

        def text(rng: random.Random = rng) -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))

        results = [
            AuthResult(
                rng.choice(["spf", "dkim", "x y"]),
                "pass",
                reason=text(),
                properties=(("smtp.mailfrom", text()),),
            )
            for _ in range(rng.randint(0, 4))
        ]
        field = build_header("mx.example.org", results)
        parsed = parse_field(field)
        assert len(parsed.entries) == sum(1 for r in results if r.method != "x y")
        assert all(len(line) <= 998 for line in lines(field))
        for char in field.replace("\r\n\t", ""):
            assert 0x20 <= ord(char) <= 0x7E


# ---------------------------------------------------------------------------------------------
# reading authserv-ids


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mx.example.org; spf=pass smtp.mailfrom=example.com", "mx.example.org"),
        ("MX.Example.ORG; none", "mx.example.org"),
        ("mx.example.org 1; spf=pass", "mx.example.org"),
        ("mx.example.org 1 ; none", "mx.example.org"),
        ("mx.example.org;none", "mx.example.org"),
        ("mx.example.org(comment);none", "mx.example.org"),
        ("  \t mx.example.org ; none", "mx.example.org"),
        ("\r\n\tmx.example.org;\r\n\tspf=pass", "mx.example.org"),
        ("(a comment) mx.example.org; none", "mx.example.org"),
        ("(nested (comment) \\) here) mx.example.org; none", "mx.example.org"),
        ("(c1)(c2) (c3)mx.example.org; none", "mx.example.org"),
        ('"mx.example.org"; none', "mx.example.org"),
        ('"MX.example.org" 1; none', "mx.example.org"),
        ('"mx\\.example.org"; none', "mx.example.org"),
        ("mx.example.org", "mx.example.org"),
        ("mx.example.org 1 (version) ; spf=pass", "mx.example.org"),
        ("mx.example.org/evil; dkim=pass", "mx.example.org"),
        ("; spf=pass", ""),
        ("", ""),
        ("   ", ""),
        ("(unclosed comment mx.example.org; none", ""),
        ('"unclosed mx.example.org; none', ""),
        ('""; none', ""),
        ("=mx.example.org", ""),
        ("\x00mx.example.org; none", ""),
        ("ëvil; none", ""),
    ],
)
def test_authserv_id_of(value: str, expected: str) -> None:
    """The first token (or quoted-string) after comments and white space, in lower case."""
    assert authserv_id_of(value) == expected


@pytest.mark.parametrize(
    ("value", "claims"),
    [
        ("mx.example.org; spf=pass", True),
        ("MX.EXAMPLE.ORG; spf=pass", True),
        ("(forged) mx.example.org 1; dkim=pass", True),
        ("mx.example.org.; dkim=pass", True),
        ("evil.mx.example.org; dkim=pass", False),
        ("mx.example.org.evil; dkim=pass", False),
        ("example.org; dkim=pass", False),
        ("xmx.example.org; dkim=pass", False),
        ("other.example; dkim=pass (mx.example.org)", False),
        ("; mx.example.org", False),
        ("", False),
    ],
)
def test_claims_authserv_id_is_exact(value: str, claims: bool) -> None:
    """Case-insensitive and exact: a longer name that ends in ours does not claim it."""
    assert claims_authserv_id(value, "mx.example.org") is claims
    assert claims_authserv_id(value, "MX.Example.Org.") is claims


def test_an_empty_authserv_id_claims_nothing() -> None:
    """With no id of our own, no field is ours (not even one without an id)."""
    assert not claims_authserv_id("; spf=pass", "")
    assert not claims_authserv_id("", "")


@dataclass(frozen=True)
class Field:
    name: str
    value: str

    @property
    def lname(self) -> str:
        return self.name.lower()


def test_ours_lists_only_authentication_results_that_claim_us() -> None:
    """Indexes of our A-R fields; other ids, ARC-Authentication-Results and other fields stay."""
    headers = [
        Field("Received", "from mx.example.org"),
        Field("Authentication-Results", "mx.example.org; dkim=pass header.d=bank.example"),
        Field("ARC-Authentication-Results", "i=1; mx.example.org; dkim=pass"),
        Field("authentication-results", "(x) MX.example.org 1; spf=pass"),
        Field("Authentication-Results", "upstream.example.net; spf=pass"),
        Field("Authentication-Results", "evil.mx.example.org; spf=pass"),
        Field("X-Authentication-Results", "mx.example.org; spf=pass"),
        Field("Authentication-Results ", "mx.example.org; spf=pass"),
    ]
    assert ours(headers, "mx.example.org") == [1, 3, 7]
    assert ours(headers, "upstream.example.net") == [4]
    assert ours([], "mx.example.org") == []


def test_a_built_field_is_recognised_as_ours() -> None:
    """What build_header writes, authserv_id_of reads back (after the field name)."""
    field = build_header("Mx.Example.Org", [SPF, DKIM])
    value = field.partition(":")[2]
    assert authserv_id_of(value) == "mx.example.org"
    assert ours([Field("Authentication-Results", value)], "mx.example.org") == [0]


def test_a_built_field_goes_into_a_message_and_replaces_a_forged_one() -> None:
    """With the filter's Message: the forged field that claims us is removed, ours is added as
    one field, and a later pass finds exactly ours."""
    from mxward.contentfilter.message import Message

    raw = (
        b"Authentication-Results: mx.example.org; dkim=pass header.d=bank.example\r\n"
        b"Authentication-Results: upstream.example.net; spf=pass\r\n"
        b"From: a@example.com\r\n\r\nbody\r\n"
    )
    message = Message.parse(raw)
    hostile = AuthResult(
        "spf", "fail", properties=(("smtp.mailfrom", "x\r\nAuthentication-Results: mx.example.org"),)
    )
    field = build_header("mx.example.org", [hostile, DKIM])
    out = Message.parse(message.rewrite(prepend=[field], remove=ours(message.headers, "mx.example.org")))
    assert [h.name for h in out.headers] == ["Authentication-Results", "Authentication-Results", "From"]
    assert ours(out.headers, "mx.example.org") == [0]
    assert "bank.example" not in out.raw.decode()
    assert out.raw.endswith(b"\r\n\r\nbody\r\n")
