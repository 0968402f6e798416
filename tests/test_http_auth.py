"""Phone OTP sign-up and sign-in, tokens, refresh rotation, and the error shape, over ASGI."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import jwt
import pytest
from sqlalchemy import select, update

import powerbank.actors.wallet  # noqa: F401  (registers OpenWallet)
from powerbank.http.app import create_app
from powerbank.http.auth import AuthPolicy, create_access_token, issue_access_token
from powerbank.http.routes_auth import judge_otp
from powerbank.http.testing import running_services, settings_for_tests
from powerbank.storage.models import OtpChallenge, SmsFcmLog, User, UserDevice, UserProfile, Wallet
from powerbank.storage.types import utcnow

PHONE = "+9779812345678"
POLICY = AuthPolicy(otp_echo=True, otp_max_attempts=3, otp_rate_per_phone=4, otp_rate_per_ip=1000)


@pytest.fixture
async def services(tmp_path):
    async with running_services(settings_for_tests(tmp_path)) as services:
        yield services


def client_for(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(services):
    async with client_for(create_app(services, auth_policy=POLICY)) as client:
        yield client


async def get_code(client, phone=PHONE, purpose="register") -> str:
    response = await client.post("/api/auth/get-otp", json={"phone": phone, "purpose": purpose})
    assert response.status_code == 200, response.text
    return response.json()["debug_code"]


async def register(client, phone=PHONE, **extra) -> dict:
    code = await get_code(client, phone)
    response = await client.post("/api/auth/register", json={"phone": phone, "code": code, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_register_creates_account_device_wallet_and_logs_the_sms(client, services):
    body = await register(client, full_name="Asha Rai", device_id="phone-1", platform="android")

    assert body["token_type"] == "bearer"
    assert body["user"]["phone"] == PHONE and body["user"]["role"] == "user"
    assert body["user"]["full_name"] == "Asha Rai"
    user_id = uuid.UUID(body["user"]["id"])
    claims = jwt.decode(body["access_token"], services.settings.jwt_secret, algorithms=["HS256"])
    assert claims["sub"] == str(user_id) and claims["type"] == "access" and claims["role"] == "user"
    async with services.sessions() as session:
        user = await session.get(User, user_id)
        assert len(user.referral_code) == 8
        assert (await session.get(UserProfile, user_id)).full_name == "Asha Rai"
        device = (await session.execute(select(UserDevice).where(UserDevice.user_id == user_id))).scalar_one()
        assert (device.device_id, device.platform) == ("phone-1", "android")
        assert device.refresh_family is not None and device.refresh_jti is not None
        wallet = (await session.execute(select(Wallet).where(Wallet.user_id == user_id))).scalar_one()
        assert wallet.currency == services.settings.currency
        log_row = (await session.execute(select(SmsFcmLog))).scalar_one()
        challenge = (await session.execute(select(OtpChallenge))).scalar_one()
    assert (log_row.status, log_row.provider, log_row.recipient) == ("sent", "log", PHONE)
    code = log_row.body.split()[-1]
    assert code.isdigit() and len(code) == 6
    assert code not in challenge.code_hash  # only a keyed hash is stored
    assert challenge.consumed_at is not None


async def test_login_and_me(client):
    await register(client)
    code = await get_code(client, purpose="login")
    response = await client.post("/api/auth/login", json={"phone": PHONE, "code": code, "device_id": "tablet"})
    assert response.status_code == 200, response.text
    tokens = response.json()

    me = await client.get("/api/auth/me", headers=bearer(tokens["access_token"]))
    assert me.status_code == 200
    assert me.json()["phone"] == PHONE and me.json()["id"] == tokens["user"]["id"]


async def test_verify_otp_aliases_register_and_login(client):
    code = await get_code(client)
    registered = await client.post("/api/auth/verify-otp", json={"phone": PHONE, "code": code, "purpose": "register"})
    assert registered.status_code == 200, registered.text
    code = await get_code(client, purpose="login")
    signed_in = await client.post("/api/auth/verify-otp", json={"phone": PHONE, "code": code, "purpose": "login"})
    assert signed_in.status_code == 200
    assert signed_in.json()["user"]["id"] == registered.json()["user"]["id"]


async def test_purpose_must_match_account_existence(client):
    missing = await client.post("/api/auth/get-otp", json={"phone": PHONE, "purpose": "login"})
    assert missing.status_code == 404 and missing.json()["error"] == "user_not_found"
    await register(client)
    again = await client.post("/api/auth/get-otp", json={"phone": PHONE, "purpose": "register"})
    assert again.status_code == 409 and again.json()["error"] == "phone_already_registered"


async def test_wrong_code_counts_attempts_then_locks_the_code(client):
    code = await get_code(client)
    wrong = "000000" if code != "000000" else "111111"
    first = await client.post("/api/auth/register", json={"phone": PHONE, "code": wrong})
    assert first.status_code == 400
    assert first.json() == {"error": "otp_invalid", "detail": first.json()["detail"], "attempts_left": 2}
    await client.post("/api/auth/register", json={"phone": PHONE, "code": wrong})
    third = await client.post("/api/auth/register", json={"phone": PHONE, "code": wrong})
    assert third.status_code == 429 and third.json()["error"] == "otp_attempts_exceeded"
    # The right code no longer helps: guessing ended with the attempts.
    right = await client.post("/api/auth/register", json={"phone": PHONE, "code": code})
    assert right.status_code == 429 and right.json()["error"] == "otp_attempts_exceeded"


async def test_a_code_works_once(client):
    code = await get_code(client)
    assert (await client.post("/api/auth/register", json={"phone": PHONE, "code": code})).status_code == 201
    await client.post("/api/auth/get-otp", json={"phone": PHONE, "purpose": "login"})
    reuse = await client.post("/api/auth/login", json={"phone": PHONE, "code": code})
    assert reuse.status_code == 400 and reuse.json()["error"] in ("otp_invalid", "otp_expired")


async def test_expired_code_is_refused(client, services):
    code = await get_code(client)
    async with services.sessions.begin() as session:
        await session.execute(update(OtpChallenge).values(expires_at=utcnow() - timedelta(seconds=1)))
    response = await client.post("/api/auth/register", json={"phone": PHONE, "code": code})
    assert response.status_code == 400 and response.json()["error"] == "otp_expired"


def test_judge_otp_stops_guessing_at_the_limit():
    assert judge_otp(False, 0, 5, True) == "expired"
    assert judge_otp(True, 0, 5, True) == "ok"
    assert judge_otp(True, 3, 5, False) == "invalid"
    assert judge_otp(True, 4, 5, False) == "exhausted"
    assert judge_otp(True, 5, 5, True) == "exhausted"


async def test_rate_limit_per_phone(client):
    for _ in range(POLICY.otp_rate_per_phone):
        await get_code(client)
    limited = await client.post("/api/auth/get-otp", json={"phone": PHONE, "purpose": "register"})
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limited" and limited.json()["limit"] == "phone"
    assert 1 <= int(limited.headers["retry-after"]) <= POLICY.otp_rate_window_s
    # Another phone is not affected.
    await get_code(client, phone="+9779811111111")


async def test_rate_limit_per_ip(services):
    policy = AuthPolicy(otp_echo=True, otp_rate_per_ip=2)
    async with client_for(create_app(services, auth_policy=policy)) as client:
        await get_code(client, phone="+9779800000001")
        await get_code(client, phone="+9779800000002")
        limited = await client.post("/api/auth/get-otp", json={"phone": "+9779800000003", "purpose": "register"})
    assert limited.status_code == 429 and limited.json()["limit"] == "ip"


async def test_code_is_not_echoed_unless_enabled(services):
    async with client_for(create_app(services, auth_policy=AuthPolicy())) as client:
        response = await client.post("/api/auth/get-otp", json={"phone": PHONE, "purpose": "register"})
    assert response.status_code == 200 and "debug_code" not in response.json()


def test_policy_reads_the_environment():
    policy = AuthPolicy.from_env({"POWERBANK_OTP_ECHO": "1", "OTP_RATE_PER_IP": "100000"})
    assert policy.otp_echo and policy.otp_rate_per_ip == 100000
    assert not AuthPolicy.from_env({}).otp_echo


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
)
async def test_missing_or_malformed_token_is_401(client, headers):
    response = await client.get("/api/auth/me", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


async def test_expired_tampered_and_wrong_type_tokens_are_401(client, services):
    body = await register(client)
    user_id = uuid.UUID(body["user"]["id"])
    expired = issue_access_token(
        services.settings, user_id=user_id, role="user", device_id=None, now=utcnow() - timedelta(hours=1), ttl_s=60
    )
    header, payload, signature = body["access_token"].split(".")
    tampered = ".".join([header, payload, signature[:-4] + ("AAAA" if signature[-4:] != "AAAA" else "BBBB")])
    forged_admin = jwt.encode(
        {"sub": str(user_id), "role": "admin", "type": "access", "jti": str(uuid.uuid4()), "exp": 4102444800},
        "some-other-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
    )
    for token in (expired, tampered, forged_admin, body["refresh_token"]):
        response = await client.get("/api/auth/me", headers=bearer(token))
        assert response.status_code == 401, token
        assert response.json()["error"] == "unauthorized"
    assert "expired" in (await client.get("/api/auth/me", headers=bearer(expired))).json()["detail"]


async def test_blocked_user_loses_access_at_once(client, services):
    body = await register(client)
    async with services.sessions.begin() as session:
        await session.execute(update(User).values(status="blocked"))
    response = await client.get("/api/auth/me", headers=bearer(body["access_token"]))
    assert response.status_code == 401


async def test_refresh_rotates_and_reuse_revokes_the_family(client):
    first = await register(client, device_id="phone-1")
    rotated = await client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert rotated.status_code == 200, rotated.text
    second = rotated.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await client.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 200

    reused = await client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    assert reused.status_code == 401 and reused.json()["error"] == "unauthorized"
    assert "reuse" in reused.json()["detail"]
    # The thief's reuse ends the whole session: the newest tokens stop working too.
    assert (await client.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})).status_code == 401
    assert (await client.get("/api/auth/me", headers=bearer(second["access_token"]))).status_code == 401
    # Signing in again on the device starts a new family.
    code = await get_code(client, purpose="login")
    again = await client.post("/api/auth/login", json={"phone": PHONE, "code": code, "device_id": "phone-1"})
    assert (await client.post("/api/auth/refresh", json={"refresh_token": again.json()["refresh_token"]})).status_code == 200


async def test_an_access_token_cannot_refresh(client):
    body = await register(client)
    response = await client.post("/api/auth/refresh", json={"refresh_token": body["access_token"]})
    assert response.status_code == 401


async def test_logout_revokes_the_device_session(client):
    body = await register(client)
    assert (await client.post("/api/auth/logout", headers=bearer(body["access_token"]))).status_code == 204
    assert (await client.get("/api/auth/me", headers=bearer(body["access_token"]))).status_code == 401
    assert (await client.post("/api/auth/refresh", json={"refresh_token": body["refresh_token"]})).status_code == 401


async def test_operator_token_without_device_works(client, services):
    body = await register(client)
    token = create_access_token(services.settings, body["user"]["id"], "user")
    assert (await client.get("/api/auth/me", headers=bearer(token))).status_code == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"phone": "9812345678", "purpose": "login"}, "phone"),
        ({"phone": "+0123456789", "purpose": "login"}, "phone"),
        ({"phone": PHONE, "purpose": "reset"}, "purpose"),
        ({"phone": PHONE}, "purpose"),
        ({"phone": PHONE, "purpose": "login", "extra": 1}, "extra"),
    ],
)
async def test_validation_errors_have_the_json_error_shape(client, payload, field):
    response = await client.post("/api/auth/get-otp", json=payload)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "validation_failed"
    assert isinstance(body["detail"], str) and body["detail"]
    assert field in [f["field"] for f in body["fields"]], body


async def test_code_must_be_six_digits(client):
    response = await client.post("/api/auth/register", json={"phone": PHONE, "code": "12345"})
    assert response.status_code == 400 and response.json()["fields"][0]["field"] == "code"


async def test_malformed_json_and_unknown_routes_use_the_error_shape(client):
    broken = await client.post("/api/auth/get-otp", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"] == "validation_failed"
    missing = await client.get("/api/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    wrong_method = await client.get("/api/auth/get-otp")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"


async def test_sign_ups_sign_ins_sign_outs_and_token_theft_are_in_the_persons_audit_log(client, services):
    from sqlalchemy import select

    from powerbank.storage.models import UserAuditLog

    first = await register(client, device_id="phone-7")
    code = await get_code(client, purpose="login")
    login = (await client.post("/api/auth/login", json={"phone": PHONE, "code": code, "device_id": "phone-8"})).json()
    await client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
    await client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})  # reused: theft assumed
    assert (await client.post("/api/auth/logout", headers=bearer(login["access_token"]))).status_code == 204
    async with services.readonly() as session:
        rows = (await session.execute(
            select(UserAuditLog.action, UserAuditLog.actor_id, UserAuditLog.target_id).order_by(UserAuditLog.id)
        )).all()
    user_id = uuid.UUID(first["user"]["id"])
    assert [(action, actor) for action, actor, _ in rows] == [
        ("registered", user_id), ("signed_in", user_id), ("refresh_token_reused", user_id), ("signed_out", user_id),
    ]
    assert [target for _, _, target in rows][:3] == ["phone-7", "phone-8", "phone-7"]
