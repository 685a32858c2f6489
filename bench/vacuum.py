"""Benchmark: writers beside a VACUUM (FREEZE) of a large event table, under either lock.

    python bench/vacuum.py [--events 5000000] [--schema bench_vacuum] [--reuse]
                           [--writers 4] [--batch 100] [--interval-ms 100]
                           [--before-s 10] [--after-s 3]
                           [--vacuum "FREEZE, DISABLE_PAGE_SKIPPING"] [--cost-delay-ms 2]
                           [--fresh]

Uses the PostgreSQL named by the usual PIPELINE_POSTGRES_* settings, in a schema of its
own made by `pipeline db migrate`'s code (dropped afterwards unless --reuse is given,
which also reuses a schema that already holds enough events). It:
  (a) fills the event table to --events rows with SQL (`INSERT ... SELECT
      generate_series`, in chunks of 250,000), each row a copy of one of twenty events
      stored by the real store (the four domains, frames one in ten) under an id of its
      own, then runs a plain `VACUUM (FREEZE)` of it with nothing else running
      (`freeze_s`; on a table just filled, the first freeze of its rows, less what
      autovacuum froze meanwhile under migrate's settings);
  (b) twice, once with the insert function as earlier releases had it (`LOCK TABLE ...
      IN EXCLUSIVE MODE`, the "table" lock) and once as it is (the writers' advisory
      lock, "advisory"): --writers threads, each with its own `EventStore` connected as
      the writer role, store a batch of --batch generated messages every --interval-ms
      through the real insert function (`EventStore.write`, as the worker does), a
      batch that fails (a lock wait past the lock timeout) tried again at once as the
      worker's probe would; after --before-s, `VACUUM (<--vacuum>)` of the event table
      runs beside them, then --after-s more. The default adds DISABLE_PAGE_SKIPPING to
      FREEZE so that both runs read every page of the table, as an anti-wraparound
      vacuum does where the visibility map marks little as frozen (a table frozen in
      (a) would otherwise be skipped), at autovacuum's pace (--cost-delay-ms 2, the
      default autovacuum_vacuum_cost_delay, with vacuum_cost_limit 200; 0 runs it at a
      manual VACUUM's full speed); the other variant with the lock of the other run
      is the function with that one statement swapped, and the function is put back by
      migrate at the end.
With --fresh, each lock's run has a table of its own (schemas <--schema>_table and
<--schema>_advisory, dropped afterwards), filled to --events rows with its autovacuum
off, as in a store whose every autovacuum was cancelled by writers waiting for the table
lock: nothing is frozen, and `--vacuum FREEZE` then freezes every row beside the
writers, as an anti-wraparound vacuum of such a store does.

A batch's latency runs from when it was due to its commit, retries included: the pause
a worker's messages would see. For each lock it prints the vacuum's duration
(`<lock>_vacuum_s`), the batches' latency before the vacuum (p50 and max) and during it
(p50, p99 and max, `<lock>_pause_ms` being that max: the longest writer pause), the
lock timeouts the writers hit, and what the writers' sessions were waiting for during
the vacuum, sampled every 50 ms from pg_stat_activity (`<lock>_writer_waits`, the most
frequent `wait_event_type:wait_event`, "running" when not waiting;
`<lock>_lock_wait_share`, the share of those samples waiting for a lock). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.sql import SQL, Composed, Identifier, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import as_role, connect
from pipeline.errors import StoreUnavailable
from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import stored_events
from pipeline.ops.watch import terminate_as_interrupt
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from pipeline.store.reader import EVENTS_TABLE, EventReader
from pipeline.store.recorder import order_lock

CHUNK = 250_000
TEMPLATES = 20


def _events(schema: str) -> Composed:
    return SQL("{}.{}").format(Identifier(schema), Identifier(EVENTS_TABLE))


# -- (a) the store ----------------------------------------------------------------------


def fill(settings: Settings, have: int, want: int) -> float:
    """Add rows until the table holds `want`; the fill's rate (rows/s)."""
    schema = settings.postgres_schema
    first_rows = SQL("SELECT topic, state FROM {} ORDER BY notification_id LIMIT %s").format(
        _events(schema)
    )
    with connect(settings) as conn:
        templates = conn.execute(first_rows, (TEMPLATES,)).fetchall()
    if len(templates) < TEMPLATES:  # the real store's rows, as the worker stores them
        store = EventStore(as_role(settings, "writer").eventsourcing_env())
        try:
            store.write(list(stored_events(TEMPLATES, seed=1)))
        finally:
            store.close()
        with connect(settings) as conn:
            templates = conn.execute(first_rows, (TEMPLATES,)).fetchall()
            have = EventReader(schema).head(conn)
    topics = [row[0] for row in templates]
    states = [row[1] for row in templates]
    insert = SQL(
        "INSERT INTO {} (originator_id, originator_version, topic, state) "
        "SELECT md5('bench-vacuum:' || g)::uuid, 1, (%s::text[])[1 + g %% {n}], "
        "(%s::bytea[])[1 + g %% {n}] FROM generate_series(%s, %s) g"
    ).format(_events(schema), n=SQL(str(TEMPLATES)))
    started = time.perf_counter()
    with connect(settings) as conn:
        for first in range(have + 1, want + 1, CHUNK):
            last = min(want, first + CHUNK - 1)
            conn.execute(insert, (topics, states, first, last))
            print(f"    {last:,} rows", flush=True)
    return (want - have) / max(time.perf_counter() - started, 1e-9)


