"""Phone OTP sign-up and sign-in, token refresh with rotation, sign-out, and /me.

A code is spent in the same transaction that creates the account or the device session, so a
failure half-way leaves the code usable and no account behind. Wrong guesses are counted in a
transaction of their own that commits even though the request fails.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Literal

from litestar import Controller, Request, get, post
from litestar.datastructures import State
from litestar.params import JSONBody
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.actors.runtime import Envelope, insert_command
from powerbank.config import Settings
from powerbank.http.auth import (
    BEARER_SECURITY,
    REFRESH,
    AuthPolicy,
    AuthUser,
    decode_token,
    generate_otp_code,
    hash_otp,
    issue_access_token,
    issue_refresh_token,
    otp_matches,
    otp_rate_limit_hit,
    retry_after_s,
)
from powerbank.http.deps import client_ip, services_of
from powerbank.http.errors import ApiError, error_responses
from powerbank.http.schemas import (
    LoginRequest,
    OtpRequest,
    OtpSent,
    RefreshRequest,
    RegisterRequest,
    TokenPair,
    UserView,
    VerifyOtpRequest,
)
from powerbank.storage.models import OtpChallenge, User, UserDevice, UserProfile
from powerbank.storage.types import new_id, utcnow
from powerbank.storage.user_audit import record_user_action

log = logging.getLogger(__name__)

REFERRAL_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud and typed
REFERRAL_CODE_LENGTH = 8
WALLET_OPEN_WAIT_S = 5.0

OtpVerdict = Literal["ok", "invalid", "expired", "exhausted"]


# --- pure decisions ---------------------------------------------------------------------------


def judge_otp(found: bool, attempts_before: int, max_attempts: int, code_ok: bool) -> OtpVerdict:
    """Decide a verification attempt. Once the attempts are used up the code is not even
    compared, so guessing stops at `max_attempts` whatever the guesses are."""
    if not found:
        return "expired"
    if attempts_before >= max_attempts:
        return "exhausted"
    if not code_ok:
        return "exhausted" if attempts_before + 1 >= max_attempts else "invalid"
    return "ok"


def otp_error(verdict: OtpVerdict, attempts_left: int) -> ApiError:
    if verdict == "invalid":
        return ApiError(400, "otp_invalid", f"wrong code; {attempts_left} attempts left", attempts_left=attempts_left)
    if verdict == "exhausted":
        return ApiError(429, "otp_attempts_exceeded", "too many wrong codes; request a new code")
    return ApiError(400, "otp_expired", "no valid code for this phone; request a new code")


def new_referral_code() -> str:
    return "".join(secrets.choice(REFERRAL_ALPHABET) for _ in range(REFERRAL_CODE_LENGTH))


# --- storage steps ----------------------------------------------------------------------------


async def find_user_by_phone(session: AsyncSession, phone: str) -> User | None:
    return (await session.execute(select(User).where(User.phone == phone))).scalar_one_or_none()


async def recent_challenges(
    session: AsyncSession, column, value: str, since: datetime
) -> tuple[int, datetime | None]:
    count, oldest = (
        await session.execute(
            select(func.count(), func.min(OtpChallenge.created_at)).where(
                column == value, OtpChallenge.created_at >= since
            )
        )
    ).one()
    if isinstance(oldest, str):  # SQLite aggregates skip the column type's result processing
        oldest = datetime.fromisoformat(oldest)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=since.tzinfo)
    return count, oldest


async def spend_otp(
    session: AsyncSession, settings: Settings, policy: AuthPolicy, phone: str, purpose: str, code: str, now: datetime
) -> tuple[OtpVerdict, int]:
    """Check `code` against the newest live challenge; consume it on success, count a wrong
    guess otherwise. Returns the verdict and the attempts left."""
    challenge = (
        await session.execute(
            select(OtpChallenge)
            .where(
                OtpChallenge.phone == phone,
                OtpChallenge.purpose == purpose,
                OtpChallenge.consumed_at.is_(None),
                OtpChallenge.expires_at > now,
            )
            .order_by(OtpChallenge.created_at.desc())
            .limit(1)
        )
    ).scalar_one_or_none()
    if challenge is None:
        return "expired", 0
    code_ok = otp_matches(settings.jwt_secret, challenge.id, code, challenge.code_hash)
    verdict = judge_otp(True, challenge.attempts, policy.otp_max_attempts, code_ok)
    if verdict == "ok":
        consumed = await session.execute(
            update(OtpChallenge)
            .where(OtpChallenge.id == challenge.id, OtpChallenge.consumed_at.is_(None))
            .values(consumed_at=now)
        )
        # A concurrent request spent it first: this one is too late.
        return ("ok", 0) if consumed.rowcount == 1 else ("expired", 0)
    attempts_left = max(0, policy.otp_max_attempts - challenge.attempts - 1)
    if not code_ok and challenge.attempts < policy.otp_max_attempts:
        await session.execute(
            update(OtpChallenge).where(OtpChallenge.id == challenge.id).values(attempts=OtpChallenge.attempts + 1)
        )
    return verdict, attempts_left


async def open_device_session(
    session: AsyncSession,
    settings: Settings,
    user: User,
    *,
    device_id: str | None,
    platform: str,
    now: datetime,
) -> TokenPair:
    """Start a fresh refresh family on the device (created if new) and mint both tokens.
    Signing in again on a device replaces its family, so older refresh tokens stop working."""
    device = None
    if device_id is not None:
        device = (
            await session.execute(
                select(UserDevice).where(UserDevice.user_id == user.id, UserDevice.device_id == device_id)
            )
        ).scalar_one_or_none()
    if device is None:
        device = UserDevice(
            id=new_id(),
            user_id=user.id,
            device_id=device_id or f"anon-{uuid.uuid4().hex}",
            created_at=now,
        )
        session.add(device)
    family, jti = uuid.uuid4(), uuid.uuid4()
    device.platform = platform
    device.refresh_family = family
    device.refresh_jti = jti
    device.revoked_at = None
    device.last_seen_at = now
    await session.flush()
    return await token_pair(session, settings, user, device.id, family, jti, now)


async def token_pair(
    session: AsyncSession,
    settings: Settings,
    user: User,
    device_row_id: uuid.UUID,
    family: uuid.UUID,
    jti: uuid.UUID,
    now: datetime,
) -> TokenPair:
    return TokenPair(
        access_token=issue_access_token(settings, user_id=user.id, role=user.role, device_id=device_row_id, now=now),
        refresh_token=issue_refresh_token(
            settings, user_id=user.id, role=user.role, device_id=device_row_id, family=family, jti=jti, now=now
        ),
        expires_in_s=settings.access_token_ttl_s,
        user=await user_view(session, user),
    )


async def user_view(session: AsyncSession, user: User) -> UserView:
    profile = await session.get(UserProfile, user.id)
    return UserView(
        id=user.id,
        phone=user.phone,
        role=user.role,
        status=user.status,
        referral_code=user.referral_code,
        full_name=profile.full_name if profile else None,
        email=profile.email if profile else None,
        created_at=user.created_at,
    )


async def unused_referral_code(session: AsyncSession) -> str:
    for _ in range(10):
        code = new_referral_code()
        taken = await session.scalar(select(func.count()).where(User.referral_code == code))
        if not taken:
            return code
    raise RuntimeError("could not find a free referral code")  # 32**8 codes: not in practice


def open_wallet_envelope(user_id: uuid.UUID, currency: str) -> Envelope:
    """The Wallet actor's OpenWallet command; its id makes opening idempotent per user."""
    return Envelope("wallet", str(user_id), "OpenWallet", {"currency": currency}, f"open:{user_id}")


