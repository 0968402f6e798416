"""Settings read once from the environment.

Nothing set means the embedded default: a SQLite file, an in-process queue and an embedded
MQTT broker, all in one process. Each URL moves one part out of the process.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = Path("var")


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _default_database_url(data_dir: Path) -> str:
    return f"sqlite+aiosqlite:///{data_dir / 'powerbank.sqlite3'}"


def _normalise_database_url(url: str) -> str:
    """Accept the plain URLs operators paste (postgres://, postgresql://) and pick async drivers."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix):]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str | None
    mqtt_url: str | None
    jwt_secret: str
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    bridge_username: str = "powerbank-bridge"
    bridge_password: str = ""
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 30 * 24 * 3600
    otp_ttl_s: int = 300
    eject_timeout_ms: int = 8000
    # How long a reserved bank is held for the person who reserved it.
    reservation_hold_s: int = 600
    rental_start_timeout_ms: int = 20000
    heartbeat_interval_s: int = 30
    currency: str = "NPR"
    # Connections per process (plus as many again in overflow); every drain in flight holds one.
    db_pool_size: int = 10
    # Processes without the web role (worker, mqtt, scheduler) serve /metrics here when set.
    metrics_port: int | None = None
    # Payments: top-ups are offered only with a secret key. STRIPE_API_BASE points the SDK at the
    # local emulator (powerbank stripe-emulator, or the demo's own); unset means api.stripe.com.
    stripe_secret_key: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_api_base: str | None = None
    # Auto-refill: how often the scheduler looks for wallets below their threshold (0 = never).
    auto_refill_interval_s: int = 60
    # The ending-soon reminder goes out this long before a rental is due.
    ending_soon_minutes: int = 10
    # A refund a person asks for above this amount (minor units) waits for an admin's approval;
    # at or below it, it is made at once. 500000 is NPR 5,000.
    refund_approval_above_minor: int = 500_000
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def embedded_database(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def embedded_queue(self) -> bool:
        return not self.redis_url

    @property
    def embedded_broker(self) -> bool:
        return not self.mqtt_url


def load_settings() -> Settings:
    data_dir = Path(os.environ.get("POWERBANK_DATA_DIR", DEFAULT_DATA_DIR))
    jwt_secret = os.environ.get("JWT_SECRET") or _dev_secret(data_dir, "jwt_secret")
    return Settings(
        database_url=_normalise_database_url(
            os.environ.get("DATABASE_URL") or _default_database_url(data_dir)
        ),
        redis_url=os.environ.get("REDIS_URL") or None,
        mqtt_url=os.environ.get("MQTT_URL") or None,
        jwt_secret=jwt_secret,
        data_dir=data_dir,
        http_host=os.environ.get("HTTP_HOST", "127.0.0.1"),
        http_port=_env_int("PORT", _env_int("HTTP_PORT", 8000)),
        mqtt_host=os.environ.get("MQTT_HOST", "127.0.0.1"),
        mqtt_port=_env_int("MQTT_PORT", 1883),
        bridge_username=os.environ.get("MQTT_BRIDGE_USERNAME", "powerbank-bridge"),
        bridge_password=os.environ.get("MQTT_BRIDGE_PASSWORD") or _dev_secret(data_dir, "bridge_password"),
        access_token_ttl_s=_env_int("ACCESS_TOKEN_TTL_S", 900),
        refresh_token_ttl_s=_env_int("REFRESH_TOKEN_TTL_S", 30 * 24 * 3600),
        otp_ttl_s=_env_int("OTP_TTL_S", 300),
        eject_timeout_ms=_env_int("EJECT_TIMEOUT_MS", 8000),
        reservation_hold_s=_env_int("RESERVATION_HOLD_S", 600),
        rental_start_timeout_ms=_env_int("RENTAL_START_TIMEOUT_MS", 20000),
        heartbeat_interval_s=_env_int("HEARTBEAT_INTERVAL_S", 30),
        currency=os.environ.get("CURRENCY", "NPR"),
        metrics_port=_env_int("METRICS_PORT", 0) or None,
        db_pool_size=_env_int("DATABASE_POOL_SIZE", 10),
        stripe_secret_key=os.environ.get("STRIPE_SECRET_KEY") or None,
        stripe_webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
        stripe_api_base=os.environ.get("STRIPE_API_BASE") or None,
        auto_refill_interval_s=_env_int("AUTO_REFILL_INTERVAL_S", 60),
        ending_soon_minutes=_env_int("ENDING_SOON_MINUTES", 10),
        refund_approval_above_minor=_env_int("REFUND_APPROVAL_ABOVE_MINOR", 500_000),
    )


def _dev_secret(data_dir: Path, name: str) -> str:
    """A per-installation secret kept under the data dir, so a restart keeps tokens valid.

    Production sets the variable; the embedded default must still never ship a constant secret.
    """
    path = data_dir / f".{name}"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    # Written aside, then linked into place: the file appears whole and only once, so processes
    # started together on a fresh data dir (the Procfile's) all end up with the first secret.
    draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    draft.write_text(value)
    try:
        os.link(draft, path)
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        draft.unlink()
    return value
