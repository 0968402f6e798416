"""The embedded broker's station authentication and topic ACL, over real MQTT connections."""

from __future__ import annotations

import asyncio
import collections
import contextlib

import pytest
from amqtt.contexts import Action
from amqtt.errors import ConnectError

from powerbank.broker import embedded, mqtt
from powerbank.broker.embedded import provision_station_password, station_may
from powerbank.broker.protocol import Topics
from powerbank.broker.testing import station_stack
from powerbank.simulators.stations import provision_fleet

REFUSED = 0x80


@pytest.fixture
async def stack(tmp_path):
    async with station_stack(tmp_path) as stack:
        stack.specs = await provision_fleet(stack.sessions, 2, 2, 1, serial_prefix="ACL")
        yield stack


def login(stack, username, password) -> str:
    host_port = stack.broker_url.split("://", 1)[1]
    return f"mqtt://{username}:{password}@{host_port}" if username else f"mqtt://{host_port}"


async def refused(url, client_id, **kwargs) -> bool:
    try:
        client = await mqtt.connect(url, client_id, **kwargs)
    except ConnectError:
        return True
    await mqtt.close(client)
    return False


@contextlib.asynccontextmanager
async def connected(url, client_id, **kwargs):
    client = await mqtt.connect(url, client_id, **kwargs)
    try:
        yield client
    finally:
        await mqtt.close(client)


async def test_who_may_connect(stack):
    a, b = stack.specs
    own_will = (stack.topics.status(a.serial), '{"type":"offline"}')
    assert not await refused(login(stack, a.serial, a.password), a.serial, will=own_will)
    assert await refused(login(stack, a.serial, "wrong"), a.serial)
    assert await refused(login(stack, None, None), "anonymous")
    assert await refused(login(stack, a.serial, b.password), a.serial)
    assert await refused(login(stack, "NO-SUCH", a.password), "NO-SUCH")
    # Right password, but posing under another client id or with another station's last will.
    assert await refused(login(stack, a.serial, a.password), b.serial)
    assert await refused(
        login(stack, a.serial, a.password), a.serial, will=(stack.topics.status(b.serial), '{"type":"offline"}')
    )
    assert await refused(login(stack, stack.settings.bridge_username, "wrong"), "bridge-x")
    assert not await refused(
        login(stack, stack.settings.bridge_username, stack.settings.bridge_password), "bridge-x"
    )


async def test_a_station_reaches_only_its_own_topics(stack):
    a, b = stack.specs
    topics = stack.topics
    bridge_login = login(stack, stack.settings.bridge_username, stack.settings.bridge_password)
    async with connected(bridge_login, "spy") as spy, connected(login(stack, a.serial, a.password), a.serial) as station:
        assert await spy.subscribe([("pb/#", 1)]) == [1]
        granted = await station.subscribe(
            [
                (topics.commands(a.serial), 1),
                (topics.errors(a.serial), 1),
                (topics.commands(b.serial), 1),
                (topics.events(a.serial), 1),
                ("pb/v1/stations/+/commands", 1),
                ("#", 1),
            ]
        )
        assert granted == [1, 1, REFUSED, REFUSED, REFUSED, REFUSED]
        for topic in (topics.events(b.serial), topics.commands(a.serial), topics.status(b.serial), "pb/other"):
            await station.publish(topic, b"forged", qos=1)
        await station.publish(topics.events(a.serial), b"mine", qos=1)
        received = []
        with contextlib.suppress(TimeoutError):
            while True:
                message = await spy.deliver_message(timeout_duration=0.5)
                if message.topic != topics.errors(a.serial):  # the bridge answers "mine": not JSON
                    received.append((message.topic, bytes(message.data)))
        assert received == [(topics.events(a.serial), b"mine")]
        # And commands for another station never reach this one.
        await spy.publish(topics.commands(b.serial), b"for b", qos=1)
        await spy.publish(topics.commands(a.serial), b"for a", qos=1)
        delivered = []
        with contextlib.suppress(TimeoutError):
            while True:
                message = await station.deliver_message(timeout_duration=0.5)
                delivered.append((message.topic, bytes(message.data)))
        assert [d for d in delivered if d[0] != topics.errors(a.serial)] == [(topics.commands(a.serial), b"for a")]


