"""Both buses deliver what is published after a subscription is made, to every subscriber."""

from __future__ import annotations

import asyncio

import pytest

from powerbank.actors.bus import LocalBus, RedisBus
from powerbank.storage.testing import isolated_redis_url

BUS_REDIS_DB = 11


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def bus_pair(request):
    """A publisher's bus and a subscriber's bus (two processes' worth, for Redis)."""
    if request.param == "local":
        bus = LocalBus()
        yield bus, bus
        return
    url = isolated_redis_url(BUS_REDIS_DB)
    publisher, subscriber = RedisBus(url), RedisBus(url)
    try:
        yield publisher, subscriber
    finally:
        await publisher.close()
        await subscriber.close()


@pytest.mark.parametrize("channel", ["user:42", "cmd:wallet:abc"])
async def test_every_subscriber_gets_each_message_once(bus_pair, channel):
    publisher, subscriber = bus_pair
    async with subscriber.subscribe(channel) as first, subscriber.subscribe(channel, "other") as second:
        await publisher.publish(channel, {"n": 1})
        await publisher.publish("unrelated", {"n": 2})
        assert await first.get(5) == (channel, {"n": 1})
        assert await second.get(5) == (channel, {"n": 1})
        with pytest.raises(asyncio.TimeoutError):
            await first.get(0.2)


async def test_nothing_arrives_after_leaving(bus_pair):
    publisher, subscriber = bus_pair
    async with subscriber.subscribe("user:7") as subscription:
        pass
    await publisher.publish("user:7", {"late": True})
    with pytest.raises(asyncio.TimeoutError):
        await subscription.get(0.2)


async def test_a_batch_of_results_and_events_reaches_each_waiter(bus_pair):
    """`publish_many` (one message for all results on Redis) gives every waiter its own result,
    and nobody anything meant for another command."""
    publisher, subscriber = bus_pair
    async with (
        subscriber.subscribe("cmd:wallet:a") as a,
        subscriber.subscribe("cmd:rental:b") as b,
        subscriber.subscribe("user:9") as events,
    ):
        await publisher.publish_many([
            ("cmd:wallet:a", {"ok": True, "n": 1}),
            ("cmd:wallet:nobody-waits", {"ok": True}),
            ("user:9", {"type": "wallet.updated"}),
            ("cmd:rental:b", {"ok": False, "reason": "x"}),
        ])
        assert await a.get(5) == ("cmd:wallet:a", {"ok": True, "n": 1})
        assert await b.get(5) == ("cmd:rental:b", {"ok": False, "reason": "x"})
        assert await events.get(5) == ("user:9", {"type": "wallet.updated"})
        with pytest.raises(asyncio.TimeoutError):
            await a.get(0.2)
