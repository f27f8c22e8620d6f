"""``mxward``: the command line.

    mxward [--config PATH] COMMAND [...]

Commands: ``run``, ``policyd``, ``check``, ``greylist``, ``karma``, ``state``, ``postfix-config``,
``config-check``; ``mxward --version``. ``mxward COMMAND --help`` explains each. The
configuration is ``--config PATH``, else ``$MXWARD_CONFIG``, else ``/etc/mxward/mxward.toml``
(built-in defaults when that file does not exist). A configuration error exits with 78.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from mxward.shared.buildinfo import build
from mxward.shared.config import EX_CONFIG, Config, ConfigError, config_path, load_config, parse_listen
from mxward.shared.plugin import Check, Result, load_check_class

__all__ = ["main"]

log = logging.getLogger("mxward")


def _version() -> str:
    try:
        return version("mxward")
    except PackageNotFoundError:
        return "unknown"


def builtin_checks() -> dict[str, type[Check[Any]]]:
    from mxward.contentfilter.checks import CHECKS as CONTENT_CHECKS
    from mxward.policyd.checks import CHECKS as POLICY_CHECKS

    return {cls.name: cls for cls in (*POLICY_CHECKS, *CONTENT_CHECKS)}


def resolve_check(name: str) -> type[Check[Any]]:
    return load_check_class(name, builtin_checks())


def load(path: str | None) -> Config:
    return load_config(path, resolve_check)


def _setup_logging(config: Config, ident: str, *, stderr: bool = False) -> None:
    from mxward.shared.logs import setup_logging

    general = config.general
    setup_logging(
        general.log_level,
        "stderr" if stderr else general.log_target,
        ident=ident,
        facility=general.syslog_facility,
    )
    for name in general.debug_checks:
        logging.getLogger(f"mxward.checks.{name}").setLevel(logging.DEBUG)


# --------------------------------------------------------------------------------------------
# commands


def cmd_policyd(args: argparse.Namespace, config: Config) -> int:
    from mxward.policyd.daemon import run_policyd

    _setup_logging(config, "mxward-policyd")
    return run_policyd(config, lambda: load(args.config))


def cmd_filter(args: argparse.Namespace, config: Config) -> int:
    from mxward.contentfilter.daemon import run_filter

    _setup_logging(config, "mxward-filter")
    return run_filter(config, lambda: load(args.config))


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from mxward.contentfilter.daemon import filter_role
    from mxward.policyd.daemon import policyd_role
    from mxward.shared.supervisor import supervise

    _setup_logging(config, "mxward")
    return supervise(config, lambda: load(args.config), [policyd_role(config), filter_role(config)], "run")


def cmd_config_check(args: argparse.Namespace, config: Config) -> int:
    names = ", ".join(
        f"{n}{'' if c.common.enabled else ' (disabled)'}{' (observe)' if c.common.mode == 'observe' else ''}"
        for n, c in config.checks.items()
    )
    print(f"{config.path or 'built-in defaults (no configuration file)'}: OK")
    print(f"  policyd listen: {', '.join(config.policyd.listen)}")
    print(f"  state: {config.state.url or 'embedded server in ' + str(config.data_dir / 'state')}")
    print(f"  policyd checks: {names or '(none)'}")
    if config.inactive:
        print(f"  configured but not run (not in [policyd] checks): {', '.join(config.inactive)}")
    return 0


@contextlib.asynccontextmanager
async def _services(config: Config) -> AsyncIterator[Any]:
    """Services for one-shot commands; starts (or reuses) the embedded state server if needed."""
    from mxward.shared.clock import SystemClock
    from mxward.shared.dns import Resolver
    from mxward.shared.embedded import EmbeddedServer
    from mxward.shared.plugin import Services
    from mxward.shared.state import StateStore

    embedded = None
    socket_path = None
    if not config.state.url:
        embedded = EmbeddedServer(config.data_dir, config.state.embedded_binary)
        socket_path = embedded.start()
    store = StateStore(config.state, unix_socket=socket_path)
    try:
        await store.connect()
        clock = SystemClock()
        yield Services(
            dns=Resolver(config.dns, clock=clock),
            state=store,
            clock=clock,
            hostname=config.hostname,
            config=config,
        )
    finally:
        await store.aclose()
        if embedded is not None:
            embedded.stop()


def _read_requests(stream: Any) -> list[dict[str, str]]:
    requests: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for number, raw in enumerate(stream, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            if current:
                requests.append(current)
                current = {}
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"stdin line {number}: expected name=value, got {line[:60]!r}")
        current[name.strip()] = value
    if current:
        requests.append(current)
    return requests


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    if args.message:
        return _check_message(args, config)
    from mxward.policyd.daemon import build_pipeline
    from mxward.policyd.service import PolicyService
    from mxward.shared.logs import kv

    try:
        requests = _read_requests(sys.stdin)
    except ValueError as exc:
        print(f"mxward check: {exc}", file=sys.stderr)
        return 2
    if not requests:
        print(
            "mxward check: no request on stdin (name=value lines, a blank line between requests)",
            file=sys.stderr,
        )
        return 2

    async def run() -> None:
        async with _services(config) as services:
            pipeline, checks = await build_pipeline(config, services)
            service = PolicyService(pipeline)
            try:
                for number, attrs in enumerate(requests, 1):
                    attrs.setdefault("request", "smtpd_access_policy")
                    attrs.setdefault("protocol_state", "RCPT")
                    text, tx, decision = await service.decide(attrs)
                    print(
                        f"request {number}: state={tx.protocol_state} client={tx.client_name}"
                        f"[{tx.client_address}] helo={kv(tx.helo)} from=<{tx.sender}> rcpt=<{tx.recipient}>"
                    )
                    if decision.exempt:
                        print(f"  exempt ({decision.exempt}): no check runs")
                    for r in decision.results:
                        _print_result(r)
                        for fact, value in r.facts.items():
                            print(f"  {'':<12} fact {fact}={kv(value)}")
                    print(f"  total score {decision.score:g}, decided at stage {decision.stage.value}")
                    print(f"  action={text}")
                    await pipeline.after(tx, decision)
            finally:
                for check in checks:
                    await check.aclose()

    asyncio.run(run())
    return 0


def _print_result(r: Result) -> None:
    """One check's line of a ``mxward check`` trace, and its reason."""
    from mxward.shared.logs import kv

    mode = " observe" if r.observed else ""
    forced = f" forces {r.action.kind.name}" if r.action and not r.observed else ""
    details = " ".join(f"{k}={kv(v)}" for k, v in r.log.items())
    print(
        f"  {r.check:<12} {r.verdict.value:<5} score={r.score:g}{mode}{forced}"
        f" {'reused' if r.reused else f'{r.elapsed_ms:.1f}ms'} {details}".rstrip()
    )
    if r.reason:
        print(f"  {'':<12} reason: {r.reason}")


