"""Admin writes to the cached content tables: content pages (terms, privacy, about), FAQ,
banners, countries, contact info, app versions and app updates (admin or superadmin only).

Every write is one transaction holding the change and its AdminActionLog row, and after the
commit the read cache key of that table is invalidated (docs/app-endpoints.md), so the public
read in this process shows the change on its next request; other web processes within the
cache's ttl. Invalidating only after the commit matters: invalidating earlier would let a read
that races the commit reload the old rows and keep them for a whole ttl.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.http.admin_log import admin_action
from powerbank.http.auth import BEARER_SECURITY, require_admin
from powerbank.http.cache import invalidate_everywhere
from powerbank.http.deps import services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.routes_content import _version_view, version_key
from powerbank.http.schemas_admin import (
    AppUpdateAdminView,
    AppUpdateWrite,
    AppVersionWrite,
    BannerAdminView,
    BannerWrite,
    ContactAdminView,
    ContactWrite,
    ContentPageWrite,
    CountryAdminView,
    CountryWrite,
    FaqAdminView,
    FaqWrite,
)
from powerbank.http.schemas_app import AppVersionView, ContentPageView
from powerbank.storage.models import (
    APP_PLATFORMS,
    CONTENT_SLUGS,
    AppUpdate,
    AppVersion,
    Banner,
    ContactInfo,
    ContentPage,
    Country,
    Faq,
)

Change = Callable[[AsyncSession], Awaitable[Any]]


# --- pure decisions ---------------------------------------------------------------------------


def as_utc(value: datetime | None, field: str) -> datetime | None:
    """The request's time in UTC; a time that cannot be expressed in UTC (year 1 with a
    positive offset) is the client's mistake, not a server error."""
    if value is None:
        return None
    try:
        return value.astimezone(timezone.utc)
    except (OverflowError, ValueError) as exc:
        raise ApiError(400, "validation_failed", f"{field}: out of range") from exc


def banner_columns(data: BannerWrite) -> dict[str, Any]:
    """The banner's columns; a window that ends before it starts is refused here (the table's
    CHECK would say the same as a driver error)."""
    columns = msgspec.structs.asdict(data)
    columns["starts_at"] = as_utc(data.starts_at, "starts_at")
    columns["ends_at"] = as_utc(data.ends_at, "ends_at")
    if columns["starts_at"] and columns["ends_at"] and columns["ends_at"] <= columns["starts_at"]:
        raise ApiError(400, "invalid_window", "ends_at must be after starts_at")
    return columns


def version_columns(data: AppVersionWrite) -> dict[str, Any]:
    if version_key(data.min_supported_version) > version_key(data.latest_version):
        raise ApiError(400, "invalid_versions", "min_supported_version is newer than latest_version")
    return msgspec.structs.asdict(data)


# --- one audited, cache-invalidating write ----------------------------------------------------


async def audited_write(
    state: State, request: Request, change: Change, *, action: str, target_type: str,
    cache_keys: tuple[str, ...], conflict: str = "conflict", details: dict[str, Any] | None = None,
) -> Any:
    """Run `change` (it returns the written row, None for a delete, and the target's id) with
    its AdminActionLog row in one transaction, then invalidate the cache keys. A unique-key
    clash is 409 `conflict`; a `change` that finds nothing raises its own 404."""
    try:
        async with services_of(state).sessions.begin() as session:
            row, target_id = await change(session)
            await session.flush()
            session.add(admin_action(request, action, target_type, target_id, details=details))
    except IntegrityError as exc:
        raise ApiError(409, conflict, f"another {target_type} has the same key") from exc
    await invalidate_everywhere(state, *cache_keys)
    return row


def update_by_id(model: type, row_id: uuid.UUID, columns: dict[str, Any], not_found: str) -> Change:
    async def change(session: AsyncSession) -> tuple[Any, uuid.UUID]:
        row = await session.get(model, row_id, with_for_update=True)
        if row is None:
            raise ApiError(404, not_found, f"no {model.__tablename__} row {row_id}")
        for name, value in columns.items():
            setattr(row, name, value)
        return row, row_id

    return change


def delete_by_id(model: type, row_id: uuid.UUID, not_found: str) -> Change:
    async def change(session: AsyncSession) -> tuple[None, uuid.UUID]:
        row = await session.get(model, row_id)
        if row is None:
            raise ApiError(404, not_found, f"no {model.__tablename__} row {row_id}")
        await session.delete(row)
        return None, row_id

    return change


