"""Process composition: which parts run in this process.

Every process is one asyncio loop. Roles (the Procfile's process types):
- web: the Litestar app under uvicorn; accepts commands and reads storage.
- worker: Dramatiq worker threads that drain actor mailboxes on this loop; publishes the
  outbox to MQTT.
- mqtt: the embedded amqtt broker (unless MQTT_URL names an external one) and the bridge that
  turns station messages into Station commands.
- scheduler: timers (eject deadlines, silent stations) and recovery (stalled mailboxes, unsent
  outbox rows).
`serve` and `demo` run all four in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import uvicorn

from powerbank.actors import dispatch
from powerbank.actors.metrics import run_mailbox_sampler
from powerbank.config import Settings
from powerbank.services import Services, build_services
from powerbank import scheduler
from powerbank.storage import migrate, seed

log = logging.getLogger(__name__)
ALL_ROLES = frozenset({"web", "worker", "mqtt", "scheduler"})
WORKER_THREADS = 8
# Python's cyclic garbage collector, tuned for a long-running server process (see tune_gc).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> tuple[int, int, int]:
    """Collect the young generation every 50,000 allocations instead of 700, and move what
    exists at start-up out of the collector's way (`gc.freeze`). Returns the old thresholds.

    Why: a backend holding thousands of MQTT connections has millions of long-lived objects
    (sessions, handlers, their tasks and futures), and at 700 allocations per young collection
    every future still waiting for I/O survived into the old generations; full collections,
    each a walk of the whole heap, then ran every few seconds. Measured by `powerbank bench
    stations` at 3,000 stations: 27 s of 75 s in the collector, which slowed the loop, which
    made more objects survive: the collapse past ~1,500 stations. Reference cycles are still
    collected, only in bigger, rarer batches (at most ~50,000 objects wait for it)."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    return old


def import_actors() -> None:
    """Importing the actor modules registers their command handlers."""
    import powerbank.actors.rental  # noqa: F401
    import powerbank.actors.station  # noqa: F401
    import powerbank.actors.wallet  # noqa: F401
    import powerbank.actors.wallet_payments  # noqa: F401
    import powerbank.actors.wallet_rewards  # noqa: F401


class _EmbeddedServer(uvicorn.Server):
    """Uvicorn inside our loop: we own the signals, it owns HTTP."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class Backend:
    settings: Settings
    roles: frozenset[str]
    services: Services
    broker_handle: object | None = None
    bridge: object | None = None
    worker: object | None = None
    server: _EmbeddedServer | None = None
    server_task: asyncio.Task | None = None
    fast_lane: dispatch.FastLane | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.settings.http_host}:{self.settings.http_port}"

    async def stop(self) -> None:
        if self.server is not None:
            # Let uvicorn finish its lifespan and close connections; cancelling it mid-lifespan
            # leaves Litestar waiting on a receive that never comes.
            self.server.should_exit = True
            await asyncio.wait([self.server_task], timeout=10)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.fast_lane is not None:
            await self.fast_lane.close()
        if self.worker is not None:
            # Worker threads may be waiting on this loop; join them from another thread.
            await asyncio.to_thread(self.worker.stop)
        await self.services.runtime.close()
        if self.bridge is not None:
            await self.bridge.stop()
        if self.broker_handle is not None:
            await self.broker_handle.stop()
        if hasattr(self.services.runtime.dispatcher, "close"):
            await self.services.runtime.dispatcher.close()
        await self.services.close()


async def start_backend(settings: Settings, roles: Iterable[str] = ALL_ROLES, *, migrate_first: bool = False) -> Backend:
    roles = frozenset(roles)
    unknown = roles - ALL_ROLES
    if unknown:
        raise ValueError(f"unknown roles: {sorted(unknown)}")
    if not settings.redis_url and roles != ALL_ROLES:
        raise SystemExit(
            "Without REDIS_URL the queue lives inside one process: run `powerbank serve` (all roles), "
            "or set REDIS_URL to split web, worker, mqtt and scheduler into processes."
        )
    import_actors()
    if migrate_first:
        await asyncio.to_thread(migrate.upgrade, settings.database_url)
    broker = dispatch.setup_broker(settings.redis_url)
    dispatcher = dispatch.RedisDispatcher(settings.redis_url) if settings.redis_url else dispatch.DramatiqDispatcher()
    services = build_services(settings, dispatcher=dispatcher)
    await seed.ensure_defaults(services.sessions, settings.currency)
    backend = Backend(settings=settings, roles=roles, services=services)
    await _start_mqtt_parts(backend)
    if "worker" in roles:
        backend.worker = dispatch.start_worker(broker, asyncio.get_running_loop(), threads=WORKER_THREADS)
        if settings.redis_url:
            # Drains hold a connection each: the Dramatiq threads and the fast lane together stay
            # within the pool (size + overflow), so a burst queues here, not in PostgreSQL.
            lane_slots = max(1, min(dispatch.FAST_LANE_CONCURRENCY, 2 * settings.db_pool_size - WORKER_THREADS))
            backend.fast_lane = dispatch.FastLane(settings.redis_url, services.runtime, concurrency=lane_slots)
            backend.tasks.append(asyncio.create_task(backend.fast_lane.run()))
            services.runtime.follow_up_locally = True
    backend.tasks.append(asyncio.create_task(run_mailbox_sampler(services.readonly)))
    if "scheduler" in roles:
        lease = scheduler.lease_for(services.engine)
        backend.tasks.append(asyncio.create_task(scheduler.run_scheduler(
            services.runtime, lease, jobs=scheduler.default_jobs(settings.ending_soon_minutes))))
        if settings.stripe_secret_key:
            backend.tasks.append(asyncio.create_task(run_payment_jobs(services, lease)))
    if "web" in roles:
        await _start_web(backend)
    elif settings.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.http_host)
    return backend


async def _start_mqtt_parts(backend: Backend) -> None:
    from powerbank.broker.bridge import StationBridge

    settings, services = backend.settings, backend.services
    if "mqtt" in backend.roles and settings.embedded_broker:
        from powerbank.broker.embedded import start_embedded_broker

        backend.broker_handle = await start_embedded_broker(settings, services.sessions, readonly=services.readonly)
        if services.runtime.single_writer:  # logins at the pace the one writer applies boots
            backend.broker_handle.authority.admission.mailbox_backlog = services.runtime.backlog
    if backend.roles & {"mqtt", "worker", "scheduler"}:
        # The bridge subscribes to stations only in the mqtt role; elsewhere it just publishes
        # the outbox (eject commands, config) through its own client.
        bridge = StationBridge(
            settings, services.runtime, services.sessions, subscribe="mqtt" in backend.roles, readonly=services.readonly
        )
        # Wait for the broker only when it runs in this process; a worker must come up (and
        # keep applying commands) while an external broker is away: its outbox waits for it.
        await bridge.start(wait_s=10.0 if backend.broker_handle is not None else None)
        services.runtime.outbox_sink = bridge
        backend.bridge = bridge


def web_server_config(app, host: str, port: int) -> uvicorn.Config:
    """How the web role runs uvicorn: one place, so `powerbank bench http` serves its bare
    Litestar reference with exactly the same settings."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", ws="websockets-sansio")