def _check_message(args: argparse.Namespace, config: Config) -> int:
    """``mxward check message.eml``: the content checks on a message file, offline."""
    from mxward.contentfilter.daemon import build_filter_pipeline, karma_rules
    from mxward.contentfilter.message import Message
    from mxward.contentfilter.service import FilterService
    from mxward.shared.msgfacts import MessageFacts

    try:
        with open(args.message, "rb") as stream:
            data = stream.read(config.filter.max_message_size + 1)
    except OSError as exc:
        print(f"mxward check: {args.message}: {exc.strerror}", file=sys.stderr)
        return 2
    if len(data) > config.filter.max_message_size:
        print(f"mxward check: {args.message}: larger than [filter] max_message_size", file=sys.stderr)
        return 2
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # a file has LF line ends
    xforward = {"ADDR": args.client_ip or "", "HELO": args.helo or "", "NAME": args.client_name or ""}
    if args.queue_id:
        xforward["IDENT"] = args.queue_id

    async def run() -> None:
        async with _services(config) as services:
            pipeline, checks = await build_filter_pipeline(config, services)
            service = FilterService(
                config.filter,
                services,
                pipeline,
                facts=MessageFacts(services.state, config.policyd.message_facts_ttl)
                if args.queue_id
                else None,
                quarantine=None,
                karma_rules=karma_rules(config),
                authserv_id=config.filter.authserv_id or services.hostname,
            )
            try:
                message = Message.parse(data)
                judgement = await service.judge(
                    message, sender=args.sender or "", recipients=args.to or [], xforward=xforward
                )
                decision = judgement.decision
                print(
                    f"message {args.message}: {message.size} bytes, {len(message.headers)} header fields"
                    + (f", defects: {' '.join(message.defects)}" if message.defects else "")
                )
                if args.queue_id:
                    print(f"  policyd facts for queue id {args.queue_id}: {judgement.policy}")
                for r in decision.results:
                    _print_result(r)
                print(
                    f"  total score {decision.score:g} (tag at {config.filter.tag_score:g},"
                    f" reject at {config.filter.reject_score:g})"
                )
                print(f"  action={judgement.verdict} ({config.filter.mode} mode)")
                if decision.reasons and judgement.verdict not in ("pass", "tag"):
                    print(f"  reason: {'; '.join(decision.reasons)}")
                if judgement.verdict in ("pass", "tag") or args.headers:
                    out = service.render(message, judgement)
                    head = out[: len(out) - len(message.raw) + message.body_offset]
                    added = head.decode("utf-8", "replace").split("\r\n")
                    print("  headers as delivered (first lines):")
                    for line in added[: max(4, len(added) - len(message.headers) - 1)][:12]:
                        print(f"    {line}")
            finally:
                for check in checks:
                    await check.aclose()

    asyncio.run(run())
    return 0


