"""Rental fees (pure) and the start of the rental saga through the runtime."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from powerbank.actors.rental import is_quick_return, rental_fee_minor
from powerbank.storage.models import RentalPackage

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _package(**overrides) -> RentalPackage:
    fields = dict(duration_minutes=60, price_minor=5000, grace_minutes=5, late_fee_per_hour_minor=3000, late_fee_daily_cap_minor=20000)
    fields.update(overrides)
    return RentalPackage(**fields)


def test_fee_within_package_and_grace_is_the_price():
    package = _package()
    assert rental_fee_minor(package, T0, T0 + timedelta(minutes=10)) == 5000
    assert rental_fee_minor(package, T0, T0 + timedelta(minutes=65)) == 5000


def test_late_fee_per_started_hour_after_grace():
    package = _package()
    assert rental_fee_minor(package, T0, T0 + timedelta(minutes=66)) == 5000 + 3000
    assert rental_fee_minor(package, T0, T0 + timedelta(minutes=121)) == 5000 + 2 * 3000


def test_late_fee_is_capped_per_started_day():
    package = _package()
    assert rental_fee_minor(package, T0, T0 + timedelta(hours=20)) == 5000 + 20000
    assert rental_fee_minor(package, T0, T0 + timedelta(hours=26)) == 5000 + 2 * 20000


def test_clock_running_backwards_never_gives_a_negative_duration():
    assert rental_fee_minor(_package(), T0, T0 - timedelta(minutes=3)) == 5000


def test_quick_return_under_five_minutes():
    assert is_quick_return(T0, T0 + timedelta(minutes=4, seconds=59))
    assert not is_quick_return(T0, T0 + timedelta(minutes=5))
