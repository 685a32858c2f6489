"""Commands of the read side: the projections process, view status, rebuild and skip, events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import psycopg

from projections import VIEWS
from projections.positions import Positions
from projections.status import ViewStatus, view_status
from schemas import Domain

from ..settings import Settings
from ..store.domain import domain_topics
from ..store.reader import EventReader, Positioned
from .progress import Progress

__all__ = [
    "RebuildError",
    "events_get",
    "events_tail",
    "projections_rebuild",
    "projections_skip",
    "projections_status",
    "run_projections",
]

log = logging.getLogger("pipeline")

Print = Callable[[str], None]


class RebuildError(Exception):
    """One or more views were not rebuilt (each named, with why)."""


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(**settings.postgres_connection(), autocommit=True)


async def run_projections(settings: Settings, stop: asyncio.Event) -> None:
    """Keep every view current until `stop` is set."""
    # Here, not above: `projections status` and the others start without them.
    from projections.service import ProjectionService

    from ..metrics import serve_metrics

    service = ProjectionService(settings)
    await anyio.to_thread.run_sync(service.start)
    server = None
    if settings.projections_metrics_port:
        server = serve_metrics(
            service.metrics,
            settings.metrics_host,
            settings.projections_metrics_port,
            ready=service.ready,
        )
        log.info(
            "projections: metrics on http://%s:%d/metrics, health on /healthz and /readyz",
            settings.metrics_host,
            settings.projections_metrics_port,
        )
    try:
        await stop.wait()
        log.info("stopping: finishing the batches in hand")
    finally:
        await anyio.to_thread.run_sync(service.stop)
        if server is not None:
            server.shutdown()


def projections_status(
    settings: Settings, *, as_json: bool, out: Print = print
) -> list[ViewStatus]:
    """Print each view's position, lag and state."""
    with _connect(settings) as conn:
        rows = view_status(conn, settings.postgres_schema)
    if as_json:
        out(json.dumps([r.as_json() for r in rows]))
        return rows
    out(f"{'VIEW':<18} {'POSITION':>10} {'HEAD':>10} {'LAG':>8} {'LAG_S':>8}  STATE")
    for r in rows:
        out(
            f"{r.view:<18} {r.position:>10} {r.head:>10} {r.lag_events:>8} "
            f"{r.lag_seconds:>8.1f}  {r.state}"
        )
        if r.state == "stalled":
            out(f"  stalled at position {r.stalled_at}: {r.error}")
            out(f"  to move past it: pipeline projections skip {r.view} {r.stalled_at}")
    return rows


def projections_rebuild(
    settings: Settings,
    names: Sequence[str],
    *,
    after: int,
    jobs: int | None = None,
    as_json: bool,
    out: Print = print,
) -> None:
    """Rebuild views beside the live ones and swap them in (several at once in processes).

    Raises `RebuildError` naming each view that did not finish (the others are swapped in).
    """
    from projections.rebuild import rebuild_views

    names = list(dict.fromkeys(names)) or list(VIEWS)
    with _connect(settings) as conn:
        head = EventReader(settings.postgres_schema).head(conn)
    span = max(head - after, 0)
    bar = Progress(f"rebuilding {', '.join(names)}", span * len(names))
    done_by_view = dict.fromkeys(names, 0)

    def progress(name: str, position: int) -> None:
        done_by_view[name] = min(position - after, span)
        bar.update(sum(done_by_view.values()))

    started = time.perf_counter()
    try:
        results = rebuild_views(
            settings.postgres_connection(),
            settings.postgres_schema,
            names,
            after=after,
            batch_size=settings.projections_batch_size,
            jobs=jobs,
            progress=progress,
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    failed = []
    for name, result in results.items():
        if isinstance(result, Exception):
            failed.append(f"{name}: {result}")
            continue
        rate = result.events / result.seconds if result.seconds else 0.0
        if as_json:
            out(
                json.dumps(
                    {
                        "view": result.view,
                        "events": result.events,
                        "position": result.position,
                        "seconds": round(result.seconds, 3),
                        "events_per_s": round(rate),
                    }
                )
            )
        else:
            out(
                f"rebuilt {result.view}: {result.events:,} events in {result.seconds:.1f} s "
                f"({rate:,.0f}/s), now at position {result.position}"
            )
    rebuilt = [r for r in results.values() if not isinstance(r, Exception)]
    if len(rebuilt) > 1:
        events = sum(r.events for r in rebuilt)
        rate = events / seconds if seconds else 0.0
        if as_json:
            out(
                json.dumps(
                    {
                        "views": [r.view for r in rebuilt],
                        "events": events,
                        "seconds": round(seconds, 3),
                        "events_per_s": round(rate),
                    }
                )
            )
        else:
            out(f"all {len(rebuilt)} views: {events:,} events in {seconds:.1f} s ({rate:,.0f}/s)")
    if failed:
        raise RebuildError("not rebuilt (the live view is unchanged): " + "; ".join(failed))


def projections_skip(
    settings: Settings, name: str, position: int, *, note: str, as_json: bool, out: Print = print
) -> None:
    """Move a stalled view past the event at `position`, recording the skip."""
    if name not in VIEWS:
        raise KeyError(f"no view {name!r} (views: {', '.join(VIEWS)})")
    with _connect(settings) as conn:
        row = Positions(settings.postgres_schema).skip(conn, name, position, note)
    if as_json:
        out(json.dumps({"view": name, "skipped": position, "position": row.position}))
    else:
        out(f"view {name}: skipped the event at position {position}; it goes on from there")


def events_get(settings: Settings, ident: str, *, out: Print = print) -> bool:
    """Print one stored event as JSON; False if there is none with that id."""
    reader = EventReader(settings.postgres_schema)
    with _connect(settings) as conn:
        found = reader.find(conn, ident)
    if found is None:
        return False
    out(json.dumps(found.as_json(), indent=2))
    return True


def _topics(domain: Domain | None) -> list[str] | None:
    return domain_topics(domain) if domain is not None else None


def events_tail(
    settings: Settings,
    *,
    domain: Domain | None,
    limit: int,
    follow: bool,
    as_json: bool,
    stop: Callable[[], bool] = lambda: False,
    out: Print = print,
) -> None:
    """Print the last `limit` events (of a domain); with `follow`, then each new one."""
    reader = EventReader(settings.postgres_schema)
    topics = _topics(domain)
    with _connect(settings) as conn:
        shown = reader.recent(conn, topics=topics, limit=limit)
        after = shown[-1].position if shown else reader.head(conn)
        while True:
            for item in shown:
                out(json.dumps(item.as_json()) if as_json else _line(item))
            if not follow or stop():
                return
            time.sleep(0.5)
            shown = reader.since(conn, after, topics=topics)
            if shown:
                after = shown[-1].position


def _line(item: Positioned) -> str:
    data = item.as_json()
    payload = json.dumps(data["payload"], separators=(",", ":"))
    if len(payload) > 120:
        payload = payload[:117] + "..."
    return (
        f"{data['position']:>10} {data['received_at'][:23]} {data['domain']:<10} "
        f"{data['subject']} {payload}"
    )