def cmd_dkim(args: argparse.Namespace, config: Config) -> int:
    from mxward.contentfilter.dkimkeys import run_command

    async def run() -> int:
        async with _services(config) as services:
            return await run_command(args, config, services)

    return asyncio.run(run())


def cmd_dmarc(args: argparse.Namespace, config: Config) -> int:
    from mxward.contentfilter.dmarcreports import run_command

    async def run() -> int:
        async with _services(config) as services:
            return await run_command(args, config, services, settings=config.dmarc_reports)

    return asyncio.run(run())


def cmd_quarantine(args: argparse.Namespace, config: Config) -> int:
    from mxward.contentfilter.quarantine import Quarantine, run_command

    async def run() -> int:
        async with _services(config) as services:
            quarantine = Quarantine(
                config.data_dir / "quarantine",
                services.state,
                node=services.hostname,
                retention=config.filter.quarantine_retention,
                clock=services.clock,
            )
            return await run_command(args, quarantine, _release_sender(config, services.hostname))

    return asyncio.run(run())


def _release_sender(config: Config, helo: str) -> Any:
    """Reinjection for ``mxward quarantine release``: the original envelope, to [filter] reinject."""
    from mxward.contentfilter.reinject import Downstream, DownstreamError

    async def send(entry: Any, content: bytes) -> None:
        _, host, port = parse_listen(config.filter.reinject)
        downstream = Downstream(host, port, helo=helo, timeout=config.filter.reinject_timeout)
        await downstream.connect()
        try:
            recipients = list(entry.recipients)
            options = list(entry.rcpt_options)
            mail_options = " ".join(entry.mail_options)
            reply = await downstream.command(f"MAIL FROM:<{entry.sender}> {mail_options}".rstrip())
            if not reply.ok:
                raise DownstreamError(f"MAIL FROM refused: {reply.relay()}")
            accepted = 0
            for index, rcpt in enumerate(recipients):
                params = " ".join(options[index]) if index < len(options) else ""
                reply = await downstream.command(f"RCPT TO:<{rcpt}> {params}".rstrip())
                if reply.ok:
                    accepted += 1
                else:
                    raise DownstreamError(f"RCPT TO:<{rcpt}> refused: {reply.relay()}")
            reply = await downstream.send_data(content)
            if not reply.ok:
                raise DownstreamError(f"message refused: {reply.relay()}")
        finally:
            await downstream.close()

    return send


