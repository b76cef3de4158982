"""Background work claimed from PostgreSQL, the same way in every service: a worker polls for one unit of work
(claimed with SKIP LOCKED, so replicas never share it), and keeps its claim alive with a heartbeat while it works;
a claim whose heartbeat stops (its replica died) goes stale and another worker takes it over.

The services own their claims (tables, SQL, what the work is); these are the two loops around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

_log = structlog.get_logger("megacity.claims")


async def poll_forever(process_one: Callable[[], Awaitable[bool]], poll_seconds: float, event: str) -> None:
    """Runs `process_one` for the life of the service, waiting `poll_seconds` whenever it found nothing to do.
    Neither failing work nor PostgreSQL being away ends it: work that raised is failed inside `process_one`, so
    what reaches this loop is the database being away (a claim already taken goes stale and is taken again)."""
    while True:
        try:
            worked = await process_one()
        except Exception as error:
            _log.warning(event, error=repr(error))
            worked = False
        if not worked:
            await asyncio.sleep(poll_seconds)


async def keep_claim(
    renew: Callable[[], Awaitable[bool]], every_seconds: float, on_lost: Callable[[], None], event: str, **context: str
) -> None:
    """Renews a claim every `every_seconds` until cancelled; calls `on_lost` and returns once the claim is no
    longer held (taken over, or the work was withdrawn). A renewal that fails is logged as `event` and tried again
    at the next beat: missing one is harmless, as a claim goes stale only after several."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            held = await renew()
        except Exception as error:
            _log.warning(event, error=repr(error), **context)
            continue
        if not held:
            on_lost()
            return