# --- the flows --------------------------------------------------------------------------------


async def request_code(
    state: State, data: OtpRequest, ip: str
) -> OtpSent:
    services = services_of(state)
    settings, policy, sender = services.settings, state.auth_policy, state.otp_sender
    now = utcnow()
    async with services.sessions.begin() as session:
        user = await find_user_by_phone(session, data.phone)
        if data.purpose == "register" and user is not None:
            raise ApiError(409, "phone_already_registered", "this phone already has an account; sign in")
        if data.purpose == "login" and user is None:
            raise ApiError(404, "user_not_found", "no account for this phone; register first")
        await enforce_otp_rate_limit(session, policy, data.phone, ip, now)
        code = generate_otp_code()
        challenge = OtpChallenge(
            id=new_id(),
            phone=data.phone,
            purpose=data.purpose,
            attempts=0,
            expires_at=now + timedelta(seconds=settings.otp_ttl_s),
            requester_ip=ip,
            created_at=now,
        )
        challenge.code_hash = hash_otp(settings.jwt_secret, challenge.id, code)
        session.add(challenge)
        await sender.send_otp(
            session, phone=data.phone, code=code, purpose=data.purpose, user_id=user.id if user else None
        )
    return OtpSent(
        phone=data.phone,
        purpose=data.purpose,
        expires_in_s=settings.otp_ttl_s,
        debug_code=code if policy.otp_echo else None,
    )


