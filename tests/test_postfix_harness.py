"""The private-Postfix harness itself: delivery, policy delegation, XCLIENT, queue control."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import pytest
from support.postfix import find_free_port, send_mail, send_mail_async

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from support.postfix_fixtures import PostfixFactory

pytestmark = pytest.mark.postfix


class PolicyServer:
    """Minimal Postfix policy server: records each request and answers ``action=<self.action>``."""

    def __init__(self) -> None:
        self.action = "DUNNO"
        self.requests: list[dict[str, str]] = []
        self.spec = ""
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with contextlib.suppress(ConnectionError):
            while True:  # many requests per connection
                request: dict[str, str] = {}
                while (line := await reader.readline()).strip():
                    name, _, value = line.decode().rstrip("\n").partition("=")
                    request[name] = value
                if not line:  # Postfix closed the connection
                    break
                self.requests.append(request)
                writer.write(f"action={self.action}\n\n".encode())
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def policy() -> AsyncIterator[PolicyServer]:
    server = PolicyServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.spec = f"inet:127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    yield server
    listener.close()
    await server.close()
    await listener.wait_closed()


async def test_mail_from_outside_client_is_delivered_to_sink(
    postfix: PostfixFactory, policy: PolicyServer
) -> None:
    """Mail from 127.0.0.2 to ok@sink.test passes the policy and reaches the in-process sink."""
    pf = postfix(policy_service=policy.spec)
    result = await send_mail_async(pf.smtpd_port, mail_from="alice@sender.example", rcpt_to=["ok@sink.test"])
    assert result.rcpt["ok@sink.test"].code == 250
    assert result.queue_id is not None
    message = await pf.sink.wait_delivered_async("ok@sink.test", timeout=10)
    assert message.mail_from == "alice@sender.example"
    assert "[127.0.0.2]" in message.headers("Received")[0]
    assert f"id {result.queue_id}" in message.headers("Received")[0]


async def test_policy_defer_if_permit_gives_450_and_queues_nothing(
    postfix: PostfixFactory, policy: PolicyServer
) -> None:
    """A DEFER_IF_PERMIT answer becomes 450 4.7.1 at RCPT, and no message is queued."""
    policy.action = "DEFER_IF_PERMIT 4.7.1 test"
    pf = postfix(policy_service=policy.spec)
    result = await send_mail_async(pf.smtpd_port, mail_from="bob@sender.example", rcpt_to=["ok@sink.test"])
    reply = result.rcpt["ok@sink.test"]
    assert (reply.code, reply.enhanced) == (450, "4.7.1")
    assert reply.text.endswith("test")
    assert result.data is None
    assert pf.queue() == []
    assert pf.sink.messages == []


def test_unreachable_policy_service_gives_default_action(postfix: PostfixFactory) -> None:
    """With nothing listening on the policy port, RCPT gets the 451 4.3.5 default_action within seconds."""
    pf = postfix(policy_service=f"inet:127.0.0.1:{find_free_port()}")
    started = time.monotonic()
    result = send_mail(pf.smtpd_port, mail_from="carol@sender.example", rcpt_to=["ok@sink.test"])
    elapsed = time.monotonic() - started
    reply = result.rcpt["ok@sink.test"]
    assert (reply.code, reply.enhanced) == (451, "4.3.5")
    assert "Policy service unavailable" in reply.text
    assert elapsed < 5


async def test_xclient_login_reaches_policy_as_sasl_username(
    postfix: PostfixFactory, policy: PolicyServer
) -> None:
    """XCLIENT LOGIN from the authorised address reaches the policy as sasl_username, without SASL."""
    pf = postfix(policy_service=policy.spec, xclient_hosts="127.0.0.3")
    assert pf.postconf("smtpd_sasl_auth_enable") == {"smtpd_sasl_auth_enable": "no"}
    result = await send_mail_async(
        pf.smtpd_port,
        mail_from="dave@sender.example",
        rcpt_to=["ok@sink.test"],
        client_ip="127.0.0.3",
        xclient={"NAME": "[UNAVAILABLE]", "ADDR": "192.0.2.7", "LOGIN": "dave@sender.example"},
    )
    assert result.xclient is not None
    assert result.xclient.code == 220
    assert result.rcpt["ok@sink.test"].code == 250
    request = policy.requests[0]
    assert request["sasl_username"] == "dave@sender.example"
    assert request["sasl_method"] == "XCLIENT"
    assert request["client_address"] == "192.0.2.7"


def test_xclient_from_unauthorised_address_is_refused(postfix: PostfixFactory) -> None:
    """A client outside xclient_hosts cannot use XCLIENT to pose as someone else."""
    pf = postfix(xclient_hosts="127.0.0.3")
    result = send_mail(
        pf.smtpd_port,
        mail_from="eve@sender.example",
        rcpt_to=["ok@sink.test"],
        xclient={"ADDR": "192.0.2.8", "LOGIN": "eve"},
    )
    assert result.xclient is not None
    assert result.xclient.code == 550
    assert result.mail is None


async def test_policy_sees_the_client_address(postfix: PostfixFactory, policy: PolicyServer) -> None:
    """The policy request carries client_address=127.0.0.2 and the RCPT-stage envelope."""
    pf = postfix(policy_service=policy.spec)
    await send_mail_async(pf.smtpd_port, mail_from="frank@sender.example", rcpt_to=["ok@sink.test"])
    request = policy.requests[0]
    assert request["client_address"] == "127.0.0.2"
    assert request["protocol_state"] == "RCPT"
    assert (request["sender"], request["recipient"]) == ("frank@sender.example", "ok@sink.test")
    assert request["helo_name"] == "client.test.example"


def test_deferred_mail_is_listed_and_flushed(postfix: PostfixFactory) -> None:
    """A 4xx from the sink leaves the mail deferred with its reason; a flush delivers it later."""
    pf = postfix()
    pf.sink.data_reply = "451 4.3.0 sink says later"
    result = send_mail(pf.smtpd_port, mail_from="grace@sender.example", rcpt_to=["ok@sink.test"])
    assert result.queue_id is not None
    pf.wait_for_log(rf"{result.queue_id}: to=<ok@sink\.test>.*status=deferred")
    # qmgr moves the file from the active to the deferred queue just after smtp(8) logs it
    deadline = time.monotonic() + 10
    while (entries := pf.queue()) and entries[0].queue_name != "deferred" and time.monotonic() < deadline:
        time.sleep(0.05)
    [entry] = entries
    assert (entry.queue_id, entry.queue_name) == (result.queue_id, "deferred")
    assert entry.recipients[0].address == "ok@sink.test"
    assert "451 4.3.0 sink says later" in entry.recipients[0].delay_reason
    pf.sink.data_reply = None
    pf.flush()
    assert pf.sink.wait_delivered("ok@sink.test", timeout=10).mail_from == "grace@sender.example"


def test_smtputf8_mail_is_delivered_to_local_maildir(postfix: PostfixFactory) -> None:
    """SMTPUTF8 mail to user@local.test lands unchanged in that user's Maildir."""
    pf = postfix()
    result = send_mail(
        pf.smtpd_port,
        mail_from="zoë@sender.example",
        rcpt_to=["user@local.test"],
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        subject="Grüße",
        body="Grüße, ünïcödé\n.leading dot\n",
    )
    assert result.data is not None
    assert result.data.code == 250
    [stored] = pf.wait_maildir("user", timeout=10)
    assert "Return-Path: <zoë@sender.example>\n".encode() in stored  # Maildir files use LF
    assert "Grüße, ünïcödé\n.leading dot\n".encode() in stored
