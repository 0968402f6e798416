"""The Litestar application: validate (msgspec), authenticate, authorize, enqueue or await an
actor command, read storage, push live events.

`create_app(services)` builds it around already started services; the process that owns the
services (see powerbank.processes) opens and closes them. Nothing in here runs at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from litestar import Litestar, Response, get
from litestar.datastructures import State
from litestar.middleware.base import DefineMiddleware
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.plugins.prometheus import PrometheusConfig
from litestar.enums import ScopeType
from litestar.types import Scopes
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from powerbank import __version__
from powerbank.http.auth import BEARER_SCHEME, AuthPolicy, JwtAuthMiddleware, LogOtpSender, OtpSender
from powerbank.http.errors import EXCEPTION_HANDLERS
from powerbank.http.routes_admin import AdminController
from powerbank.http.routes_admin_content import AdminContentController
from powerbank.http.routes_admin_system import AdminAchievementController, AdminSystemController
from powerbank.http.system_log import SystemLogRecorder
from powerbank.http.routes_admin_kyc import AdminKycController
from powerbank.http.routes_admin_refunds import AdminRefundController
from powerbank.http.routes_staff import StaffController
from powerbank.http.routes_reservations import ReservationController
from powerbank.http.routes_analytics import AnalyticsController
from powerbank.http.routes_app import AppController, PaymentController
from powerbank.http.routes_auth import AuthController
from powerbank.http.routes_payment import PaymentFlowController, UserTransactionsController
from powerbank.http.routes_promotions import AdminCouponController, PromotionController, ReferralController
from powerbank.http.routes_rentals import RentalActionController, RentalController, RentalStarter, start_rental_via_actor
from powerbank.http.cache import InvalidationFollower, ReadCache
from powerbank.http.routes_content import AppContentController, ContentController
from powerbank.http.routes_media import MediaController
from powerbank.http.routes_notifications import NotificationController
from powerbank.http.routes_profile import DeviceController, ProfileController
from powerbank.http.routes_social import SocialController
from powerbank.http.routes_stations import StationController
from powerbank.http.routes_wallet import PayDueController, PaymentOptionsController, PointsController, UserWalletController
from powerbank.http.station_stream import station_stream
from powerbank.http.websocket import live_events
from powerbank.payment_flows import build_gateway
from powerbank.payment_gateway import PaymentGateway
from powerbank.storage.media import MediaStore, build_media_store

if TYPE_CHECKING:
    from powerbank.services import Services

MAX_REQUEST_BODY_BYTES = 64 * 1024  # every body here is a small JSON document


@get("/metrics", opt={"exclude_from_auth": True}, include_in_schema=False)
async def metrics() -> Response[bytes]:
    """Prometheus exposition of this process's registry (HTTP, actors, bridge)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="powerbank",
        version=__version__,
        description=(
            "Real-time backend for shared power-bank rental networks. Every error body is "
            '`{"error": "<machine_code>", "detail": "..."}`; validation errors add `fields`. '
            "Live events: websocket `GET /api/ws?token=<access token>[&cursor=<seq>]`; station "
            "availability for the map: websocket `GET /api/ws/stations?stations=<ids>` or "
            "`?lat=&lng=&radius_m=` (docs/websocket.md)."
        ),
        path="/schema",
        render_plugins=[SwaggerRenderPlugin()],
        components=Components(
            security_schemes={
                BEARER_SCHEME: SecurityScheme(type="http", scheme="bearer", bearer_format="JWT", description="access token")
            }
        ),
        tags=[
            Tag(name="auth", description="phone OTP, tokens"),
            Tag(name="app", description="stations, health"),
            Tag(name="payment", description="packages, gateways, card top-ups, refunds, provider webhooks"),
            Tag(name="wallet", description="the caller's money and points"),
            Tag(name="rentals", description="rent, follow, history"),
            Tag(name="promotions", description="referral codes and coupons"),
            Tag(name="admin", description="admin and superadmin only"),
            Tag(name="content", description="terms, privacy, about, contact, FAQ, release notes (cached)"),
            Tag(name="user", description="the caller's profile and usage"),
            Tag(name="stations", description="favourite stations and issue reports"),
            Tag(name="notifications", description="the caller's in-app inbox"),
            Tag(name="social", description="leaderboard and achievements"),
        ],
        use_handler_docstrings=True,
    )