def insert(row: Any) -> Change:
    async def change(session: AsyncSession) -> tuple[Any, uuid.UUID]:
        session.add(row)
        await session.flush()
        return row, row.id

    return change


async def all_rows(state: State, statement) -> list[Any]:
    async with services_of(state).readonly() as session:
        return list((await session.execute(statement)).scalars())


# --- views ------------------------------------------------------------------------------------


def _view(view_type: type, row: Any) -> Any:
    """A response struct from the row's columns of the same names."""
    return view_type(**{name: getattr(row, name) for name in view_type.__struct_fields__})


def _page_view(page: ContentPage) -> ContentPageView:
    return ContentPageView(slug=page.slug, title=page.title, body=page.body, version=page.version, updated_at=page.updated_at)


# --- routes -----------------------------------------------------------------------------------

# 413: every body is capped by the app (MAX_REQUEST_BODY_BYTES); long pages and answers can reach it.
WRITE_ERRORS = error_responses(400, 401, 403, 404, 409, 413)
CREATE_ERRORS = error_responses(400, 401, 403, 409, 413)
DELETE_ERRORS = error_responses(400, 401, 403, 404)
READ_ERRORS = error_responses(401, 403)


class AdminContentController(Controller):
    path = "/api/admin/content"
    tags = ["admin"]
    security = BEARER_SECURITY
    guards = [require_admin]

    # --- content pages (one per slug) ---

    @put("/pages/{slug:str}", responses=error_responses(400, 401, 403, 404, 413))
    async def put_page(self, state: State, request: Request, slug: FromPath[str], data: JSONBody[ContentPageWrite]) -> ContentPageView:
        """Publish or replace the terms of service, privacy policy or about page (slug
        `terms-of-service`, `privacy-policy`, `about`; any other is 404 `content_not_found`)."""
        _known(slug, CONTENT_SLUGS, "content_not_found")

        async def change(session: AsyncSession) -> tuple[ContentPage, str]:
            page = (await session.execute(select(ContentPage).where(ContentPage.slug == slug).with_for_update())).scalar_one_or_none()
            if page is None:
                page = ContentPage(slug=slug)
                session.add(page)
            page.title, page.body, page.version = data.title, data.body, data.version
            return page, slug

        page = await audited_write(state, request, change, action="content_page_published", target_type="content_page",
                                   cache_keys=(f"content:{slug}",), details={"version": data.version})
        return _page_view(page)

    @delete("/pages/{slug:str}", status_code=204, responses=DELETE_ERRORS)
    async def delete_page(self, state: State, request: Request, slug: FromPath[str]) -> None:
        """Withdraw a page; the app then gets 404 `content_not_found` for it."""
        _known(slug, CONTENT_SLUGS, "content_not_found")

        async def change(session: AsyncSession) -> tuple[None, str]:
            page = (await session.execute(select(ContentPage).where(ContentPage.slug == slug))).scalar_one_or_none()
            if page is None:
                raise ApiError(404, "content_not_found", f"no {slug} page has been published")
            await session.delete(page)
            return None, slug

        await audited_write(state, request, change, action="content_page_deleted", target_type="content_page", cache_keys=(f"content:{slug}",))

    # --- FAQ ---

    @get("/faq", responses=READ_ERRORS)
    async def list_faq(self, state: State) -> list[FaqAdminView]:
        """Every question, hidden ones too, in the app's order."""
        rows = await all_rows(state, select(Faq).order_by(Faq.category, Faq.sort_order, Faq.question))
        return [_view(FaqAdminView, r) for r in rows]

    @post("/faq", status_code=201, responses=CREATE_ERRORS)
    async def create_faq(self, state: State, request: Request, data: JSONBody[FaqWrite]) -> FaqAdminView:
        """Add a question (shown at once if `is_active`)."""
        row = await audited_write(state, request, insert(Faq(**msgspec.structs.asdict(data))), action="faq_created", target_type="faq", cache_keys=("faq",))
        return _view(FaqAdminView, row)

    @put("/faq/{faq_id:uuid}", responses=WRITE_ERRORS)
    async def update_faq(self, state: State, request: Request, faq_id: FromPath[uuid.UUID], data: JSONBody[FaqWrite]) -> FaqAdminView:
        """Replace a question; `is_active: false` hides it without losing it."""
        change = update_by_id(Faq, faq_id, msgspec.structs.asdict(data), "faq_not_found")
        row = await audited_write(state, request, change, action="faq_updated", target_type="faq", cache_keys=("faq",))
        return _view(FaqAdminView, row)

    @delete("/faq/{faq_id:uuid}", status_code=204, responses=DELETE_ERRORS)
    async def delete_faq(self, state: State, request: Request, faq_id: FromPath[uuid.UUID]) -> None:
        """Delete a question for good."""
        await audited_write(state, request, delete_by_id(Faq, faq_id, "faq_not_found"), action="faq_deleted", target_type="faq", cache_keys=("faq",))

    # --- banners ---

    @get("/banners", responses=READ_ERRORS)
    async def list_banners(self, state: State) -> list[BannerAdminView]:
        """Every banner, inactive and expired ones too."""
        rows = await all_rows(state, select(Banner).order_by(Banner.sort_order, Banner.created_at))
        return [_view(BannerAdminView, r) for r in rows]

    @post("/banners", status_code=201, responses=CREATE_ERRORS)
    async def create_banner(self, state: State, request: Request, data: JSONBody[BannerWrite]) -> BannerAdminView:
        """Add a home-screen banner; 400 `invalid_window` if it ends before it starts."""
        row = await audited_write(state, request, insert(Banner(**banner_columns(data))), action="banner_created", target_type="banner", cache_keys=("banners",))
        return _view(BannerAdminView, row)

    @put("/banners/{banner_id:uuid}", responses=WRITE_ERRORS)
    async def update_banner(self, state: State, request: Request, banner_id: FromPath[uuid.UUID], data: JSONBody[BannerWrite]) -> BannerAdminView:
        """Replace a banner."""
        change = update_by_id(Banner, banner_id, banner_columns(data), "banner_not_found")
        row = await audited_write(state, request, change, action="banner_updated", target_type="banner", cache_keys=("banners",))
        return _view(BannerAdminView, row)

    @delete("/banners/{banner_id:uuid}", status_code=204, responses=DELETE_ERRORS)
    async def delete_banner(self, state: State, request: Request, banner_id: FromPath[uuid.UUID]) -> None:
        """Delete a banner for good."""
        await audited_write(state, request, delete_by_id(Banner, banner_id, "banner_not_found"), action="banner_deleted", target_type="banner", cache_keys=("banners",))

    # --- countries ---

    @get("/countries", responses=READ_ERRORS)
    async def list_countries(self, state: State) -> list[CountryAdminView]:
        """Every country, inactive ones too."""
        rows = await all_rows(state, select(Country).order_by(Country.sort_order, Country.name))
        return [_view(CountryAdminView, r) for r in rows]

    @post("/countries", status_code=201, responses=CREATE_ERRORS)
    async def create_country(self, state: State, request: Request, data: JSONBody[CountryWrite]) -> CountryAdminView:
        """Offer a country for sign-up; its code is unique (409 `country_exists`)."""
        row = await audited_write(state, request, insert(Country(**msgspec.structs.asdict(data))), action="country_created",
                                  target_type="country", cache_keys=("countries",), conflict="country_exists")
        return _view(CountryAdminView, row)

    @put("/countries/{country_id:uuid}", responses=WRITE_ERRORS)
    async def update_country(self, state: State, request: Request, country_id: FromPath[uuid.UUID], data: JSONBody[CountryWrite]) -> CountryAdminView:
        """Replace a country; `is_active: false` withdraws it from sign-up."""
        change = update_by_id(Country, country_id, msgspec.structs.asdict(data), "country_not_found")
        row = await audited_write(state, request, change, action="country_updated", target_type="country",
                                  cache_keys=("countries",), conflict="country_exists")
        return _view(CountryAdminView, row)

    @delete("/countries/{country_id:uuid}", status_code=204, responses=DELETE_ERRORS)
    async def delete_country(self, state: State, request: Request, country_id: FromPath[uuid.UUID]) -> None:
        """Delete a country for good (people's phone numbers do not refer to it)."""
        await audited_write(state, request, delete_by_id(Country, country_id, "country_not_found"), action="country_deleted",
                            target_type="country", cache_keys=("countries",))

    # --- contact info ---

    @get("/contact", responses=READ_ERRORS)
    async def list_contact(self, state: State) -> list[ContactAdminView]:
        """Every way to reach support, with ids."""
        rows = await all_rows(state, select(ContactInfo).order_by(ContactInfo.sort_order, ContactInfo.label))
        return [_view(ContactAdminView, r) for r in rows]

    @post("/contact", status_code=201, responses=CREATE_ERRORS)
    async def create_contact(self, state: State, request: Request, data: JSONBody[ContactWrite]) -> ContactAdminView:
        """Add a way to reach support."""
        row = await audited_write(state, request, insert(ContactInfo(**msgspec.structs.asdict(data))), action="contact_created", target_type="contact", cache_keys=("contact",))
        return _view(ContactAdminView, row)

    @put("/contact/{contact_id:uuid}", responses=WRITE_ERRORS)
    async def update_contact(self, state: State, request: Request, contact_id: FromPath[uuid.UUID], data: JSONBody[ContactWrite]) -> ContactAdminView:
        """Replace one contact entry."""
        change = update_by_id(ContactInfo, contact_id, msgspec.structs.asdict(data), "contact_not_found")
        row = await audited_write(state, request, change, action="contact_updated", target_type="contact", cache_keys=("contact",))
        return _view(ContactAdminView, row)

    @delete("/contact/{contact_id:uuid}", status_code=204, responses=DELETE_ERRORS)
    async def delete_contact(self, state: State, request: Request, contact_id: FromPath[uuid.UUID]) -> None:
        """Delete one contact entry."""
        await audited_write(state, request, delete_by_id(ContactInfo, contact_id, "contact_not_found"), action="contact_deleted", target_type="contact", cache_keys=("contact",))

    # --- app versions (one per platform) ---

    @put("/app-versions/{platform:str}", responses=error_responses(400, 401, 403, 404))
    async def put_app_version(self, state: State, request: Request, platform: FromPath[str], data: JSONBody[AppVersionWrite]) -> AppVersionView:
        """Publish the newest build of a platform (`ios`, `android`, `web`, `other`) and the
        oldest still allowed; 400 `invalid_versions` if the minimum is newer than the latest."""
        _known(platform, APP_PLATFORMS, "app_version_not_found")
        columns = version_columns(data)

        async def change(session: AsyncSession) -> tuple[AppVersion, str]:
            row = (await session.execute(select(AppVersion).where(AppVersion.platform == platform).with_for_update())).scalar_one_or_none()
            if row is None:
                row = AppVersion(platform=platform)
                session.add(row)
            for name, value in columns.items():
                setattr(row, name, value)
            return row, platform

        row = await audited_write(state, request, change, action="app_version_published", target_type="app_version",
                                  cache_keys=("app_versions",), details={"latest_version": data.latest_version})
        return _version_view(row)

    # --- app updates (release notes) ---

    @get("/app-updates", responses=READ_ERRORS)
    async def list_app_updates(self, state: State) -> list[AppUpdateAdminView]:
        """Every release note, newest first, with ids."""
        rows = await all_rows(state, select(AppUpdate).order_by(AppUpdate.released_at.desc()))
        return [_view(AppUpdateAdminView, r) for r in rows]

    @post("/app-updates", status_code=201, responses=CREATE_ERRORS)
    async def create_app_update(self, state: State, request: Request, data: JSONBody[AppUpdateWrite]) -> AppUpdateAdminView:
        """Add a release note."""
        row = AppUpdate(**{**msgspec.structs.asdict(data), "released_at": as_utc(data.released_at, "released_at")})
        row = await audited_write(state, request, insert(row), action="app_update_created", target_type="app_update", cache_keys=("app_updates",))
        return _view(AppUpdateAdminView, row)

    @put("/app-updates/{update_id:uuid}", responses=WRITE_ERRORS)
    async def update_app_update(self, state: State, request: Request, update_id: FromPath[uuid.UUID], data: JSONBody[AppUpdateWrite]) -> AppUpdateAdminView:
        """Replace a release note."""
        columns = {**msgspec.structs.asdict(data), "released_at": as_utc(data.released_at, "released_at")}
        row = await audited_write(state, request, update_by_id(AppUpdate, update_id, columns, "app_update_not_found"),
                                  action="app_update_updated", target_type="app_update", cache_keys=("app_updates",))
        return _view(AppUpdateAdminView, row)

    @delete("/app-updates/{update_id:uuid}", status_code=204, responses=DELETE_ERRORS)
    async def delete_app_update(self, state: State, request: Request, update_id: FromPath[uuid.UUID]) -> None:
        """Delete a release note."""
        await audited_write(state, request, delete_by_id(AppUpdate, update_id, "app_update_not_found"), action="app_update_deleted",
                            target_type="app_update", cache_keys=("app_updates",))


def _known(value: str, allowed: tuple[str, ...], not_found: str) -> None:
    """A path value outside a fixed set names nothing: 404, like an unknown id."""
    if value not in allowed:
        raise ApiError(404, not_found, f"{value!r} is not one of {', '.join(allowed)}")