@pytest.mark.parametrize(
    ("topic", "action", "allowed"),
    [
        ("pb/v1/stations/A/events", Action.PUBLISH, True),
        ("pb/v1/stations/A/status", Action.PUBLISH, True),
        ("pb/v1/stations/A/commands", Action.PUBLISH, False),
        ("pb/v1/stations/B/events", Action.PUBLISH, False),
        ("pb/v1/stations/A/commands", Action.SUBSCRIBE, True),
        ("pb/v1/stations/A/errors", Action.RECEIVE, True),
        ("pb/v1/stations/A/events", Action.SUBSCRIBE, False),
        ("pb/v1/stations/B/commands", Action.RECEIVE, False),
        ("pb/v1/stations/+/commands", Action.SUBSCRIBE, False),
        ("pb/v1/stations/A/#", Action.SUBSCRIBE, False),
    ],
)
def test_station_acl_table(topic, action, allowed):
    assert station_may(Topics("pb"), "A", topic, action) is allowed


async def test_credential_checks_are_cached_and_follow_a_new_password(stack, monkeypatch):
    a, _ = stack.specs
    verifications = []
    real_verify = embedded.verify_password

    def counting_verify(stored, password):
        verifications.append(password)
        return real_verify(stored, password)

    monkeypatch.setattr(embedded, "verify_password", counting_verify)
    url = login(stack, a.serial, a.password)
    for _ in range(3):
        assert not await refused(url, a.serial)
    for _ in range(3):
        assert await refused(login(stack, a.serial, "wrong"), a.serial)
    assert verifications == [a.password, "wrong"]  # one hash check per distinct attempt
    async with stack.sessions.begin() as db:
        new_password = await provision_station_password(db, a.station_id)
    stack.embedded.authority.forget(a.serial)
    assert await refused(url, a.serial)
    assert not await refused(login(stack, a.serial, new_password), a.serial)


async def test_a_login_storm_does_not_block_the_broker(stack):
    """Password checks run off the event loop: many stations connecting at once all get in."""
    a, b = stack.specs
    clients = await asyncio.gather(
        *(mqtt.connect(login(stack, s.serial, s.password), s.serial) for s in (a, b))
    )
    assert all(mqtt.is_connected(c) for c in clients)
    await asyncio.gather(*(mqtt.close(c) for c in clients))


async def test_no_message_is_lost_while_clients_subscribe_and_leave(stack):
    """amqtt walks its subscription table across awaits (the ACL's RECEIVE check); churn during
    a broadcast must not drop the message for the subscribers not yet reached (see
    embedded._Subscriptions). Ten subscribers walked before the listener widen the window."""
    bridge_login = login(stack, stack.settings.bridge_username, stack.settings.bridge_password)
    sent = 150

    async def churn(index: int) -> None:
        for round_ in range(3):
            async with connected(bridge_login, f"churn-{index}-{round_}") as client:
                await client.subscribe([(f"churn/{index}/{round_}/a", 1), (f"churn/{index}/{round_}/b", 1)])

    async with contextlib.AsyncExitStack() as clients:
        for n in range(10):
            decoy = await clients.enter_async_context(connected(bridge_login, f"decoy-{n}"))
            await decoy.subscribe([("load/#", 1)])
        listener = await clients.enter_async_context(connected(bridge_login, "listener"))
        await listener.subscribe([("load/+", 1)])
        talker = await clients.enter_async_context(connected(bridge_login, "talker"))

        async def talk() -> None:
            for n in range(sent):
                await talker.publish(f"load/{n}", b"x", qos=1)

        await asyncio.gather(talk(), *(churn(i) for i in range(15)))
        received = set()
        with contextlib.suppress(TimeoutError):
            while len(received) < sent:
                message = await listener.deliver_message(timeout_duration=2)
                received.add(message.topic)
    assert len(received) == sent


def test_station_passwords_are_stored_salted_and_older_argon2_hashes_still_verify():
    password = "token-from-provisioning"
    first, second = embedded.hash_password(password), embedded.hash_password(password)
    assert first != second and password not in first  # salted, never the password itself
    assert embedded.verify_password(first, password) and not embedded.verify_password(first, password + "x")
    assert not embedded.verify_password("sha256$not-hex$00", password)
    legacy = embedded.LEGACY_HASHER.hash(password)  # what earlier versions stored
    assert embedded.verify_password(legacy, password) and not embedded.verify_password(legacy, "other")