def vacuum(settings: Settings, options: str, cost_delay_ms: float = 0.0) -> float:
    """`VACUUM (<options>)` of the event table, at the pace the cost delay sets (0: a
    manual VACUUM's full speed); its duration in seconds."""
    with connect(settings) as conn:
        conn.execute(SQL("SET vacuum_cost_delay = {}").format(Literal(f"{cost_delay_ms}ms")))
        started = time.perf_counter()
        conn.execute(SQL("VACUUM ({}) {}").format(SQL(options), _events(settings.postgres_schema)))
        return time.perf_counter() - started


def wait_for_autovacuum(settings: Settings) -> None:
    """Until no other vacuum of the event table runs (autovacuum after the fill)."""
    table = _events(settings.postgres_schema)
    with connect(settings) as conn:
        running = "SELECT 1 FROM pg_stat_progress_vacuum WHERE relid = %s::regclass"
        while conn.execute(running, (table.as_string(conn),)).fetchone():
            time.sleep(0.5)


# -- (b) the writers --------------------------------------------------------------------


def use_lock(settings: Settings, lock: str) -> None:
    """Make the insert function take `lock`: "advisory" (as migrate makes it), or "table"
    (that statement swapped for the EXCLUSIVE table lock of earlier releases)."""
    migrate(settings)
    if lock == "advisory":
        return
    schema = settings.postgres_schema
    with connect(settings) as conn:
        current = order_lock(schema, EVENTS_TABLE).as_string(conn)
        earlier = SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(_events(schema)).as_string(conn)
        row = conn.execute(
            "SELECT pg_get_functiondef(p.oid) FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = %s",
            (schema, f"{EVENTS_TABLE}_insert_new"),
        ).fetchone()
        assert row is not None and current in row[0], "the insert function has no order lock"
        conn.execute(row[0].replace(current, earlier))


@dataclass
class Batch:
    """One batch's schedule and outcome."""

    due: float
    done: float
    failures: int

    @property
    def latency(self) -> float:
        return self.done - self.due