async def enforce_otp_rate_limit(
    session: AsyncSession, policy: AuthPolicy, phone: str, ip: str, now: datetime
) -> None:
    """Counted from the challenges table, so the limit holds across web processes."""
    since = now - timedelta(seconds=policy.otp_rate_window_s)
    phone_count, phone_oldest = await recent_challenges(session, OtpChallenge.phone, phone, since)
    ip_count, ip_oldest = await recent_challenges(session, OtpChallenge.requester_ip, ip, since)
    hit = otp_rate_limit_hit(phone_count, ip_count, policy)
    if hit is None:
        return
    oldest = phone_oldest if hit == "phone" else ip_oldest
    wait_s = retry_after_s(oldest, now, policy.otp_rate_window_s)
    raise ApiError(
        429,
        "rate_limited",
        f"too many codes requested for this {hit}; retry in {wait_s} s",
        headers={"Retry-After": str(wait_s)},
        limit=hit,
        retry_after_s=wait_s,
    )


async def register(state: State, data: RegisterRequest | VerifyOtpRequest) -> TokenPair:
    services = services_of(state)
    settings, policy = services.settings, state.auth_policy
    now = utcnow()
    tokens: TokenPair | None = None
    try:
        async with services.sessions.begin() as session:
            if await find_user_by_phone(session, data.phone) is not None:
                raise ApiError(409, "phone_already_registered", "this phone already has an account; sign in")
            verdict, attempts_left = await spend_otp(session, settings, policy, data.phone, "register", data.code, now)
            if verdict == "ok":
                user = User(
                    id=new_id(),
                    phone=data.phone,
                    role="user",
                    status="active",
                    referral_code=await unused_referral_code(session),
                    created_at=now,
                    last_login_at=now,
                )
                session.add(user)
                session.add(UserProfile(user_id=user.id, full_name=data.full_name))
                await session.flush()
                # Accepted with the account, so no crash can leave a user without a wallet.
                await insert_command(session, open_wallet_envelope(user.id, settings.currency))
                tokens = await open_device_session(
                    session, settings, user, device_id=data.device_id, platform=data.platform, now=now
                )
                record_user_action(session, user.id, "registered", target_type="device", target_id=data.device_id,
                                   details={"platform": data.platform})
    except IntegrityError as exc:
        # Two registrations of one phone raced; the other one won.
        raise ApiError(409, "phone_already_registered", "this phone already has an account; sign in") from exc
    if tokens is None:
        raise otp_error(verdict, attempts_left)
    await await_wallet_open(services, tokens.user.id)
    return tokens


async def await_wallet_open(services, user_id: uuid.UUID) -> None:
    """Ring the wallet and wait briefly so the app's first wallet read finds it. The command is
    already durable; if the wait times out the wallet still opens, just later."""
    envelope = open_wallet_envelope(user_id, services.settings.currency)
    services.runtime.ring(envelope.kind, envelope.entity_id)
    try:
        result = await services.runtime.call(
            envelope.kind, envelope.entity_id, envelope.name, envelope.payload,
            command_id=envelope.command_id, timeout_s=WALLET_OPEN_WAIT_S,
        )
    except (TimeoutError, asyncio.TimeoutError):
        log.warning("wallet of %s not open after %.1f s; it opens when the actor catches up", user_id, WALLET_OPEN_WAIT_S)
        return
    if not result.get("ok", False):
        log.error("OpenWallet for %s refused: %s", user_id, result)


async def login(state: State, data: LoginRequest | VerifyOtpRequest) -> TokenPair:
    services = services_of(state)
    settings, policy = services.settings, state.auth_policy
    now = utcnow()
    tokens: TokenPair | None = None
    async with services.sessions.begin() as session:
        user = await find_user_by_phone(session, data.phone)
        if user is None:
            raise ApiError(404, "user_not_found", "no account for this phone; register first")
        if user.status != "active":
            raise ApiError(403, "account_blocked", "this account is not active")
        verdict, attempts_left = await spend_otp(session, settings, policy, data.phone, "login", data.code, now)
        if verdict == "ok":
            user.last_login_at = now
            # Idempotent: accounts made before their wallet (or by an operator) get one now.
            await insert_command(session, open_wallet_envelope(user.id, settings.currency))
            tokens = await open_device_session(
                session, settings, user, device_id=data.device_id, platform=data.platform, now=now
            )
            record_user_action(session, user.id, "signed_in", target_type="device", target_id=data.device_id,
                               details={"platform": data.platform})
    if tokens is None:
        raise otp_error(verdict, attempts_left)
    services.runtime.ring("wallet", str(tokens.user.id))
    return tokens


