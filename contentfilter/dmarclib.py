"""DMARC's building blocks for the ``dmarc`` check: records, author domains, policy discovery.

Kept apart from the check (``contentfilter/checks/dmarc.py``) so the rules of the RFCs can be
read, and tested, on their own; DNS goes through mxward's resolver, passed in.

Records (:func:`parse_record`)
    A DMARC Policy Record is a TXT record at ``_dmarc.<domain>`` in DKIM's tag=value syntax
    (RFC 9989 section 4.7, RFC 7489 section 6.3). Only TXT strings whose first tag is
    ``v=DMARC1`` (the value case-sensitive, exactly) are DMARC records; everything else at that
    name is not looked at (SPF, site verification tokens). Tag names and the keyword values
    are case-insensitive (RFC 5234 strings); unknown tags are ignored; a tag given twice counts
    with its first value. A value that is not valid falls back to the default: ``adkim`` and
    ``aspf`` to ``r``, ``psd`` to ``u``, ``t`` to ``n``, ``pct`` to 100, ``fo`` to ``0``;
    report URIs that are no URI are dropped, as is RFC 7489's ``!size`` suffix (RFC 9989
    removed it). ``p`` that is missing or not ``none``/``quarantine``/``reject``, or ``sp`` or
    ``np`` present but not valid, make the record "without a valid policy": when the record
    has at least one valid ``rua`` URI it counts as ``p=none`` (sp and np dropped), otherwise
    no DMARC processing applies (RFC 9989 section 4.10.1, RFC 7489 section 6.6.3 step 6).

Author domain (:func:`author_domains`)
    The domain part of every mailbox in the From fields (RFC 5322 section 3.4 with the
    obsolete forms of section 4.4: comments, quoted names, source routes, groups), lower-cased
    and in A-labels (RFC 5890, IDNA2008 with the UTS 46 mapping when the ``idna`` package is
    installed, else Python's IDNA2003 codec), repeats removed. Anything that cannot be read
    (no address, an address literal, a name that is not a DNS name, broken syntax) is an
    error: the message then has no Author Domain.

Policy discovery (:class:`Discovery`)
    RFC 9989 mode (``"9989"``): the record at the Author Domain applies; else the DNS Tree
    Walk of section 4.10 looks for the Organizational Domain: query ``_dmarc.<name>`` for the
    name, then (a name of 8 or more labels being first cut to its last 7) for each parent, one
    label at a time, down to the top-level label, stopping early at a single record with
    ``psd=y`` or ``psd=n``: at most 8 questions. Several DMARC records at one name are all
    discarded there. Of the records found (longest name first) one with ``psd=n`` is the
    Organizational Domain; one with ``psd=y`` (not at the starting name) makes the name one
    label below it the Organizational Domain; otherwise the record with the fewest labels
    does; with no record the starting name is its own Organizational Domain (section 4.10.2).
    The record applied is the one of the Author Domain, else of its Organizational Domain,
    else of its Public Suffix Domain (a ``psd=y`` record). Relaxed alignment compares the
    Organizational Domains found by tree walks from both names.

    RFC 7489 mode (``"7489"``): the Organizational Domain is the public suffix plus one label
    by the Public Suffix List (the ``publicsuffixlist`` package, or a file given); the record
    at the Author Domain applies, else the one at its Organizational Domain; several records
    at either name end discovery (no policy, RFC 7489 section 6.6.3).

    In both modes a record that is not the Author Domain's is a subdomain's policy: ``np`` for
    an Author Domain that does not exist (the answer to its A question is NXDOMAIN, RFC 8020),
    else ``sp``, else ``p``. A DNS answer that did not come (SERVFAIL, timeout) raises
    :class:`~mxward.shared.dns.DnsTempError`: the message can neither pass nor fail then.

Sampling (:func:`sampled`)
    RFC 7489's ``pct``: a message is "selected" when the first 8 bytes of SHA-256 of its
    sampling key, as an integer, modulo 100 are below ``pct``. The key is the message's
    Message-ID (else its queue id, else the hash of its bytes), so the same message gets the
    same answer on every delivery attempt, and tests can predict it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

from publicsuffixlist import PublicSuffixList

from mxward.shared.dns import DnsError, DnsTempError, normalize_domain
from mxward.shared.headers import comment_end

if TYPE_CHECKING:
    from mxward.shared.dns import Resolver

__all__ = [
    "MAX_WALK_QUERIES",
    "POLICIES",
    "AuthorDomains",
    "Discovery",
    "DmarcRecord",
    "Mode",
    "Policy",
    "PolicyFound",
    "author_domains",
    "is_dmarc_record",
    "load_public_suffix_list",
    "lower_policy",
    "normalize_domain",
    "parse_record",
    "sample_value",
    "sampled",
    "select_organizational_domain",
    "walk_names",
]

Mode = Literal["9989", "7489"]
Policy = Literal["none", "quarantine", "reject"]
POLICIES: Final[tuple[Policy, ...]] = ("none", "quarantine", "reject")
MAX_WALK_QUERIES: Final = 8
_SHORTCUT_AT: Final = 8  # RFC 9989 section 4.10 step 4: "If x >= 8 ..."
_SHORTEN_TO: Final = 7  # "... until 7 labels remain"
_MAX_RECORD: Final = 4096  # longer TXT values are not read as DMARC records


# ---------------------------------------------------------------------------------------------
# Records

_VERSION = re.compile(r"[ \t]*[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")
_TAG = re.compile(r"[A-Za-z]+")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[!-~]+")
_SIZE = re.compile(r"![0-9]+[kmgtKMGT]?$")
_FO = frozenset({"0", "1", "d", "s"})


@dataclass(frozen=True, slots=True, kw_only=True)
class DmarcRecord:
    """One parsed DMARC record; ``p`` is None when it has no valid policy (see the module doc).

    ``sp_valid``/``np_valid`` are False when the tag is present with a value that is not a
    policy; ``problems`` lists what was not understood (for the log).
    """

    raw: str
    p: Policy | None = None
    sp: Policy | None = None
    np: Policy | None = None
    sp_valid: bool = True
    np_valid: bool = True
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    psd: Literal["y", "n", "u"] = "u"
    t: Literal["y", "n"] = "n"
    pct: int = 100
    fo: str = "0"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def has_policy(self) -> bool:
        """p is valid and so are sp and np where present."""
        return self.p is not None and self.sp_valid and self.np_valid

    def effective(self) -> DmarcRecord | None:
        """The record as applied: itself; ``p=none`` when it lacks a valid policy but has a
        ``rua`` URI; None when no DMARC processing applies."""
        if self.has_policy:
            return self
        if self.rua:
            return DmarcRecord(
                raw=self.raw,
                p="none",
                adkim=self.adkim,
                aspf=self.aspf,
                psd=self.psd,
                t=self.t,
                pct=self.pct,
                fo=self.fo,
                rua=self.rua,
                ruf=self.ruf,
                problems=self.problems,
            )
        return None


def is_dmarc_record(text: str) -> bool:
    """Does this TXT value start with the tag ``v=DMARC1``?"""
    return len(text) <= _MAX_RECORD and _VERSION.match(text) is not None


def parse_record(text: str) -> DmarcRecord | None:
    """Parse a TXT value as a DMARC record; None when it is not one (no leading v=DMARC1)."""
    if not is_dmarc_record(text):
        return None
    tags: dict[str, str] = {}
    problems: list[str] = []
    for part in text.split(";")[1:]:
        if not part.strip(" \t"):
            continue
        name, eq, value = part.partition("=")
        name = name.strip(" \t").lower()
        if not eq or not _TAG.fullmatch(name):
            problems.append(f"bad tag {part.strip()[:20]!r}")
            continue
        tags.setdefault(name, value.strip(" \t"))
    p = _policy(tags.get("p"))
    if "p" not in tags:
        problems.append("no p=")
    elif p is None:
        problems.append("bad p=")
    sp = _policy(tags.get("sp"))
    np = _policy(tags.get("np"))
    sp_valid = "sp" not in tags or sp is not None
    np_valid = "np" not in tags or np is not None
    problems.extend(f"bad {name}=" for name, ok in (("sp", sp_valid), ("np", np_valid)) if not ok)
    adkim = _choice(tags, "adkim", ("r", "s"), "r", problems)
    aspf = _choice(tags, "aspf", ("r", "s"), "r", problems)
    psd = _choice(tags, "psd", ("y", "n", "u"), "u", problems)
    testing = _choice(tags, "t", ("y", "n"), "n", problems)
    pct = 100
    if "pct" in tags:
        raw_pct = tags["pct"]
        if raw_pct.isascii() and raw_pct.isdigit() and int(raw_pct) <= 100:
            pct = int(raw_pct)
        else:
            problems.append("bad pct=")
    fo = "0"
    if "fo" in tags:
        options = [o.strip(" \t").lower() for o in tags["fo"].split(":")]
        if options and all(o in _FO for o in options):
            fo = ":".join(options)
        else:
            problems.append("bad fo=")
    return DmarcRecord(
        raw=text,
        p=p,
        sp=sp,
        np=np,
        sp_valid=sp_valid,
        np_valid=np_valid,
        adkim=adkim,  # type: ignore[arg-type]
        aspf=aspf,  # type: ignore[arg-type]
        psd=psd,  # type: ignore[arg-type]
        t=testing,  # type: ignore[arg-type]
        pct=pct,
        fo=fo,
        rua=_uris(tags.get("rua"), "rua", problems),
        ruf=_uris(tags.get("ruf"), "ruf", problems),
        problems=tuple(problems),
    )


def _policy(value: str | None) -> Policy | None:
    if value is None:
        return None
    word = value.lower()
    for policy in POLICIES:
        if word == policy:
            return policy
    return None


def _choice(
    tags: dict[str, str], name: str, valid: tuple[str, ...], default: str, problems: list[str]
) -> str:
    if name not in tags:
        return default
    value = tags[name].lower()
    if value in valid:
        return value
    problems.append(f"bad {name}=")
    return default


def _uris(value: str | None, name: str, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    uris: list[str] = []
    for item in value.split(","):
        uri = _SIZE.sub("", item.strip(" \t"))
        if _URI.fullmatch(uri):
            if uri not in uris:
                uris.append(uri)
        elif item.strip(" \t"):
            problems.append(f"bad {name} URI")
    return tuple(uris)


def lower_policy(policy: Policy) -> Policy:
    """The next policy down: reject -> quarantine -> none (t=y, and pct's unselected mail)."""
    return "quarantine" if policy == "reject" else "none"


# ---------------------------------------------------------------------------------------------
# Domains


@dataclass(frozen=True, slots=True)
class AuthorDomains:
    """The Author Domains of a message, or why there are none (``error``)."""

    domains: tuple[str, ...] = ()
    mailboxes: int = 0
    error: str = ""


_WSP = frozenset(" \t\r\n")
_SPECIALS = frozenset('<>@,;:."[]()')
_Token = tuple[str, str]
_MAX_FROM: Final = 32 * 1024


class _FromError(Exception):
    pass


def _from_tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        if char in _WSP:
            pos += 1
        elif char == "(":
            pos = comment_end(text, pos)
            if pos < 0:
                raise _FromError("unclosed comment")
        elif char == '"':
            pos += 1
            start = pos
            while pos < end and text[pos] != '"':
                pos += 2 if text[pos] == "\\" else 1
            if pos >= end:
                raise _FromError("unclosed quoted string")
            tokens.append(("word", text[start:pos]))
            pos += 1
        elif char == "[":
            close = text.find("]", pos)
            if close < 0:
                raise _FromError("unclosed domain literal")
            tokens.append(("literal", text[pos : close + 1]))
            pos = close + 1
        elif char in _SPECIALS:
            if char in ")]":
                raise _FromError(f"unexpected {char!r}")
            tokens.append((char, char))
            pos += 1
        else:
            start = pos
            while pos < end and text[pos] not in _WSP and text[pos] not in _SPECIALS:
                pos += 1
            tokens.append(("word", text[start:pos]))
    return tokens


def _mailbox_items(tokens: list[_Token]) -> list[list[_Token]]:
    """Split an address list into mailboxes (group names and separators dropped)."""
    items: list[list[_Token]] = []
    current: list[_Token] = []
    angle = False
    for token in tokens:
        kind = token[0]
        if angle:
            current.append(token)
            if kind == ">":
                angle = False
            continue
        if kind == "<":
            angle = True
            current.append(token)
        elif kind in (",", ";"):
            items.append(current)
            current = []
        elif kind == ":":  # "display-name:" opens a group: its name is no mailbox
            current = []
        else:
            current.append(token)
    if angle:
        raise _FromError("unclosed '<'")
    items.append(current)
    return [item for item in items if item]


def _domain_of(item: list[_Token]) -> str:
    kinds = [kind for kind, _ in item]
    if "<" in kinds:
        start = kinds.index("<")
        if kinds[-1] != ">" or any(k not in ("word", ".") for k in kinds[:start]):
            raise _FromError("bad name-addr")
        spec = item[start + 1 : -1]
        if spec and spec[0][0] == "@":  # obs-route: @a,@b:
            colon = next((i for i, (k, _) in enumerate(spec) if k == ":"), -1)
            if colon < 0:
                raise _FromError("bad route")
            spec = spec[colon + 1 :]
    else:
        spec = item
    ats = [i for i, (kind, _) in enumerate(spec) if kind == "@"]
    if not ats:
        raise _FromError("mailbox without a domain")
    at = ats[-1]
    local, domain = spec[:at], spec[at + 1 :]
    if not local or any(kind not in ("word", ".") for kind, _ in local):
        raise _FromError("bad local part")
    if len(domain) == 1 and domain[0][0] == "literal":
        raise _FromError("address literal: no domain name")
    if not domain or len(domain) % 2 == 0:
        raise _FromError("bad domain")
    for index, (kind, _) in enumerate(domain):
        if kind != ("word" if index % 2 == 0 else "."):
            raise _FromError("bad domain")
    return "".join(text for _, text in domain)


def _field_domains(value: str) -> list[str]:
    """The domain of each mailbox of one From field value."""
    items = _mailbox_items(_from_tokens(value))
    if not items:
        raise _FromError("no address")
    found: list[str] = []
    for item in items:
        domain = normalize_domain(_domain_of(item))
        if domain is None:
            raise _FromError("domain is not a DNS name")
        found.append(domain)
    return found


def author_domains(values: Sequence[str]) -> AuthorDomains:
    """The distinct Author Domains of the From field values (in order), or the error."""
    if not values:
        return AuthorDomains(error="no From header")
    domains: list[str] = []
    mailboxes = 0
    for value in values:
        if len(value) > _MAX_FROM:
            return AuthorDomains(error="From header too long")
        try:
            found = _field_domains(value)
        except _FromError as exc:
            return AuthorDomains(mailboxes=mailboxes, error=f"From header: {exc}")
        mailboxes += len(found)
        domains.extend(d for d in found if d not in domains)
    return AuthorDomains(domains=tuple(domains), mailboxes=mailboxes)


# ---------------------------------------------------------------------------------------------
# The tree walk (RFC 9989 section 4.10)


def walk_names(domain: str) -> list[str]:
    """The names a DNS Tree Walk from ``domain`` asks for, in order (at most 8)."""
    labels = domain.split(".")
    names = [domain]
    rest = labels[-_SHORTEN_TO:] if len(labels) >= _SHORTCUT_AT else labels[1:]
    while rest:
        names.append(".".join(rest))
        rest = rest[1:]
    return names


def select_organizational_domain(start: str, found: Sequence[tuple[str, DmarcRecord]]) -> str:
    """RFC 9989 section 4.10.2: the Organizational Domain from the records a walk found."""
    for name, record in found:
        if record.psd == "n":
            return name
        if record.psd == "y" and name != start:
            depth = name.count(".") + 2
            return ".".join(start.split(".")[-depth:])
    if found:
        return found[-1][0]
    return start


@dataclass(frozen=True, slots=True)
class PolicyFound:
    """The record that applies to an Author Domain and where it was found.

    ``subdomain``: the record is not the Author Domain's own (sp/np apply); ``kind``:
    ``"author"``, ``"organizational"`` or ``"psd"``.
    """

    record: DmarcRecord
    domain: str
    subdomain: bool
    kind: Literal["author", "organizational", "psd"]


@dataclass(slots=True)
class _Lookup:
    record: DmarcRecord | None
    multiple: bool


def load_public_suffix_list(path: str = "") -> PublicSuffixList:
    """The Public Suffix List: the file at ``path``, or the copy the package ships."""
    if not path:
        return PublicSuffixList()
    with open(path, "rb") as source:
        return PublicSuffixList(source)


@dataclass(slots=True)
class Discovery:
    """Policy discovery and alignment for one message; DNS answers are remembered per message.

    ``questions`` counts the ``_dmarc`` and existence questions asked (cache hits included),
    ``multiple`` the names that had several DMARC records.
    """

    resolver: Resolver
    mode: Mode = "9989"
    psl: PublicSuffixList | None = None
    questions: int = 0
    multiple: list[str] = field(default_factory=list)
    _lookups: dict[str, _Lookup] = field(default_factory=dict)
    _walks: dict[str, list[tuple[str, DmarcRecord]]] = field(default_factory=dict)
    _orgs: dict[str, str] = field(default_factory=dict)

    async def lookup(self, name: str) -> _Lookup:
        """The DMARC record at ``_dmarc.<name>``; raises DnsTempError."""
        known = self._lookups.get(name)
        if known is not None:
            return known
        self.questions += 1
        try:
            texts = await self.resolver.txt(f"_dmarc.{name}")
        except DnsTempError:
            raise
        except DnsError:  # "_dmarc." makes the name too long for DNS: no record can be there
            texts = []
        records = [r for r in (parse_record(t) for t in texts) if r is not None]
        found = _Lookup(records[0] if len(records) == 1 else None, len(records) > 1)
        if found.multiple:
            self.multiple.append(name)
        self._lookups[name] = found
        return found

    async def walk(self, start: str) -> list[tuple[str, DmarcRecord]]:
        """The records a DNS Tree Walk from ``start`` finds, longest name first."""
        known = self._walks.get(start)
        if known is not None:
            return known
        found: list[tuple[str, DmarcRecord]] = []
        for name in walk_names(start):
            record = (await self.lookup(name)).record
            if record is not None:
                found.append((name, record))
                if record.psd in ("y", "n"):
                    break
        self._walks[start] = found
        return found

    async def organizational_domain(self, domain: str) -> str:
        """The Organizational Domain of ``domain`` in this mode."""
        known = self._orgs.get(domain)
        if known is not None:
            return known
        if self.mode == "7489":
            org = self._psl_org(domain)
        else:
            org = select_organizational_domain(domain, await self.walk(domain))
        self._orgs[domain] = org
        return org

    def _psl_org(self, domain: str) -> str:
        psl = self.psl if self.psl is not None else load_public_suffix_list()
        self.psl = psl
        return psl.privatesuffix(domain) or domain

    async def policy(self, author: str) -> PolicyFound | None:
        """The record that applies to ``author``, or None (no DMARC policy)."""
        if self.mode == "7489":
            return await self._policy_7489(author)
        own = await self.lookup(author)
        if own.record is not None:
            return PolicyFound(own.record, author, subdomain=False, kind="author")
        found = await self.walk(author)
        org = await self.organizational_domain(author)
        by_name = dict(found)
        # The Organizational Domain's record is one the walk found. (One label below a psd=y
        # record that the shortcut for long names skipped is not asked for: 8 questions at most.)
        if org != author and org in by_name:
            return PolicyFound(by_name[org], org, subdomain=True, kind="organizational")
        for name, record in found:
            if record.psd == "y" and name != author:
                return PolicyFound(record, name, subdomain=True, kind="psd")
        return None

    async def _policy_7489(self, author: str) -> PolicyFound | None:
        own = await self.lookup(author)
        if own.multiple:
            return None
        if own.record is not None:
            return PolicyFound(own.record, author, subdomain=False, kind="author")
        org = await self.organizational_domain(author)
        if org == author:
            return None
        at_org = await self.lookup(org)
        if at_org.record is None:
            return None
        return PolicyFound(at_org.record, org, subdomain=True, kind="organizational")

    async def aligned(self, author: str, identifier: str, mode: Literal["r", "s"]) -> bool:
        """Is ``identifier`` aligned with ``author`` (strict: equal; relaxed: same Org Domain)?"""
        if identifier == author:
            return True
        if mode == "s":
            return False
        org = await self.organizational_domain(author)
        if identifier != org and not identifier.endswith("." + org):
            return False  # an Organizational Domain is the name itself or one of its parents
        return await self.organizational_domain(identifier) == org

    async def exists(self, domain: str) -> bool:
        """False only when ``domain`` is NXDOMAIN (RFC 8020): its A question says so."""
        self.questions += 1
        return not (await self.resolver.query(domain, "A")).nxdomain


# ---------------------------------------------------------------------------------------------
# Sampling (RFC 7489 pct)


def sample_value(key: str) -> int:
    """0..99 from ``key``: the first 8 bytes of its SHA-256, big-endian, modulo 100."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def sampled(pct: int, key: str) -> bool:
    """Is the message with sampling ``key`` selected for a policy with ``pct``?"""
    if pct >= 100:
        return True
    if pct <= 0:
        return False
    return sample_value(key) < pct
