"""Rarely changing reads: app versions, banners, countries, and the content pages (terms,
privacy, about, contact, FAQ, app updates).

Each is one small query, served from the in-process `ReadCache` (http/cache.py) under the key
named next to its table in storage/models.py; an admin write invalidates the key. Everything here
is public: the app shows it before anyone signs in.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, get
from litestar.datastructures import State
from litestar.params import QueryParameter
from sqlalchemy import select

from powerbank.http.cache import read_cache_of
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas_app import (
    AppVersionView,
    BannerView,
    ContactView,
    ContentPageView,
    CountryView,
    FaqView,
    AppUpdateView,
)
from powerbank.storage.models import AppUpdate, AppVersion, Banner, ContactInfo, ContentPage, Country, Faq
from powerbank.storage.types import utcnow

PUBLIC = {"exclude_from_auth": True}
MAX_APP_UPDATES = 50


# --- pure decisions ---------------------------------------------------------------------------


def version_key(version: str) -> tuple[int, ...]:
    """"2.10.1" -> (2, 10, 1): numeric, so 2.10 is newer than 2.9 (a string compare says not).
    Trailing zeros do not count: 2.1 == 2.1.0."""
    parts = [int(p) if p.isdigit() else 0 for p in re.split(r"[.\-+]", version.strip())[:4]]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def update_flags(current: str, latest: str, min_supported: str) -> tuple[bool, bool]:
    """(update available, update required) for an app running `current`."""
    running = version_key(current)
    return running < version_key(latest), running < version_key(min_supported)


def banner_is_live(starts_at: datetime | None, ends_at: datetime | None, now: datetime) -> bool:
    """Inside its window; the cache holds every active banner and the window is checked per read,
    so a banner appears and disappears on time without an invalidation."""
    return (starts_at is None or starts_at <= now) and (ends_at is None or now < ends_at)


# --- storage ----------------------------------------------------------------------------------


async def _cached(state: State, key: str, query: Callable[[Any], Awaitable[Any]]) -> Any:
    async def load() -> Any:
        async with services_of(state).readonly() as session:
            return await query(session)

    return await read_cache_of(state).get_or_load(key, load)


async def _rows(session, statement) -> list[Any]:
    return list((await session.execute(statement)).scalars())


def _version_view(row: AppVersion) -> AppVersionView:
    return AppVersionView(
        platform=row.platform, latest_version=row.latest_version, min_supported_version=row.min_supported_version,
        store_url=row.store_url, release_notes=row.release_notes,
    )


async def load_app_versions(session) -> dict[str, AppVersionView]:
    return {row.platform: _version_view(row) for row in await _rows(session, select(AppVersion))}


async def load_banners(session) -> list[BannerView]:
    rows = await _rows(session, select(Banner).where(Banner.is_active.is_(True)).order_by(Banner.sort_order, Banner.created_at))
    return [
        BannerView(id=b.id, title=b.title, image_url=b.image_url, link_url=b.link_url, sort_order=b.sort_order,
                   starts_at=b.starts_at, ends_at=b.ends_at)
        for b in rows
    ]


async def load_countries(session) -> list[CountryView]:
    rows = await _rows(session, select(Country).where(Country.is_active.is_(True)).order_by(Country.sort_order, Country.name))
    return [CountryView(code=c.code, name=c.name, dial_code=c.dial_code, flag=c.flag) for c in rows]


def load_page(slug: str) -> Callable[[Any], Awaitable[ContentPageView | None]]:
    async def query(session) -> ContentPageView | None:
        page = (await session.execute(select(ContentPage).where(ContentPage.slug == slug))).scalar_one_or_none()
        if page is None:
            return None
        return ContentPageView(slug=page.slug, title=page.title, body=page.body, version=page.version, updated_at=page.updated_at)

    return query


async def load_contact(session) -> list[ContactView]:
    rows = await _rows(session, select(ContactInfo).order_by(ContactInfo.sort_order, ContactInfo.label))
    return [ContactView(kind=c.kind, label=c.label, value=c.value) for c in rows]


async def load_faq(session) -> list[FaqView]:
    rows = await _rows(session, select(Faq).where(Faq.is_active.is_(True)).order_by(Faq.category, Faq.sort_order, Faq.question))
    return [FaqView(id=f.id, category=f.category, question=f.question, answer=f.answer) for f in rows]


async def load_app_updates(session) -> list[AppUpdateView]:
    rows = await _rows(session, select(AppUpdate).order_by(AppUpdate.released_at.desc()).limit(MAX_APP_UPDATES))
    return [AppUpdateView(version=u.version, title=u.title, notes=u.notes, released_at=u.released_at) for u in rows]


def with_flags(view: AppVersionView, current: str | None) -> AppVersionView:
    if current is None:
        return view
    available, required = update_flags(current, view.latest_version, view.min_supported_version)
    fields = {f: getattr(view, f) for f in view.__struct_fields__}
    return AppVersionView(**{**fields, "update_available": available, "update_required": required})


# --- routes -----------------------------------------------------------------------------------

PlatformQuery = Annotated[str, QueryParameter(description="the app's platform", pattern="^(ios|android|web|other)$")]
CurrentVersion = Annotated[
    str | None,
    QueryParameter(description="the version the app runs, to learn whether it must update", pattern=r"^[0-9]+(\.[0-9]+){0,3}$", max_length=32),
]


class AppContentController(Controller):
    path = "/api/app"
    tags = ["app"]
    opt = PUBLIC

    @get("/version", responses=error_responses(400, 404))
    async def version(self, state: State, platform: PlatformQuery = "android", current: CurrentVersion = None) -> AppVersionView:
        """The newest app version for a platform and the oldest still supported; with `current`,
        whether this app should (`update_available`) or must (`update_required`) update.
        404 `app_version_not_found` when nothing is published for the platform."""
        versions = await _cached(state, "app_versions", load_app_versions)
        view = versions.get(platform)
        if view is None:
            raise ApiError(404, "app_version_not_found", f"no app version published for {platform}")
        return with_flags(view, current)

    @get("/banners", responses=error_responses(500))
    async def banners(self, state: State) -> list[BannerView]:
        """Home-screen banners that are active and inside their window, in display order."""
        cached: Sequence[BannerView] = await _cached(state, "banners", load_banners)
        now = utcnow()
        return [b for b in cached if banner_is_live(b.starts_at, b.ends_at, now)]

    @get("/countries", responses=error_responses(500))
    async def countries(self, state: State) -> list[CountryView]:
        """Countries the app offers for phone sign-up, with their dial codes."""
        return await _cached(state, "countries", load_countries)


class ContentController(Controller):
    path = "/api/content"
    tags = ["content"]
    opt = PUBLIC

    @staticmethod
    async def _page(state: State, slug: str) -> ContentPageView:
        page = await _cached(state, f"content:{slug}", load_page(slug))
        if page is None:
            raise ApiError(404, "content_not_found", f"no {slug} page has been published")
        return page

    @get("/terms-of-service", responses=error_responses(404))
    async def terms(self, state: State) -> ContentPageView:
        """The terms of service (markdown)."""
        return await self._page(state, "terms-of-service")

    @get("/privacy-policy", responses=error_responses(404))
    async def privacy(self, state: State) -> ContentPageView:
        """The privacy policy (markdown)."""
        return await self._page(state, "privacy-policy")

    @get("/about", responses=error_responses(404))
    async def about(self, state: State) -> ContentPageView:
        """About the service (markdown)."""
        return await self._page(state, "about")

    @get("/contact", responses=error_responses(500))
    async def contact(self, state: State) -> list[ContactView]:
        """How to reach support."""
        return await _cached(state, "contact", load_contact)

    @get("/faq", responses=error_responses(500))
    async def faq(self, state: State) -> list[FaqView]:
        """Frequently asked questions, by category then display order."""
        return await _cached(state, "faq", load_faq)

    @get("/app-updates", responses=error_responses(500))
    async def app_updates(self, state: State) -> list[AppUpdateView]:
        """Release notes, newest first."""
        return await _cached(state, "app_updates", load_app_updates)