def create_app(
    services: "Services | None",
    *,
    auth_policy: AuthPolicy | None = None,
    otp_sender: OtpSender | None = None,
    start_rental: RentalStarter | None = None,
    payment_gateway: PaymentGateway | None = None,
    media_store: MediaStore | None = None,
    read_cache: ReadCache | None = None,
    debug: bool = False,
) -> Litestar:
    """Build the app. `auth_policy` defaults to the environment (POWERBANK_OTP_ECHO,
    OTP_RATE_PER_IP, ...), `otp_sender` to the log-only provider, `start_rental` to
    `powerbank.actors.rental.start_rental`, `payment_gateway` to Stripe when STRIPE_SECRET_KEY is set
    (the app then closes it on shutdown), `media_store` to `storage.media.build_media_store` (local
disk under data_dir unless configured), `read_cache` to a fresh in-process `ReadCache` (admin
writes invalidate it through `app.state.read_cache`). `services` may be None only to render OpenAPI."""
    owned_gateway = None
    if payment_gateway is None and services is not None:
        payment_gateway = owned_gateway = build_gateway(services.settings)
    state = State(
        {
            "services": services,
            "auth_policy": auth_policy or AuthPolicy.from_env(),
            "otp_sender": otp_sender or LogOtpSender(),
            "start_rental": start_rental or start_rental_via_actor,
            "payment_gateway": payment_gateway,
            "media_store": media_store
            or (build_media_store(services.settings.data_dir) if services is not None else None),
            "read_cache": read_cache or ReadCache(),
        }
    )
    prometheus = PrometheusConfig(
        app_name="powerbank", prefix="powerbank_http", group_path=True, exclude=["^/metrics", "^/schema"]
    )
    http_only: Scopes = {ScopeType.HTTP}
    # WARNING+ of the powerbank loggers into system_logs while the app runs (http/system_log.py).
    recorder = SystemLogRecorder(services.sessions) if services is not None else None
    state.system_log = recorder
    # Other web processes' content writes reach this one's cache over the bus (http/cache.py).
    follower = InvalidationFollower(state.read_cache, services.bus) if services is not None else None
    on_startup = [recorder.start, follower.start] if services is not None else []
    on_shutdown = ([owned_gateway.close] if owned_gateway is not None else []) + ([recorder.stop, follower.stop] if services is not None else [])
    return Litestar(
        route_handlers=[
            AuthController,
            AppController,
            PaymentController,
            UserWalletController,
            PointsController,
            PaymentOptionsController,
            PayDueController,
            PaymentFlowController,
            UserTransactionsController,
            RentalController,
            AdminController,
            AdminContentController,
            AdminSystemController,
            AdminAchievementController,
            StaffController,
            AdminKycController,
            AdminRefundController,
            ReservationController,
            AnalyticsController,
            ReferralController,
            PromotionController,
            AdminCouponController,
            AppContentController,
            ContentController,
            MediaController,
            DeviceController,
            ProfileController,
            StationController,
            NotificationController,
            RentalActionController,
            SocialController,
            live_events,
            station_stream,
            metrics,
        ],
        state=state,
        middleware=[
            prometheus.middleware,
            # The websocket authenticates itself, so it can close with 4401 instead of a 401.
            DefineMiddleware(JwtAuthMiddleware, scopes=http_only, exclude=["^/schema"]),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
        openapi_config=openapi_config(),
        request_max_body_size=MAX_REQUEST_BODY_BYTES,
        logging_config=None,  # the process configures logging (structlog), not the app
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        debug=debug,
    )


def openapi_document(services: "Services | None" = None) -> dict[str, Any]:
    """The OpenAPI document as a dict, without serving anything (for the CLI and docs)."""
    return create_app(services).openapi_schema.to_schema()


__all__ = ["create_app", "openapi_document"]
