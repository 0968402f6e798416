"""Who is calling: phone OTPs, JWT access and refresh tokens, the authentication middleware and
the role guards.

Tokens are HS256 JWTs signed with `settings.jwt_secret`, carrying `sub` (user id), `role`,
`type` ("access" or "refresh"), `jti`, `iat`, `exp` and `did` (the user_devices row). Refresh
tokens also carry `fam`, the rotation family kept on the device row with the one live `jti`:
presenting any older refresh token of the family means it leaked, so the family is revoked.

Every authenticated request re-reads the user row, so a blocked user or a demoted admin loses
access at once instead of when the access token expires.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Protocol

import jwt
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.authentication import AbstractAuthenticationMiddleware, AuthenticationResult
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from powerbank.config import Settings
from powerbank.http.errors import ApiError
from powerbank.storage.models import SmsFcmLog, User, UserDevice
from powerbank.storage.types import utcnow

if TYPE_CHECKING:
    from powerbank.services import Services

log = logging.getLogger(__name__)

ACCESS = "access"
REFRESH = "refresh"
JWT_ALGORITHM = "HS256"
ADMIN_ROLES = frozenset({"admin", "superadmin"})
OTP_DIGITS = 6
BEARER_SCHEME = "BearerToken"
# OpenAPI security requirement of the routes that need an access token.
BEARER_SECURITY = [{BEARER_SCHEME: []}]


@dataclass(frozen=True)
class AuthPolicy:
    """OTP limits. Defaults suit production; the demo raises `otp_rate_per_ip` because all its
    simulated riders share 127.0.0.1."""

    otp_echo: bool = False
    otp_max_attempts: int = 5
    otp_rate_per_phone: int = 5
    otp_rate_per_ip: int = 30
    otp_rate_window_s: int = 600

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "AuthPolicy":
        env = os.environ if environ is None else environ

        def number(name: str, default: int) -> int:
            raw = env.get(name, "")
            return default if raw == "" else int(raw)

        return cls(
            otp_echo=env.get("POWERBANK_OTP_ECHO", "") == "1",
            otp_max_attempts=number("OTP_MAX_ATTEMPTS", cls.otp_max_attempts),
            otp_rate_per_phone=number("OTP_RATE_PER_PHONE", cls.otp_rate_per_phone),
            otp_rate_per_ip=number("OTP_RATE_PER_IP", cls.otp_rate_per_ip),
            otp_rate_window_s=number("OTP_RATE_WINDOW_S", cls.otp_rate_window_s),
        )


# --- one-time codes ---------------------------------------------------------------------------


def generate_otp_code() -> str:
    return f"{secrets.randbelow(10**OTP_DIGITS):0{OTP_DIGITS}d}"


def hash_otp(secret: str, challenge_id: uuid.UUID, code: str) -> str:
    """HMAC rather than a slow hash: a 6-digit code has too little entropy for hashing to protect
    it offline anyway; what protects it is the secret key plus the attempt limit. The challenge
    id in the message makes equal codes hash differently."""
    message = f"{challenge_id}:{code}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def otp_matches(secret: str, challenge_id: uuid.UUID, code: str, code_hash: str) -> bool:
    return hmac.compare_digest(hash_otp(secret, challenge_id, code), code_hash)


def otp_rate_limit_hit(
    sent_to_phone: int, sent_to_ip: int, policy: AuthPolicy
) -> str | None:
    """Which limit a new code request would exceed ("phone" or "ip"), counting codes already
    sent in the current window; None when it may go ahead."""
    if sent_to_phone >= policy.otp_rate_per_phone:
        return "phone"
    if sent_to_ip >= policy.otp_rate_per_ip:
        return "ip"
    return None


def retry_after_s(oldest_in_window: datetime | None, now: datetime, window_s: int) -> int:
    """Seconds until the oldest counted request leaves the window (at least 1)."""
    if oldest_in_window is None:
        return window_s
    remaining = window_s - (now - oldest_in_window).total_seconds()
    return max(1, int(remaining + 0.999))


class OtpSender(Protocol):
    """Delivers a code to a phone. Called inside the transaction that stores the challenge, so a
    provider that records a log row commits it together with the challenge."""

    name: str

    async def send_otp(
        self, session: AsyncSession, *, phone: str, code: str, purpose: str, user_id: uuid.UUID | None
    ) -> None: ...


class LogOtpSender:
    """The default, development-only provider: writes the code to the log and to sms_fcm_log
    (no SMS leaves the machine). Production plugs in a real SMS gateway."""

    name = "log"

    async def send_otp(
        self, session: AsyncSession, *, phone: str, code: str, purpose: str, user_id: uuid.UUID | None
    ) -> None:
        body = f"Your powerbank code is {code}"
        log.info("otp for %s (%s): %s", phone, purpose, code)
        session.add(
            SmsFcmLog(
                user_id=user_id,
                channel="sms",
                recipient=phone,
                purpose=f"otp_{purpose}",
                body=body,
                provider=self.name,
                status="sent",
            )
        )


# --- tokens -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claims:
    user_id: uuid.UUID
    role: str
    type: str
    jti: uuid.UUID
    expires_at: datetime
    device_id: uuid.UUID | None = None
    family: uuid.UUID | None = None


def _encode(secret: str, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, secret, algorithm=JWT_ALGORITHM)


def issue_access_token(
    settings: Settings,
    *,
    user_id: uuid.UUID,
    role: str,
    device_id: uuid.UUID | None,
    now: datetime,
    ttl_s: int | None = None,
) -> str:
    ttl_s = settings.access_token_ttl_s if ttl_s is None else ttl_s
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "role": role,
        "type": ACCESS,
        "jti": str(uuid.uuid4()),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(seconds=ttl_s)).timestamp()),
    }
    if device_id is not None:
        claims["did"] = str(device_id)
    return _encode(settings.jwt_secret, claims)


def issue_refresh_token(
    settings: Settings,
    *,
    user_id: uuid.UUID,
    role: str,
    device_id: uuid.UUID,
    family: uuid.UUID,
    jti: uuid.UUID,
    now: datetime,
) -> str:
    claims = {
        "sub": str(user_id),
        "role": role,
        "type": REFRESH,
        "jti": str(jti),
        "did": str(device_id),
        "fam": str(family),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(seconds=settings.refresh_token_ttl_s)).timestamp()),
    }
    return _encode(settings.jwt_secret, claims)


def create_access_token(settings: Settings, user_id: uuid.UUID | str, role: str, ttl_s: int | None = None) -> str:
    """An access token without a device session, for operators' tools (the demo's admin)."""
    return issue_access_token(
        settings, user_id=uuid.UUID(str(user_id)), role=role, device_id=None, now=utcnow(), ttl_s=ttl_s
    )


def decode_token(secret: str, token: str, expected_type: str) -> Claims:
    """Verify signature, expiry and type; any failure is a 401 `unauthorized`."""
    try:
        raw = jwt.decode(
            token,
            secret,
            algorithms=[JWT_ALGORITHM],
            options={"require": ["exp", "sub", "type", "jti", "role"]},
        )
        if raw["type"] != expected_type:
            raise ApiError(401, "unauthorized", f"a {expected_type} token is required")
        return Claims(
            user_id=uuid.UUID(raw["sub"]),
            role=str(raw["role"]),
            type=raw["type"],
            jti=uuid.UUID(raw["jti"]),
            expires_at=datetime.fromtimestamp(raw["exp"], tz=timezone.utc),
            device_id=uuid.UUID(raw["did"]) if raw.get("did") else None,
            family=uuid.UUID(raw["fam"]) if raw.get("fam") else None,
        )
    except jwt.ExpiredSignatureError as exc:
        raise ApiError(401, "unauthorized", "token expired") from exc
    except (jwt.InvalidTokenError, ValueError, TypeError, KeyError) as exc:
        raise ApiError(401, "unauthorized", "invalid token") from exc


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


# --- who is calling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthUser:
    id: uuid.UUID
    role: str
    phone: str | None
    claims: Claims
    # The operator a staff member works for (see http/access.py); None for everyone else.
    tenant_id: uuid.UUID | None = None

    @property
    def is_admin(self) -> bool:
        """Both the stored role and the token's claim must say admin: a token minted before a
        demotion no longer works, and a stolen user token cannot claim more than it was given."""
        return self.role in ADMIN_ROLES and self.claims.role in ADMIN_ROLES


async def authenticate_token(services: "Services", token: str | None) -> AuthUser:
    if token is None:
        raise ApiError(401, "unauthorized", "missing bearer token")
    claims = decode_token(services.settings.jwt_secret, token, ACCESS)
    async with services.readonly() as session:
        user = await session.get(User, claims.user_id)
        device = await session.get(UserDevice, claims.device_id) if claims.device_id else None
    if user is None or user.status != "active":
        raise ApiError(401, "unauthorized", "unknown or inactive user")
    if device is not None and device.revoked_at is not None:
        # Signed out, or its refresh family was revoked after a token reuse.
        raise ApiError(401, "unauthorized", "session revoked")
    return AuthUser(id=user.id, role=user.role, phone=user.phone, claims=claims, tenant_id=user.tenant_id)


class JwtAuthMiddleware(AbstractAuthenticationMiddleware):
    """Authenticates every HTTP route not marked `exclude_from_auth`: deny by default."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        services = connection.app.state.services
        user = await authenticate_token(services, bearer_token(connection.headers.get("authorization")))
        return AuthenticationResult(user=user, auth=user.claims)