async def test_a_broadcast_walks_only_the_filters_that_can_match_and_a_leaver_only_its_own(stack, monkeypatch):
    """At fleet scale every station has a command filter of its own; amqtt walked all of them
    for every message, every connect and every disconnect (see embedded._Subscriptions)."""
    broker = stack.embedded.broker
    bridge_login = login(stack, stack.settings.bridge_username, stack.settings.bridge_password)
    matched = []
    real_matches = broker._matches
    monkeypatch.setattr(broker, "_matches", lambda topic, a_filter: matched.append(a_filter) or real_matches(topic, a_filter))
    async with contextlib.AsyncExitStack() as clients:
        for n in range(40):
            client = await clients.enter_async_context(connected(bridge_login, f"own-{n}"))
            await client.subscribe([(f"fleet/{n}/commands", 1)])
        watcher = await clients.enter_async_context(connected(bridge_login, "watcher"))
        await watcher.subscribe([("fleet/+/commands", 1)])
        leaver = await clients.enter_async_context(connected(bridge_login, "leaver"))
        await leaver.subscribe([("leaver/a", 1), ("leaver/#", 1)])
        assert broker._subscriptions.filters_of["leaver"] == {"leaver/a", "leaver/#"}
        target = await clients.enter_async_context(connected(bridge_login, "own-7-reader"))
        await target.subscribe([("fleet/7/commands", 1)])
        matched.clear()
        await watcher.publish("fleet/7/commands", b"eject", qos=1)
        assert (await target.deliver_message(timeout_duration=5)).data == b"eject"
        assert (await watcher.deliver_message(timeout_duration=5)).topic == "fleet/7/commands"
        # Of the 42 filters without wildcards only the one equal to the topic was looked at.
        assert [f for f in matched if "+" not in f and "#" not in f] == ["fleet/7/commands"]
        await mqtt.close(leaver)
        for _ in range(50):
            if "leaver" not in broker._subscriptions.filters_of:
                break
            await asyncio.sleep(0.05)
        assert "leaver" not in broker._subscriptions.filters_of
        assert "leaver/a" not in broker._subscriptions and "leaver/#" not in broker._subscriptions
        assert "fleet/7/commands" in broker._subscriptions
        assert repr(broker._subscriptions).startswith("<")


def test_the_subscription_table_keeps_its_wildcard_index_through_every_change():
    table = embedded._Subscriptions(has_retained=lambda: False)
    table["a/b"], table["a/+"], table["#"] = [], [], []
    assert sorted(table.candidates("a/b")) == ["#", "a/+", "a/b"]
    assert sorted(table.candidates("x/y")) == ["#", "a/+"]
    assert sorted(key for key, _ in table.items()) == ["#", "a/+", "a/b"]
    del table["a/+"]
    table.pop("#")
    assert table.candidates("a/c") == []
    assert list(table) == []  # no retained message: nothing for a connect to replay
    retaining = embedded._Subscriptions(has_retained=lambda: True)
    retaining["a/b"] = []
    assert list(retaining) == ["a/b"]


async def test_one_fan_out_turn_takes_every_queued_message_and_delivers_each_in_order(stack, monkeypatch):
    """amqtt spent several turns of the event loop on every message (a task, `asyncio.wait`,
    the plugin manager's `gather` per subscriber); at fleet scale its queue only grew. A
    backlog now leaves in a few turns, in queue order, the ACL still asked per subscriber."""
    broker = stack.embedded.broker
    turns, asked = [], []
    real_next, real_filtering = broker._next_broadcast, broker._topic_filtering

    async def counting_next():
        turns.append(broker._broadcast_queue.qsize())
        return await real_next()

    async def counting_filtering(session, topic, action):
        asked.append((topic, action))
        return await real_filtering(session, topic, action)

    bridge_login = login(stack, stack.settings.bridge_username, stack.settings.bridge_password)
    sent = 300
    async with connected(bridge_login, "burst-reader") as reader:
        await reader.subscribe([("burst/+", 1)])
        monkeypatch.setattr(broker, "_next_broadcast", counting_next)
        monkeypatch.setattr(broker, "_topic_filtering", counting_filtering)
        await broker._broadcast_queue.put({"session": None, "topic": "wake/up", "data": b""})  # re-enter with counting
        await asyncio.sleep(0.1)
        turns.clear()
        for n in range(sent):  # no await in between: all queued before the loop wakes
            broker._broadcast_queue.put_nowait({"session": None, "topic": f"burst/{n}", "data": str(n).encode()})
        received = [(await reader.deliver_message(timeout_duration=5)).data for _ in range(sent)]
    assert received == [str(n).encode() for n in range(sent)]
    assert 1 <= len(turns) <= 1 + sent // embedded.BROADCAST_BATCH_MAX + 1
    assert sum(1 for topic, action in asked if topic.startswith("burst/") and action == Action.RECEIVE) == sent