async def rotate_refresh_token(state: State, raw_token: str) -> TokenPair:
    services = services_of(state)
    settings = services.settings
    claims = decode_token(settings.jwt_secret, raw_token, REFRESH)
    if claims.device_id is None or claims.family is None:
        raise ApiError(401, "unauthorized", "invalid token")
    now = utcnow()
    tokens: TokenPair | None = None
    async with services.sessions.begin() as session:
        device = await session.get(UserDevice, claims.device_id)
        user = await session.get(User, claims.user_id)
        if (
            device is None
            or user is None
            or user.status != "active"
            or device.user_id != user.id
            or device.revoked_at is not None
            or device.refresh_family != claims.family
        ):
            raise ApiError(401, "unauthorized", "refresh token revoked")
        new_jti = uuid.uuid4()
        rotated = await session.execute(
            update(UserDevice)
            .where(
                UserDevice.id == device.id,
                UserDevice.refresh_family == claims.family,
                UserDevice.refresh_jti == claims.jti,
                UserDevice.revoked_at.is_(None),
            )
            .values(refresh_jti=new_jti, last_seen_at=now)
        )
        if rotated.rowcount == 1:
            tokens = await token_pair(session, settings, user, device.id, claims.family, new_jti, now)
        else:
            # An already rotated token came back: someone else holds the family. End it.
            await session.execute(
                update(UserDevice).where(UserDevice.id == device.id).values(revoked_at=now, refresh_jti=None)
            )
            record_user_action(session, user.id, "refresh_token_reused", target_type="device", target_id=device.device_id,
                               details={"family_revoked": True})
            log.warning("refresh token reuse on device %s of user %s; family revoked", device.id, user.id)
    if tokens is None:
        raise ApiError(401, "unauthorized", "refresh token reuse detected; sign in again")
    return tokens


# --- routes -----------------------------------------------------------------------------------

PUBLIC = {"exclude_from_auth": True}


class AuthController(Controller):
    path = "/api/auth"
    tags = ["auth"]

    @post("/get-otp", status_code=200, opt=PUBLIC, responses=error_responses(400, 404, 409, 429))
    async def get_otp(self, state: State, request: Request, data: JSONBody[OtpRequest]) -> OtpSent:
        """Send a 6-digit code to the phone. `purpose` register needs a new phone, login a known
        one. Rate-limited per phone and per client address (429 `rate_limited`, Retry-After)."""
        return await request_code(state, data, client_ip(request))

    @post("/register", status_code=201, opt=PUBLIC, responses=error_responses(400, 409, 429))
    async def register(self, state: State, data: JSONBody[RegisterRequest]) -> TokenPair:
        """Create the account (user, profile, device, wallet) with a `register` code; returns tokens.
        Errors: `otp_invalid`, `otp_expired`, `otp_attempts_exceeded`, `phone_already_registered`."""
        return await register(state, data)

    @post("/login", status_code=200, opt=PUBLIC, responses=error_responses(400, 403, 404, 429))
    async def login(self, state: State, data: JSONBody[LoginRequest]) -> TokenPair:
        """Sign in with a `login` code; returns tokens bound to the device."""
        return await login(state, data)

    @post("/verify-otp", status_code=200, opt=PUBLIC, responses=error_responses(400, 403, 404, 409, 429))
    async def verify_otp(self, state: State, data: JSONBody[VerifyOtpRequest]) -> TokenPair:
        """Verify a code for its purpose: same as /register or /login."""
        if data.purpose == "register":
            return await register(state, data)
        return await login(state, data)

    @post("/refresh", status_code=200, opt=PUBLIC, responses=error_responses(400, 401))
    async def refresh(self, state: State, data: JSONBody[RefreshRequest]) -> TokenPair:
        """Exchange a refresh token for a new pair. Each refresh token works once: presenting a
        used one revokes the device's session (token theft is assumed)."""
        return await rotate_refresh_token(state, data.refresh_token)

    @post("/logout", status_code=204, security=BEARER_SECURITY, responses=error_responses(401))
    async def logout(self, state: State, request: Request) -> None:
        """End this device's session: its refresh and access tokens stop working."""
        user: AuthUser = request.user
        if user.claims.device_id is None:
            return
        async with services_of(state).sessions.begin() as session:
            await session.execute(
                update(UserDevice)
                .where(UserDevice.id == user.claims.device_id, UserDevice.user_id == user.id)
                .values(revoked_at=utcnow(), refresh_jti=None)
            )
            record_user_action(session, user.id, "signed_out", target_type="device", target_id=user.claims.device_id,
                               ip=client_ip(request))

    @get("/me", security=BEARER_SECURITY, responses=error_responses(401))
    async def me(self, state: State, request: Request) -> UserView:
        """The signed-in user with profile."""
        user: AuthUser = request.user
        async with services_of(state).readonly() as session:
            row = await session.get(User, user.id)
            return await user_view(session, row)
