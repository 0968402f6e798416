"""The crash tests' client: run by path (`python tests/crash_driver.py ...`) with the deployment's
DATABASE_URL (and REDIS_URL) in its environment, while the test kills the processes that apply
commands. It is never killed itself, so what it records is the ground truth of what was
accepted.

1. Setup: a fleet of online stations with banks, users with wallets (OpenWallet and a first
   credit go through the Wallet actor like any command).
2. Storm: `--commands` client commands spread over `--storm-s` seconds by concurrent senders:
   CreditWallet transfers across the wallets, PropApply (the order-sensitive test command) and
   rental starts. Each PropApply entity has one sender, so its commands have a real-time order
   the runtime must keep. Meanwhile it plays the stations (powerbank.actors.testing.
   StationPlayer): it answers every eject found in the outbox through the bridge's mapping
   (some fail, some acks are delivered twice) and returns most ejected banks a little later.
3. It touches `--storm-flag` (the test stops killing), then keeps playing the stations until
   nothing is pending and no rental waits, or `--drain-s` passes.
4. Writes a JSON summary to `--out`: every command it saw accepted, counts and durations.

A submit that raises (the database briefly away) is retried with the same command id, as a
client would; a command counts as accepted once a submit returned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

import powerbank.actors.testing as proof  # registers PropApply (this process only submits)
from powerbank.actors import dispatch
from powerbank.actors.runtime import pending_count
from powerbank.config import load_settings
from powerbank.processes import import_actors
from powerbank.services import build_services
from powerbank.simulators.stations import provision_fleet
from powerbank.storage.models import RentalPackage, Station, User
from powerbank.storage.types import utcnow

log = logging.getLogger("crash_driver")
INITIAL_CREDIT_MINOR = 1_000_000


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--storm-flag", required=True, type=Path)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--storm-s", type=float, default=60.0)
    parser.add_argument("--drain-s", type=float, default=90.0)
    parser.add_argument("--wallets", type=int, default=50)
    parser.add_argument("--stations", type=int, default=12)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--banks", type=int, default=14)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--mix", default="credit=55,prop=30,rental=15", help="weights of client commands")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.settings = load_settings()
        dispatcher = None
        if self.settings.redis_url:
            # The web process's way to ring doorbells.
            dispatch.setup_broker(self.settings.redis_url)
            dispatcher = dispatch.RedisDispatcher(self.settings.redis_url)
        import_actors()
        self.services = build_services(self.settings, dispatcher=dispatcher)
        self.runtime = self.services.runtime
        self.reader = self.services.readonly
        self.accepted: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.submit_errors = 0
        self.player = proof.StationPlayer(self.runtime, self.reader, rng=random.Random(args.seed + 1), accepted=self.accepted)
        self.users: list[str] = []
        self.crediting: list[str] = []
        self.renting: list[str] = []
        self.stations: list[str] = []
        self.package_id = ""

    async def submit(self, kind: str, entity_id: str, name: str, payload: dict[str, Any], command_id: str) -> None:
        for attempt in range(60):
            try:
                await self.runtime.submit(kind, entity_id, name, payload, command_id)
                break
            except Exception as error:  # noqa: BLE001 - a client retries with the same id
                self.submit_errors += 1
                log.warning("submit %s failed (attempt %d): %r", command_id, attempt + 1, error)
                await asyncio.sleep(0.25)
        else:
            raise RuntimeError(f"could not submit {command_id}")
        self.accepted.append(
            {"kind": kind, "entity_id": entity_id, "name": name, "command_id": command_id, "payload": payload}
        )
        self.counts[name] += 1

    # --- setup ----------------------------------------------------------------------------

    async def setup(self) -> None:
        args, sessions = self.args, self.services.sessions
        specs = await provision_fleet(
            sessions, args.stations, args.slots, args.banks, serial_prefix="CRASH", settings=self.settings,
            charge_range=(60, 100), seed=args.seed,
        )
        self.stations = [spec.station_id for spec in specs]
        async with sessions.begin() as session:
            # Installed and heard from: online, with a heartbeat interval no test outlives.
            await session.execute(
                update(Station)
                .where(Station.id.in_([uuid.UUID(s) for s in self.stations]))
                .values(status="online", last_seen_at=utcnow(), heartbeat_interval_s=3600)
            )
            for _ in range(args.wallets):
                user = User(
                    phone=f"+9775{uuid.uuid4().int % 10**9:09d}", referral_code=uuid.uuid4().hex[:12], max_active_rentals=1000,
                )
                session.add(user)
                await session.flush()
                self.users.append(str(user.id))
            self.package_id = str(
                (await session.execute(select(RentalPackage.id).where(RentalPackage.code == "hour-1"))).scalar_one()
            )
        for user_id in self.users:
            await self.submit("wallet", user_id, "OpenWallet", {"currency": self.settings.currency}, f"open:{user_id}")
            await self.credit(user_id, INITIAL_CREDIT_MINOR)
        # Credits and rentals hit the same wallets: a wallet batch then both credits and holds
        # or captures, touching both shared ledger accounts.
        self.crediting = self.renting = self.users

    # --- the storm ------------------------------------------------------------------------

    async def credit(self, user_id: str, amount: int) -> None:
        transfer_id = str(uuid.uuid4())
        payload = {"amount_minor": amount, "currency": self.settings.currency, "transfer_id": transfer_id, "reason": "crash test"}
        await self.submit("wallet", user_id, "CreditWallet", payload, f"credit:{transfer_id}")

    async def prop(self, user_id: str) -> None:
        tag = f"prop:{uuid.uuid4()}"
        await self.submit("wallet", user_id, proof.PROP_APPLY, proof.prop_payload(tag, self.rng.randrange(2**61)), tag)

    async def rental(self, user_id: str) -> None:
        rental_id = str(uuid.uuid4())
        payload = {"user_id": user_id, "station_id": self.rng.choice(self.stations), "package_id": self.package_id}
        await self.submit("rental", rental_id, "StartRental", payload, f"start:{rental_id}")

    async def sender(self, index: int, quota: int, gap_s: float) -> None:
        mine = self.users[index::self.args.senders] or self.users  # PropApply entities of this sender only
        weights = dict(item.split("=") for item in self.args.mix.split(","))
        kinds, cumulative = list(weights), [int(w) for w in weights.values()]
        for _ in range(quota):
            kind = self.rng.choices(kinds, weights=cumulative)[0]
            if kind == "credit":
                await self.credit(self.rng.choice(self.crediting), self.rng.randint(1, 5000))
            elif kind == "prop":
                await self.prop(self.rng.choice(mine))
            else:
                await self.rental(self.rng.choice(self.renting))
            await asyncio.sleep(self.rng.expovariate(1 / gap_s))

    async def storm(self) -> None:
        args = self.args
        quotas = [args.commands // args.senders + (1 if i < args.commands % args.senders else 0) for i in range(args.senders)]
        gap_s = args.storm_s * args.senders / max(1, args.commands)
        await asyncio.gather(*(self.sender(i, quota, gap_s) for i, quota in enumerate(quotas)))

    async def settled(self) -> bool:
        return (
            await proof.quiescent(self.reader)
            and not self.player.returns_due
            and not await self.player.new_ejects()
        )

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        await self.setup()
        setup_s = time.monotonic() - started
        setup_counts = Counter(self.counts)
        stop = asyncio.Event()
        station = asyncio.create_task(self.player.run(stop))
        storm_started = time.monotonic()
        try:
            await self.storm()
            storm_s = time.monotonic() - storm_started
            self.args.storm_flag.write_text("storm over\n")
            print(f"driver: storm over after {storm_s:.1f} s, {len(self.accepted)} commands", file=sys.stderr, flush=True)
            drain_started = time.monotonic()
            quiet_looks = 0
            next_note = drain_started + 5
            while time.monotonic() - drain_started < self.args.drain_s and quiet_looks < 3:
                await asyncio.sleep(0.5)
                quiet_looks = quiet_looks + 1 if await self.settled() else 0
                if time.monotonic() > next_note:
                    next_note += 5
                    pending = await pending_count(self.reader)
                    print(f"driver: draining, {pending} commands pending", file=sys.stderr, flush=True)
            drain_s = time.monotonic() - drain_started
        finally:
            stop.set()
            await station
        storm_counts = self.counts - setup_counts
        return {
            "quiescent": quiet_looks >= 3,
            "accepted": self.accepted,
            "setup_commands": sum(setup_counts.values()),
            "storm_commands": sum(storm_counts.values()),
            "storm_counts": dict(storm_counts),
            "station_messages": len(self.accepted) - sum(self.counts.values()),
            "ejects_answered": len(self.player.played),
            "returns": self.player.returned,
            "submit_errors": self.submit_errors + self.player.submit_errors,
            "setup_s": round(setup_s, 1),
            "storm_s": round(storm_s, 1),
            "drain_s": round(drain_s, 1),
        }

    async def close(self) -> None:
        dispatcher = self.runtime.dispatcher
        if hasattr(dispatcher, "close"):
            await dispatcher.close()
        await self.services.close()


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    driver = Driver(args)
    try:
        summary = await driver.run()
    finally:
        await driver.close()
    args.out.write_text(json.dumps(summary))
    return 0 if summary["quiescent"] else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1:])))
