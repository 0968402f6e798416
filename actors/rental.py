"""The Rental actor: one per rental (entity id = rental id), driving the rental's saga.

    StartRental -> (Wallet) PlaceHold -> HoldPlaced -> (Station) ReserveAndEject
        -> BankEjected: active            -> BankReturned: completed -> (Wallet) CaptureHold
        -> EjectFailed: cancelled, (Wallet) VoidHold                 -> ChargeSettled
    HoldRefused: cancelled

Each step is one command; follow-ups to other actors commit with the step that caused them.

A rental paid by card (payment_mode "card") arrives with its manual-capture PaymentIntent already
authorised (`payment_flows.authorise_rental_card`, before StartRental: the provider is never
called inside an actor's transaction). The Wallet still checks dues and the rental limit but holds
nothing; on return, or when the start fails, the actor only says that the card needs settling
(`payments.CARD_WORK`, published after commit), and `payment_flows.settle_card_rental` captures
the fee (or cancels the hold) at the provider and answers with ChargeSettled. The scheduler's
sweep repeats whatever that notice missed.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from powerbank.actors import payments, pricing
from powerbank.actors.notifications import notify_rental
from powerbank.actors.runtime import ActorContext, CommandRejected, Runtime, handles
from powerbank.actors.wallet import load_money_config
from powerbank.storage.models import ActorCommand, PaymentIntent, PowerBank, Rental, RentalExtension, RentalPackage, Station, User

QUICK_RETURN_S = pricing.QUICK_RETURN_S
WAITING_STATUSES = ("pending", "ejecting")
OPEN_STATUSES = ("active", "overdue")
# How long before its due time a rental's ending-soon reminder goes out (the scheduler's default).
ENDING_SOON_MINUTES = 10


# --- pure decisions ---------------------------------------------------------------------------


def rental_fee_minor(package: RentalPackage, started_at: datetime, returned_at: datetime) -> int:
    """The package price, plus a late fee per started hour past duration + grace, capped per
    started day of lateness (`pricing.rental_fee_minor`)."""
    return pricing.rental_fee_minor(pricing.Tariff.of(package), _used_s(started_at, returned_at))


def is_quick_return(started_at: datetime, returned_at: datetime, quick_return_s: int = QUICK_RETURN_S) -> bool:
    return pricing.is_quick_return(_used_s(started_at, returned_at), quick_return_s)


def _used_s(started_at: datetime, returned_at: datetime) -> float:
    return max(0.0, (returned_at - started_at).total_seconds())


def hold_amount_minor(package: RentalPackage) -> int:
    return package.price_minor


# --- views and notifications ------------------------------------------------------------------


def rental_view(rental: Rental) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": str(rental.id),
        "user_id": str(rental.user_id),
        "status": rental.status,
        "station_id": str(rental.station_id),
        "return_station_id": str(rental.return_station_id) if rental.return_station_id else None,
        "package_id": str(rental.package_id),
        "power_bank_id": str(rental.power_bank_id) if rental.power_bank_id else None,
        "slot_number": rental.slot_number,
        "currency": rental.currency,
        "hold_minor": rental.hold_minor,
        "fee_minor": rental.fee_minor,
        "charged_minor": rental.charged_minor,
        "due_minor": rental.due_minor,
        "payment_mode": rental.payment_mode,
        "card_intent_id": str(rental.card_intent_id) if rental.card_intent_id else None,
        "quick_return": rental.quick_return,
        "cancel_reason": rental.cancel_reason,
        "started_at": iso(rental.started_at),
        "due_at": iso(rental.due_at),
        "returned_at": iso(rental.returned_at),
        "created_at": iso(rental.created_at),
    }


def _publish(ctx: ActorContext, rental: Rental, event: str) -> dict[str, Any]:
    view = rental_view(rental)
    message = {"type": "rental.updated", "event": event, "rental": view}
    ctx.notify(f"rental:{rental.id}", message)
    ctx.notify(f"user:{rental.user_id}", message)
    return view


async def _load(ctx: ActorContext, rental_id: str) -> Rental:
    rental = await ctx.session.get(Rental, uuid.UUID(rental_id))
    if rental is None:
        raise CommandRejected("rental_not_found")
    return rental


# --- handlers ---------------------------------------------------------------------------------


@handles("rental", "StartRental")
async def start(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    existing = await ctx.session.get(Rental, uuid.UUID(rental_id))
    if existing is not None:
        return {"ok": True, "rental": rental_view(existing)}
    user = await ctx.session.get(User, uuid.UUID(payload["user_id"]))
    package = await ctx.session.get(RentalPackage, uuid.UUID(payload["package_id"]))
    station = await ctx.session.get(Station, uuid.UUID(payload["station_id"]))
    if user is None or package is None or station is None or not package.is_active:
        raise CommandRejected("invalid_rental_request")
    payment_mode = payload.get("payment_mode", "wallet")
    card_intent = await _authorised_card_intent(ctx, payload, user.id, hold_amount_minor(package))
    rental = Rental(
        id=uuid.UUID(rental_id),
        user_id=user.id,
        station_id=station.id,
        package_id=package.id,
        status="pending",
        currency=package.currency,
        hold_minor=hold_amount_minor(package),
        payment_mode=payment_mode,
        card_intent_id=card_intent.id if card_intent else None,
        reservation_id=uuid.UUID(payload["reservation_id"]) if payload.get("reservation_id") else None,
        created_at=ctx.now,
    )
    ctx.session.add(rental)
    await ctx.session.flush()
    await ctx.send(
        "wallet",
        str(user.id),
        "PlaceHold",
        {
            "rental_id": rental_id,
            "amount_minor": rental.hold_minor,
            "currency": rental.currency,
            "max_active_rentals": user.max_active_rentals,
            "payment_mode": payment_mode,
        },
        f"hold:{rental_id}",
    )
    return {"ok": True, "rental": _publish(ctx, rental, "requested")}


async def _authorised_card_intent(
    ctx: ActorContext, payload: dict[str, Any], user_id: uuid.UUID, hold_minor: int
) -> PaymentIntent | None:
    """The card hold a card rental starts on. It must be this person's, a rental hold, and
    authorised for at least the package price; a free package needs none."""
    mode = payload.get("payment_mode", "wallet")
    if mode not in ("wallet", "card"):
        raise CommandRejected("invalid_payment_mode")
    if mode == "wallet" or hold_minor == 0:
        return None
    intent_id = payload.get("card_intent_id")
    intent = await ctx.session.get(PaymentIntent, uuid.UUID(intent_id)) if intent_id else None
    if (intent is None or intent.user_id != user_id or intent.purpose != "rental_hold"
            or intent.status != "preauth" or intent.amount_minor < hold_minor):
        raise CommandRejected("card_hold_not_authorised")
    return intent


def _settle_card(ctx: ActorContext, rental: Rental) -> None:
    """After commit, ask the payment side to capture or release this rental's card hold."""
    if rental.card_intent_id is not None:
        ctx.notify(payments.CARD_WORK, payments.card_work(str(rental.id)))


