"""Admin content writes over HTTP: admins only, validated, audited in the same transaction, and
the public cached read shows the change at once in this process. Embedded default (SQLite)."""

from __future__ import annotations

import secrets
import uuid

import pytest
from sqlalchemy import select

from powerbank.http.auth import create_access_token, ensure_admin_token
from powerbank.http.testing import bearer
from powerbank.storage.models import AdminActionLog, Faq, User


@pytest.fixture
async def admin(app_services) -> dict[str, str]:
    return bearer(await ensure_admin_token(app_services, "+9779800000001"))


async def person(services, role: str) -> dict[str, str]:
    tenant_id = None
    if role == "operator":
        from powerbank.storage.models import Tenant

        async with services.sessions.begin() as session:
            tenant = Tenant(name=f"T{secrets.token_hex(3)}", slug=f"t-{secrets.token_hex(3)}", is_active=True)
            session.add(tenant)
            await session.flush()
            tenant_id = tenant.id
    async with services.sessions.begin() as session:
        user = User(phone=f"+97798{secrets.randbelow(10**8):08d}", role=role, tenant_id=tenant_id, referral_code=secrets.token_hex(4).upper())
        session.add(user)
    return bearer(create_access_token(services.settings, user.id, role))


async def actions(services, action: str) -> list[AdminActionLog]:
    async with services.readonly() as session:
        return list((await session.execute(select(AdminActionLog).where(AdminActionLog.action == action))).scalars())


FAQ = {"question": "How do I return a bank?", "answer": "Push it into any empty slot.", "category": "rentals"}


@pytest.mark.parametrize("role", ["user", "operator"])
async def test_riders_and_operators_may_not_write_content(app_client, app_services, role):
    headers = await person(app_services, role)
    for method, path, body in [
        ("POST", "/api/admin/content/faq", FAQ),
        ("GET", "/api/admin/content/faq", None),
        ("PUT", "/api/admin/content/pages/about", {"title": "About", "body": "x"}),
        ("DELETE", f"/api/admin/content/banners/{uuid.uuid4()}", None),
    ]:
        response = await app_client.request(method, path, json=body, headers=headers)
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"] == "forbidden"
    assert await actions(app_services, "faq_created") == []


async def test_a_faq_change_shows_in_the_public_read_at_once_and_is_audited(app_client, app_services, admin):
    before = (await app_client.get("/api/content/faq")).json()  # fills the cache
    assert FAQ["question"] not in [f["question"] for f in before]
    created = await app_client.post("/api/admin/content/faq", json=FAQ, headers=admin)
    assert created.status_code == 201, created.text
    faq_id = created.json()["id"]
    assert faq_id in {f["id"] for f in (await app_client.get("/api/content/faq")).json()}

    changed = await app_client.put(f"/api/admin/content/faq/{faq_id}", json={**FAQ, "answer": "Any slot, any station."}, headers=admin)
    assert changed.status_code == 200, changed.text
    public = {f["id"]: f for f in (await app_client.get("/api/content/faq")).json()}
    assert public[faq_id]["answer"] == "Any slot, any station."

    hidden = await app_client.put(f"/api/admin/content/faq/{faq_id}", json={**FAQ, "is_active": False}, headers=admin)
    assert hidden.status_code == 200
    assert faq_id not in {f["id"] for f in (await app_client.get("/api/content/faq")).json()}
    assert faq_id in {f["id"] for f in (await app_client.get("/api/admin/content/faq", headers=admin)).json()}

    assert (await app_client.delete(f"/api/admin/content/faq/{faq_id}", headers=admin)).status_code == 204
    async with app_services.readonly() as session:
        assert await session.get(Faq, uuid.UUID(faq_id)) is None
    for action in ("faq_created", "faq_updated", "faq_deleted"):
        rows = await actions(app_services, action)
        assert [(r.target_type, r.target_id, r.actor_role) for r in rows][:1] == [("faq", faq_id, "admin")], action
    assert len(await actions(app_services, "faq_updated")) == 2