@dataclass
class Writers:
    """Threads storing batches on a steady schedule until stopped."""

    settings: Settings
    count: int
    size: int
    interval_s: float
    seed: int
    batches: list[Batch] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Each writer opens its store, then all start on the same schedule."""
        stores = [
            EventStore(as_role(self.settings, "writer").eventsourcing_env())
            for _ in range(self.count)
        ]
        start = time.perf_counter() + 0.5
        for n, store in enumerate(stores):
            offset = n * self.interval_s / self.count  # spread over the interval
            thread = threading.Thread(target=self._run, args=(store, n, start + offset))
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop every writer after its current batch."""
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, store: EventStore, n: int, start: float) -> None:
        messages = iter(stored_events(10**12, seed=self.seed * 100 + n))
        try:
            for k in itertools.count():
                due = start + k * self.interval_s
                if self._stop.is_set():
                    return
                time.sleep(max(0.0, due - time.perf_counter()))
                batch = list(itertools.islice(messages, self.size))
                failures = 0
                while True:
                    try:
                        store.write(batch)
                        break
                    except StoreUnavailable:  # a lock wait past the lock timeout
                        failures += 1
                self.batches.append(Batch(due, time.perf_counter(), failures))
        finally:
            store.close()


class WaitSampler:
    """What the writers' sessions wait for, sampled every 50 ms while in use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def share(self, kind: str) -> float:
        """The share of the samples of a writer in a statement that waited for `kind`."""
        total = sum(self.seen.values())
        return sum(n for k, n in self.seen.items() if k.startswith(f"{kind}:")) / max(total, 1)

    def _run(self) -> None:
        query = (
            "SELECT coalesce(wait_event_type || ':' || wait_event, 'running') FROM "
            "pg_stat_activity WHERE usename = %s AND state = 'active'"
        )
        with connect(self.settings) as conn:
            while not self._stop.wait(0.05):
                rows = conn.execute(query, (self.settings.postgres_role("writer"),))
                self.seen.update(row[0] for row in rows)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def run(settings: Settings, lock: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Writers beside a vacuum, with the insert function taking `lock`."""
    use_lock(settings, lock)
    wait_for_autovacuum(settings)
    writers = Writers(settings, args.writers, args.batch, args.interval_ms / 1000, seed)
    writers.start()
    try:
        time.sleep(args.before_s)
        with WaitSampler(settings) as waits:
            began = time.perf_counter()
            took = vacuum(settings, args.vacuum, args.cost_delay_ms)
            ended = time.perf_counter()
        time.sleep(args.after_s)
    finally:
        writers.stop()
    before = [b.latency for b in writers.batches if b.done < began]
    during = sorted(b.latency for b in writers.batches if b.done >= began and b.due <= ended)
    out = {
        "vacuum_s": round(took, 2),
        "batches": len(writers.batches),
        "events": len(writers.batches) * args.batch,
        "before_p50_ms": _ms(statistics.median(before)),
        "before_max_ms": _ms(max(before)),
        "during_p50_ms": _ms(statistics.median(during)),
        "during_p99_ms": _ms(during[max(0, int(len(during) * 0.99) - 1)]),
        "pause_ms": _ms(max(during)),
        "lock_timeouts": sum(b.failures for b in writers.batches),
        "lock_wait_share": round(waits.share("Lock"), 3),
        "writer_waits": dict(waits.seen.most_common(6)),
    }
    print(
        f"    {lock} lock: VACUUM ({args.vacuum}) {out['vacuum_s']} s; batches before it "
        f"p50 {out['before_p50_ms']} ms, max {out['before_max_ms']} ms; during it "
        f"p50 {out['during_p50_ms']} ms, p99 {out['during_p99_ms']} ms, "
        f"max {out['pause_ms']} ms; lock timeouts {out['lock_timeouts']}; writers "
        f"waiting for a lock in {100 * out['lock_wait_share']:.0f}% of the samples "
        f"during it ({out['writer_waits']})",
        flush=True,
    )
    return {f"{lock}_{key}": value for key, value in out.items()}


# -- all of it --------------------------------------------------------------------------


def autovacuum(settings: Settings, on: bool) -> None:
    """Turn the event table's autovacuum on or off."""
    with connect(settings) as conn:
        conn.execute(
            SQL("ALTER TABLE {} SET (autovacuum_enabled = {})").format(
                _events(settings.postgres_schema), SQL("true" if on else "false")
            )
        )


