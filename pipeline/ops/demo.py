"""`pipeline demo`: embedded NATS and PostgreSQL, a worker with its detector pool on a
local Ray, the projections, the incident process, the query API with its live dashboard,
and simulated producers and cameras."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import nats
import psycopg
from nats.js.api import PubAck

from projections.incidents import EXAMPLE_SITES
from projections.incidents.service import IncidentService
from projections.service import ProjectionService

from ..api.server import run_api
from ..app import Worker, apply_streams_once
from ..metrics import Metrics, serve_metrics
from ..settings import ALL_DOMAINS, EVENT_DOMAINS, Settings
from .demoenv import DEMO_DIR, remove_env_file, write_env_file
from .embedded import EmbeddedNats, EmbeddedPostgres, free_port
from .failures import causes
from .incidents import load_sites_file
from .migrate import migrate
from .scenes import Scenes, play
from .simulate import Cameras, Outgoing, Traffic, publish
from .watch import ChildExited, Watch

__all__ = [
    "LEGEND",
    "LIMITS",
    "MAX_DISK_BYTES",
    "ON_CALL",
    "RESOLVE_AFTER_S",
    "WINDOW",
    "disk_usage",
    "resolve_quiet",
    "run_demo",
    "status_line",
]

log = logging.getLogger(__name__)

LIMITS = {
    "frames_max_bytes": 128 * 1024**2,
    "dead_letters_max_bytes": 32 * 1024**2,
    "dead_letter_max_body_bytes": 16 * 1024,
    "evidence_max_bytes": 64 * 1024**2,
}
"""What the demo's streams keep at most (settings, where production keeps 2 GiB of frames
and 1 GiB of dead letters): the newest 128 MiB of frames (about ten minutes of two
cameras) and 32 MiB of dead letters, a letter's body cut at 16 KiB (a bad frame's image
left out, its size and hash kept); 64 MiB of incidents' evidence frames (then no more
are kept). With PostgreSQL's WAL kept to 64 MB between
checkpoints, what grows is the events: the store and the event streams, which the disk
budget (`MAX_DISK_BYTES`) bounds."""
MAX_DISK_BYTES = 1000 * 1000**2
"""The data folder's size at which the producers stop (`pipeline demo --max-disk-mb`)."""
_DISK_EVERY_S = 5.0
RESOLVE_AFTER_S = 180.0
"""How long after it opened the demo's on-call resolves an incident nobody acknowledged."""
ON_CALL = "demo-on-call"
"""Who the demo's on-call resolves incidents as."""
_ON_CALL_EVERY_S = 10.0

LEGEND = (
    "published = stored + duplicates dropped (by JetStream's duplicate window, or by the "
    "pipeline's own dedup when a copy came later with a new Nats-Msg-Id) + dead-lettered "
    "+ not yet handled"
)
"""The first status line: how the counts of the others add up."""
WINDOW = "dropped by the duplicate window"
"""The key, among the published counts, of the copies JetStream acked as duplicates."""


def status_line(published: Counter[str], m: Metrics) -> str:
    """The demo's counts: what was published and what became of it, adding up (`LEGEND`)."""
    sent = sum(count for key, count in published.items() if key != WINDOW)
    window = published[WINDOW]
    deduplicated = m.total("pipeline_duplicates")
    stored = m.total("pipeline_events_stored")
    dead = m.total("pipeline_dead_lettered")
    waiting = max(sent - window - deduplicated - stored - dead, 0)
    return (
        f"published {sent:>7} = stored {stored:>7.0f} "
        f"+ duplicates dropped {window + deduplicated:>5.0f} "
        f"(JetStream {window:>4}, pipeline {deduplicated:>4.0f}) "
        f"+ dead-lettered {dead:>5.0f} + not yet handled {waiting:>5.0f} | "
        f"frames analysed {_frames(m, 'analysed'):>5.0f}, "
        f"detections {m.total('pipeline_detections'):>5.0f}"
    )


def _frames(m: Metrics, outcome: str) -> float:
    value = m.registry.get_sample_value("pipeline_frames_total", {"outcome": outcome})
    return value or 0.0