async def test_a_content_page_put_replaces_the_cached_page(app_client, app_services, admin):
    await app_client.get("/api/content/about")  # cached, whatever it was
    response = await app_client.put("/api/admin/content/pages/about", json={"title": "About us", "body": "# Hello", "version": "7"}, headers=admin)
    assert response.status_code == 200, response.text
    public = (await app_client.get("/api/content/about")).json()
    assert (public["title"], public["body"], public["version"]) == ("About us", "# Hello", "7")
    assert [r.target_id for r in await actions(app_services, "content_page_published")] == ["about"]

    assert (await app_client.delete("/api/admin/content/pages/about", headers=admin)).status_code == 204
    gone = await app_client.get("/api/content/about")
    assert (gone.status_code, gone.json()["error"]) == (404, "content_not_found")


async def test_banners_countries_contact_versions_and_updates_reach_their_public_reads(app_client, admin):
    for path in ("/api/app/banners", "/api/app/countries", "/api/content/contact", "/api/content/app-updates"):
        await app_client.get(path)  # fill every cache first
    await app_client.get("/api/app/version", params={"platform": "ios"})

    banner = {"title": "Free first hour", "image_url": "https://cdn.example/b.png", "starts_at": "2020-01-01T00:00:00Z"}
    assert (await app_client.post("/api/admin/content/banners", json=banner, headers=admin)).status_code == 201
    assert "Free first hour" in [b["title"] for b in (await app_client.get("/api/app/banners")).json()]

    country = {"code": "ZZ", "name": "Zedland", "dial_code": "+999"}
    assert (await app_client.post("/api/admin/content/countries", json=country, headers=admin)).status_code == 201
    assert "ZZ" in [c["code"] for c in (await app_client.get("/api/app/countries")).json()]
    again = await app_client.post("/api/admin/content/countries", json=country, headers=admin)
    assert (again.status_code, again.json()["error"]) == (409, "country_exists")

    contact = {"kind": "email", "label": "Support", "value": "help@example.com"}
    assert (await app_client.post("/api/admin/content/contact", json=contact, headers=admin)).status_code == 201
    assert "help@example.com" in [c["value"] for c in (await app_client.get("/api/content/contact")).json()]

    version = {"latest_version": "9.1.0", "min_supported_version": "9.0"}
    assert (await app_client.put("/api/admin/content/app-versions/ios", json=version, headers=admin)).status_code == 200
    ios = (await app_client.get("/api/app/version", params={"platform": "ios", "current": "8.0"})).json()
    assert (ios["latest_version"], ios["update_required"]) == ("9.1.0", True)

    update = {"version": "9.1.0", "title": "Faster map", "notes": "The map loads faster.", "released_at": "2026-11-01T00:00:00Z"}
    assert (await app_client.post("/api/admin/content/app-updates", json=update, headers=admin)).status_code == 201
    assert "Faster map" in [u["title"] for u in (await app_client.get("/api/content/app-updates")).json()]


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("POST", "/api/admin/content/faq", {**FAQ, "surprise": 1}, "validation_failed"),
        ("POST", "/api/admin/content/faq", {"question": "", "answer": "x"}, "validation_failed"),
        ("POST", "/api/admin/content/banners", {"title": "t", "image_url": "https://x/y", "starts_at": "2026-02-01T00:00:00Z", "ends_at": "2026-01-01T00:00:00Z"}, "invalid_window"),
        ("POST", "/api/admin/content/banners", {"title": "t", "image_url": "https://x/y", "starts_at": "2026-02-01T00:00:00"}, "validation_failed"),
        ("POST", "/api/admin/content/countries", {"code": "zed", "name": "Z", "dial_code": "999"}, "validation_failed"),
        ("PUT", "/api/admin/content/app-versions/ios", {"latest_version": "1.0", "min_supported_version": "2.0"}, "invalid_versions"),
        ("POST", "/api/admin/content/faq", {**FAQ, "sort_order": 10**20}, "validation_failed"),
    ],
)
async def test_bad_bodies_are_400(app_client, admin, method, path, body, error):
    response = await app_client.request(method, path, json=body, headers=admin)
    assert (response.status_code, response.json()["error"]) == (400, error), response.text


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("PUT", "/api/admin/content/faq/{id}", FAQ, "faq_not_found"),
        ("DELETE", "/api/admin/content/faq/{id}", None, "faq_not_found"),
        ("PUT", "/api/admin/content/banners/{id}", {"title": "t", "image_url": "https://x/y"}, "banner_not_found"),
        ("DELETE", "/api/admin/content/countries/{id}", None, "country_not_found"),
        ("DELETE", "/api/admin/content/contact/{id}", None, "contact_not_found"),
        ("DELETE", "/api/admin/content/app-updates/{id}", None, "app_update_not_found"),
        ("PUT", "/api/admin/content/pages/imprint", {"title": "t", "body": "b"}, "content_not_found"),
        ("PUT", "/api/admin/content/app-versions/symbian", {"latest_version": "1", "min_supported_version": "1"}, "app_version_not_found"),
    ],
)
async def test_unknown_targets_are_404_and_leave_no_audit_row(app_client, app_services, admin, method, path, body, error):
    response = await app_client.request(method, path.format(id=uuid.uuid4()), json=body, headers=admin)
    assert (response.status_code, response.json()["error"]) == (404, error), response.text
    async with app_services.readonly() as session:
        assert list((await session.execute(select(AdminActionLog))).scalars()) == []


