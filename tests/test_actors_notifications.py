"""Notifications: rendering, channel choice from rules and preferences, exactly one notification
per event even when commands arrive twice, the ending-soon reminder, and delivery through
providers with retries."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from powerbank.actors import notifications
from powerbank.actors.notifications import Preferences, Rule, choose_channels, deliver_notifications, render
from powerbank.actors.rental import remind_rentals_ending_soon
from powerbank.storage.models import (
    ActorCommand,
    Notification,
    NotificationDelivery,
    NotificationPreference,
    NotificationTemplate,
    PaymentIntent,
    PowerBank,
    Rental,
    RentalPackage,
    SmsFcmLog,
    Station,
    User,
    UserDevice,
)
from powerbank.storage.seed import ensure_defaults
from powerbank.storage.types import utcnow

# --- rendering (pure) ---------------------------------------------------------------------------


def test_render_fills_named_placeholders_with_their_format_spec():
    assert render("{station_name}: slot {slot:02d}", {"station_name": "Mall", "slot": 3}) == "Mall: slot 03"


def test_render_leaves_a_missing_key_visible_instead_of_failing():
    assert render("Return to {station_name} by {due_at}", {"due_at": "10:00 UTC"}) == "Return to {station_name} by 10:00 UTC"


def test_render_never_reaches_into_objects_or_positions():
    data = {"user": object(), "x": "ok"}
    assert render("{user.__class__} {0} {x}", data) == "{user.__class__} {0} ok"
    assert render("{x!r:>5}", data) == " 'ok'"


def test_render_survives_broken_templates_and_unfitting_specs():
    assert render("Unbalanced {x", {"x": 1}) == "Unbalanced {x"
    assert render("{x:d}", {"x": "text"}) == "text"


def test_money_is_shown_in_major_units_without_floats():
    assert notifications.format_money(123456, "NPR") == "1234.56 NPR"
    assert notifications.format_money(5, "NPR") == "0.05 NPR"
    assert notifications.format_money(-250, "NPR") == "-2.50 NPR"


# --- channels from rules and preferences (pure) ---------------------------------------------------

NOISY = Rule("rental_ending_soon", push=True, sms=True)
CRITICAL = Rule("rental_overdue", push=True, sms=True, is_critical=True)


def test_defaults_send_every_channel_the_rule_names():
    assert choose_channels(NOISY, Preferences()) == ("push", "sms")
    assert choose_channels(Rule("rental_started", push=True), Preferences()) == ("push",)
    assert choose_channels(Rule("in_app_only"), Preferences()) == ()


def test_a_muted_channel_or_kind_is_not_sent():
    assert choose_channels(NOISY, Preferences(sms_enabled=False)) == ("push",)
    assert choose_channels(NOISY, Preferences(push_enabled=False, sms_enabled=False)) == ()
    assert choose_channels(NOISY, Preferences(muted_kinds=frozenset({"rental_ending_soon"}))) == ()


def test_a_critical_kind_is_sent_even_when_muted():
    muted = Preferences(push_enabled=False, sms_enabled=False, muted_kinds=frozenset({"rental_overdue"}))
    assert choose_channels(CRITICAL, muted) == ("push", "sms")


def test_retry_backoff_doubles_and_is_capped():
    assert [notifications.retry_delay_s(n) for n in (1, 2, 3)] == [30, 60, 120]
    assert notifications.retry_delay_s(50) == notifications.RETRY_CAP_S


# --- fixtures ---------------------------------------------------------------------------------------


async def _person(runtime, *, phone: bool = True, push_token: str | None = "tok-1") -> str:
    async with runtime.sessions.begin() as session:
        user = User(phone=f"+9779{uuid.uuid4().int % 10**9:09d}" if phone else None, referral_code=uuid.uuid4().hex[:10])
        session.add(user)
        await session.flush()
        if push_token:
            session.add(UserDevice(user_id=user.id, device_id="phone-1", platform="android", push_token=push_token))
    user_id = str(user.id)
    assert (await runtime.call("wallet", user_id, "OpenWallet", {"currency": "NPR"}, f"open:{user_id}"))["ok"]
    return user_id


async def _credit(runtime, user_id: str, amount_minor: int) -> None:
    transfer_id = str(uuid.uuid4())
    payload = {"amount_minor": amount_minor, "currency": "NPR", "transfer_id": transfer_id, "reason": "test"}
    assert (await runtime.call("wallet", user_id, "CreditWallet", payload, f"credit:{transfer_id}"))["ok"]


async def _rental(runtime, user_id: str, *, status: str, due_in: timedelta | None = None) -> tuple[str, str, str]:
    """A rental of a 60-minute package at station "Mall"; (rental id, station id, bank id)."""
    async with runtime.sessions.begin() as session:
        station = Station(serial=uuid.uuid4().hex[:12], name="Mall", latitude=0, longitude=0, slot_count=4)
        package = RentalPackage(code=uuid.uuid4().hex[:10], name="p", duration_minutes=60, price_minor=5000, currency="NPR",
                                grace_minutes=5, late_fee_per_hour_minor=3000, late_fee_daily_cap_minor=30000, max_duration_minutes=600)
        bank = PowerBank(serial=uuid.uuid4().hex[:12], currency="NPR", status="rented", price_minor=20000)
        session.add_all([station, package, bank])
        await session.flush()
        now = utcnow()
        rental = Rental(user_id=uuid.UUID(user_id), station_id=station.id, package_id=package.id, currency="NPR",
                        status=status, hold_minor=5000, power_bank_id=bank.id if status == "active" else None,
                        started_at=now - timedelta(minutes=50) if status == "active" else None,
                        due_at=now + due_in if due_in is not None else None)
        session.add(rental)
    return str(rental.id), str(station.id), str(bank.id)


async def _inbox(runtime, user_id: str) -> list[Notification]:
    async with runtime.sessions() as session:
        return list((await session.execute(
            select(Notification).where(Notification.user_id == uuid.UUID(user_id)).order_by(Notification.created_at)
        )).scalars())


async def _deliveries(runtime, user_id: str) -> list[NotificationDelivery]:
    async with runtime.sessions() as session:
        return list((await session.execute(
            select(NotificationDelivery).where(NotificationDelivery.user_id == uuid.UUID(user_id)).order_by(NotificationDelivery.channel)
        )).scalars())


async def _log_rows(runtime, user_id: str) -> list[SmsFcmLog]:
    async with runtime.sessions() as session:
        return list((await session.execute(
            select(SmsFcmLog).where(SmsFcmLog.user_id == uuid.UUID(user_id)).order_by(SmsFcmLog.channel)
        )).scalars())


def _kinds(rows: list[Notification]) -> list[str]:
    return sorted(row.kind for row in rows)


# --- exactly once, with the state change ---------------------------------------------------------


async def test_a_rental_lifecycle_notifies_started_returned_charged_once_each(runtime):
    user_id = await _person(runtime)
    await _credit(runtime, user_id, 8000)
    rental_id, station_id, bank_id = await _rental(runtime, user_id, status="ejecting")
    hold = {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR"}
    assert (await runtime.call("wallet", user_id, "PlaceHold", hold, f"hold:{rental_id}"))["ok"]
    async with runtime.bus.subscribe(f"user:{user_id}") as events:
        ejected = {"power_bank_id": bank_id, "slot_number": 2}
        for command_id in (f"ejected:{rental_id}", f"ejected:{rental_id}", f"ejected-again:{rental_id}"):
            await runtime.call("rental", rental_id, "BankEjected", ejected, command_id)
        returned = {"returned_at": utcnow().isoformat(), "station_id": station_id}
        for command_id in (f"returned:{rental_id}", f"returned:{rental_id}", f"returned-again:{rental_id}"):
            assert (await runtime.call("rental", rental_id, "BankReturned", returned, command_id))["ok"]
        await runtime.test_dispatcher.settle()
        # The wallet's ChargeSettled delivered once more under another id (a sweep repeating it).
        again = {"charged_minor": 5000, "due_minor": 0}
        assert (await runtime.call("rental", rental_id, "ChargeSettled", again, f"charge-settled-again:{rental_id}"))["ok"]
        await runtime.test_dispatcher.settle()
        created = []
        while not events.queue.empty():
            _, message = await events.get(1)
            if message["type"] == "notification.created":
                created.append(message["notification"]["kind"])
    inbox = await _inbox(runtime, user_id)
    assert _kinds(inbox) == ["rental_charged", "rental_returned", "rental_started"]
    assert created == ["rental_started", "rental_returned", "rental_charged"]
    started = next(row for row in inbox if row.kind == "rental_started")
    assert "Mall" in started.body and "slot 2" in started.body and started.data["rental_id"] == rental_id
    charged = next(row for row in inbox if row.kind == "rental_charged")
    assert charged.body == "Charged 50.00 NPR. Still due: 0.00 NPR."
    # One push each (the default rules), queued with the notification.
    assert [(d.channel, d.status) for d in await _deliveries(runtime, user_id)] == [("push", "queued")] * 3


async def test_overdue_and_lost_are_critical_and_reach_every_channel_despite_mutes(runtime):
    user_id = await _person(runtime)
    async with runtime.sessions.begin() as session:
        session.add(NotificationPreference(user_id=uuid.UUID(user_id), push_enabled=False, sms_enabled=False,
                                           muted_kinds=["rental_overdue", "rental_lost"]))
    rental_id, *_ = await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=-1))
    await runtime.call("rental", rental_id, "MarkOverdue", {}, f"overdue:{rental_id}")
    await runtime.call("rental", rental_id, "MarkOverdue", {}, f"overdue-again:{rental_id}")
    assert _kinds(await _inbox(runtime, user_id)) == ["rental_overdue"]
    assert [d.channel for d in await _deliveries(runtime, user_id)] == ["push", "sms"]


async def test_a_muted_channel_is_not_queued_but_the_inbox_still_gets_it(runtime):
    user_id = await _person(runtime)
    async with runtime.sessions.begin() as session:
        session.add(NotificationPreference(user_id=uuid.UUID(user_id), sms_enabled=False))
    rental_id, *_ = await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=5))
    await remind_rentals_ending_soon(runtime, utcnow())
    await runtime.test_dispatcher.settle()
    assert _kinds(await _inbox(runtime, user_id)) == ["rental_ending_soon"]
    assert [d.channel for d in await _deliveries(runtime, user_id)] == ["push"]


async def test_an_operators_template_and_seeded_rules_are_used(runtime):
    await ensure_defaults(runtime.sessions, "NPR")
    async with runtime.sessions.begin() as session:
        await session.execute(update(NotificationTemplate).where(NotificationTemplate.code == "topup_succeeded")
                              .values(body_template="+{amount} (ref {missing})"))
    await ensure_defaults(runtime.sessions, "NPR")  # a restart does not overwrite the edit
    user_id = await _person(runtime)
    async with runtime.sessions.begin() as session:
        intent = PaymentIntent(user_id=uuid.UUID(user_id), amount_minor=2500, currency="NPR", purpose="topup",
                               provider="stripe", idempotency_key=uuid.uuid4().hex)
        session.add(intent)
    observed = {"intent_id": str(intent.id), "provider_intent_id": "pi_1", "provider_status": "succeeded",
                "amount_received_minor": 2500, "currency": "NPR"}
    for command_id in ("webhook-1", "reconcile-1"):  # the webhook and a reconciliation both see it
        assert (await runtime.call("wallet", user_id, "ApplyIntentStatus", observed, command_id))["ok"]
    inbox = await _inbox(runtime, user_id)
    assert [(row.kind, row.body) for row in inbox] == [("topup_succeeded", "+25.00 NPR (ref {missing})")]


async def test_a_refund_of_wallet_money_is_announced_once(runtime):
    user_id = await _person(runtime)
    await _credit(runtime, user_id, 8000)
    rental_id, *_ = await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=30))
    hold = {"rental_id": rental_id, "amount_minor": 5000, "currency": "NPR"}
    assert (await runtime.call("wallet", user_id, "PlaceHold", hold, f"hold:{rental_id}"))["ok"]
    assert (await runtime.call("wallet", user_id, "CaptureHold", {"rental_id": rental_id, "amount_minor": 5000}, "cap"))["ok"]
    from powerbank.actors.wallet import hold_id

    posted = str(uuid.uuid5(hold_id(rental_id), "resolution"))
    refund = {"transfer_id": posted, "refund_id": str(uuid.uuid4()), "amount_minor": 1500}
    for command_id in ("refund-1", "refund-1-again"):
        assert (await runtime.call("wallet", user_id, "RefundTransfer", refund, command_id))["ok"]
    refunds = [row for row in await _inbox(runtime, user_id) if row.kind == "refund_succeeded"]
    assert [row.body for row in refunds] == ["15.00 NPR was refunded."]


# --- the ending-soon reminder -------------------------------------------------------------------


async def test_the_ending_soon_job_run_twice_sends_one_reminder(runtime):
    user_id = await _person(runtime)
    soon, *_ = await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=8))
    later, *_ = await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=30))
    now = utcnow()
    assert await remind_rentals_ending_soon(runtime, now) == 1
    await runtime.test_dispatcher.settle()
    # Again, and as a second scheduler would: the rental was asked already.
    assert await remind_rentals_ending_soon(runtime, now + timedelta(seconds=5)) == 0
    await runtime.submit("rental", soon, "RemindEndingSoon", {"as_of": now.isoformat()}, f"ending-soon:{soon}")
    await runtime.test_dispatcher.settle()
    inbox = await _inbox(runtime, user_id)
    assert [(row.kind, row.data["rental_id"]) for row in inbox] == [("rental_ending_soon", soon)]
    async with runtime.sessions() as session:
        asked = await session.scalar(select(func.count()).select_from(ActorCommand).where(ActorCommand.name == "RemindEndingSoon"))
    assert asked == 1
    # The later rental gets its own reminder when its window comes.
    assert await remind_rentals_ending_soon(runtime, now + timedelta(minutes=25)) == 1
    await runtime.test_dispatcher.settle()
    assert sorted(row.data["rental_id"] for row in await _inbox(runtime, user_id)) == sorted([soon, later])


async def test_a_rental_returned_before_the_reminder_applies_is_not_reminded(runtime):
    user_id = await _person(runtime)
    rental_id, *_ = await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=8))
    async with runtime.sessions.begin() as session:
        await session.execute(update(Rental).where(Rental.id == uuid.UUID(rental_id)).values(status="completed"))
    result = await runtime.call("rental", rental_id, "RemindEndingSoon", {"as_of": utcnow().isoformat()}, f"ending-soon:{rental_id}")
    assert result == {"ok": True, "ignored": "completed"}
    assert await _inbox(runtime, user_id) == []


# --- delivery ------------------------------------------------------------------------------------


@pytest.fixture
def providers():
    """Providers a test installs are removed afterwards."""
    yield notifications.install_provider
    notifications.PROVIDERS.clear()


async def _reminded(runtime, **person) -> str:
    """A person with a queued push and SMS (an ending-soon reminder)."""
    user_id = await _person(runtime, **person)
    await _rental(runtime, user_id, status="active", due_in=timedelta(minutes=5))
    await remind_rentals_ending_soon(runtime, utcnow())
    await runtime.test_dispatcher.settle()
    return user_id


async def test_delivery_writes_the_log_once_and_marks_sent(runtime):
    user_id = await _reminded(runtime)
    now = utcnow() + timedelta(seconds=1)
    assert await deliver_notifications(runtime, now) == 2
    assert await deliver_notifications(runtime, now + timedelta(hours=1)) == 0
    deliveries = await _deliveries(runtime, user_id)
    assert [(d.channel, d.status, d.attempts) for d in deliveries] == [("push", "sent", 1), ("sms", "sent", 1)]
    rows = await _log_rows(runtime, user_id)
    assert [(r.channel, r.recipient, r.status, r.purpose) for r in rows] == [
        ("fcm", "tok-1", "sent", "rental_ending_soon"), ("sms", rows[1].recipient, "sent", "rental_ending_soon")]
    assert rows[1].recipient.startswith("+977") and rows[0].body.startswith("Rental ending soon\n")
    assert {d.provider_message_id for d in deliveries} == {str(r.id) for r in rows}


class FlakyProvider:
    def __init__(self, failures: int) -> None:
        self.failures, self.sent = failures, []

    async def send(self, channel, recipient, title, body, *, user_id=None, purpose="notification") -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("gateway timeout")
        self.sent.append((channel, recipient, title))
        return f"msg-{len(self.sent)}"


async def test_a_failed_send_is_retried_with_backoff(runtime, providers):
    flaky = FlakyProvider(failures=1)
    providers("sms", flaky)
    user_id = await _reminded(runtime)
    now = utcnow() + timedelta(seconds=1)
    assert await deliver_notifications(runtime, now) == 2
    sms = next(d for d in await _deliveries(runtime, user_id) if d.channel == "sms")
    assert (sms.status, sms.attempts, "gateway timeout" in sms.last_error) == ("queued", 1, True)
    assert sms.next_attempt_at == now + timedelta(seconds=30)
    assert await deliver_notifications(runtime, now + timedelta(seconds=29)) == 0
    assert await deliver_notifications(runtime, now + timedelta(seconds=30)) == 1
    sms = next(d for d in await _deliveries(runtime, user_id) if d.channel == "sms")
    assert (sms.status, sms.attempts, sms.provider_message_id) == ("sent", 2, "msg-1")
    assert len(flaky.sent) == 1
    # The push went through the default provider; the SMS did not touch the log.
    assert [r.channel for r in await _log_rows(runtime, user_id)] == ["fcm"]


async def test_a_send_that_keeps_failing_ends_failed(runtime, providers):
    providers("push", FlakyProvider(failures=100))
    user_id = await _reminded(runtime)
    now = utcnow() + timedelta(seconds=1)
    for attempt in range(notifications.MAX_DELIVERY_ATTEMPTS):
        await deliver_notifications(runtime, now + timedelta(seconds=notifications.RETRY_CAP_S * attempt))
    push = next(d for d in await _deliveries(runtime, user_id) if d.channel == "push")
    assert (push.status, push.attempts) == ("failed", notifications.MAX_DELIVERY_ATTEMPTS)
    assert await deliver_notifications(runtime, now + timedelta(days=1)) == 0


async def test_no_push_token_or_phone_fails_the_delivery_with_a_reason(runtime):
    user_id = await _reminded(runtime, phone=False, push_token=None)
    await deliver_notifications(runtime, utcnow() + timedelta(seconds=1))
    assert [(d.channel, d.status, d.last_error) for d in await _deliveries(runtime, user_id)] == [
        ("push", "failed", "no_push_token"), ("sms", "failed", "no_phone")]
    assert await _log_rows(runtime, user_id) == []


class SlowProvider:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, channel, recipient, title, body, *, user_id=None, purpose="notification") -> str:
        await asyncio.sleep(0.05)
        self.sent.append(recipient)
        return recipient


@pytest.mark.postgres
async def test_two_deliverers_at_once_send_each_message_once(pg_runtime, providers):
    slow = SlowProvider()
    providers("push", slow)
    providers("sms", slow)
    users = [await _reminded(pg_runtime, push_token=uuid.uuid4().hex) for _ in range(4)]
    now = utcnow() + timedelta(seconds=1)
    tried = await asyncio.gather(*(deliver_notifications(pg_runtime, now) for _ in range(3)))
    assert sum(tried) == 8 and len(slow.sent) == 8 and len(set(slow.sent)) == 8
    for user_id in users:
        assert [d.status for d in await _deliveries(pg_runtime, user_id)] == ["sent", "sent"]
