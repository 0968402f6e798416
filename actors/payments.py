"""Payment decisions as plain functions, no I/O: what a provider status means for our intent,
how an intent's status may move, how much may be refunded, when a wallet refills itself.

Why a lattice: the provider tells us about one intent through several channels (our verify call,
webhooks delivered at least once and in any order, the reconciliation job), each carrying a
snapshot that may be stale. If every observation can only move the status *up* a fixed order,
the final status is the highest one observed, whatever the order of arrival, and the moment it
first reaches `confirmed` is the one moment the wallet is credited.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

# Our statuses (seed 003) in the only order they may move. `rejected` sits below `confirmed`:
# if the provider ever reports money received for an intent we saw canceled, the money is real
# and the person gets it (the provider is the source of truth for money taken from a card).
STATUS_RANK = {"error": 0, "waiting": 1, "preauth": 2, "rejected": 3, "confirmed": 4, "refunded": 5}

# Stripe PaymentIntent statuses -> ours. A decline leaves Stripe's intent in
# `requires_payment_method` (the person may try another card), so it stays `waiting` here too.
STRIPE_STATUS = {
    "requires_payment_method": "waiting",
    "requires_confirmation": "waiting",
    "requires_action": "waiting",
    "processing": "waiting",
    "requires_capture": "preauth",
    "succeeded": "confirmed",
    "canceled": "rejected",
}

# Fixed namespace: the credit of one provider intent is always the same ledger transfer, so the
# verify call, the webhook and the reconciliation job cannot credit it twice.
TOPUP_NAMESPACE = uuid.UUID("9b7e4a3c-5d1f-4c2e-8a6b-0f3e2d1c4b5a")

REFUNDABLE_TYPES = frozenset({"topup", "auto_refill"})


def status_from_provider(provider_status: str) -> str:
    """Our status for a provider status; an unknown one is `error` (rank 0: it never overrides
    anything we already know)."""
    return STRIPE_STATUS.get(provider_status, "error")


def next_status(current: str, observed: str) -> str:
    """The status after observing `observed`: the higher of the two in STATUS_RANK. Commutative
    and idempotent, so any order and any number of repeats of the same observations end in the
    same status."""
    return observed if STATUS_RANK[observed] > STATUS_RANK[current] else current


def credits_now(current: str, new: str) -> bool:
    """The wallet is credited exactly when the status first reaches `confirmed`."""
    return new == "confirmed" and STATUS_RANK[current] < STATUS_RANK["confirmed"]


def topup_transfer_id(provider: str, provider_intent_id: str) -> uuid.UUID:
    return uuid.uuid5(TOPUP_NAMESPACE, f"{provider}:{provider_intent_id}")


def refund_transfer_id(refund_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(refund_id, "refund")


def refund_reversal_id(refund_id: uuid.UUID) -> uuid.UUID:
    return uuid.uuid5(refund_id, "reversal")


def provider_refund_uuid(provider: str, provider_refund_id: str) -> uuid.UUID:
    """Our Refund id for a refund the provider reports and we did not start (the dashboard): the
    same provider refund always names the same row and, through `refund_transfer_id`, the same
    ledger reversal, however often and by whichever channel it is reported."""
    return uuid.uuid5(TOPUP_NAMESPACE, f"refund:{provider}:{provider_refund_id}")


@dataclass(frozen=True)
class RefundRequest:
    transaction_type: str
    transaction_status: str
    captured_minor: int
    refunded_minor: int
    requested_minor: int
    wallet_available_minor: int


def refundable_minor(captured_minor: int, refunded_minor: int) -> int:
    return max(0, captured_minor - refunded_minor)


def needs_approval(amount_minor: int, approval_above_minor: int) -> bool:
    """A refund above the threshold waits for an admin: large card refunds are where fraud
    (a stolen card topped up, then refunded elsewhere) and mistakes cost most."""
    return amount_minor > approval_above_minor


def refund_review_refusal(status: str) -> str | None:
    """Why an admin may not approve or reject a refund in this state, or None: only a
    `requested` one waits for a decision (approving one already approved is answered with its
    outcome by the caller, not refused)."""
    return None if status == "requested" else "refund_not_requested"


def refund_refusal(request: RefundRequest) -> str | None:
    """Why a refund must be refused, or None. The money to give back must still be in the
    wallet: a top-up already spent on rentals is not refunded to the card (that would hand back
    money the platform earned), so the person is told `insufficient_funds`."""
    if request.transaction_type not in REFUNDABLE_TYPES or request.transaction_status != "succeeded":
        return "not_refundable"
    if request.requested_minor <= 0:
        return "invalid_amount"
    if request.requested_minor > refundable_minor(request.captured_minor, request.refunded_minor):
        return "exceeds_refundable"
    if request.requested_minor > request.wallet_available_minor:
        return "insufficient_funds"
    return None


@dataclass(frozen=True)
class RefillSetting:
    enabled: bool
    threshold_minor: int
    amount_minor: int
    saved_payment_method: str | None


def auto_refill_amount(setting: RefillSetting, available_minor: int) -> int:
    """How much to charge the saved card now: the configured amount once the available balance is
    below the threshold, nothing otherwise (and nothing without a saved card)."""
    if not setting.enabled or not setting.saved_payment_method or setting.amount_minor <= 0:
        return 0
    return setting.amount_minor if available_minor < setting.threshold_minor else 0


def auto_refill_key(user_id: uuid.UUID, credits_posted_minor: int) -> str:
    """One refill per wallet state: until money comes in, the wallet's posted credits do not
    change, so every trigger meanwhile names the same intent (a unique idempotency key) and the
    card is charged once however often the check runs."""
    return f"auto-refill:{user_id}:{credits_posted_minor}"


# --- work for the payment side, announced by actors after their transaction commits ------------

# Actors never call the provider (no network inside a transaction). When a committed change needs
# provider I/O (capture or release a card hold, refill a wallet), the actor publishes a notice on
# this bus channel after commit; `payment_flows.run_payment_listener` does the I/O and answers with
# commands. Notices are not durable: the scheduler's sweeps find the same work from the rows.
CARD_WORK = "payments:work"


def card_work(rental_id: str) -> dict[str, str]:
    return {"type": "settle_card_rental", "rental_id": rental_id}


def refill_work(user_id: str) -> dict[str, str]:
    return {"type": "auto_refill", "user_id": user_id}


@dataclass(frozen=True)
class CardCharge:
    """What a card rental's fee does to its hold: capture this much (0 releases it), and the
    rest becomes a due on the rental (paid later with PayDue, like any other due)."""

    capture_minor: int
    due_minor: int


def card_charge(fee_minor: int, authorised_minor: int) -> CardCharge:
    capture = max(0, min(fee_minor, authorised_minor))
    return CardCharge(capture_minor=capture, due_minor=max(0, fee_minor - capture))


def card_hold_action(rental_status: str, intent_status: str, settled: bool) -> str | None:
    """What a card rental's hold needs now: "cancel" once the rental never started, "capture"
    once it ended and is not settled yet, "settle" when the provider already decided (captured,
    or the authorisation lapsed) and only the rental is behind, None otherwise."""
    if rental_status == "cancelled":
        return "cancel" if intent_status == "preauth" else None
    if rental_status not in ("completed", "lost"):
        return None
    if intent_status == "preauth":
        return "capture"
    return None if settled else "settle"
