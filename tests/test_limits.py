"""The fair-share pieces on their own: a token bucket on a moved clock, write slots handed out in turn."""

from __future__ import annotations

import asyncio

import httpx

from pipeline.delivery import _retry_after
from pipeline.server.limits import Concurrency, FairSlots, RateLimit


def test_a_rate_limit_allows_a_burst_then_names_the_wait_and_refills() -> None:
    now = [0.0]
    limit = RateLimit(3, period=60, clock=lambda: now[0])
    assert [limit.take("ann") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limit.take("ann") == 20.0 and limit.take("bob") == 0.0  # one every 20 s; bob has his own bucket
    now[0] = 20.0
    assert limit.take("ann") == 0.0 and limit.take("ann") > 0


def test_concurrency_holds_places_per_key_until_the_block_ends() -> None:
    places = Concurrency(1)
    with places.hold("acme") as first, places.hold("acme") as second, places.hold("globex") as other:
        assert (first, second, other) == (True, False, True)
    with places.hold("acme") as again:
        assert again


def test_write_slots_go_to_waiting_accounts_in_turn_not_in_arrival_order() -> None:
    async def scenario() -> list[str]:
        slots, order, release = FairSlots(1), [], asyncio.Event()

        async def write(account: str) -> None:
            async with slots.slot(account):
                order.append(account)
                await release.wait()

        first = asyncio.create_task(write("acme"))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(write(a)) for a in ("acme", "acme", "acme", "globex")]
        cancelled = asyncio.create_task(write("initech"))
        await asyncio.sleep(0)
        cancelled.cancel()  # a client gone while waiting gives up its turn
        release.set()
        await asyncio.gather(first, *waiting, return_exceptions=True)
        await asyncio.gather(cancelled, return_exceptions=True)
        async with slots.slot("after"):  # every slot came back
            order.append("after")
        return order

    assert asyncio.run(scenario()) == ["acme", "acme", "globex", "acme", "acme", "after"]


def test_retry_after_is_read_as_seconds_or_a_date_and_bounded() -> None:
    def answer(value: str | None) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": value} if value is not None else {})

    assert _retry_after(answer("7")) == 7.0
    assert _retry_after(answer("999999")) == 3600.0
    assert _retry_after(answer(None)) == _retry_after(answer("soon")) == 1.0
    assert _retry_after(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0


def test_one_tokens_flood_spends_its_own_rate_not_the_accounts(home) -> None:  # noqa: ANN001
    """ann's cluster posting in a loop drew the account's budget down with requests its own limit refused:
    dan's cluster in the same account then got 429 for every batch."""
    import pytest
    from fastapi import HTTPException

    from pipeline.principals import Principal
    from pipeline.runtime import Pipeline
    from pipeline.server.ingest import IngestGate

    gate = IngestGate(Pipeline.open(create=True))  # 20 a second per token, 100 per account

    async def admitted(token_id: str) -> bool:
        try:
            async with gate.admitted(Principal("cluster", "acme", token_id=token_id)):
                return True
        except HTTPException as refused:
            assert refused.status_code == 429
            return False

    async def flood_then_another() -> tuple[int, bool]:
        flooded = sum([await admitted("ann-cluster") for _ in range(500)])
        return flooded, await admitted("dan-cluster")

    flooded, other = asyncio.run(flood_then_another())
    assert flooded == pytest.approx(20, abs=2) and other