def fresh(base: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """--fresh: each lock's run on a table of its own, filled with autovacuum off."""
    out: dict[str, Any] = {"fresh": True, "events": args.events}
    seed = time.time_ns() % 10**9
    for n, lock in enumerate(("table", "advisory")):
        settings = base.model_copy(update={"postgres_schema": f"{args.schema}_{lock}"})
        drop = SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(f"{args.schema}_{lock}"))
        with connect(settings) as conn:
            conn.execute(drop)
        migrate(settings)
        try:
            autovacuum(settings, on=False)
            rate = fill(settings, 0, args.events)
            autovacuum(settings, on=True)
            print(f"(a) {args.events:,} events, none frozen: filled at {rate:,.0f} rows/s")
            out.update(run(settings, lock, args, seed + n))
        finally:
            with connect(settings) as conn:
                conn.execute(drop)
    out["vacuum_options"] = args.vacuum
    out["vacuum_cost_delay_ms"] = args.cost_delay_ms
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    base = Settings()
    if args.fresh:
        print(f"PostgreSQL {base.postgres_host}/{base.postgres_dbname}, fresh tables")
        return fresh(base, args)
    settings = base.model_copy(update={"postgres_schema": args.schema})
    migrate(settings)
    print(f"PostgreSQL {base.postgres_host}/{base.postgres_dbname}, schema {args.schema}")
    out: dict[str, Any] = {}
    try:
        with connect(settings) as conn:
            have = EventReader(args.schema).head(conn)
        if args.reuse and have >= args.events:
            print(f"(a) reusing the {have:,} events stored")
        else:
            rate = fill(settings, have, args.events)
            print(f"(a) {args.events:,} events: filled at {rate:,.0f} rows/s")
        wait_for_autovacuum(settings)
        out["freeze_s"] = round(vacuum(settings, "FREEZE"), 2)
        with connect(settings) as conn:
            out["events"] = EventReader(args.schema).head(conn)
            size = conn.execute(
                "SELECT pg_total_relation_size(%s::regclass)",
                (_events(args.schema).as_string(conn),),
            ).fetchone()
        out["table_gib"] = round(size[0] / 2**30, 2) if size else None
        print(
            f"    VACUUM (FREEZE) with nothing else running: {out['freeze_s']} s "
            f"({out['events']:,} events, {out['table_gib']} GiB with indexes)"
        )
        print(
            f"(b) {args.writers} writers, a batch of {args.batch} each every "
            f"{args.interval_ms} ms, VACUUM ({args.vacuum}) after {args.before_s} s "
            f"(vacuum_cost_delay {args.cost_delay_ms} ms):",
            flush=True,
        )
        seed = time.time_ns() % 10**9  # fresh message ids on every run of a reused store
        for n, lock in enumerate(("table", "advisory")):
            out.update(run(settings, lock, args, seed + n))
        out["vacuum_options"] = args.vacuum
        out["vacuum_cost_delay_ms"] = args.cost_delay_ms
    finally:
        migrate(settings)  # the insert function as it is, whatever happened
        if not args.reuse:
            with connect(settings) as conn:
                conn.execute(SQL("DROP SCHEMA {} CASCADE").format(Identifier(args.schema)))
    return out


if __name__ == "__main__":
    terminate_as_interrupt()  # a `kill` still drops what this run made
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--schema", default="bench_vacuum")
    parser.add_argument("--reuse", action="store_true", help="keep the schema (and reuse it)")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100, help="messages per batch")
    parser.add_argument("--interval-ms", type=int, default=100, help="between a writer's batches")
    parser.add_argument("--before-s", type=float, default=10.0)
    parser.add_argument("--after-s", type=float, default=3.0)
    parser.add_argument("--vacuum", default="FREEZE, DISABLE_PAGE_SKIPPING")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="each lock on a table of its own, filled with autovacuum off (use --vacuum FREEZE)",
    )
    parser.add_argument(
        "--cost-delay-ms",
        type=float,
        default=2.0,
        help="vacuum_cost_delay of the vacuum in (b): 2 is autovacuum's pace, 0 full speed",
    )
    print(json.dumps(main(parser.parse_args())))
