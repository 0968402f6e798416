"""Admin system and achievement endpoints over HTTP, and the bounded system-log handler.
Embedded default (SQLite, in-process runtime)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select

from powerbank.http.auth import create_access_token, ensure_admin_token
from powerbank.http.system_log import SystemLogHandler, SystemLogRecorder, SystemLogSink, flush
from powerbank.http.testing import bearer
from powerbank.storage.models import (
    Achievement,
    AdminActionLog,
    Notification,
    NotificationDelivery,
    SmsFcmLog,
    SystemLog,
    User,
    UserAchievement,
)
from powerbank.storage.types import utcnow


@pytest.fixture
async def admin(app_services) -> dict[str, str]:
    return bearer(await ensure_admin_token(app_services, "+9779800000001"))


async def person(services, role: str = "user") -> tuple[uuid.UUID, dict[str, str]]:
    async with services.sessions.begin() as session:
        user = User(phone=f"+97798{secrets.randbelow(10**8):08d}", role=role, referral_code=secrets.token_hex(4).upper())
        if role == "operator":
            from powerbank.storage.models import Tenant

            tenant = Tenant(name=f"T{secrets.token_hex(3)}", slug=f"t-{secrets.token_hex(3)}", is_active=True)
            session.add(tenant)
            await session.flush()
            user.tenant_id = tenant.id
        session.add(user)
        await session.flush()
        user_id = user.id
    return user_id, bearer(create_access_token(services.settings, user_id, role))


class Clock:
    def __init__(self, now: float = 1_000_000 * 60.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the handler ---------------------------------------------------------------------------


def test_the_sink_truncates_and_caps_each_minute_then_summarises_the_drops():
    clock = Clock()
    sink = SystemLogSink(per_minute=3, max_message=60, clock=clock)
    accepted = [sink.offer("ERROR", "powerbank.x", f"message {i} " + "x" * 100) for i in range(50)]
    assert accepted == [True] * 3 + [False] * 47
    rows = sink.take()
    assert [r["message"] for r in rows] == [f"message {i} " + "x" * 49 + "…" for i in range(3)]
    assert all(len(r["message"]) == 60 for r in rows)

    clock.now += 60  # the next minute: a fresh quota, and a summary of what the last one dropped
    assert sink.offer("WARNING", "powerbank.x", "again")
    rows = sink.take()
    assert [r["message"] for r in rows] == ["47 log records dropped in one minute (cap 3 a minute)", "again"]
    assert sink.take() == []


def test_the_buffer_is_bounded_when_nothing_drains_it():
    clock = Clock()
    sink = SystemLogSink(per_minute=1000, max_pending=5, clock=clock)
    for i in range(20):
        sink.offer("ERROR", "powerbank.x", str(i))
    assert len(sink.take()) == 5
    assert sink.dropped_total == 15


def test_the_handler_takes_warnings_of_powerbank_loggers_and_never_its_own():
    sink = SystemLogSink(clock=Clock())
    handler = SystemLogHandler(sink)
    logger = logging.getLogger("powerbank.test_admin_system")
    logger.addHandler(handler)
    try:
        logger.info("not kept")
        logger.warning("kept %s", 1)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
        logging.getLogger("powerbank.http.system_log").warning("a failed flush")
    finally:
        logger.removeHandler(handler)
    rows = sink.take()
    assert [(r["level"], r["logger"], r["message"]) for r in rows] == [
        ("WARNING", "powerbank.test_admin_system", "kept 1"),
        ("ERROR", "powerbank.test_admin_system", "failed [ValueError: boom]"),
    ]


async def test_the_recorder_writes_off_the_request_path_and_flushes_on_stop(app_services):
    recorder = SystemLogRecorder(app_services.sessions, interval_s=0.01)
    await recorder.start()
    try:
        logging.getLogger("powerbank.actors.test").error("station %s unreachable", "SN-1")
        for _ in range(200):
            async with app_services.readonly() as session:
                if await session.scalar(select(func.count()).select_from(SystemLog)):
                    break
            await asyncio.sleep(0.01)
    finally:
        await recorder.stop()
    async with app_services.readonly() as session:
        rows = list((await session.execute(select(SystemLog))).scalars())
    assert [(r.level, r.logger, r.message) for r in rows] == [("ERROR", "powerbank.actors.test", "station SN-1 unreachable")]
    assert recorder.handler not in logging.getLogger("powerbank").handlers


async def test_a_failed_flush_keeps_the_rows_for_the_next_one(app_services):
    sink = SystemLogSink(clock=Clock())
    sink.offer("ERROR", "powerbank.x", "kept")

    class Broken:
        def begin(self):
            raise ConnectionError("database down")

    assert await flush(sink, Broken()) == 0
    assert await flush(sink, app_services.sessions) == 1
    async with app_services.readonly() as session:
        assert [r.message for r in (await session.execute(select(SystemLog))).scalars()] == ["kept"]


# --- health writes nothing -------------------------------------------------------------------


async def test_health_only_reads(app_client, app_services):
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    engines = {app_services.engine.sync_engine, app_services.readonly.kw["bind"].sync_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        response = await app_client.get("/api/app/health")
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200
    assert "SELECT 1" in statements
    writes = [s for s in statements if s.lstrip().upper().split(" ")[0] in ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")]
    assert writes == []


async def test_degraded_health_leaves_a_system_log_row(app_services, monkeypatch):
    """The database is down for the health check; the warning waits in the sink and is written
    once the database answers (here: at the recorder's stop)."""
    from powerbank.http.app import create_app
    from powerbank.http.testing import TEST_AUTH_POLICY, client_for

    app = create_app(app_services, auth_policy=TEST_AUTH_POLICY)
    recorder = app.state.system_log
    await recorder.start()
    try:
        class Down:
            def __call__(self):
                raise ConnectionError("database down")

        monkeypatch.setattr(app_services, "readonly", Down())
        async with client_for(app) as client:
            response = await client.get("/api/app/health")
        monkeypatch.undo()
    finally:
        await recorder.stop()
    assert (response.status_code, response.json()["error"]) == (503, "database_unavailable")
    async with app_services.readonly() as session:
        rows = list((await session.execute(select(SystemLog))).scalars())
    assert [(r.level, r.logger, r.message) for r in rows] == [
        ("WARNING", "powerbank.http.routes_app", "health: the database did not answer: ConnectionError")
    ]


# --- system endpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["user", "operator"])
async def test_riders_and_operators_get_403(app_client, app_services, role):
    _, headers = await person(app_services, role)
    for method, path in [
        ("GET", "/api/admin/system/logs"),
        ("GET", "/api/admin/system/notification-deliveries"),
        ("GET", "/api/admin/system/sms-fcm-log"),
        ("GET", "/api/admin/achievements"),
        ("POST", "/api/admin/achievements"),
        ("GET", f"/api/admin/achievements/{uuid.uuid4()}/unlocks"),
    ]:
        response = await app_client.request(method, path, headers=headers, json={} if method == "POST" else None)
        assert response.status_code == 403, (path, response.text)


async def test_logs_filter_by_level_logger_and_time_and_page(app_client, app_services, admin):
    now = utcnow()
    async with app_services.sessions.begin() as session:
        session.add_all([
            SystemLog(level="WARNING", logger="powerbank.http.routes_app", message="slow", created_at=now - timedelta(hours=2)),
            SystemLog(level="ERROR", logger="powerbank.actors.rental", message="stuck", created_at=now - timedelta(minutes=5)),
            SystemLog(level="CRITICAL", logger="powerbank.actorsx", message="other", created_at=now - timedelta(minutes=1)),
        ])

    async def messages(**params):
        response = await app_client.get("/api/admin/system/logs", params=params, headers=admin)
        assert response.status_code == 200, response.text
        return [i["message"] for i in response.json()["items"]], response.json()["total"]

    assert await messages() == (["other", "stuck", "slow"], 3)
    assert await messages(level="ERROR") == (["other", "stuck"], 2)
    assert await messages(logger="powerbank.actors") == (["stuck"], 1)
    assert await messages(since=(now - timedelta(hours=1)).isoformat()) == (["other", "stuck"], 2)
    assert await messages(page_size=1, page=2) == (["stuck"], 3)
    naive = await app_client.get("/api/admin/system/logs", params={"since": "2026-01-01T00:00:00"}, headers=admin)
    assert (naive.status_code, naive.json()["error"]) == (400, "validation_failed")
    bad = await app_client.get("/api/admin/system/logs", params={"level": "DEBUG"}, headers=admin)
    assert bad.status_code == 400


async def test_deliveries_and_the_sms_log_are_listed_with_status_filters(app_client, app_services, admin):
    user_id, _ = await person(app_services)
    async with app_services.sessions.begin() as session:
        note = Notification(user_id=user_id, kind="rental_started", title="t", body="b")
        session.add(note)
        await session.flush()
        session.add_all([
            NotificationDelivery(notification_id=note.id, user_id=user_id, channel="push", status="failed", attempts=5,
                                 next_attempt_at=utcnow(), last_error="no device"),
            NotificationDelivery(notification_id=note.id, user_id=user_id, channel="sms", status="sent", next_attempt_at=utcnow()),
            SmsFcmLog(user_id=user_id, channel="sms", recipient="+97798000000", purpose="login", body="code 123456", provider="log", status="sent"),
        ])
    failed = (await app_client.get("/api/admin/system/notification-deliveries", params={"status": "failed"}, headers=admin)).json()
    assert [(d["channel"], d["last_error"]) for d in failed["items"]] == [("push", "no device")]
    assert (await app_client.get("/api/admin/system/notification-deliveries", headers=admin)).json()["total"] == 2
    sms = (await app_client.get("/api/admin/system/sms-fcm-log", params={"status": "sent"}, headers=admin)).json()
    assert [(s["purpose"], s["recipient"]) for s in sms["items"]] == [("login", "+97798000000")]
    assert "body" not in sms["items"][0]  # sign-in codes stay out of the admin API
    assert (await app_client.get("/api/admin/system/sms-fcm-log", params={"status": "lost"}, headers=admin)).status_code == 400


# --- achievements ----------------------------------------------------------------------------

GOAL = {"code": "ten-rentals", "name": "Regular", "description": "Ten rentals", "metric": "rentals_completed", "threshold": 10, "points": 50}


async def test_achievement_crud_is_audited_and_refuses_bad_input(app_client, app_services, admin):
    created = await app_client.post("/api/admin/achievements", json=GOAL, headers=admin)
    assert created.status_code == 201, created.text
    achievement_id = created.json()["id"]
    duplicate = await app_client.post("/api/admin/achievements", json=GOAL, headers=admin)
    assert (duplicate.status_code, duplicate.json()["error"]) == (409, "achievement_exists")
    for bad in ({**GOAL, "threshold": 0}, {**GOAL, "metric": "steps"}, {**GOAL, "extra": True}):
        response = await app_client.post("/api/admin/achievements", json=bad, headers=admin)
        assert (response.status_code, response.json()["error"]) == (400, "validation_failed"), bad

    changed = await app_client.put(f"/api/admin/achievements/{achievement_id}", json={**GOAL, "threshold": 12, "is_active": False}, headers=admin)
    assert (changed.status_code, changed.json()["threshold"], changed.json()["is_active"]) == (200, 12, False)
    listed = (await app_client.get("/api/admin/achievements", headers=admin)).json()
    assert achievement_id in [a["id"] for a in listed["items"]]

    assert (await app_client.delete(f"/api/admin/achievements/{achievement_id}", headers=admin)).status_code == 204
    for method in ("PUT", "DELETE"):
        response = await app_client.request(method, f"/api/admin/achievements/{achievement_id}", json=GOAL if method == "PUT" else None, headers=admin)
        assert (response.status_code, response.json()["error"]) == (404, "achievement_not_found")
    async with app_services.readonly() as session:
        logged = [(r.action, r.target_id) for r in (await session.execute(select(AdminActionLog).order_by(AdminActionLog.id))).scalars()]
    assert logged == [(a, achievement_id) for a in ("achievement_created", "achievement_updated", "achievement_deleted")]


async def test_unlocks_are_listed_and_an_achievement_with_progress_cannot_be_deleted(app_client, app_services, admin):
    first, _ = await person(app_services)
    second, _ = await person(app_services)
    trying, _ = await person(app_services)
    async with app_services.sessions.begin() as session:
        goal = Achievement(code="first-ride", name="First", description="One rental", metric="rentals_completed", threshold=1)
        session.add(goal)
        await session.flush()
        now = utcnow()
        session.add_all([
            UserAchievement(user_id=first, achievement_id=goal.id, progress=1, unlocked_at=now - timedelta(days=1)),
            UserAchievement(user_id=second, achievement_id=goal.id, progress=1, unlocked_at=now),
            UserAchievement(user_id=trying, achievement_id=goal.id, progress=0),
        ])
        goal_id = goal.id
    page = (await app_client.get(f"/api/admin/achievements/{goal_id}/unlocks", params={"page_size": 1}, headers=admin)).json()
    assert ([i["user_id"] for i in page["items"]], page["total"]) == ([str(second)], 2)
    missing = await app_client.get(f"/api/admin/achievements/{uuid.uuid4()}/unlocks", headers=admin)
    assert (missing.status_code, missing.json()["error"]) == (404, "achievement_not_found")
    refused = await app_client.delete(f"/api/admin/achievements/{goal_id}", headers=admin)
    assert (refused.status_code, refused.json()["error"]) == (409, "achievement_in_use")
    listed = {a["id"]: a for a in (await app_client.get("/api/admin/achievements", headers=admin)).json()["items"]}
    assert listed[str(goal_id)]["unlocked_by"] == 2