def cmd_greylist(args: argparse.Namespace, config: Config) -> int:
    from mxward.policyd.checks import greylist

    cfg = config.checks.get("greylist")
    options = cfg.options if cfg is not None else greylist.Options()

    async def run() -> int:
        async with _services(config) as services:
            admin = greylist.GreylistAdmin(options, services)
            if args.action == "list":
                count = 0
                async for entry in admin.entries(client=args.client):
                    print(entry.line(now=time.time()))
                    count += 1
                    if args.limit and count >= args.limit:
                        break
                if count == 0:
                    print("(no entries)")
                return 0
            if args.action == "allow":
                done = await admin.allow(args.client, args.sender, args.recipient)
            else:
                done = await admin.remove(args.client, args.sender, args.recipient)
            print(done)
            return 0

    if args.action in ("allow", "remove") and not args.client:
        print(f"mxward greylist {args.action}: --client is required", file=sys.stderr)
        return 2
    if (
        args.action in ("allow", "remove")
        and bool(args.sender) != bool(args.recipient)
        and args.sender is not None
    ):
        print(f"mxward greylist {args.action}: --sender needs --recipient", file=sys.stderr)
        return 2
    if args.client:
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            print(f"mxward greylist: --client {args.client!r} is not an IP address", file=sys.stderr)
            return 2
    return asyncio.run(run())