async def run_demo(
    data_dir: Path,
    *,
    rate: float,
    duration_s: float | None,
    stop: asyncio.Event,
    cameras: int = 2,
    fps: float = 1.0,
    model: str | None = None,
    max_disk_bytes: int = MAX_DISK_BYTES,
    say: Callable[[str], None] = print,
) -> None:
    """Run everything on embedded servers until `stop` is set or `duration_s` passes.

    The detector is `model`, else PIPELINE_DETECTOR_MODEL, else a randomly initialised
    yolov8n (no download; it finds next to nothing: name a trained `.pt` to see objects).
    Parts start in order (NATS, PostgreSQL, the worker, the projections, the incident
    process, the API, the producers) and stop in the reverse order; the servers' own logs
    stay in files under `data_dir`. The incidents follow PIPELINE_SITES_FILE, else the
    shipped example written for the simulator's sources (`EXAMPLE_SITES`). While it runs,
    `data_dir/demo.env` holds the settings `pipeline --demo <command>` reads. Once
    `data_dir` holds `max_disk_bytes`, the producers stop and the rest runs on.
    """
    # The demo's own lines are its output; the worker's routine INFO lines are not.
    for name in ("pipeline", "projections"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if cameras:  # before any server starts
        from ..detection.extra import require

        require(
            "--cameras",
            "the demo's cameras (frames, detected on a local Ray)",
            instead="run it with --cameras 0",
        )
    nats_server = EmbeddedNats(data_dir / "nats")
    postgres = EmbeddedPostgres(data_dir)
    try:
        async with contextlib.AsyncExitStack() as parts:
            url = await anyio.to_thread.run_sync(nats_server.start)
            parts.push_async_callback(anyio.to_thread.run_sync, nats_server.stop)
            address = await anyio.to_thread.run_sync(postgres.start)
            parts.push_async_callback(anyio.to_thread.run_sync, postgres.stop)
            say(f"NATS {url}, PostgreSQL {address.host} (data and server logs in {data_dir})")
            metrics_port = free_port()
            detector = {"detector_model": model} if model else {}
            settings = Settings(
                _env_file=None,
                **detector,  # type: ignore[arg-type]
                nats_url=url,
                postgres_host=address.host,
                postgres_port=address.port,
                postgres_user=address.user,
                postgres_dbname=address.dbname,
                metrics_port=metrics_port,
                consumer_lag_interval_s=1.0,
                api_port=free_port(),
                api_tokens={f"demo-{secrets.token_hex(8)}": ("read", "operate")},
                domains=ALL_DOMAINS if cameras else EVENT_DOMAINS,
                **LIMITS,  # type: ignore[arg-type]
            )
            if not settings.sites_file:
                settings = settings.model_copy(update={"sites_file": str(EXAMPLE_SITES)})
            sites = load_sites_file(settings)  # a bad file stops the demo before it runs
            if cameras:
                say(f"detector {settings.detector_model} on a local Ray: loading the model")
            # The owner's and the operator's steps; then each process as its own role.
            await anyio.to_thread.run_sync(migrate, settings)
            await anyio.to_thread.run_sync(_bound_wal, settings)
            await apply_streams_once(settings)
            role = _roles(settings)
            worker = await parts.enter_async_context(Worker(role["writer"]))
            server = serve_metrics(
                worker.metrics, settings.metrics_host, metrics_port, worker.ready
            )
            parts.callback(server.shutdown)
            say(
                f"metrics on http://127.0.0.1:{metrics_port}/metrics "
                f"(health: /healthz, /readyz); Ctrl-C stops"
            )
            views = ProjectionService(role["projector"])
            await anyio.to_thread.run_sync(views.start)
            parts.push_async_callback(anyio.to_thread.run_sync, lambda: views.stop())
            incidents = IncidentService(role["projector"], sites)
            await anyio.to_thread.run_sync(incidents.start)
            parts.push_async_callback(anyio.to_thread.run_sync, lambda: incidents.stop())
            api_stop, api_started = asyncio.Event(), asyncio.Event()
            api = asyncio.create_task(run_api(role["api"], api_stop, api_started))
            await asyncio.wait(
                {api, asyncio.create_task(api_started.wait())}, return_when=asyncio.FIRST_COMPLETED
            )
            if api.done():
                await api  # raises why it could not start
            parts.push_async_callback(_stop_api, api, api_stop)
            token = next(iter(settings.api_tokens))
            say(
                f"dashboard on http://127.0.0.1:{settings.api_port}/ (sign in with the token "
                f"below; incidents by the rules of {settings.sites_file})"
            )
            say(
                f"query API on http://127.0.0.1:{settings.api_port}/docs, e.g. curl -H "
                f"'Authorization: Bearer {token}' "
                f"'http://127.0.0.1:{settings.api_port}/v1/security/events?limit=5'"
            )
            env_file = write_env_file(data_dir, settings)
            parts.callback(remove_env_file, env_file)
            say(f"CLI in another terminal: {_cli_line(env_file)}")
            # A server that exits under the demo stops it, saying why (its last log lines).
            servers = Watch(nats_server.watched(), postgres.watched(), interval_s=0.5)
            await servers.guard(
                _simulate(
                    settings,
                    worker,
                    operator=role["api"],
                    rate=rate,
                    cameras=cameras,
                    fps=fps,
                    duration_s=duration_s,
                    stop=stop,
                    say=say,
                    budget=_Budget(data_dir, max_disk_bytes),
                )
            )
    except Exception as exc:
        # After a server died under it, stopping the parts fails too (NATS cannot drain):
        # the server's exit is the error to report.
        exited = _server_exit(exc)
        if exited is None or exited is exc:
            raise
        raise exited from None
    say("stopped")


def _server_exit(exc: BaseException) -> ChildExited | None:
    """The exit of a server that `exc` was raised after (its context), if any."""
    return next((e for e in causes(exc) if isinstance(e, ChildExited)), None)


def _cli_line(env_file: Path) -> str:
    """The command a user types to point the CLI at this demo."""
    if env_file.parent == DEMO_DIR.resolve():
        return "pipeline --demo projections status (--demo before any command)"
    return f"PIPELINE_ENV_FILE={env_file} pipeline projections status"


def _bound_wal(settings: Settings) -> None:
    """Keep PostgreSQL's WAL to 64 MB between checkpoints (its default lets it reach 1 GB,
    as much as the demo's whole budget)."""
    with psycopg.connect(**settings.postgres_connection(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_wal_size = '64MB'")
        conn.execute("ALTER SYSTEM SET min_wal_size = '32MB'")
        conn.execute("SELECT pg_reload_conf()")


def disk_usage(folder: Path) -> int:
    """Bytes the files under `folder` take on disk (those it may read)."""
    used = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # gone meanwhile, or another user's
                used += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return used


def _roles(settings: Settings) -> dict[str, Settings]:
    """The settings of each process, connecting as its role (the embedded server trusts
    its local connections, so the roles need no password)."""
    return {
        kind: settings.model_copy(update={"postgres_user": settings.postgres_role(kind)})
        for kind in ("writer", "projector", "api")
    }


async def _stop_api(api: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await api


async def _simulate(
    settings: Settings,
    worker: Worker,
    *,
    operator: Settings,
    rate: float,
    cameras: int,
    fps: float,
    duration_s: float | None,
    stop: asyncio.Event,
    say: Callable[[str], None],
    budget: _Budget,
) -> None:
    nc = await nats.connect(settings.nats_servers())
    published: Counter[str] = Counter()

    def count(out: Outgoing) -> None:
        published[out.expect.value] += 1

    def acked(out: Outgoing, ack: PubAck) -> None:
        if ack.duplicate:
            published[WINDOW] += 1

    # Routine traffic matches no rule of the example sites file; the scenes make its
    # incidents, a few a minute at most, and the on-call resolves them after a while.
    traffic = Traffic(worker.subjects, routine=True)
    producers = [
        publish(
            nc.jetstream(),
            iter(traffic),
            rate=rate,
            duration_s=duration_s,
            on_published=count,
            on_acked=acked,
        ),
        play(
            nc.jetstream(),
            Scenes(worker.subjects),
            duration_s=duration_s,
            on_published=count,
            on_acked=acked,
        ),
    ]
    if cameras:
        frames = Cameras(worker.subjects, cameras=cameras)
        producers.append(
            publish(
                nc.jetstream(),
                iter(frames),
                rate=fps * cameras,
                duration_s=duration_s,
                on_published=count,
                on_acked=acked,
            )
        )
    producer = asyncio.gather(*producers)
    on_call = asyncio.create_task(_on_call(operator))
    started = time.monotonic()
    full = False
    say(LEGEND)
    try:
        while not producer.done() and not stop.is_set() and not full:
            full = await budget.spent(say)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            say(status_line(published, worker.metrics))
    finally:
        # The producers stop first, while everything under them still runs.
        producer.cancel()
        on_call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        with contextlib.suppress(asyncio.CancelledError):
            await on_call
    # Let the worker catch up with what was published.
    deadline = time.monotonic() + 10
    expected = published["store"]
    while time.monotonic() < deadline and worker.metrics.total("pipeline_events_stored") < expected:
        await asyncio.sleep(0.2)
    say("final: " + status_line(published, worker.metrics))
    if full:  # the API and the CLI go on answering until Ctrl-C (or the duration's end)
        left = None if duration_s is None else max(duration_s - (time.monotonic() - started), 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=left)
    await nc.drain()


async def _on_call(operator: Settings) -> None:
    """The demo's on-call: resolves each incident nobody acknowledged `RESOLVE_AFTER_S`
    after it opened (as `ON_CALL`, through the API's query, as the API role), so the
    dashboard shows incidents come and go; an acknowledged one is left to whoever
    acknowledged it. Runs until cancelled; a failed round is tried again later."""
    while True:
        await asyncio.sleep(_ON_CALL_EVERY_S)
        try:
            await anyio.to_thread.run_sync(resolve_quiet, operator, RESOLVE_AFTER_S)
        except psycopg.Error as exc:
            log.debug("demo on-call: %s", exc)


def resolve_quiet(operator: Settings, after_s: float) -> list[str]:
    """Resolve the open, unacknowledged incidents opened more than `after_s` ago; their
    ids."""
    from projections.incidents.queries import (
        IncidentNotFound,
        IncidentStateError,
        list_incidents,
        resolve,
    )

    schema = operator.postgres_schema
    done = []
    with psycopg.connect(**operator.postgres_connection(), autocommit=True) as conn:
        now = datetime.now(UTC)
        for incident in list_incidents(conn, schema, state="open", limit=200):
            opened = datetime.fromisoformat(incident["opened_at"])
            if (now - opened).total_seconds() < after_s:
                continue
            note = f"resolved by the demo {after_s / 60:g} min after it opened, unacknowledged"
            with contextlib.suppress(IncidentNotFound, IncidentStateError):
                resolve(conn, schema, uuid.UUID(incident["incident_id"]), ON_CALL, note)
                done.append(incident["incident_id"])
    return done


@dataclass
class _Budget:
    """The demo's disk budget: `data_dir` may hold `max_bytes`."""

    data_dir: Path
    max_bytes: int
    _next_look: float = 0.0

    async def spent(self, say: Callable[[str], None]) -> bool:
        """Whether the folder holds its budget (then say so); looked at every few seconds."""
        if time.monotonic() < self._next_look:
            return False
        self._next_look = time.monotonic() + _DISK_EVERY_S
        used = await anyio.to_thread.run_sync(disk_usage, self.data_dir)
        if used < self.max_bytes:
            return False
        say(
            f"{self.data_dir} holds {used / 1e6:,.0f} MB, the demo's --max-disk-mb "
            f"{self.max_bytes / 1e6:,.0f}: the producers stop; the API and `pipeline --demo "
            "...` still answer, Ctrl-C stops the demo (remove the folder to start afresh)"
        )
        return True
