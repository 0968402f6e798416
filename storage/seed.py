"""Reference data every installation starts with; safe to run on every start."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from powerbank.storage.db import insert_unless_exists
from powerbank.storage.models import (
    Achievement,
    AppConfig,
    AppUpdate,
    AppVersion,
    Banner,
    ContactInfo,
    ContentPage,
    Country,
    Faq,
    NotificationRule,
    NotificationTemplate,
    RentalPackage,
    StationAmenity,
)
from powerbank.storage.types import utcnow

DEFAULT_CONFIG = {
    "points_per_currency_unit": ({"points": 10, "minor_units": 100}, "Points worth one currency unit"),
    "min_eject_charge_percent": ({"value": 20}, "Banks below this charge are never ejected"),
    "quick_return_s": ({"value": 300}, "Returns faster than this are flagged as possibly faulty"),
    "timely_return_points": ({"value": 10}, "Points for a return within the package time"),
}


def default_packages(currency: str) -> list[RentalPackage]:
    return [
        RentalPackage(
            code="hour-1", name="1 hour", duration_minutes=60, price_minor=5000, currency=currency,
            grace_minutes=5, late_fee_per_hour_minor=3000, late_fee_daily_cap_minor=30000,
            max_duration_minutes=7 * 24 * 60, sort_order=1,
        ),
        RentalPackage(
            code="day-1", name="1 day", duration_minutes=24 * 60, price_minor=20000, currency=currency,
            grace_minutes=15, late_fee_per_hour_minor=2000, late_fee_daily_cap_minor=20000,
            max_duration_minutes=7 * 24 * 60, sort_order=2,
        ),
    ]


async def ensure_defaults(sessions: async_sessionmaker[AsyncSession], currency: str) -> None:
    """Insert what is missing. Several processes may start at once, so every insert yields to
    a row that another one committed first (sample content: see `ensure_content`)."""
    async with sessions.begin() as session:
        if (await session.execute(select(RentalPackage.id).limit(1))).first() is None:
            for package in default_packages(currency):
                await _insert_missing(session, RentalPackage, _columns(package), "code")
        for key, (value, description) in DEFAULT_CONFIG.items():
            await _insert_missing(session, AppConfig, {"key": key, "value": value, "description": description}, "key")
    for ensure in (ensure_content, ensure_notification_defaults):
        try:
            await ensure(sessions)
        except IntegrityError:
            pass  # another process seeded the same empty table at the same moment: its rows will do


async def ensure_notification_defaults(sessions: async_sessionmaker[AsyncSession]) -> None:
    """The built-in rules and English templates (actors/notifications.py), each table filled only
    while it is empty, so an operator's edits survive restarts."""
    from powerbank.actors.notifications import DEFAULT_RULES, DEFAULT_TEMPLATES

    now = utcnow()
    async with sessions.begin() as session:
        if (await session.execute(select(NotificationRule.id).limit(1))).first() is None:
            session.add_all(
                NotificationRule(id=uuid.uuid4(), kind=r.kind, in_app=r.in_app, push=r.push, sms=r.sms,
                                 is_critical=r.is_critical, updated_at=now)
                for r in DEFAULT_RULES.values()
            )
        if (await session.execute(select(NotificationTemplate.id).limit(1))).first() is None:
            session.add_all(
                NotificationTemplate(id=uuid.uuid4(), code=code, language="en", title_template=title,
                                     body_template=body, updated_at=now)
                for code, (title, body) in DEFAULT_TEMPLATES.items()
            )


def _columns(row) -> dict:
    values = {column.key: getattr(row, column.key) for column in row.__table__.columns}
    values["id"] = values["id"] or uuid.uuid4()
    values["created_at"] = values.get("created_at") or utcnow()
    return {key: value for key, value in values.items() if value is not None}


async def _insert_missing(session: AsyncSession, model, values: dict, unique_column: str) -> None:
    await session.execute(insert_unless_exists(session.bind.dialect.name, model, values, [unique_column]))


# --- app content: shown by the demo and by a fresh installation --------------------------------
#
# Each table is filled only while it is empty, so an operator's own content (or their deletion of
# a sample row after adding their own) is never overwritten on the next start.