async def _start_web(backend: Backend) -> None:
    from powerbank.http.app import create_app

    app = create_app(backend.services)
    backend.server = _EmbeddedServer(web_server_config(app, backend.settings.http_host, backend.settings.http_port))
    backend.server_task = asyncio.create_task(backend.server.serve())
    while not backend.server.started:
        if backend.server_task.done():
            backend.server_task.result()
            raise SystemExit(f"the HTTP server did not start on {backend.base_url}")
        await asyncio.sleep(0.01)


RECONCILE_INTERVAL_S = 300
CARD_SWEEP_INTERVAL_S = 30


async def run_payment_jobs(services: Services, lease=None) -> None:
    """Reconciliation with the payment provider (repairs missed webhooks and unanswered refunds),
    the listener for provider work actors announce after commit (card rental holds, auto-refill
    after a debit), and the sweeps behind that listener (auto-refill, card rentals). All
    idempotent, like the scheduler's other jobs; the sweeps run only while this process holds
    the scheduler's lease (scheduler.py)."""
    from powerbank import payment_flows

    lease = lease or scheduler.SoleLease()
    gateway = payment_flows.build_gateway(services.settings)
    refill_every_s = services.settings.auto_refill_interval_s
    next_reconcile_s = next_refill_s = next_cards_s = time.monotonic()
    listener = asyncio.create_task(payment_flows.run_payment_listener(services, gateway))
    try:
        while True:
            now_s = time.monotonic()
            if not lease.held:
                await asyncio.sleep(1)
                continue
            if now_s >= next_reconcile_s:
                next_reconcile_s = now_s + RECONCILE_INTERVAL_S
                with _log_errors("payment reconciliation"):
                    await payment_flows.reconcile(services, gateway)
            if refill_every_s and now_s >= next_refill_s:
                next_refill_s = now_s + refill_every_s
                with _log_errors("auto-refill"):
                    await payment_flows.auto_refill_sweep(services, gateway)
            if now_s >= next_cards_s:
                next_cards_s = now_s + CARD_SWEEP_INTERVAL_S
                with _log_errors("card rentals"):
                    await payment_flows.card_rentals_sweep(services, gateway)
            await asyncio.sleep(1)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await gateway.close()


@contextlib.contextmanager
def _log_errors(what: str):
    try:
        yield
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s tick failed; will retry", what)


async def wait_for_stop(duration_s: float | None = None) -> None:
    """Until SIGINT/SIGTERM, or `duration_s` seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), duration_s)
    except TimeoutError:
        pass


async def run_roles(settings: Settings, roles: Iterable[str], *, migrate_first: bool) -> None:
    backend = await start_backend(settings, roles, migrate_first=migrate_first)
    tune_gc()
    log.info("running %s", ", ".join(sorted(backend.roles)))
    try:
        await wait_for_stop()
    finally:
        await backend.stop()
