"""The money rules of a rental as properties of pure functions (actors/pricing.py)."""

from __future__ import annotations

import math

from hypothesis import given, settings, strategies as st

from powerbank.actors import pricing
from powerbank.actors.pricing import PointsRatio, Tariff

HOUR_S = 3600
DAY_S = 86400

tariffs = st.builds(
    Tariff,
    price_minor=st.integers(0, 10**6),
    duration_minutes=st.integers(1, 7 * 24 * 60),
    grace_minutes=st.integers(0, 120),
    late_fee_per_hour_minor=st.integers(0, 10**5),
    late_fee_daily_cap_minor=st.integers(0, 10**6),
    max_duration_minutes=st.none() | st.integers(1, 30 * 24 * 60),
)
durations_s = st.floats(min_value=-DAY_S, max_value=60 * DAY_S, allow_nan=False)
ratios = st.builds(PointsRatio, points=st.integers(1, 1000), minor_units=st.integers(1, 10_000))
modes = st.sampled_from(pricing.PAYMENT_MODES)


@given(tariffs, durations_s)
def test_fee_is_never_below_the_price_nor_negative(tariff, used_s):
    fee = pricing.rental_fee_minor(tariff, used_s)
    assert fee >= tariff.price_minor >= 0


@given(tariffs, durations_s)
def test_late_fee_never_exceeds_the_cap_per_started_day_nor_the_hourly_rate(tariff, used_s):
    late = pricing.late_fee_minor(tariff, used_s)
    late_s = max(0.0, used_s - tariff.duration_minutes * 60)
    assert 0 <= late <= math.ceil(late_s / HOUR_S) * tariff.late_fee_per_hour_minor
    if tariff.late_fee_daily_cap_minor:
        assert late <= math.ceil(late_s / DAY_S) * tariff.late_fee_daily_cap_minor


@given(tariffs, durations_s, st.floats(min_value=0, max_value=10 * DAY_S, allow_nan=False))
def test_fee_is_monotone_in_duration(tariff, used_s, more_s):
    assert pricing.rental_fee_minor(tariff, used_s) <= pricing.rental_fee_minor(tariff, used_s + more_s)


@given(tariffs, st.floats(min_value=0, max_value=60 * DAY_S, allow_nan=False))
def test_within_duration_and_grace_costs_the_price(tariff, used_s):
    if used_s <= (tariff.duration_minutes + tariff.grace_minutes) * 60:
        assert pricing.rental_fee_minor(tariff, used_s) == tariff.price_minor


@given(tariffs.filter(lambda t: t.max_duration_minutes is not None), st.integers(0, 10**7), st.floats(0, 10 * DAY_S))
def test_past_the_maximum_costs_nothing_more_and_lost_adds_the_bank(tariff, bank_minor, extra_s):
    at_max = pricing.rental_fee_minor(tariff, tariff.max_duration_minutes * 60)
    assert pricing.rental_fee_minor(tariff, tariff.max_duration_minutes * 60 + extra_s) == at_max
    assert pricing.lost_charge_minor(tariff, bank_minor) == at_max + bank_minor


def test_worked_example_from_the_docs():
    hour = Tariff(price_minor=5000, duration_minutes=60, grace_minutes=5, late_fee_per_hour_minor=3000,
                  late_fee_daily_cap_minor=30000, max_duration_minutes=7 * 24 * 60)
    assert pricing.rental_fee_minor(hour, 64 * 60) == 5000  # within grace
    assert pricing.rental_fee_minor(hour, 3 * HOUR_S + 10 * 60) == 5000 + 3 * 3000  # 2h10m late: 3 started hours
    assert pricing.rental_fee_minor(hour, 21 * HOUR_S) == 5000 + 30000  # 20 h late: 60000 capped at 1 day
    assert pricing.rental_fee_minor(hour, 30 * HOUR_S) == 5000 + 60000  # 29 h late: 2 started days


@given(tariffs, durations_s, st.integers(0, 1000), st.integers(1, 3600))
def test_points_for_a_timely_return_only(tariff, used_s, award, quick_s):
    points = pricing.timely_return_points(tariff, used_s, quick_return_s=quick_s, award_points=award)
    assert points in (0, award)
    if used_s < quick_s or used_s > tariff.duration_minutes * 60:
        assert points == 0


def test_quick_return_is_flagged_under_five_minutes():
    assert pricing.is_quick_return(4 * 60 + 59)
    assert not pricing.is_quick_return(5 * 60)


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**9), ratios, modes)
def test_a_split_adds_up_and_spends_no_more_than_there_is(amount, wallet, points, ratio, mode):
    split = pricing.split_payment(amount, wallet_available_minor=wallet, points_available=points, ratio=ratio, mode=mode)
    assert split.points_minor + split.wallet_minor + split.shortfall_minor == amount
    assert min(split.points, split.points_minor, split.wallet_minor, split.shortfall_minor) >= 0
    assert split.wallet_minor <= wallet and split.points <= points
    # Points pay at most their worth, and no more points are spent than that part needs.
    assert split.points_minor <= pricing.points_value_minor(split.points, ratio)
    assert split.points == pricing.points_needed(split.points_minor, ratio)
    if mode == "wallet_only":
        assert split.points == 0
    if mode == "points_only":
        assert split.wallet_minor == 0
    if mode in ("points_first", "wallet_first"):
        # Short only when both sources are used up.
        assert split.sufficient or (
            split.wallet_minor == wallet and split.points_minor == pricing.points_value_minor(points, ratio)
        )


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**9), ratios, modes)
def test_a_settlement_takes_the_hold_first_and_adds_up(fee, hold, wallet, points, ratio, mode):
    settled = pricing.settle_fee(fee, hold_minor=hold, wallet_available_minor=wallet, points_available=points, ratio=ratio, mode=mode)
    assert settled.from_hold_minor == min(fee, hold)
    assert settled.charged_minor + settled.due_minor == fee
    assert settled.due_minor >= 0


def test_points_ratio_from_config_and_its_fallback():
    assert PointsRatio.of({"points": 10, "minor_units": 100}) == PointsRatio(10, 100)
    assert PointsRatio.of({"points": 0, "minor_units": 100}) == PointsRatio()
    assert PointsRatio.of(None) == PointsRatio()
    ratio = PointsRatio(10, 100)  # 1 point = 10 minor units
    assert pricing.points_value_minor(25, ratio) == 250
    assert pricing.points_needed(251, ratio) == 26


@settings(max_examples=50)
@given(st.integers(1, 10**6), ratios)
def test_points_needed_pay_in_full(amount, ratio):
    assert pricing.points_value_minor(pricing.points_needed(amount, ratio), ratio) >= amount


def test_the_worked_settlement_example_in_docs_payments():
    hour = Tariff(price_minor=5000, duration_minutes=60, grace_minutes=5, late_fee_per_hour_minor=3000,
                  late_fee_daily_cap_minor=30000, max_duration_minutes=7 * 24 * 60)
    fee = pricing.rental_fee_minor(hour, 3 * HOUR_S + 10 * 60)
    assert fee == 14000 and pricing.timely_return_points(hour, 3 * HOUR_S + 10 * 60) == 0
    settled = pricing.settle_fee(fee, hold_minor=5000, wallet_available_minor=4000, points_available=120, ratio=PointsRatio())
    assert (settled.from_hold_minor, settled.split.wallet_minor, settled.split.points, settled.split.points_minor,
            settled.due_minor) == (5000, 4000, 120, 1200, 3800)
    assert pricing.timely_return_points(hour, 50 * 60) == 10
    assert pricing.rental_fee_minor(hour, 21 * HOUR_S) == 35000