DEFAULT_COUNTRIES = [
    ("NP", "Nepal", "+977", "🇳🇵", 1), ("IN", "India", "+91", "🇮🇳", 2), ("BD", "Bangladesh", "+880", "🇧🇩", 3),
    ("GB", "United Kingdom", "+44", "🇬🇧", 4), ("US", "United States", "+1", "🇺🇸", 5),
]
DEFAULT_PAGES = {
    "terms-of-service": ("Terms of service", "# Terms of service\n\nRent a power bank at any station, return it at any station. "
                         "The package price is held when you rent and charged when you return; late returns pay a late fee "
                         "up to a daily cap, and a bank not returned by the package's maximum time is charged at its price."),
    "privacy-policy": ("Privacy policy", "# Privacy policy\n\nWe keep your phone number to sign you in, your rentals and payments "
                       "as the law requires, and your location only while a power bank is out. Deleting your account erases "
                       "your phone, name, documents and locations; payment records stay, no longer linked to you."),
    "about": ("About", "# About\n\nAn open-source network of power-bank stations: rent in seconds, return anywhere."),
}
DEFAULT_FAQ = [
    ("rentals", "How do I rent a power bank?", "Open the map, pick a station with available banks, choose a package and tap Rent. The slot releases a charged bank."),
    ("rentals", "Can I return it at another station?", "Yes, at any station with an empty slot. The rental ends the moment the bank clicks in."),
    ("rentals", "What if I need it longer?", "Extend the rental from the app before it is due: each extension adds the package's time at its price."),
    ("payments", "When am I charged?", "The package price is held when you rent and charged when you return; anything not used is released."),
    ("account", "How do I delete my account?", "Profile, Delete account. Return any power bank and settle any dues first."),
]
DEFAULT_CONTACT = [
    ("email", "Support", "support@example.org", 1), ("phone", "Hotline", "+9771000000000", 2),
    ("website", "Website", "https://example.org", 3),
]
DEFAULT_AMENITIES = [
    ("wifi", "Free Wi-Fi", "wifi"), ("seating", "Seating", "chair"), ("open-24h", "Open 24 hours", "clock"),
    ("accessible", "Step-free access", "accessible"),
]
DEFAULT_ACHIEVEMENTS = [
    ("first-rental", "First charge", "Complete your first rental", "rentals_completed", 1, 10, 1),
    ("regular", "Regular", "Complete 10 rentals", "rentals_completed", 10, 50, 2),
    ("on-time", "On time", "Return 5 power banks before they are due", "timely_returns", 5, 30, 3),
    ("explorer", "Explorer", "Rent at 5 different stations", "stations_visited", 5, 30, 4),
]


def default_content_rows(now) -> dict[type, list[dict]]:
    """Rows per table, as column dicts."""
    return {
        Country: [dict(code=c, name=n, dial_code=d, flag=f, is_active=True, sort_order=o) for c, n, d, f, o in DEFAULT_COUNTRIES],
        ContentPage: [dict(slug=s, title=t, body=b, version="1", updated_at=now) for s, (t, b) in DEFAULT_PAGES.items()],
        Faq: [dict(category=c, question=q, answer=a, sort_order=i, is_active=True, updated_at=now) for i, (c, q, a) in enumerate(DEFAULT_FAQ)],
        ContactInfo: [dict(kind=k, label=l, value=v, sort_order=o, updated_at=now) for k, l, v, o in DEFAULT_CONTACT],
        AppVersion: [
            dict(platform=p, latest_version="1.2.0", min_supported_version="1.0.0", store_url=u, release_notes="Rental extensions and favourites.", updated_at=now)
            for p, u in (("android", "https://play.google.com/store"), ("ios", "https://apps.apple.com"))
        ],
        AppUpdate: [
            dict(version="1.2.0", title="Extend and favourite", notes="Extend a rental from the app; keep your favourite stations one tap away.", released_at=now),
            dict(version="1.1.0", title="Points", notes="Earn points for on-time returns and spend them on rentals.", released_at=now - timedelta(days=30)),
        ],
        Banner: [
            dict(title="First rental on us", image_url="https://example.org/banners/first-rental.png", link_url="powerbank://promotions", sort_order=1, is_active=True, created_at=now),
            dict(title="Return anywhere", image_url="https://example.org/banners/return-anywhere.png", link_url=None, sort_order=2, is_active=True, created_at=now),
        ],
        StationAmenity: [dict(code=c, name=n, icon=i) for c, n, i in DEFAULT_AMENITIES],
        Achievement: [
            dict(code=c, name=n, description=d, metric=m, threshold=t, points=p, sort_order=o, is_active=True)
            for c, n, d, m, t, p, o in DEFAULT_ACHIEVEMENTS
        ],
    }


async def ensure_content(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Sample content for tables that are still empty (the demo shows it; operators replace it)."""
    now = utcnow()
    async with sessions.begin() as session:
        for model, rows in default_content_rows(now).items():
            if (await session.execute(select(model.id).limit(1))).first() is not None:
                continue
            session.add_all(model(id=uuid.uuid4(), **row) for row in rows)