async def test_a_body_over_the_apps_cap_is_413_and_documented(app_client, admin):
    from powerbank.http.app import openapi_document

    response = await app_client.put("/api/admin/content/pages/terms-of-service", json={"title": "t", "body": "x" * 70_000}, headers=admin)
    assert response.status_code == 413, response.text
    operation = openapi_document()["paths"]["/api/admin/content/pages/{slug}"]["put"]
    assert "413" in operation["responses"]


async def test_writes_conflicts_and_audit_on_both_backends(both_app_client, both_app_services):
    """Row locks, upserts and unique clashes behave alike on SQLite and PostgreSQL."""
    client, admin = both_app_client, bearer(await ensure_admin_token(both_app_services, "+9779800000002"))
    country = {"code": "QQ", "name": "Qland", "dial_code": "+998", "flag": "🇶"}
    created = await client.post("/api/admin/content/countries", json=country, headers=admin)
    assert created.status_code == 201, created.text
    clash = await client.post("/api/admin/content/countries", json=country, headers=admin)
    assert (clash.status_code, clash.json()["error"]) == (409, "country_exists")
    renamed = await client.put(f"/api/admin/content/countries/{created.json()['id']}", json={**country, "name": "Q"}, headers=admin)
    assert renamed.status_code == 200
    assert {"code": "QQ", "name": "Q", "dial_code": "+998", "flag": "🇶"} in (await client.get("/api/app/countries")).json()
    for version in ("1", "2"):
        page = await client.put("/api/admin/content/pages/privacy-policy", json={"title": "Privacy", "body": "b", "version": version}, headers=admin)
        assert page.status_code == 200, page.text
    assert (await client.get("/api/content/privacy-policy")).json()["version"] == "2"
    async with both_app_services.readonly() as session:
        logged = [r.action for r in (await session.execute(select(AdminActionLog).order_by(AdminActionLog.id))).scalars()]
    assert logged == ["country_created", "country_updated", "content_page_published", "content_page_published"]


async def test_a_content_write_reaches_the_cache_of_every_web_process(app_client, app_services):
    """Two apps on one bus stand for two web processes: the admin writes through one, the
    other's cached copy is dropped at once (not after its 60 s expiry)."""
    import asyncio

    from powerbank.http.app import create_app
    from powerbank.http.cache import InvalidationFollower, ReadCache
    from powerbank.http.testing import TEST_AUTH_POLICY, client_for

    other_cache = ReadCache(ttl_s=3600)
    follower = InvalidationFollower(other_cache, app_services.bus)
    await follower.start()
    try:
        async with client_for(create_app(app_services, auth_policy=TEST_AUTH_POLICY, read_cache=other_cache)) as other:
            before = (await other.get("/api/content/faq")).json()
            loads = other_cache.loads
            admin = bearer(await ensure_admin_token(app_services, "+9779800000001"))
            created = await app_client.post("/api/admin/content/faq", json={"question": "Is it cached?", "answer": "Not for long.", "category": "general", "sort_order": 1}, headers=admin)
            assert created.status_code == 201, created.text
            for _ in range(100):
                if not other_cache._entries:
                    break
                await asyncio.sleep(0.01)
            after = (await other.get("/api/content/faq")).json()
            assert other_cache.loads == loads + 1
            assert len(str(after)) > len(str(before)) and "Is it cached?" in str(after)
    finally:
        await follower.stop()