async def test_a_sweep_forgets_finished_deliveries_behind_a_slow_one_and_reads_their_errors():
    loop = asyncio.get_running_loop()
    slow = loop.create_future()
    finished = [loop.create_future() for _ in range(embedded.DELIVERY_TASKS_SWEEP_AT)]
    for future in finished:
        future.set_result(None)
    finished[3] = loop.create_future()
    finished[3].set_exception(TimeoutError("no PUBACK"))
    running = collections.deque([slow, *finished])
    next_sweep_at = embedded._sweep_finished(running, embedded.DELIVERY_TASKS_SWEEP_AT)
    assert list(running) == [slow]
    assert next_sweep_at == embedded.DELIVERY_TASKS_SWEEP_AT
    assert embedded._sweep_finished(running, next_sweep_at) == next_sweep_at and list(running) == [slow]
    slow.cancel()


async def test_logins_wait_while_the_bridge_is_behind_are_let_in_in_order_and_refused_after_a_while():
    """5,000 to 10,000 stations logging in at once buried the bridge under boots; acks came
    late and stations booted again and again. Logins now wait for room (see embedded.Admission)."""
    backlog = [0]
    admission = embedded.Admission(lambda: backlog[0], backlog_max=10, wait_max_s=0.5)
    assert await admission.enter()  # room: at once
    backlog[0] = 11
    order = []

    async def login(n):
        if await admission.enter():
            order.append(n)
            backlog[0] += 1  # an admitted station boots: one more message for the bridge
        else:
            order.append(-n)

    waiting = [asyncio.ensure_future(login(n)) for n in range(1, 4)]
    await asyncio.sleep(0.15)
    assert order == []  # the bridge is behind: everyone waits
    backlog[0] = 8  # room for two
    await asyncio.sleep(0.15)
    assert order == [1, 2]
    await asyncio.gather(*waiting)
    assert order == [1, 2, -3]  # the third waited its time out: refused, it comes back later
    admission.close()


async def test_logins_also_wait_while_the_single_writer_has_many_commands_waiting():
    """On the embedded default a boot the bridge took still waits for the one writer; a station
    admitted meanwhile heartbeats behind it. Logins come at the pace commands are applied."""
    waiting_commands = [0]
    admission = embedded.Admission(lambda: 0, backlog_max=10, wait_max_s=0.3,
                                   mailbox_backlog=lambda: waiting_commands[0], mailbox_max=5)
    assert admission.room() == 5 and await admission.enter()
    waiting_commands[0] = 6  # the writer is behind
    assert admission.room() == -1
    late = asyncio.ensure_future(admission.enter())
    await asyncio.sleep(0.1)
    assert not late.done()
    waiting_commands[0] = 2  # it caught up
    assert await late
    waiting_commands[0] = 9
    assert not await admission.enter()  # it stayed behind: refused, the station comes back later
    admission.mailbox_backlog = lambda: None  # a runtime that cannot tell: only the bridge counts
    assert admission.room() == 10
    admission.close()


async def test_a_station_login_is_refused_as_busy_when_the_bridge_stays_behind(stack, monkeypatch):
    a = stack.specs[0]
    authority = stack.embedded.authority
    monkeypatch.setattr(authority.admission, "backlog", lambda: embedded.ADMISSION_BACKLOG_MAX + 1)
    monkeypatch.setattr(authority.admission, "wait_max_s", 0.2)
    assert await refused(login(stack, a.serial, a.password), a.serial)
    assert authority.refusals[embedded.REFUSED_BUSY] == 1
    monkeypatch.setattr(authority.admission, "backlog", lambda: 0)
    assert not await refused(login(stack, a.serial, a.password), a.serial)
    assert stack.embedded.broker.backlog() >= 0
