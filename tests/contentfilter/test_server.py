"""The filter's SMTP side against a real downstream (the test sink), in-process."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.filter_inproc import RunningFilter, filter_config, message, running_filter, stuffed
from support.postfix import SmtpSink, find_free_port

from mxward.shared.karma import KarmaRules, KarmaStore
from mxward.shared.msgfacts import MessageFacts


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink(xforward=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def flt(
    tmp_path: Path, redis_server: Any, sink: SmtpSink, request: pytest.FixtureRequest
) -> AsyncIterator[RunningFilter]:
    table = getattr(request, "param", {})
    config = filter_config(tmp_path, redis_server.url, sink.port, table)
    async with running_filter(config, sink) as running:
        yield running


async def transaction(
    flt: RunningFilter,
    data: bytes,
    rcpts: tuple[str, ...] = ("bob@sink.test",),
    mail: str = "MAIL FROM:<alice@sender.example>",
) -> tuple[int, str]:
    talk = await flt.talk()
    try:
        assert (await talk.cmd(mail))[0] == 250
        for rcpt in rcpts:
            assert (await talk.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await talk.cmd("DATA"))[0] == 354
        await talk.send(stuffed(data))
        return await talk.reply()
    finally:
        await talk.close()


async def test_ehlo_announces_what_postfix_needs(flt: RunningFilter) -> None:
    talk = await flt.talk()
    text = await talk.cmd("EHLO scan.test.example")
    await talk.close()
    lines = set(text[1].split("\n")[1:])
    assert lines == {
        "PIPELINING",
        "SIZE 52428800",
        "8BITMIME",
        "SMTPUTF8",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE",
    }


@pytest.mark.parametrize("flt", [{"xforward_hosts": ["127.0.0.9/32"]}], indirect=True)
async def test_xforward_only_for_xforward_hosts(flt: RunningFilter) -> None:
    talk = await flt.talk()
    assert "XFORWARD" not in (await talk.cmd("EHLO x.example"))[1]
    code, text = await talk.cmd("XFORWARD ADDR=192.0.2.1")
    await talk.close()
    assert (code, text) == (550, "5.7.0 Error: insufficient authorization")


@pytest.mark.parametrize("flt", [{"allowed_clients": ["127.0.0.9/32"]}], indirect=True)
async def test_clients_outside_allowed_networks_are_refused(flt: RunningFilter) -> None:
    from support.filter_inproc import Talk

    talk = await Talk.open(flt.port)
    assert await talk.reply() == (554, "5.7.1 Access denied")
    assert (await talk.reply())[0] == 0  # closed
    await talk.close()


async def test_envelope_and_dsn_parameters_pass_unchanged(flt: RunningFilter) -> None:
    talk = await flt.talk()
    assert (await talk.cmd("XFORWARD NAME=mail.client.example ADDR=192.0.2.7 PORT=4242"))[0] == 250
    assert (await talk.cmd("XFORWARD PROTO=ESMTP HELO=mail.client.example IDENT=AbC123xyZ SOURCE=REMOTE"))[
        0
    ] == 250
    mail = "MAIL FROM:<Alice@Sender.example> SIZE=300 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=Env+2BId.1"
    assert (await talk.cmd(mail))[0] == 250
    rcpt = "RCPT TO:<grüße@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;gr\\x{FC}\\x{DF}e@sink.test"
    assert (await talk.cmd(rcpt))[0] == 250
    assert (await talk.cmd("RCPT TO:<b@sink.test> ORCPT=rfc822;B@Sink.test"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message(body="8-bit: gr\u00fc\u00dfe\r\n")))
    code, text = await talk.reply()
    await talk.close()
    assert code == 250 and "queued as SINK" in text
    got = flt.sink.wait_delivered("b@sink.test")
    assert got.mail_from == "Alice@Sender.example"
    # SIZE is left out only because this downstream does not announce SIZE
    assert got.mail_options == ("BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "ENVID=Env+2BId.1")
    assert got.rcpt_tos == ("grüße@sink.test", "b@sink.test")
    assert got.rcpt_options == (
        ("NOTIFY=SUCCESS,FAILURE", "ORCPT=utf-8;gr\\x{FC}\\x{DF}e@sink.test"),
        ("ORCPT=rfc822;B@Sink.test",),
    )
    assert dict(got.xforward) == {
        "NAME": "mail.client.example",
        "ADDR": "192.0.2.7",
        "PORT": "4242",
        "PROTO": "ESMTP",
        "HELO": "mail.client.example",
        "IDENT": "AbC123xyZ",
        "SOURCE": "REMOTE",
    }
    assert "gr\u00fc\u00dfe".encode() in got.data


async def test_xforward_does_not_leak_into_the_next_transaction(flt: RunningFilter) -> None:
    talk = await flt.talk()
    assert (await talk.cmd("XFORWARD ADDR=192.0.2.7 IDENT=AAAAAA1"))[0] == 250
    for rcpt in ("one@sink.test", "two@sink.test"):
        assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
        assert (await talk.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250
        assert (await talk.cmd("DATA"))[0] == 354
        await talk.send(stuffed(message()))
        assert (await talk.reply())[0] == 250
    await talk.close()
    assert dict(flt.sink.wait_delivered("one@sink.test").xforward).get("ADDR") == "192.0.2.7"
    assert flt.sink.wait_delivered("two@sink.test").xforward == ()


async def test_unavailable_xforward_values_are_unknown(flt: RunningFilter) -> None:
    talk = await flt.talk()
    assert (await talk.cmd("XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.8"))[0] == 250
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await talk.cmd("RCPT TO:<x@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message()))
    assert (await talk.reply())[0] == 250
    await talk.close()
    assert dict(flt.sink.wait_delivered("x@sink.test").xforward) == {"ADDR": "192.0.2.8"}


async def test_pipelined_commands_get_every_reply_in_order(flt: RunningFilter) -> None:
    talk = await flt.talk()
    await talk.send(
        "MAIL FROM:<a@sender.example>\r\nRCPT TO:<p1@sink.test>\r\nRCPT TO:<p2@sink.test>\r\nDATA\r\n"
    )
    assert [(await talk.reply())[0] for _ in range(4)] == [250, 250, 250, 354]
    await talk.send(stuffed(message()) + b"QUIT\r\n")  # QUIT pipelined after the dot
    assert (await talk.reply())[0] == 250
    assert (await talk.reply())[0] == 221
    await talk.close()
    assert flt.sink.wait_delivered("p2@sink.test").rcpt_tos == ("p1@sink.test", "p2@sink.test")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b".\r\n",
        b"..\r\n",
        b".leading dot\r\n..two dots\r\n.\r\nlast\r\n",
        b"no final line end",
        b"line\r\n\r\n.\r\n\r\n",
    ],
    ids=["empty", "lone-dot", "two-dots", "dots", "no-final-crlf", "dot-between-blank-lines"],
)
async def test_dot_stuffing_round_trip(flt: RunningFilter, body: bytes) -> None:
    head = message(body="")
    code, _ = await transaction(flt, head + body)
    assert code == 250
    got = flt.sink.wait_delivered("bob@sink.test")
    expected = head + body if body.endswith(b"\r\n") or not body else head + body + b"\r\n"
    assert got.data.endswith(expected[len(head) :])
    assert got.data.count(b"Authentication-Results: mx.test.example") == 1


async def test_bare_line_ends_become_crlf_downstream(flt: RunningFilter) -> None:
    code, _ = await transaction(flt, message(body="one\ntwo\rthree\r\n"))
    assert code == 250
    assert flt.sink.wait_delivered("bob@sink.test").data.endswith(b"one\r\ntwo\r\nthree\r\n")


async def test_a_bare_lf_dot_is_content_not_the_end(flt: RunningFilter) -> None:
    """SMTP smuggling: only CRLF.CRLF ends the message."""
    body = b"before\n.\r\nMAIL FROM:<evil@example>\r\nafter\r\n"
    code, _ = await transaction(flt, message(body="") + body)
    assert code == 250
    got = flt.sink.wait_delivered("bob@sink.test")
    assert b"MAIL FROM:<evil@example>" in got.data and len(flt.sink.messages) == 1


@pytest.mark.parametrize("flt", [{"max_message_size": 4096}], indirect=True)
async def test_oversized_message_gets_552_after_the_dot_and_the_session_goes_on(flt: RunningFilter) -> None:
    talk = await flt.talk()
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await talk.cmd("RCPT TO:<big@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message(body="x" * 900 + "\r\n") * 10))
    assert await talk.reply() == (552, "5.3.4 Message size exceeds fixed limit")
    assert (await talk.cmd("MAIL FROM:<a@sender.example> SIZE=999999"))[0] == 552
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await talk.cmd("RCPT TO:<small@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message()))
    assert (await talk.reply())[0] == 250
    await talk.close()
    assert flt.sink.delivered_to("big@sink.test") == []
    assert flt.sink.resets >= 1  # the refused transaction was reset downstream


@pytest.mark.parametrize("flt", [{"max_line_length": 1000}], indirect=True)
async def test_overlong_line_is_refused(flt: RunningFilter) -> None:
    code, text = await transaction(flt, message(body="y" * 5000 + "\r\n"))
    assert code == 500 and "longer than 1000" in text


async def test_protocol_order_errors(flt: RunningFilter) -> None:
    talk = await flt.talk()
    assert (await talk.cmd("RCPT TO:<x@sink.test>"))[0] == 503
    assert (await talk.cmd("DATA"))[0] == 503
    assert (await talk.cmd("MAIL FROM:alice@sender.example"))[0] == 501
    assert (await talk.cmd("MAIL FROM:<a@sender.example> AUTH=<>"))[0] == 555
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 503
    assert (await talk.cmd("XFORWARD ADDR=192.0.2.1"))[0] == 503
    assert (await talk.cmd("RCPT TO:<x@sink.test> FOO=bar"))[0] == 555
    assert (await talk.cmd("DATA"))[0] == 554  # no recipient accepted
    assert (await talk.cmd("XFORWARD BOGUS=1"))[0] == 503
    assert (await talk.cmd("RSET"))[0] == 250
    assert (await talk.cmd("XFORWARD BOGUS=1"))[0] == 501
    assert (await talk.cmd("XFORWARD ADDR=" + "1" * 300))[0] == 501
    await talk.close()


@pytest.mark.parametrize("flt", [{"relay_downstream_rejects": True}], indirect=True)
async def test_each_recipient_gets_the_downstream_answer(flt: RunningFilter) -> None:
    flt.sink.rcpt_replies = {
        "gone@sink.test": "550 5.1.1 no such user",
        "later@sink.test": "450 4.2.1 try later",
    }
    talk = await flt.talk()
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    assert await talk.cmd("RCPT TO:<ok1@sink.test>") == (250, "2.1.5 Ok")
    assert await talk.cmd("RCPT TO:<gone@sink.test>") == (550, "5.1.1 no such user")
    assert await talk.cmd("RCPT TO:<later@sink.test>") == (450, "4.2.1 try later")
    assert (await talk.cmd("RCPT TO:<ok2@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message()))
    assert (await talk.reply())[0] == 250
    await talk.close()
    assert flt.sink.wait_delivered("ok1@sink.test").rcpt_tos == ("ok1@sink.test", "ok2@sink.test")
    assert len(flt.sink.messages) == 1


async def test_a_permanent_downstream_refusal_defers_by_default(flt: RunningFilter) -> None:
    flt.sink.rcpt_replies = {"gone@sink.test": "554 5.7.1 Relay access denied"}
    talk = await flt.talk()
    assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
    code, text = await talk.cmd("RCPT TO:<gone@sink.test>")
    await talk.close()
    assert code == 451 and text.startswith("4.3.0") and "Relay access denied" in text


async def test_refusal_of_the_message_downstream_gives_451(flt: RunningFilter) -> None:
    flt.sink.data_reply = "554 5.6.0 no thanks"
    code, text = await transaction(flt, message())
    assert (code, text) == (451, "4.3.0 Temporary local problem, please try again later")
    flt.sink.data_reply = "452 4.3.1 full"
    assert (await transaction(flt, message()))[0] == 451
    assert flt.sink.messages == []


async def test_downstream_unreachable_gives_451_at_mail(tmp_path: Path, redis_server: Any) -> None:
    port = find_free_port()
    config = filter_config(tmp_path, redis_server.url, port)
    sink = SmtpSink()
    async with running_filter(config, sink) as flt:
        talk = await flt.talk()
        assert await talk.cmd("MAIL FROM:<a@sender.example>") == (
            451,
            "4.3.0 Temporary local problem, please try again later",
        )
        await talk.close()


async def test_authentication_results_join_and_karma_write_back(flt: RunningFilter) -> None:
    """policyd's stored facts (by queue id) reach A-R; the verdict goes into the IP's karma."""
    state = flt.runtime.services.state
    facts = MessageFacts(state)
    await facts.save(
        "QID1AAAA",
        {
            "client_address": "192.0.2.7",
            "helo": "mail.sender.example",
            "facts": {"spf.result": "pass", "iprev.result": "pass", "karma.known": True},
        },
    )
    talk = await flt.talk()
    assert (await talk.cmd("XFORWARD ADDR=192.0.2.7 IDENT=QID1AAAA HELO=mail.sender.example"))[0] == 250
    assert (await talk.cmd("MAIL FROM:<alice@sender.example>"))[0] == 250
    assert (await talk.cmd("RCPT TO:<joined@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message()))
    assert (await talk.reply())[0] == 250
    # the same queue id again (a retry): karma counts it once
    assert (await talk.cmd("XFORWARD ADDR=192.0.2.7 IDENT=QID1AAAA"))[0] == 250
    assert (await talk.cmd("MAIL FROM:<alice@sender.example>"))[0] == 250
    assert (await talk.cmd("RCPT TO:<joined@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(message()))
    assert (await talk.reply())[0] == 250
    # a dateless one from another queue id: quarantined, naughty
    assert (await talk.cmd("XFORWARD ADDR=192.0.2.7 IDENT=QID2BBBB"))[0] == 250
    assert (await talk.cmd("MAIL FROM:<alice@sender.example>"))[0] == 250
    assert (await talk.cmd("RCPT TO:<joined@sink.test>"))[0] == 250
    assert (await talk.cmd("DATA"))[0] == 354
    await talk.send(stuffed(b"From: <alice@sender.example>\r\nSubject: x\r\n\r\nbody\r\n"))
    code, text = await talk.reply()
    await talk.close()
    assert code == 250 and "quarantined as" in text
    got = flt.sink.wait_delivered("joined@sink.test")
    ar = got.headers("Authentication-Results")[0]
    assert "iprev=pass policy.iprev=192.0.2.7" in ar
    assert "spf=pass smtp.mailfrom=alice@sender.example" in ar
    await flt.runtime.service.drain(5.0)
    record = await KarmaStore(state, KarmaRules()).show("192.0.2.7")
    assert (record.nice, record.naughty) == (1, 1)


async def test_tagged_mail_gets_spam_headers_and_the_subject_prefix(
    tmp_path: Path, redis_server: Any, sink: SmtpSink
) -> None:
    config = filter_config(
        tmp_path,
        redis_server.url,
        sink.port,
        {"tag_score": 2.0, "subject_prefix": "[SPAM] "},
        checks={"headers": {"action": "score"}},
    )
    async with running_filter(config, sink) as scoring:
        dateless = b"From: <a@sender.example>\r\nSubject: cheap\x00 pills\rnow\r\n\r\nbody\r\n"
        code, _ = await transaction(scoring, dateless, rcpts=("tagged@sink.test",))
        assert code == 250
        got = sink.wait_delivered("tagged@sink.test")
        assert got.headers("X-Spam-Flag") == ["YES"]
        assert got.headers("X-Spam-Status")[0].startswith("Yes, score=3")
        assert got.headers("Subject")[0].startswith("[SPAM] cheap")
        assert got.data.count(b"\nSubject:") + got.data.startswith(b"Subject:") == 1
        code, _ = await transaction(scoring, message(), rcpts=("clean@sink.test",))
        assert sink.wait_delivered("clean@sink.test").headers("X-Spam-Flag") == []


class _Stamp:
    """A content check whose outgoing step adds a field (or fails)."""

    @staticmethod
    def build(fail: bool = False) -> Any:
        from mxward.shared.plugin import Check, Result, Stage, Transaction, Verdict

        class Stamp(Check[Any]):
            name = "stamp"
            stages = frozenset({Stage.CONTENT})

            async def check(self, stage: Stage, tx: Transaction) -> Result:
                return self.result(Verdict.PASS)

            async def outgoing(self, tx: Transaction, message: bytes) -> tuple[str, ...]:
                if fail:
                    raise RuntimeError("no key")
                assert message.startswith(b"Authentication-Results: mx.test.example")
                return (f"X-Stamp: {len(message)}\r\n\tfolded",)

        return Stamp


@pytest.mark.parametrize("on_error", ["ignore", "tempfail"])
async def test_outgoing_steps_sign_the_final_message(flt: RunningFilter, on_error: str) -> None:
    """Check.outgoing adds fields on top of the final bytes; a failing one follows on_error."""
    from mxward.shared.pipeline import ActiveCheck, Pipeline

    service = flt.runtime.service
    good = _Stamp.build()(None, flt.runtime.services)
    bad = _Stamp.build(fail=True)(None, flt.runtime.services)
    service.pipeline = Pipeline(
        [ActiveCheck(check=good, timeout=1.0), ActiveCheck(check=bad, timeout=1.0, on_error=on_error)],
        service.pipeline.settings,
    )
    code, text = await transaction(flt, message(), rcpts=("stamped@sink.test",))
    if on_error == "tempfail":
        assert (code, text) == (451, "4.3.0 Temporary local problem, please try again later")
        assert flt.sink.delivered_to("stamped@sink.test") == []
        return
    assert code == 250
    got = flt.sink.wait_delivered("stamped@sink.test")
    assert got.data.startswith(b"X-Stamp: ")
    first = got.data.split(b"\r\n", 2)
    assert first[1] == b"\tfolded" and first[2].startswith(b"Authentication-Results: mx.test.example")
    assert int(first[0].split()[1]) == len(got.data) - len(first[0]) - len(first[1]) - 4


async def test_dmarc_and_dkim_results_go_into_karma(flt: RunningFilter) -> None:
    """A DMARC fail lowers the client's karma (even under p=none); a first-party DKIM pass raises it."""
    from mxward.shared.pipeline import ActiveCheck, Pipeline
    from mxward.shared.plugin import Check, Result, Stage, Transaction, Verdict

    class Judge(Check[Any]):
        """Reports what the dkim and dmarc checks would, from the Subject."""

        name = "judge"
        stages = frozenset({Stage.CONTENT})

        async def check(self, stage: Stage, tx: Transaction) -> Result:
            failing = "fail" in (tx.message.get("subject") if tx.message else "")
            facts = (
                {"dmarc.result": "fail", "dmarc.policy": "none", "dmarc.dkim_aligned": False}
                if failing
                else {"dmarc.result": "pass", "dmarc.dkim_aligned": True}
            )
            return self.result(Verdict.PASS, facts=facts)

    service = flt.runtime.service
    service.pipeline = Pipeline(
        [ActiveCheck(check=Judge(None, flt.runtime.services), timeout=1.0)], service.pipeline.settings
    )
    talk = await flt.talk()
    for ident, subject in (("QKARMA01", "fail one"), ("QKARMA02", "aligned"), ("QKARMA03", "fail two")):
        assert (await talk.cmd(f"XFORWARD ADDR=192.0.2.77 IDENT={ident}"))[0] == 250
        assert (await talk.cmd("MAIL FROM:<a@sender.example>"))[0] == 250
        assert (await talk.cmd("RCPT TO:<k@sink.test>"))[0] == 250
        assert (await talk.cmd("DATA"))[0] == 354
        await talk.send(stuffed(message(subject=subject)))
        assert (await talk.reply())[0] == 250  # delivered: p=none changes nothing for the mail
    await talk.close()
    await service.drain(5.0)
    record = await KarmaStore(flt.runtime.services.state, KarmaRules()).show("192.0.2.77")
    assert (record.nice, record.naughty) == (1, 2)


async def test_every_reply_carries_an_enhanced_status_code(flt: RunningFilter) -> None:
    """Also aiosmtpd's own replies (unknown command, bad syntax, QUIT, HELP)."""
    talk = await flt.talk()
    for command, code in (("BOGUS", 500), ("HELP", 250), ("NOOP", 250), ("EXPN x", 502), ("QUIT", 221)):
        got, text = await talk.cmd(command)
        assert got == code, (command, got, text)
        assert re.match(r"[245]\.\d{1,3}\.\d{1,3} ", text), (command, text)
    await talk.close()