@handles("rental", "HoldPlaced")
async def hold_placed(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    if rental.status != "pending":
        return {"ok": True, "ignored": rental.status}
    rental.status = "ejecting"
    await ctx.send(
        "station",
        str(rental.station_id),
        "ReserveAndEject",
        {"rental_id": rental_id, "user_id": str(rental.user_id),
         **({"reservation_id": str(rental.reservation_id)} if rental.reservation_id else {})},
        f"eject:{rental_id}",
    )
    _publish(ctx, rental, "funds_held")
    return {"ok": True}


@handles("rental", "HoldRefused")
async def hold_refused(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    if rental.status != "pending":
        return {"ok": True, "ignored": rental.status}
    rental.status, rental.cancel_reason = "cancelled", payload["reason"]
    _settle_card(ctx, rental)
    _publish(ctx, rental, "cancelled")
    return {"ok": True}


@handles("rental", "BankEjected")
async def bank_ejected(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    if rental.status != "ejecting":
        # The station only reports ejects it still considers in flight for this rental.
        raise CommandRejected("not_ejecting", status=rental.status)
    package = await ctx.session.get(RentalPackage, rental.package_id)
    rental.status = "active"
    rental.power_bank_id = uuid.UUID(payload["power_bank_id"])
    rental.slot_number = payload["slot_number"]
    rental.started_at = ctx.now
    rental.due_at = ctx.now + timedelta(minutes=package.duration_minutes)
    _publish(ctx, rental, "started")
    await notify_rental(ctx, rental, "rental_started")
    return {"ok": True}


@handles("rental", "EjectFailed")
async def eject_failed(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    if rental.status not in WAITING_STATUSES:
        return {"ok": True, "ignored": rental.status}
    rental.status, rental.cancel_reason = "cancelled", payload.get("reason", "eject_failed")
    if rental.payment_mode == "card":
        _settle_card(ctx, rental)
    else:
        await ctx.send("wallet", str(rental.user_id), "VoidHold", {"rental_id": rental_id}, f"void:{rental_id}")
    _publish(ctx, rental, "cancelled")
    return {"ok": True}


@handles("rental", "BankReturned")
async def bank_returned(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    if rental.status not in OPEN_STATUSES:
        return {"ok": True, "ignored": rental.status}
    package = await ctx.session.get(RentalPackage, rental.package_id)
    returned_at = datetime.fromisoformat(payload["returned_at"])
    # A station clock running behind must not make the rental end before it began.
    returned_at = max(returned_at, rental.started_at)
    rental.status = "completed"
    rental.returned_at = returned_at
    rental.return_station_id = uuid.UUID(payload["station_id"])
    config = await load_money_config(ctx.session)
    tariff = pricing.Tariff.of(package)
    used_s = _used_s(rental.started_at, returned_at)
    billed_s = billable_s(used_s, await extended_minutes(ctx.session, rental.id))
    rental.fee_minor = pricing.rental_fee_minor(tariff, billed_s)
    rental.quick_return = pricing.is_quick_return(used_s, config.quick_return_s)
    # Quick by the time actually used; timely by the time billed (extensions included).
    points = 0 if rental.quick_return else pricing.timely_return_points(
        tariff, billed_s, quick_return_s=0, award_points=config.timely_return_points
    )
    await _charge(ctx, rental, points)
    _publish(ctx, rental, "returned")
    await notify_rental(ctx, rental, "rental_returned")
    return {"ok": True}


async def _charge(ctx: ActorContext, rental: Rental, award_points: int) -> None:
    """Charge the fee: a card rental from its card hold (points are still the wallet's to
    award), every other rental from its wallet hold, the wallet and points."""
    if rental.payment_mode == "card":
        if award_points > 0:
            await ctx.send(
                "wallet", str(rental.user_id), "GrantPoints",
                {"transfer_id": str(uuid.uuid5(rental.id, "timely-points")), "points": award_points,
                 "reason": "timely return"},
                f"timely-points:{rental.id}",
            )
        if rental.card_intent_id is None:  # a free package: nothing was authorised, nothing to take
            await ctx.send("rental", str(rental.id), "ChargeSettled",
                           {"charged_minor": 0, "due_minor": rental.fee_minor}, f"charge-settled:{rental.id}")
        _settle_card(ctx, rental)
        return
    await ctx.send(
        "wallet",
        str(rental.user_id),
        "CaptureHold",
        {"rental_id": str(rental.id), "amount_minor": rental.fee_minor, "award_points": award_points},
        f"capture:{rental.id}",
    )


def _as_of(ctx: ActorContext, payload: dict[str, Any]) -> datetime:
    """The time a sweep judged by (its clock, which tests control), else when the command was
    accepted."""
    return datetime.fromisoformat(payload["as_of"]) if payload.get("as_of") else ctx.now


@handles("rental", "MarkOverdue")
async def mark_overdue(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Past its due time and still out: the rental is overdue (the app shows it, late fees run
    from here). Sent by the scheduler's sweep; a rental returned meanwhile, or not yet due by
    the sweep's clock, is left alone, so a repeated or early sweep is harmless."""
    rental = await _load(ctx, rental_id)
    if rental.status != "active" or rental.due_at is None or rental.due_at > _as_of(ctx, payload):
        return {"ok": True, "ignored": rental.status}
    rental.status = "overdue"
    _publish(ctx, rental, "overdue")
    await notify_rental(ctx, rental, "rental_overdue")
    return {"ok": True, "status": "overdue"}


@handles("rental", "MarkLost")
async def mark_lost(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A bank still out past the package's maximum is lost: the rental up to the maximum plus the
    bank's price is charged (a due for whatever the wallet and points cannot pay). Sent by
    whoever sweeps overdue rentals; refused before the maximum, so an early sweep is harmless."""
    rental = await _load(ctx, rental_id)
    if rental.status not in OPEN_STATUSES:
        return {"ok": True, "ignored": rental.status}
    package = await ctx.session.get(RentalPackage, rental.package_id)
    tariff = pricing.Tariff.of(package)
    if not pricing.is_lost(tariff, _used_s(rental.started_at, _as_of(ctx, payload))):
        raise CommandRejected("not_past_maximum")
    bank = await ctx.session.get(PowerBank, rental.power_bank_id) if rental.power_bank_id else None
    rental.status = "lost"
    rental.fee_minor = pricing.lost_charge_minor(tariff, bank.price_minor if bank else 0)
    await _charge(ctx, rental, 0)
    _publish(ctx, rental, "lost")
    await notify_rental(ctx, rental, "rental_lost")
    return {"ok": True}


@handles("rental", "ChargeSettled")
async def charge_settled(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    rental.charged_minor = payload["charged_minor"]
    rental.due_minor = payload["due_minor"]
    _publish(ctx, rental, "charged")
    await notify_rental(ctx, rental, "rental_charged")
    return {"ok": True}


@handles("rental", "DuePaid")
async def due_paid(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The Wallet actor paid (part of) the due: move it from due to charged."""
    rental = await _load(ctx, rental_id)
    paid_minor = min(rental.due_minor, payload["paid_minor"])
    rental.due_minor -= paid_minor
    rental.charged_minor += paid_minor
    _publish(ctx, rental, "due_paid")
    return {"ok": True, "due_minor": rental.due_minor}


@handles("rental", "RemindEndingSoon")
async def remind_ending_soon(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Tell the person their rental is about to end, before a late fee can start. Sent by the
    scheduler's sweep; a rental returned, extended or already due by the sweep's clock is left
    alone, and the notification's dedupe key keeps it to one reminder per rental."""
    rental = await _load(ctx, rental_id)
    as_of = _as_of(ctx, payload)
    within = timedelta(minutes=payload.get("within_minutes", ENDING_SOON_MINUTES))
    if rental.status != "active" or rental.due_at is None or not as_of < rental.due_at <= as_of + within:
        return {"ok": True, "ignored": rental.status}
    sent = await notify_rental(ctx, rental, "rental_ending_soon")
    return {"ok": True, "reminded": sent is not None}


# --- the caller's side ------------------------------------------------------------------------


async def start_rental(
    runtime: Runtime,
    *,
    rental_id: uuid.UUID,
    user_id: uuid.UUID,
    station_id: uuid.UUID,
    package_id: uuid.UUID,
    timeout_s: float,
    payment_mode: str = "wallet",
    card_intent_id: uuid.UUID | None = None,
    reservation_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """Start a rental and wait until it is active or cancelled, or the deadline passes; returns
    the rental's latest view. Safe to repeat with the same rental id. With `reservation_id` the
    bank held for that reservation is the one ejected."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with runtime.bus.subscribe(f"rental:{rental_id}") as subscription:
        result = await runtime.call(
            "rental",
            str(rental_id),
            "StartRental",
            {"user_id": str(user_id), "station_id": str(station_id), "package_id": str(package_id),
             "payment_mode": payment_mode, "card_intent_id": str(card_intent_id) if card_intent_id else None,
             "reservation_id": str(reservation_id) if reservation_id else None},
            command_id=f"start:{rental_id}",
            timeout_s=timeout_s,
        )
        if not result.get("ok"):
            return {"id": str(rental_id), "status": "cancelled", "cancel_reason": result.get("reason")}
        view = result["rental"]
        if view["status"] in WAITING_STATUSES:
            # A repeated start gets the first result ("pending") back; the rental may have moved
            # on since. We are subscribed already, so nothing after this read can be missed.
            view = await read_rental(runtime, rental_id) or view
        while view["status"] in WAITING_STATUSES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                _, message = await subscription.get(remaining)
            except TimeoutError:
                break
            view = message["rental"]
    if view["status"] in WAITING_STATUSES:
        view = await read_rental(runtime, rental_id) or view
    return view


async def read_rental(runtime: Runtime, rental_id: uuid.UUID) -> dict[str, Any] | None:
    async with runtime.sessions() as session:
        rental = await session.get(Rental, rental_id)
        return rental_view(rental) if rental else None


async def open_rental_for_bank(session, power_bank_id: uuid.UUID) -> Rental | None:
    """The rental a bank is out on, if any (read by the Station actor on a return)."""
    return (
        await session.execute(
            select(Rental).where(Rental.power_bank_id == power_bank_id, Rental.status.in_(OPEN_STATUSES))
        )
    ).scalar_one_or_none()


# --- the scheduler's side ---------------------------------------------------------------------


async def mark_overdue_rentals(runtime: Runtime, now: datetime) -> int:
    """Submit MarkOverdue for every active rental past its due time; how many. The command id is
    the rental's, so a repeat (or a second scheduler) is a duplicate."""
    async with runtime.sessions() as session:
        ids = (await session.execute(
            select(Rental.id).where(Rental.status == "active", Rental.due_at < now)
        )).scalars().all()
    for rental_id in ids:
        await runtime.submit("rental", str(rental_id), "MarkOverdue", {"as_of": now.isoformat()}, f"overdue:{rental_id}")
    return len(ids)


async def remind_rentals_ending_soon(runtime: Runtime, now: datetime, within_minutes: int | None = None) -> int:
    """Submit RemindEndingSoon for every active rental due within `within_minutes` (default
    ENDING_SOON_MINUTES) that has not been sent one; how many. The command id is the rental's,
    so a repeat (or a second scheduler) is a duplicate; rentals already asked are skipped so a
    rental in its window is not re-submitted every sweep."""
    within = timedelta(minutes=ENDING_SOON_MINUTES if within_minutes is None else within_minutes)
    async with runtime.sessions() as session:
        ids = [str(rental_id) for rental_id in (await session.execute(
            select(Rental.id).where(Rental.status == "active", Rental.due_at > now, Rental.due_at <= now + within)
        )).scalars()]
        asked = set((await session.execute(select(ActorCommand.entity_id).where(
            ActorCommand.kind == "rental", ActorCommand.command_id.in_([f"ending-soon:{i}" for i in ids])
        ))).scalars()) if ids else set()
    due = [rental_id for rental_id in ids if rental_id not in asked]
    payload = {"as_of": now.isoformat(), "within_minutes": within.total_seconds() / 60}
    for rental_id in due:
        await runtime.submit("rental", rental_id, "RemindEndingSoon", payload, f"ending-soon:{rental_id}")
    return len(due)


async def mark_lost_rentals(runtime: Runtime, now: datetime) -> int:
    """Submit MarkLost for every open rental out longer than its package's maximum; how many.
    Only rentals already past their due time are candidates (the maximum is never shorter)."""
    async with runtime.sessions() as session:
        rows = (await session.execute(
            select(Rental.id, Rental.started_at, RentalPackage)
            .join(RentalPackage, RentalPackage.id == Rental.package_id)
            .where(Rental.status.in_(OPEN_STATUSES), Rental.due_at < now, Rental.started_at.is_not(None))
        )).all()
    lost = [rental_id for rental_id, started_at, package in rows if pricing.is_lost(pricing.Tariff.of(package), _used_s(started_at, now))]
    for rental_id in lost:
        await runtime.submit("rental", str(rental_id), "MarkLost", {"as_of": now.isoformat()}, f"lost:{rental_id}")
    return len(lost)


# --- cancel and extend (the app's /api/rentals/{id}/cancel and /extend) --------------------------
#
# Cancel: only while the funds are still being held (status pending). Once the hold is placed the
# station may already be releasing a bank (ejecting), and cancelling then could leave a bank out on
# a cancelled rental; once the bank is out (active, overdue) it ends by being returned, which within
# the quick-return window is flagged as a possibly faulty bank (SPEC).
#
# Extend: buy whole periods of the package's own duration at the package's price, while the bank is
# out, up to the package's maximum duration. The HTTP layer pays first (Wallet SpendWallet,
# idempotent by transfer id), then sends ExtendRental; a refused extension refunds that payment in
# the same transaction that records the refusal. At return, extended minutes are not billed again
# and the late fee counts from the extended due time (`billable_s`).

CANCELLABLE_STATUSES = ("pending",)
EXTENDABLE_STATUSES = OPEN_STATUSES


def cancel_refusal(status: str) -> str | None:
    if status in CANCELLABLE_STATUSES:
        return None
    if status == "ejecting":
        return "eject_in_progress"
    if status in OPEN_STATUSES:
        return "bank_taken"
    return "rental_closed"


def extension_refusal(
    status: str, started_at: datetime | None, due_at: datetime | None, max_duration_minutes: int, minutes: int
) -> str | None:
    if status not in EXTENDABLE_STATUSES or started_at is None or due_at is None:
        return "rental_not_active"
    if due_at + timedelta(minutes=minutes) > started_at + timedelta(minutes=max_duration_minutes):
        return "beyond_maximum_duration"
    return None


def billable_s(used_s: float, extended_minutes: int) -> float:
    """Time billed at the package tariff: extensions were paid when bought."""
    return max(0.0, used_s - extended_minutes * 60)


def extension_view(extension: RentalExtension) -> dict[str, Any]:
    return {
        "id": str(extension.id), "rental_id": str(extension.rental_id), "minutes": extension.minutes,
        "price_minor": extension.price_minor, "currency": extension.currency,
        "due_at_before": extension.due_at_before.isoformat(), "due_at_after": extension.due_at_after.isoformat(),
        "created_at": extension.created_at.isoformat(),
    }


async def extended_minutes(session, rental_id: uuid.UUID) -> int:
    total = await session.scalar(select(func.coalesce(func.sum(RentalExtension.minutes), 0)).where(RentalExtension.rental_id == rental_id))
    return int(total or 0)


@handles("rental", "CancelRental")
async def cancel_rental(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The person cancels before any bank is on its way; the hold (placed or about to be: the
    wallet applies PlaceHold before this VoidHold) is released."""
    rental = await _load(ctx, rental_id)
    if str(rental.user_id) != payload.get("user_id"):
        raise CommandRejected("rental_not_found")
    reason = cancel_refusal(rental.status)
    if reason is not None:
        raise CommandRejected(reason, status=rental.status)
    rental.status, rental.cancel_reason = "cancelled", "cancelled_by_user"
    await ctx.send("wallet", str(rental.user_id), "VoidHold", {"rental_id": rental_id}, f"void:{rental_id}")
    return {"ok": True, "rental": _publish(ctx, rental, "cancelled")}


@handles("rental", "ExtendRental")
async def extend_rental(ctx: ActorContext, rental_id: str, payload: dict[str, Any]) -> dict[str, Any]:
    rental = await _load(ctx, rental_id)
    extension_id = uuid.UUID(payload["extension_id"])
    existing = await ctx.session.get(RentalExtension, extension_id)
    if existing is not None:
        return {"ok": True, "extension": extension_view(existing)}
    package = await ctx.session.get(RentalPackage, rental.package_id)
    reason = extension_refusal(rental.status, rental.started_at, rental.due_at, package.max_duration_minutes, payload["minutes"])
    if reason is not None and payload.get("transfer_id") is None:
        return {"ok": False, "reason": reason, "status": rental.status, "refunded": False}
    if reason is not None:
        # Paid already: the refund commits with this refusal, so the money cannot stay taken.
        await ctx.send(
            "wallet", str(rental.user_id), "RefundTransfer",
            {"transfer_id": payload["transfer_id"], "refund_id": str(uuid.uuid5(extension_id, "refund")),
             "amount_minor": payload["price_minor"]},
            f"extend-refund:{extension_id}",
        )
        return {"ok": False, "reason": reason, "status": rental.status, "refunded": True}
    extension = RentalExtension(
        id=extension_id, rental_id=rental.id, minutes=payload["minutes"], price_minor=payload["price_minor"],
        currency=rental.currency, transfer_id=uuid.UUID(payload["transfer_id"]) if payload.get("transfer_id") else None,
        due_at_before=rental.due_at,
        due_at_after=rental.due_at + timedelta(minutes=payload["minutes"]), created_at=ctx.now,
    )
    ctx.session.add(extension)
    rental.due_at = extension.due_at_after
    if rental.status == "overdue" and rental.due_at > ctx.now:
        rental.status = "active"
    await ctx.session.flush()
    _publish(ctx, rental, "extended")
    return {"ok": True, "extension": extension_view(extension)}
