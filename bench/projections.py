"""Benchmark: the read side on a store of a million events.

    python bench/projections.py [--events 1000000] [--schema bench_projections] [--reuse]
                                [--live-seconds 30] [--api-requests 1000]

Uses the PostgreSQL named by the usual PIPELINE_POSTGRES_* settings, in a schema of its
own (dropped afterwards unless --reuse is given, which also reuses a schema that already
holds enough events). It prints:
  (a) the store: events written (the four domains, as the worker stores them), and a
      bare read of every stored row in position order (`store_rows_read_per_s`), the
      ceiling of any rebuild;
  (b) the rebuild of every view from position 0 beside the live one, then swapped in,
      as `pipeline projections rebuild --all` does: once in one process, view after view
      (`rebuild_one_process_events_per_s`), then a process per core
      (`rebuild_events_per_s`: events applied per second of the whole, all views);
  (c) the API: the main list query (`/v1/security/events`, a page of 100, with and
      without filters, and a second page by cursor) through the ASGI application;
      p50 and p99 of `api_p99_ms`;
  (d) live lag: `pipeline run projections` (a process of its own) follows while this
      one writes events at half of (a)'s write rate (20,000/s when (a) was reused), in
      batches of 100; for each batch, from its commit to every view having committed
      past it (`live_lag_p99_ms`).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import as_role, connect, percentiles_ms
from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import stored_events
from pipeline.ops.watch import Watch, terminate_as_interrupt
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from pipeline.store.reader import EventReader
from projections import VIEWS
from projections.rebuild import Rebuilt, rebuild_views


def fill(settings: Settings, store: EventStore, count: int) -> float:
    """Write `count` events in batches of 2,000; the write rate (events/s)."""
    written, seconds, chunk = 0, 0.0, []
    for accepted in stored_events(count, seed=1):
        chunk.append(accepted)
        if len(chunk) == 2000:
            started = time.perf_counter()
            store.write(chunk)
            seconds += time.perf_counter() - started
            written += len(chunk)
            chunk = []
            if written % 100_000 == 0:
                print(f"    {written:,} events stored", flush=True)
    if chunk:
        started = time.perf_counter()
        store.write(chunk)
        seconds += time.perf_counter() - started
    return count / seconds


def bare_read(settings: Settings) -> tuple[int, float]:
    """Every stored row in position order, in pages of 5,000: rows and rows per second."""
    reader = EventReader(settings.postgres_schema)
    query = SQL(
        "SELECT notification_id, originator_id, originator_version, topic, state FROM {} "
        "WHERE notification_id > %s ORDER BY notification_id LIMIT 5000"
    ).format(reader.table)
    rows, after = 0, 0
    started = time.perf_counter()
    with (
        connect(settings) as conn,
        conn.cursor(binary=True, row_factory=tuple_row) as curs,
    ):
        while True:
            curs.execute(query, (after,), prepare=True)
            page = curs.fetchall()
            if not page:
                break
            rows += len(page)
            after = page[-1][0]
    return rows, rows / (time.perf_counter() - started)


def rebuild_all(settings: Settings, jobs: int | None) -> tuple[dict[str, Any], float]:
    """Rebuild every view from 0, `jobs` views at a time (None: one per core), as
    `pipeline projections rebuild --all` does; per view: events, seconds, events/s, and
    the wall-clock seconds of the whole."""
    started = time.perf_counter()
    results = rebuild_views(
        settings.postgres_connection(),
        settings.postgres_schema,
        list(VIEWS),
        batch_size=settings.projections_batch_size,
        jobs=jobs,
    )
    seconds = time.perf_counter() - started
    views = {}
    for name, done in results.items():
        if not isinstance(done, Rebuilt):
            raise SystemExit(f"rebuild of {name} failed: {done}")
        views[name] = {
            "events": done.events,
            "seconds": round(done.seconds, 2),
            "events_per_s": round(done.events / done.seconds),
        }
        print(
            f"    {name:<9} {done.events:>9,} events in {done.seconds:6.1f} s "
            f"({done.events / done.seconds:>8,.0f}/s)",
            flush=True,
        )
    return views, seconds


def api_latency(settings: Settings, requests: int) -> tuple[float, float]:
    """p50 and p99 (ms) of the main list query, through the ASGI application."""
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

    from pipeline.api import create_app

    token = "bench-token"
    app = create_app(settings.model_copy(update={"api_tokens": {token: ("read",)}}))
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(3)
    times = []
    with TestClient(app) as client:
        first = client.get("/v1/security/events", params={"limit": 100}, headers=headers)
        first.raise_for_status()
        cursor = first.json()["next_cursor"]
        newest = first.json()["items"][0]["occurred_at"]
        variants: list[dict[str, Any]] = [
            {},
            {"severity": "high"},
            {"zone": "zone-3"},
            {"source": "door-7", "severity": "medium"},
            {"until": newest},
            {"cursor": cursor},
        ]
        for _ in range(requests):
            params = {"limit": 100, **rng.choice(variants)}
            started = time.perf_counter()
            response = client.get("/v1/security/events", params=params, headers=headers)
            times.append(time.perf_counter() - started)
            response.raise_for_status()
    return percentiles_ms(times)


def live_lag(settings: Settings, store: EventStore, rate: float, seconds: float) -> list[float]:
    """Lags (ms) from each write's commit to every view being past it.

    The projections run in a process of their own, as deployed, watched: if it exits,
    the run stops at once with its last log lines.
    """
    env = {
        **os.environ,
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema,
        "PIPELINE_POSTGRES_USER": settings.postgres_role("projector"),
        "PIPELINE_PROJECTIONS_METRICS_PORT": "0",
    }
    log = Path(tempfile.mkdtemp(prefix="bench-projections-")) / "projections.log"
    watch = Watch()
    service = watch.start(
        "`pipeline run projections`",
        [sys.executable, "-m", "pipeline", "run", "projections"],
        env=env,
        log=log,
    )
    reader = EventReader(settings.postgres_schema)
    pending: list[tuple[int, float]] = []
    lags: list[float] = []
    lock = threading.Lock()
    done, ended = threading.Event(), threading.Event()
    # Made up front (making one costs more than storing it): copies of 10,000 messages
    # under new ids.
    templates = list(stored_events(10_000, seed=2))
    events = (
        dataclasses.replace(templates[n % len(templates)], message_id=f"live-{n}")
        for n in itertools.count()
    )
    positions = SQL("SELECT min(position) FROM {}.projection_positions WHERE view = ANY(%s)")
    query = positions.format(Identifier(settings.postgres_schema))

    def follow() -> None:
        with connect(settings) as conn:
            while not ended.is_set() and (not done.is_set() or pending):
                row = conn.execute(query, (list(VIEWS),)).fetchone()
                now = time.perf_counter()
                at = row[0] if row and row[0] is not None else 0
                with lock:
                    while pending and pending[0][0] <= at:
                        lags.append(1000 * (now - pending.pop(0)[1]))
                time.sleep(0.005)

    try:
        with connect(settings) as conn:
            # The process is up and has applied a first batch before the clock starts.
            store.write([next(events) for _ in range(100)])
            warm = reader.head(conn)

            def applied() -> bool:
                row = conn.execute(query, (list(VIEWS),)).fetchone()
                return bool(row and row[0] is not None and row[0] >= warm)

            watch.wait_until(
                applied, timeout_s=120, waiting_for="the projections applied no first batch"
            )
            watcher = threading.Thread(target=follow)
            watcher.start()
            batch = 100
            interval = batch / rate
            started = time.perf_counter()
            n = 0
            while time.perf_counter() - started < seconds:
                watch.check()
                chunk = [next(events) for _ in range(batch)]
                store.write(chunk)
                committed = time.perf_counter()
                with lock:
                    pending.append((reader.head(conn), committed))
                n += 1
                pause = started + n * interval - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            done.set()
            # Views still behind after a minute: their last lags are left out.
            with contextlib.suppress(TimeoutError):
                watch.wait_until(
                    lambda: not watcher.is_alive(),
                    timeout_s=60,
                    waiting_for="the views did not catch up within 60 s",
                )
    finally:
        ended.set()
        watch.stop(service)
    return lags


def main(args: argparse.Namespace) -> dict[str, Any]:
    base = Settings()
    settings = base.model_copy(update={"postgres_schema": args.schema})
    migrate(settings)  # the schema, tables and roles; each part below runs as its role
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    try:
        with connect(settings) as conn:
            have = EventReader(args.schema).head(conn)
        print(f"PostgreSQL {base.postgres_host}/{base.postgres_dbname}, schema {args.schema}")
        write_rate = None
        if args.reuse and have >= args.events:
            print(f"(a) reusing the {have:,} events stored")
        else:
            write_rate = fill(settings, store, args.events)
            print(f"(a) {args.events:,} events written: {write_rate:>9,.0f} events/s")
        rows, read_rate = bare_read(settings)
        print(f"    bare read of {rows:,} stored rows:  {read_rate:>9,.0f} rows/s")
        print("(b) rebuild of every view from position 0, then swapped in:")
        rates = {}
        for label, jobs in (("one process, view after view", 1), ("a process per core", None)):
            print(f"  {label}:")
            views, seconds = rebuild_all(as_role(settings, "projector"), jobs)
            events = sum(v["events"] for v in views.values())
            rates[jobs] = events / seconds
            print(
                f"    all views: {events:,} events in {seconds:.1f} s: {rates[jobs]:,.0f} "
                f"events/s (ratio to the bare read {rates[jobs] / read_rate:.2f})"
            )
        rebuild_rate = rates[None]
        p50, p99 = api_latency(as_role(settings, "api"), args.api_requests)
        print(
            f"(c) API, main list query ({args.api_requests} requests): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        )
        rate = (write_rate or 20_000) / 2
        lags = sorted(live_lag(settings, store, rate, args.live_seconds))
        lag50 = statistics.median(lags) if lags else float("nan")
        lag99 = lags[int(len(lags) * 0.99) - 1] if lags else float("nan")
        achieved = 100 * len(lags) / args.live_seconds
        print(
            f"(d) live, writing at up to {rate:,.0f} events/s ({achieved:,.0f}/s achieved) for "
            f"{args.live_seconds:.0f} s: commit to every view committed: p50 {lag50:.0f} ms, "
            f"p99 {lag99:.0f} ms ({len(lags)} writes of 100 events)"
        )
    finally:
        store.close()
        if not args.reuse:
            with connect(settings) as conn:
                conn.execute(SQL("DROP SCHEMA {} CASCADE").format(Identifier(args.schema)))
    return {
        "events": rows,
        "store_rows_read_per_s": round(read_rate),
        "rebuild_events_per_s": round(rebuild_rate),
        "rebuild_ratio_to_read": round(rebuild_rate / read_rate, 3),
        "rebuild_jobs": min(len(VIEWS), os.cpu_count() or 1),
        "rebuild_one_process_events_per_s": round(rates[1]),
        "rebuild": views,
        "api_p50_ms": round(p50, 2),
        "api_p99_ms": round(p99, 2),
        "live_rate_events_per_s": round(achieved),
        "live_lag_p50_ms": round(lag50, 1),
        "live_lag_p99_ms": round(lag99, 1),
    }


if __name__ == "__main__":
    terminate_as_interrupt()  # a `kill` stops the processes this run started
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--schema", default="bench_projections")
    parser.add_argument("--reuse", action="store_true", help="keep the schema (and reuse it)")
    parser.add_argument("--live-seconds", type=float, default=30.0)
    parser.add_argument("--api-requests", type=int, default=1000)
    print(json.dumps(main(parser.parse_args())))
