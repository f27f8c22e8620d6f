"""sample: a third-party check used by the tests, registered through an entry point.

Stage: rcpt. Reports the verdict and score it is configured with, after sleeping ``sleep``.

Options ([checks.sample]):
    sleep    duration  0       time to wait before answering (to test budgets and shutdown)
    verdict  string    "pass"  pass | fail | skip
    score    float     0.0     score to report
    reject   bool      false   force a 550 5.7.1 reject
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

from mxward.shared.plugin import Action, Check, Result, Stage, Transaction, Verdict
from mxward.shared.units import Duration


@dataclass(frozen=True, kw_only=True)
class Options:
    sleep: Duration = 0.0
    verdict: str = "pass"
    score: float = 0.0
    reject: bool = False


class SampleCheck(Check[Options]):
    name: ClassVar[str] = "sample"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.RCPT})
    options_type: ClassVar[type[Any]] = Options

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if self.options.sleep:
            await asyncio.sleep(self.options.sleep)
        action = Action.reject("sample check says no") if self.options.reject else None
        return self.result(
            Verdict(self.options.verdict),
            self.options.score,
            "sample reason",
            action=action,
            rcpt=tx.recipient,
        )


class SlowContentCheck(Check[Options]):
    """A content check that sleeps ``sleep`` before passing (the filter's fault tests)."""

    name: ClassVar[str] = "slowcontent"
    stages: ClassVar[frozenset[Stage]] = frozenset({Stage.CONTENT})
    options_type: ClassVar[type[Any]] = Options

    async def check(self, stage: Stage, tx: Transaction) -> Result:
        if self.options.sleep:
            await asyncio.sleep(self.options.sleep)
        action = Action.reject("slowcontent check says no") if self.options.reject else None
        return self.result(Verdict(self.options.verdict), self.options.score, "slow reason", action=action)
