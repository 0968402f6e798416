"""The caller's notifications: list, read, mark all read, delete; another person's are 404."""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import func, select

from powerbank.http.testing import sign_up
from powerbank.storage.models import Notification
from powerbank.storage.types import utcnow


async def notify(services, user_id, count: int) -> list[uuid.UUID]:
    now = utcnow()
    ids = []
    async with services.sessions.begin() as session:
        for index in range(count):
            row = Notification(user_id=user_id, kind="rental_overdue", title=f"n{index}", body="b", data={"i": index},
                               created_at=now + timedelta(seconds=index))
            session.add(row)
            await session.flush()
            ids.append(row.id)
    return ids


async def test_list_read_and_mark_all(app_client, app_services):
    alice, alice_id = await sign_up(app_client, "+9779818000001")
    bob, bob_id = await sign_up(app_client, "+9779818000002")
    ids = await notify(app_services, alice_id, 3)
    await notify(app_services, bob_id, 1)

    page = (await app_client.get("/api/user/notifications", headers=alice)).json()
    assert [n["title"] for n in page["items"]] == ["n2", "n1", "n0"]
    assert (page["total"], page["unread"]) == (3, 3) and page["items"][0]["data"] == {"i": 2}

    read = await app_client.post(f"/api/user/notification/{ids[0]}", headers=alice)
    assert read.status_code == 200 and read.json()["read"] is True
    assert (await app_client.post(f"/api/user/notification/{ids[0]}", headers=alice)).json()["read_at"] == read.json()["read_at"]
    unread = (await app_client.get("/api/user/notifications", headers=alice, params={"unread_only": True})).json()
    assert unread["total"] == 2 and unread["unread"] == 2

    marked = (await app_client.post("/api/user/notifications/mark-all-read", headers=alice)).json()
    assert marked == {"marked": 2, "unread": 0}
    assert (await app_client.get("/api/user/notifications", headers=bob)).json()["unread"] == 1  # Bob's untouched


async def test_someone_elses_notification_is_404_and_unchanged(app_client, app_services):
    alice, alice_id = await sign_up(app_client, "+9779818000003")
    bob, _ = await sign_up(app_client, "+9779818000004")
    (alices,) = await notify(app_services, alice_id, 1)

    for response in (
        await app_client.post(f"/api/user/notification/{alices}", headers=bob),
        await app_client.delete(f"/api/user/notification/{alices}", headers=bob),
        await app_client.delete(f"/api/user/notification/{uuid.uuid4()}", headers=alice),
    ):
        assert response.status_code == 404 and response.json()["error"] == "notification_not_found"
    async with app_services.sessions() as session:
        row = await session.get(Notification, alices)
        assert row is not None and row.read_at is None

    assert (await app_client.delete(f"/api/user/notification/{alices}", headers=alice)).status_code == 204
    async with app_services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Notification)) == 0


async def test_resolving_a_station_issue_notifies_its_reporter_once(app_client, app_services):
    from powerbank.http.auth import ensure_admin_token
    from powerbank.http.testing import bearer
    from powerbank.storage.models import Station, StationIssue, UserEvent

    alice, alice_id = await sign_up(app_client, "+9779818000003")
    admin = bearer(await ensure_admin_token(app_services, "+9779800000001"))
    async with app_services.sessions.begin() as session:
        station = Station(serial="SN-ISSUE-1", name="Mall atrium", latitude=27.7, longitude=85.3, slot_count=4)
        session.add(station)
        await session.flush()
        issue = StationIssue(station_id=station.id, user_id=alice_id, kind="dirty", status="open")
        session.add(issue)
    path = f"/api/admin/station-issues/{issue.id}/status"
    acknowledged = await app_client.put(path, json={"status": "acknowledged"}, headers=admin)
    assert acknowledged.status_code == 200 and acknowledged.json()["status"] == "acknowledged"
    assert (await app_client.get("/api/user/notifications", headers=alice)).json()["total"] == 0
    for _ in range(2):  # resolving twice (a double click) tells the reporter once
        resolved = await app_client.put(path, json={"status": "resolved"}, headers=admin)
        assert resolved.status_code == 200 and resolved.json()["status"] == "resolved"
    page = (await app_client.get("/api/user/notifications", headers=alice)).json()
    assert [(n["kind"], n["body"]) for n in page["items"]] == [
        ("station_issue_resolved", "The issue you reported at Mall atrium is resolved. Thank you!")]
    async with app_services.sessions() as session:  # kept for a reconnecting app, like an actor's events
        kept = (await session.execute(select(UserEvent.type).where(UserEvent.user_id == alice_id))).scalars().all()
    assert kept.count("notification.created") == 1
    assert (await app_client.put(path, json={"status": "open"}, headers=alice)).status_code == 403
    missing = await app_client.put(f"/api/admin/station-issues/{uuid.uuid4()}/status", json={"status": "resolved"}, headers=admin)
    assert missing.status_code == 404


async def test_people_set_their_notification_preferences_and_deliveries_follow_them(app_client, app_services):
    from powerbank.actors.notifications import Preferences, choose_channels, load_preferences

    me, user_id = await sign_up(app_client, "+9779817000099")
    defaults = (await app_client.get("/api/user/notification-preferences", headers=me)).json()
    assert (defaults["push_enabled"], defaults["sms_enabled"], defaults["muted_kinds"]) == (True, True, [])
    assert "rental_ending_soon" in defaults["kinds"]

    changed = await app_client.patch("/api/user/notification-preferences", json={"sms_enabled": False, "muted_kinds": ["rental_charged"]}, headers=me)
    assert changed.status_code == 200, changed.text
    assert (changed.json()["push_enabled"], changed.json()["sms_enabled"], changed.json()["muted_kinds"]) == (True, False, ["rental_charged"])
    again = await app_client.patch("/api/user/notification-preferences", json={"language": "ne"}, headers=me)
    assert (again.json()["sms_enabled"], again.json()["language"]) == (False, "ne")  # only what was sent changes

    async with app_services.readonly() as session:
        preferences = await load_preferences(session, user_id)
    assert isinstance(preferences, Preferences)
    assert "sms" not in choose_channels(await _rule(app_services, "rental_ending_soon"), preferences)
    assert "push" not in choose_channels(await _rule(app_services, "rental_charged"), preferences)

    bad = await app_client.patch("/api/user/notification-preferences", json={"muted_kinds": ["nonsense"]}, headers=me)
    assert bad.status_code == 400 and bad.json()["error"] == "unknown_kind"
    assert (await app_client.patch("/api/user/notification-preferences", json={"language": "English"}, headers=me)).status_code == 400
    assert (await app_client.get("/api/user/notification-preferences")).status_code == 401


async def _rule(services, kind):
    from powerbank.actors.notifications import load_rule

    async with services.readonly() as session:
        return await load_rule(session, kind)
