"""Money decisions of a rental, as pure functions: what a rental costs, whether it earns points,
and how a charge splits between a hold, points and the wallet.

No I/O here: the Rental and Wallet actors read the rows, call these, and write what they decide.
That keeps every rule testable in isolation (tests/test_actors_pricing.py states them as
properties: never negative, within the caps, monotone in time).

Units are in the names: `_minor` is an integer amount in minor units of the package's currency,
`_s` seconds, `_minutes` minutes, `points` whole points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

PaymentMode = Literal["points_first", "wallet_first", "wallet_only", "points_only"]
PAYMENT_MODES: tuple[PaymentMode, ...] = ("points_first", "wallet_first", "wallet_only", "points_only")

QUICK_RETURN_S = 5 * 60
TIMELY_RETURN_POINTS = 10


@dataclass(frozen=True)
class Tariff:
    """The pricing columns of a rental package."""

    price_minor: int
    duration_minutes: int
    grace_minutes: int = 0
    late_fee_per_hour_minor: int = 0
    late_fee_daily_cap_minor: int = 0  # 0: no cap
    max_duration_minutes: int | None = None  # past this the bank counts as lost

    @classmethod
    def of(cls, package) -> "Tariff":
        return cls(
            price_minor=package.price_minor,
            duration_minutes=package.duration_minutes,
            grace_minutes=package.grace_minutes or 0,
            late_fee_per_hour_minor=package.late_fee_per_hour_minor or 0,
            late_fee_daily_cap_minor=package.late_fee_daily_cap_minor or 0,
            max_duration_minutes=package.max_duration_minutes,
        )


@dataclass(frozen=True)
class PointsRatio:
    """`points` points are worth `minor_units` minor units (AppConfig `points_per_currency_unit`)."""

    points: int = 10
    minor_units: int = 100

    @classmethod
    def of(cls, config_value: dict | None) -> "PointsRatio":
        """From the AppConfig value; a missing or nonsensical value falls back to the default
        rather than letting points become free money or worthless."""
        try:
            points, minor = int(config_value["points"]), int(config_value["minor_units"])
        except (TypeError, KeyError, ValueError):
            return cls()
        return cls(points, minor) if points > 0 and minor > 0 else cls()


# --- what a rental costs ----------------------------------------------------------------------


def late_fee_minor(tariff: Tariff, used_s: float) -> int:
    """Nothing within duration + grace. Past it, per started hour counted from the end of the
    duration (grace forgives a few minutes, it does not move the clock), capped at
    `late_fee_daily_cap_minor` per started day of lateness."""
    used_s = max(0.0, used_s)
    if used_s <= (tariff.duration_minutes + tariff.grace_minutes) * 60:
        return 0
    late_s = used_s - tariff.duration_minutes * 60
    fee = math.ceil(late_s / 3600) * tariff.late_fee_per_hour_minor
    if tariff.late_fee_daily_cap_minor > 0:
        fee = min(fee, math.ceil(late_s / 86400) * tariff.late_fee_daily_cap_minor)
    return fee


def rental_fee_minor(tariff: Tariff, used_s: float) -> int:
    """The package price plus the late fee. A rental past its maximum is billed as if it ended at
    the maximum (the bank's price is added by `lost_charge_minor`), so time past the maximum
    costs nothing more."""
    if tariff.max_duration_minutes is not None:
        used_s = min(used_s, tariff.max_duration_minutes * 60)
    return tariff.price_minor + late_fee_minor(tariff, used_s)


def is_lost(tariff: Tariff, used_s: float) -> bool:
    return tariff.max_duration_minutes is not None and used_s > tariff.max_duration_minutes * 60


def lost_charge_minor(tariff: Tariff, bank_price_minor: int) -> int:
    """A bank not back by the package's maximum: the rental up to the maximum plus the bank."""
    assert tariff.max_duration_minutes is not None
    return rental_fee_minor(tariff, tariff.max_duration_minutes * 60) + max(0, bank_price_minor)


def is_quick_return(used_s: float, quick_return_s: int = QUICK_RETURN_S) -> bool:
    """Back within minutes: the bank may be faulty. Flagged for the operator; still charged."""
    return used_s < quick_return_s


def timely_return_points(tariff: Tariff, used_s: float, *, quick_return_s: int = QUICK_RETURN_S,
                         award_points: int = TIMELY_RETURN_POINTS) -> int:
    """Points for bringing the bank back within the package time (grace not included: grace is
    forgiveness, not merit). A quick return earns nothing, or renting and returning at once
    would mint points."""
    if is_quick_return(used_s, quick_return_s) or used_s > tariff.duration_minutes * 60:
        return 0
    return max(0, award_points)


# --- points and money -------------------------------------------------------------------------


def points_value_minor(points: int, ratio: PointsRatio) -> int:
    """What `points` points pay for, rounded down: points never buy a fraction of a minor unit."""
    return max(0, points) * ratio.minor_units // ratio.points


def points_needed(amount_minor: int, ratio: PointsRatio) -> int:
    """The fewest whole points that pay `amount_minor` in full (rounded up)."""
    return -(-max(0, amount_minor) * ratio.points // ratio.minor_units)


@dataclass(frozen=True)
class Split:
    """How a charge is paid: `points` points worth `points_minor`, `wallet_minor` from the
    wallet, and `shortfall_minor` nobody paid (a due, or a refusal before a rental)."""

    amount_minor: int
    points: int
    points_minor: int
    wallet_minor: int
    shortfall_minor: int

    @property
    def sufficient(self) -> bool:
        return self.shortfall_minor == 0


def split_payment(
    amount_minor: int, *, wallet_available_minor: int, points_available: int, ratio: PointsRatio,
    mode: PaymentMode = "points_first",
) -> Split:
    """Split a charge between points and the wallet in the order `mode` says. Points are spent
    in whole points and only as many as needed; the parts always add up to `amount_minor`."""
    amount_minor = max(0, amount_minor)
    wallet_available_minor = max(0, wallet_available_minor)
    points_available = max(0, points_available)
    use_points = mode != "wallet_only"
    use_wallet = mode != "points_only"
    remaining = amount_minor
    points_minor = wallet_minor = 0
    for source in (("points", "wallet") if mode in ("points_first", "points_only") else ("wallet", "points")):
        if source == "points" and use_points:
            points_minor = min(remaining, points_value_minor(points_available, ratio))
            remaining -= points_minor
        elif source == "wallet" and use_wallet:
            wallet_minor = min(remaining, wallet_available_minor)
            remaining -= wallet_minor
    points = min(points_available, points_needed(points_minor, ratio))
    return Split(amount_minor, points, points_minor, wallet_minor, remaining)


@dataclass(frozen=True)
class Settlement:
    """How a finished rental's fee was settled; the parts add up to `fee_minor`."""

    fee_minor: int
    from_hold_minor: int
    split: Split  # what was left after the holds, from the wallet and points
    points_from_hold: int = 0  # points posted from the rental's points hold
    points_hold_minor: int = 0  # what they paid

    @property
    def charged_minor(self) -> int:
        return self.from_hold_minor + self.points_hold_minor + self.split.wallet_minor + self.split.points_minor

    @property
    def due_minor(self) -> int:
        return self.split.shortfall_minor


def settle_fee(
    fee_minor: int, *, hold_minor: int, wallet_available_minor: int, points_available: int,
    ratio: PointsRatio, mode: PaymentMode = "wallet_first", points_hold: int = 0,
) -> Settlement:
    """The wallet's hold pays first (its money, already set aside), then the points hold (the
    points the person put up when the wallet alone could not cover the start), then the rest of
    the wallet and points in `mode` order; what nobody can pay is a due on the rental. After a
    rental the wallet goes first by default: points are the person's to spend when they choose."""
    fee_minor = max(0, fee_minor)
    from_hold = min(fee_minor, max(0, hold_minor))
    points_hold_minor = min(fee_minor - from_hold, points_value_minor(points_hold, ratio))
    points_from_hold = min(max(0, points_hold), points_needed(points_hold_minor, ratio))
    rest = split_payment(
        fee_minor - from_hold - points_hold_minor, wallet_available_minor=wallet_available_minor,
        points_available=points_available, ratio=ratio, mode=mode,
    )
    return Settlement(fee_minor, from_hold, rest, points_from_hold, points_hold_minor)
