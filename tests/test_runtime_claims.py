"""The loops around claimed background work: polling that survives failures and idles when there is nothing to
do, and a heartbeat that outlives failed renewals but gives the work up once the claim is gone."""

from __future__ import annotations

import asyncio

import pytest

from services.runtime.claims import keep_claim, poll_forever


async def test_polling_goes_on_through_failures_and_waits_only_when_idle() -> None:
    outcomes: list[bool | Exception] = [True, True, RuntimeError("database away"), False, True]
    calls = 0
    done = asyncio.Event()

    async def process_one() -> bool:
        nonlocal calls
        calls += 1
        if calls > len(outcomes):
            done.set()
            await asyncio.Event().wait()
        outcome = outcomes[calls - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    loop = asyncio.get_running_loop()
    started = loop.time()
    poller = asyncio.create_task(poll_forever(process_one, 0.2, "test.unavailable"))
    await asyncio.wait_for(done.wait(), 5)
    poller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await poller
    # Two waits: after the failure and after the idle round; none after work was done.
    assert 0.4 <= loop.time() - started < 1.0
    assert calls == len(outcomes) + 1


async def test_the_heartbeat_survives_a_failed_renewal_and_gives_up_a_lost_claim() -> None:
    renewals: list[bool | Exception] = [True, OSError("a blip"), True, False]
    lost = asyncio.Event()

    async def renew() -> bool:
        outcome = renewals.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    await asyncio.wait_for(keep_claim(renew, 0.01, lost.set, "test.heartbeat_failed", unit="u-1"), 5)
    assert lost.is_set()
    assert renewals == []