def require_admin(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Guard: admin or superadmin, per both the users table and the token."""
    user = connection.scope.get("user")
    if not isinstance(user, AuthUser) or not user.is_admin:
        raise ApiError(403, "forbidden", "admin role required")


# --- operators' tools ------------------------------------------------------------------------

ADMIN_TOKEN_TTL_S = 24 * 3600


async def ensure_admin_token(
    services: "Services", phone: str, *, role: str = "admin", ttl_s: int = ADMIN_TOKEN_TTL_S
) -> str:
    """An access token for the admin account with this phone, creating the account (or raising
    an existing one to `role`) first. For the demo and operators' scripts on a trusted machine;
    never reachable over HTTP."""
    if role not in ADMIN_ROLES:
        raise ValueError(f"role must be one of {sorted(ADMIN_ROLES)}")
    async with services.sessions.begin() as session:
        user = (await session.execute(select(User).where(User.phone == phone))).scalar_one_or_none()
        if user is None:
            user = User(phone=phone, role=role, status="active", referral_code=f"ADM{secrets.token_hex(4).upper()}")
            session.add(user)
            await session.flush()
        elif user.role not in ADMIN_ROLES:
            user.role = role
        user_id, user_role = user.id, user.role
    return create_access_token(services.settings, user_id, user_role, ttl_s=ttl_s)