def cmd_karma(args: argparse.Namespace, config: Config) -> int:
    from mxward.policyd.checks import karma
    from mxward.shared.karma import KarmaStore
    from mxward.shared.units import parse_duration

    cfg = config.checks.get("karma")
    options = cfg.options if cfg is not None else karma.Options()
    if args.action != "list":
        if not args.client:
            print(f"mxward karma {args.action}: a client IP address is required", file=sys.stderr)
            return 2
        try:
            ipaddress.ip_address(args.client)
        except ValueError:
            print(f"mxward karma: {args.client!r} is not an IP address", file=sys.stderr)
            return 2
    try:
        period = parse_duration(args.period) if args.period else options.penalty
    except ValueError as exc:
        print(f"mxward karma box: --for: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        async with _services(config) as services:
            store = KarmaStore(services.state, options)
            now = time.time()
            if args.action == "list":
                count = 0
                async for record in store.records():
                    if args.boxed and not record.penalty_left(now):
                        continue
                    print(record.line(now))
                    count += 1
                if count == 0:
                    print("(no records)")
                return 0
            if args.action == "show":
                record = await store.show(args.client)
                print(record.line(now) if record.known else f"{record.network:<20} (no history)")
            elif args.action == "allow":
                record = await store.allow(args.client, now, max(options.good_history, 1))
                print(record.line(now))
            elif args.action == "box":
                record = await store.box(args.client, now, period)
                print(record.line(now))
            else:
                removed = await store.reset(args.client)
                print(f"removed {removed} record(s) of {store.network(args.client)}")
            return 0

    return asyncio.run(run())


def cmd_state(args: argparse.Namespace, config: Config) -> int:
    async def run() -> int:
        async with _services(config) as services:
            from mxward.contentfilter.daemon import build_filter_pipeline
            from mxward.contentfilter.quarantine import Quarantine
            from mxward.policyd.daemon import build_pipeline
            from mxward.shared.karma import KarmaRules, KarmaStore
            from mxward.shared.msgfacts import MessageFacts

            _, checks = await build_pipeline(config, services)
            _, filter_checks = await build_filter_pipeline(config, services)
            checks += filter_checks
            # The filter's own keys (declared by the objects that own them).
            MessageFacts(services.state, config.policyd.message_facts_ttl)
            Quarantine(
                config.data_dir / "quarantine",
                services.state,
                node=services.hostname,
                retention=config.filter.quarantine_retention,
                clock=services.clock,
            )
            KarmaStore(services.state, KarmaRules())
            for decl in services.state.declarations():
                print(f"{decl.namespace:<10} {decl.pattern:<36} ttl {decl.ttl:<28} {decl.description}")
            for check in checks:
                await check.aclose()
            await services.state.ping()
            print(f"state store reachable ({config.state.url or 'embedded'})")
            return 0

    return asyncio.run(run())


def cmd_postfix_config(args: argparse.Namespace, config: Config) -> int:
    p = config.policyd
    kind, host, port = parse_listen(p.listen[0])
    endpoint = (
        f"unix:{host}" if kind == "unix" else f"inet:{host if ':' not in host else '[' + host + ']'}:{port}"
    )
    timeout = int(p.request_deadline + 5)
    early = _earlytalker_options(config)
    data_check = ""
    if early is not None:
        from mxward.policyd.checks.earlytalker import data_restriction

        data_check = data_restriction(early[0], observe=early[1])
    policy = f"check_policy_service {{ {endpoint}, timeout={timeout}s, {{ default_action = DUNNO }} }}"
    data_items = f"{data_check},\n    {policy}" if data_check else policy
    print(
        f"""# mxward {_version()}: main.cf lines for {config.path or "the built-in defaults"}
# Apply with postconf -e, or paste into main.cf, then: postfix reload
#
# The policy check comes after the relay check, so its answers can never open a relay.
# timeout: above mxward's request deadline ({p.request_deadline:g}s), far below Postfix's 100s.
# default_action: what Postfix does if mxward cannot be reached at all. DUNNO lets mail in
# unchecked; "451 4.3.5 Policy service unavailable" would defer everything instead (no mail
# is lost either way: senders retry).
smtpd_recipient_restrictions =
    reject_unauth_destination,
    {policy}

# DATA: a policy reply can add one header, so headers that did not fit the RCPT replies
# (Received-SPF, X-Greylist, ...) go out with the DATA reply."""
        + (
            "\n# reject_unauth_pipelining (earlytalker): DATA is refused (503 5.5.0) in a session that"
            "\n# sent commands ahead of time without PIPELINING."
            if data_check and not _early_observe(early)
            else "\n# warn_if_reject reject_unauth_pipelining (earlytalker, observe mode): only logged."
            if data_check
            else ""
        )
        + f"""
smtpd_data_restrictions =
    {data_items}

# END-OF-DATA: karma books each accepted message into its client's history here.
smtpd_end_of_data_restrictions =
    {policy}"""
    )
    if kind == "unix":
        print(
            "\n# A unix socket outside the Postfix queue directory is reachable only from an"
            "\n# smtpd that does not run chroot'ed (master.cf chroot column 'n')."
        )
    if "earlytalker" in config.checks:
        print(_earlytalker_lines(config, early, data_check))
    print(_filter_lines(config))
    return 0


def _filter_lines(config: Config) -> str:
    """main.cf and (commented) master.cf lines that put the content filter in Postfix's path."""
    f = config.filter
    _, host, port = parse_listen(f.listen[0])
    _, rhost, rport = parse_listen(f.reinject)
    listen = f"[{host}]:{port}"
    deadline = int(f.deadline)
    reinject_service = [
        f"{rhost}:{rport} inet n  -       n       -       20      smtpd",
        "    -o content_filter=",
        "    -o smtpd_proxy_filter=",
        "    -o receive_override_options=no_unknown_recipient_checks,no_header_body_checks,no_milters",
        "    -o smtpd_helo_restrictions=",
        "    -o smtpd_client_restrictions=",
        "    -o smtpd_sender_restrictions=",
        "    -o smtpd_relay_restrictions=",
        "    -o smtpd_recipient_restrictions=permit_mynetworks,reject",
        "    -o smtpd_data_restrictions=",
        "    -o smtpd_end_of_data_restrictions=",
        "    -o mynetworks=127.0.0.0/8,[::1]/128",
        "    -o smtpd_authorized_xforward_hosts=127.0.0.0/8,[::1]/128",
    ]
    out = ["", "# ---- content filter (mxward filter, [filter] mode = " + repr(f.mode) + ")"]
    if f.mode == "after-queue":
        out += [
            "# After-queue: Postfix queues the mail, hands it to mxward over SMTP and mxward",
            "# reinjects it into a second smtpd; a 4xx from mxward keeps the mail queued.",
            "# These two main.cf lines are commented out on purpose: add the master.cf services",
            "# below first, then uncomment them (content_filter without the scan service would",
            "# leave every message waiting in the queue), then: postfix reload.",
            f"# content_filter = scan:{listen}",
            "# receive_override_options = no_address_mappings",
            "",
            "# ---- master.cf for the content filter (not main.cf): the scan transport and the",
            "# reinjection smtpd. Uncomment in /etc/postfix/master.cf; keep the reinjection",
            "# smtpd's maxproc at least the scan transport's.",
            "# scan      unix  -       -       n       -       10      smtp",
            "#     -o smtp_send_xforward_command=yes",
            "#     -o disable_mime_output_conversion=yes",
            "#     -o smtp_generic_maps=",
            f"#     -o smtp_data_done_timeout={max(deadline * 2, 120)}s",
        ]
    else:
        out += [
            "# Before-queue proxy: the public smtpd passes each SMTP session through mxward,",
            "# so a content rejection (5xx) reaches the sending client and nothing bounces.",
            "# ---- master.cf for the content filter (not main.cf): on the public smtpd service add",
            "# the -o lines below, and add the reinjection smtpd (uncomment in /etc/postfix/master.cf).",
            "# smtp      inet  n       -       n       -       20      smtpd",
            f"#     -o smtpd_proxy_filter={host}:{port}",
            "#     -o smtpd_proxy_options=speed_adjust",
            f"#     -o smtpd_proxy_timeout={min(deadline + 30, 300)}s",
        ]
    out += [f"# {line}" for line in reinject_service]
    return "\n".join(out)


def _early_observe(early: tuple[Any, bool] | None) -> bool:
    return early is not None and early[1]


def _earlytalker_options(config: Config) -> tuple[Any, bool] | None:
    """The earlytalker options and whether it is in observe mode; None if it is not enabled."""
    cfg = config.checks.get("earlytalker")
    if cfg is None or not cfg.common.enabled:
        return None
    return cfg.options, cfg.common.mode == "observe"


def _main_cf_line(name: str, value: str) -> str:
    """``name = value``; a long list is written one item per continuation line."""
    if len(name) + len(value) < 90:
        return f"{name} = {value}".rstrip()
    items: list[str] = []
    depth = start = 0
    for index, char in enumerate(value):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:  # only top-level commas: an inline table {..., ...} stays whole
            items.append(value[start:index].strip())
            start = index + 1
    items.append(value[start:].strip())
    return f"{name} =\n    " + ",\n    ".join(items)


def _earlytalker_lines(config: Config, early: tuple[Any, bool] | None, data_check: str) -> str:
    """main.cf settings and (commented) master.cf services of the earlytalker check."""
    if early is None:
        return "\n# earlytalker is listed but disabled (enabled = false): no postscreen or pipelining lines."
    import textwrap

    from mxward.policyd.checks.earlytalker import MASTER_CF_SERVICES, main_cf_settings

    options, observe = early
    out = [
        "",
        "# ---- earlytalker: clients that talk before the greeting or pipeline without leave",
        "# A policy service never sees those bytes, so Postfix tests them: postscreen(8) before",
        "# the 220 greeting, smtpd(8) after it.",
    ]
    if observe:
        out.append("# Observe mode (mode = observe): every test below only logs, nobody is refused.")
    settings = main_cf_settings(options, exempt_networks=config.policyd.exempt.networks, observe=observe)
    for setting in settings:
        out += textwrap.wrap(setting.comment, 94, initial_indent="# ", subsequent_indent="# ")
        out.append(_main_cf_line(setting.name, setting.value))
    if data_check:
        out.append("# The DATA-time pipelining check is in smtpd_data_restrictions above.")
    if options.postscreen:
        out += [
            "",
            "# ---- master.cf (not main.cf): postscreen answers the public SMTP port, smtpd runs behind it",
            "# These lines belong in /etc/postfix/master.cf. They are commented out here so that this",
            "# whole output stays safe to paste into main.cf. In master.cf, replace the public",
            '# "smtp inet ... smtpd" service by the four services below (without the leading "# "),',
            '# move its "-o" options, if any, to the "smtpd pass" service, keep every other service,',
            "# then: postfix reload. Only the MX port: submission (587) stays a plain smtpd with AUTH.",
            '# chroot column "n" works everywhere; keep "y" if your other services run chroot\'ed.',
            "#",
            *(f"# {line}" for line in MASTER_CF_SERVICES),
        ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# argument parsing


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mxward",
        description="Anti-spam policy daemon and content filter for Postfix.",
    )
    top.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $MXWARD_CONFIG, else /etc/mxward/mxward.toml)",
    )
    top.add_argument("--version", action="version", version=f"mxward {_version()} ({build()})")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser(
        "run",
        help="run mxward: the policy daemon, the content filter and, without [state] url, "
        "the embedded state server",
    )
    sub.add_parser(
        "filter",
        help="run the SMTP content filter (starts the embedded state server "
        "if no [state] url is set and none is running)",
    )
    sub.add_parser(
        "policyd",
        help="run the Postfix policy daemon (starts the embedded state server "
        "if no [state] url is set and none is running)",
    )
    check_cmd = sub.add_parser(
        "check",
        help="decide policy requests read from stdin (name=value lines, a blank line "
        "between requests) and print every check's result; state is updated as for real requests. "
        "With a message file: run the content checks on it offline",
    )
    check_cmd.add_argument("message", nargs="?", help="a message file (.eml): run the content checks on it")
    check_cmd.add_argument("--client-ip", help="message mode: the sending client's address")
    check_cmd.add_argument("--client-name", help="message mode: the client's verified host name")
    check_cmd.add_argument("--helo", help="message mode: the client's HELO name")
    check_cmd.add_argument("--from", dest="sender", help="message mode: the envelope sender")
    check_cmd.add_argument("--to", action="append", help="message mode: an envelope recipient (repeatable)")
    check_cmd.add_argument("--queue-id", help="message mode: read policyd's facts for this Postfix queue id")
    check_cmd.add_argument(
        "--headers", action="store_true", help="message mode: show the headers mxward adds"
    )
    grey = sub.add_parser("greylist", help="list, allow or remove greylisting entries")
    grey.add_argument("action", choices=["list", "allow", "remove"])
    grey.add_argument("--client", help="client IP address (its network is used, as in the triplet)")
    grey.add_argument("--sender", help="envelope sender of a triplet (empty string for <>)")
    grey.add_argument("--recipient", help="recipient of a triplet")
    grey.add_argument("--limit", type=int, default=0, help="list at most this many entries")
    karma = sub.add_parser("karma", help="show, list, allow, box or reset client history (karma)")
    karma.add_argument("action", choices=["show", "list", "allow", "box", "reset"])
    karma.add_argument("client", nargs="?", help="client IP address (IPv6: its network is used)")
    karma.add_argument("--boxed", action="store_true", help="list: only clients in the penalty box")
    karma.add_argument(
        "--for", dest="period", help='box: how long (default [checks.karma] penalty), e.g. "2d"'
    )
    state = sub.add_parser("state", help="show the Redis key layout and test the connection")
    state.add_argument("action", choices=["keys"])
    from mxward.contentfilter.quarantine import add_parser as add_quarantine_parser

    add_quarantine_parser(sub)
    from mxward.contentfilter.dkimkeys import add_parser as add_dkim_parser
    from mxward.contentfilter.dmarcreports import add_parser as add_dmarc_parser

    add_dkim_parser(sub)
    add_dmarc_parser(sub)
    sub.add_parser("postfix-config", help="print the main.cf and master.cf lines for this configuration")
    check = sub.add_parser("config-check", help="validate a configuration file (exit 78 if invalid)")
    check.add_argument("file", nargs="?", help="file to check (default: the --config file)")
    return top


COMMANDS = {
    "run": cmd_run,
    "policyd": cmd_policyd,
    "filter": cmd_filter,
    "quarantine": cmd_quarantine,
    "dmarc": cmd_dmarc,
    "dkim": cmd_dkim,
    "check": cmd_check,
    "greylist": cmd_greylist,
    "karma": cmd_karma,
    "state": cmd_state,
    "postfix-config": cmd_postfix_config,
    "config-check": cmd_config_check,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "config-check" and args.file:
        args.config = args.file
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"mxward: configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command not in ("run", "policyd", "filter"):
        _setup_logging(config, "mxward", stderr=True)
        if args.command != "check":
            logging.getLogger().setLevel(logging.WARNING)
    elif not config.path:
        path, _ = config_path(args.config)
        print(f"mxward: {path} not found; running on built-in defaults", file=sys.stderr)
    try:
        return COMMANDS[args.command](args, config)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"mxward {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
