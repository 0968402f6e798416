"""App version, banners, countries and the content pages, over ASGI; the read cache and its
invalidation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, update

from powerbank.http.cache import ReadCache
from powerbank.http.routes_content import banner_is_live, update_flags, version_key
from powerbank.storage.models import AppVersion, Banner, ContentPage, Country, Faq
from powerbank.storage.types import utcnow


# --- pure decisions ---------------------------------------------------------------------------


def test_version_key_compares_numerically_and_ignores_trailing_zeros():
    assert version_key("2.10.0") > version_key("2.9.9")
    assert version_key("2.1") == version_key("2.1.0")
    assert update_flags("1.0.5", latest="1.2.0", min_supported="1.1.0") == (True, True)
    assert update_flags("1.1.0", latest="1.2.0", min_supported="1.1.0") == (True, False)
    assert update_flags("1.2.0", latest="1.2.0", min_supported="1.1.0") == (False, False)


def test_banner_window_is_half_open():
    now = utcnow()
    assert banner_is_live(None, None, now)
    assert banner_is_live(now, now + timedelta(hours=1), now)
    assert not banner_is_live(now + timedelta(seconds=1), None, now)
    assert not banner_is_live(None, now, now)


# --- the cache --------------------------------------------------------------------------------


async def test_cache_loads_once_until_invalidated_or_expired():
    clock = [0.0]
    cache = ReadCache(ttl_s=10, clock=lambda: clock[0])
    values = iter(["first", "second", "third"])

    async def load():
        return next(values)

    assert await cache.get_or_load("k", load) == "first"
    assert await cache.get_or_load("k", load) == "first"
    cache.invalidate("k")
    assert await cache.get_or_load("k", load) == "second"
    clock[0] = 10.0
    assert await cache.get_or_load("k", load) == "third"
    assert cache.loads == 3


async def test_cache_does_not_keep_a_load_that_an_invalidation_overtook():
    cache = ReadCache()

    async def load():
        cache.invalidate("k")  # an admin write commits while the old rows are being read
        return "stale"

    assert await cache.get_or_load("k", load) == "stale"

    async def fresh():
        return "fresh"

    assert await cache.get_or_load("k", fresh) == "fresh"


async def test_cache_does_not_keep_a_failed_load():
    cache = ReadCache()

    async def broken():
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError):
        await cache.get_or_load("k", broken)

    async def fine():
        return 1

    assert await cache.get_or_load("k", fine) == 1


# --- routes -----------------------------------------------------------------------------------


async def test_version_for_a_platform_with_update_flags(app_client):
    body = (await app_client.get("/api/app/version", params={"platform": "android", "current": "1.0.0"})).json()
    assert body["latest_version"] == "1.2.0" and body["min_supported_version"] == "1.0.0"
    assert (body["update_available"], body["update_required"]) == (True, False)
    plain = (await app_client.get("/api/app/version", params={"platform": "ios"})).json()
    assert plain["update_available"] is None
    missing = await app_client.get("/api/app/version", params={"platform": "web"})
    assert missing.status_code == 404 and missing.json()["error"] == "app_version_not_found"
    bad = await app_client.get("/api/app/version", params={"platform": "android", "current": "one"})
    assert bad.status_code == 400 and bad.json()["error"] == "validation_failed"


async def test_banners_show_only_active_ones_inside_their_window(app_client, app_services):
    now = utcnow()
    async with app_services.sessions.begin() as session:
        await session.execute(delete(Banner))
        session.add_all([
            Banner(title="live", image_url="https://x/1.png", sort_order=2, starts_at=now - timedelta(hours=1)),
            Banner(title="first", image_url="https://x/0.png", sort_order=1),
            Banner(title="future", image_url="https://x/2.png", starts_at=now + timedelta(hours=1)),
            Banner(title="over", image_url="https://x/3.png", ends_at=now - timedelta(seconds=1)),
            Banner(title="off", image_url="https://x/4.png", is_active=False),
        ])
    titles = [b["title"] for b in (await app_client.get("/api/app/banners")).json()]
    assert titles == ["first", "live"]


async def test_countries_are_the_active_ones_in_order(app_client, app_services):
    async with app_services.sessions.begin() as session:
        await session.execute(update(Country).where(Country.code == "US").values(is_active=False))
    body = (await app_client.get("/api/app/countries")).json()
    codes = [c["code"] for c in body]
    assert codes[0] == "NP" and "US" not in codes and "IN" in codes
    assert body[0]["dial_code"] == "+977"


@pytest.mark.parametrize("slug", ["terms-of-service", "privacy-policy", "about"])
async def test_content_pages_are_public(app_client, slug):
    response = await app_client.get(f"/api/content/{slug}")
    assert response.status_code == 200
    assert response.json()["slug"] == slug and response.json()["body"].startswith("#")


async def test_missing_content_page_is_404(app_client, app_services):
    async with app_services.sessions.begin() as session:
        await session.execute(delete(ContentPage).where(ContentPage.slug == "about"))
    response = await app_client.get("/api/content/about")
    assert response.status_code == 404 and response.json()["error"] == "content_not_found"


async def test_contact_faq_and_app_updates(app_client):
    contact = (await app_client.get("/api/content/contact")).json()
    assert contact[0]["kind"] == "email"
    faq = (await app_client.get("/api/content/faq")).json()
    assert len(faq) == 5 and {f["category"] for f in faq} == {"rentals", "payments", "account"}
    updates = (await app_client.get("/api/content/app-updates")).json()
    assert [u["version"] for u in updates] == ["1.2.0", "1.1.0"]


async def test_admin_change_shows_only_after_invalidation(app_client, app_services, app):
    first = (await app_client.get("/api/content/faq")).json()
    await app_client.get("/api/app/version", params={"platform": "android"})
    async with app_services.sessions.begin() as session:
        await session.execute(update(Faq).values(question="Changed?"))
        await session.execute(update(AppVersion).where(AppVersion.platform == "android").values(latest_version="9.0.0"))
    assert (await app_client.get("/api/content/faq")).json() == first  # served from the cache
    app.state.read_cache.invalidate("faq")
    assert {f["question"] for f in (await app_client.get("/api/content/faq")).json()} == {"Changed?"}
    assert (await app_client.get("/api/app/version", params={"platform": "android"})).json()["latest_version"] == "1.2.0"
    app.state.read_cache.invalidate("app_versions")
    assert (await app_client.get("/api/app/version", params={"platform": "android"})).json()["latest_version"] == "9.0.0"


async def test_seeding_twice_adds_nothing(app_services):
    from sqlalchemy import func, select

    from powerbank.storage.seed import ensure_defaults

    await ensure_defaults(app_services.sessions, "NPR")
    async with app_services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Faq)) == 5
        assert await session.scalar(select(func.count()).select_from(Country)) == 5
