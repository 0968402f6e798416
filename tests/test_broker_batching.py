"""BatchedLookup: concurrent lookups become one query; answers and errors reach their callers."""

from __future__ import annotations

import asyncio

import pytest

from powerbank.broker.batching import BatchedLookup


async def test_concurrent_lookups_share_one_query_and_get_their_own_answers():
    asked: list[list[str]] = []
    in_flight, release = asyncio.Event(), asyncio.Event()
    release.set()

    async def fetch_many(keys):
        asked.append(sorted(keys))
        in_flight.set()
        await release.wait()
        return {key: key.lower() for key in keys if key != "GONE"}

    lookup = BatchedLookup(fetch_many)
    answers = await asyncio.gather(*(lookup.get(key) for key in ["A", "B", "A", "GONE", "C"]))
    assert answers == ["a", "b", "a", None, "c"]
    assert asked == [["A", "B", "C", "GONE"]] and lookup.queries == 1
    # Asked while a query is in flight: together in the next query, not a query each.
    in_flight.clear()
    release.clear()
    first = asyncio.ensure_future(lookup.get("D"))
    await in_flight.wait()
    later = asyncio.gather(lookup.get("E"), lookup.get("F"))
    await asyncio.sleep(0.01)
    release.set()
    assert (await first, await later) == ("d", ["e", "f"])
    assert asked[1:] == [["D"], ["E", "F"]] and lookup.queries == 3


async def test_a_storm_is_split_into_bounded_queries():
    sizes = []

    async def fetch_many(keys):
        sizes.append(len(keys))
        return {key: key for key in keys}

    lookup = BatchedLookup(fetch_many, max_keys=100)
    keys = [f"S-{n}" for n in range(250)]
    assert await asyncio.gather(*(lookup.get(k) for k in keys)) == keys
    assert sizes == [100, 100, 50]


async def test_a_failed_query_fails_its_callers_and_the_next_one_runs():
    calls = 0

    async def fetch_many(keys):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database away")
        return {key: 1 for key in keys}

    lookup = BatchedLookup(fetch_many)
    results = await asyncio.gather(lookup.get("A"), lookup.get("B"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await lookup.get("A") == 1
