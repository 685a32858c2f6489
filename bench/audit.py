"""Benchmark: the audit trail on a store of a million events, and beside the event path.

    python bench/audit.py [--events 1000000] [--schema bench_audit] [--reuse]
                          [--proofs 1000] [--signatures 1000]
                          [--messages 100000] [--processes 2] [--rounds 3]
                          [--nats embedded] [--no-events-ratio]

Uses the PostgreSQL named by the usual PIPELINE_POSTGRES_* settings, in a schema of its
own (dropped afterwards unless --reuse is given, which also reuses a schema that already
holds enough events; its audit log is emptied first, under the logged break-glass
setting). The log's keys are the deployed kinds: an Ed25519 key made in a throw-away
SoftHSM2 token (a temporary directory, SOFTHSM2_CONF pointed at it, as tests/softhsm.py
does) and an ML-DSA-65 key file. It prints:
  (a) the store: events written (the four domains, as the worker stores them), and a
      bare read of every stored row in position order, in pages of 5,000, as the auditor
      role (`store_rows_read_per_s`): the ceiling of any follower;
  (b) the follower catching up from an empty log: `AuditLog.step` in a loop, checkpoint
      when due (every 10,000 leaves, signed by both keys), as `pipeline run audit` does
      it, as the auditor role (`log_events_per_s`: leaves appended per second;
      `log_ratio_to_read`: over the bare read);
  (c) checkpoint signing: the HSM's Ed25519 key through PKCS#11 (`sign_hsm_ms`), the
      ML-DSA-65 key file (`sign_mldsa_ms`), and the whole signed note with both
      (`sign_checkpoint_ms`); p50, and p99 under the same name with `_p99`;
  (d) proofs: `trail.prove` (what `pipeline audit prove` runs) for --proofs random
      events against the latest checkpoint, on one connection (`prove_ms_p50`,
      `prove_ms_p99`), once the tables are analysed, as autovacuum does;
  (e) verification: the trail exported (`trail.export`, `export_events_per_s`), then
      `pipeline audit verify --from DIR`'s work: `verify.check` over `trail.exported(DIR)`
      (`verify_events_per_s`: events checked per second); and the live check over the
      database in one snapshot (`verify_live_events_per_s`);
  (f) the event path with and without the audit log: bench/events.py's pipeline rate
      (--processes `pipeline run worker` processes storing a backlog of --messages from
      NATS, in a fresh schema each run), alternately without and with a `pipeline run
      audit` process following that schema (as the auditor role, both keys), --rounds
      times each in the order without, with, with, without, ... (drift cancels out).
      `events_ratio_with_audit` is the median rate with it over the median without.
      The follower must keep up: `audit_behind_at_end` is how many stored events it had
      not logged when the workers' last event was stored (the worst run, sampled every
      25 ms), `audit_catch_up_s` how long it then took to log them all. What following
      costs: `audit_cpu_ms_per_1k_events`, the CPU time of the follower's process and
      of its database sessions per 1,000 events stored (median of the runs; read from
      /proc, so PostgreSQL on this machine), `audit_process_cpu_ms_per_1k_events` the
      follower's process alone (the rest is its database sessions: reading and hashing
      the events, inserting the leaves), and `audit_cpu_share` that time over all the
      machine's CPU time while the workers ran.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import as_role, bench_module, connect, percentiles_ms
from pipeline.audit import trail
from pipeline.audit.keys import MldsaSigner, generate_hsm_key
from pipeline.audit.log import AuditLog, Logged
from pipeline.audit.note import Checkpoint, Signer, Verifier, sign_note
from pipeline.audit.service import KeyRing
from pipeline.audit.tables import BREAK_GLASS, AuditTables
from pipeline.audit.verify import Report, check
from pipeline.metrics import AuditMetrics
from pipeline.ops.migrate import migrate
from pipeline.ops.watch import Child, Watch, terminate_as_interrupt
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from pipeline.store.reader import EventReader
from tests.softhsm import softhsm

_SAMPLE_S = 0.025
"""How often (f) samples the store's head and the log's size."""


# -- keys ------------------------------------------------------------------------------


@contextlib.contextmanager
def audit_keys(settings: Settings) -> Iterator[Settings]:
    """`settings` with the log's two keys: Ed25519 in a throw-away SoftHSM2 token, and an
    ML-DSA-65 key file; both removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp, softhsm(Path(tmp)) as hsm:
        token = hsm.token("bench-audit")
        label = "bench-audit-ed25519"
        generate_hsm_key(module=token.module, token=token.label, pin=token.pin, key_label=label)
        key_file = Path(tmp) / "mldsa.key"
        MldsaSigner.generate(str(key_file))
        yield settings.model_copy(
            update={
                "audit_hsm_module": token.module,
                "audit_hsm_token": token.label,
                "audit_hsm_pin": token.pin,
                "audit_hsm_key_label": label,
                "audit_mldsa_key_file": str(key_file),
            }
        )


def _verifiers(signers: Sequence[Signer]) -> list[Verifier]:
    return [Verifier(s.name, s.key_id, s.sig_type, s.public_key) for s in signers]


# -- (a) and (b): the store and the follower --------------------------------------------


def empty_log(settings: Settings) -> None:
    """Empty the schema's audit tables when they hold anything (a reused store), as the
    owner, under the break-glass setting (which records it)."""
    tables = AuditTables(settings.postgres_schema)
    with connect(settings) as conn, conn.transaction():
        held = conn.execute(
            SQL("SELECT EXISTS (SELECT FROM {}) OR EXISTS (SELECT FROM {})").format(
                tables.leaves, tables.checkpoints
            )
        ).fetchone()
        if not (held and held[0]):
            return
        conn.execute(SQL("SET LOCAL {} = 'on'").format(SQL(BREAK_GLASS)))
        conn.execute(
            SQL("TRUNCATE {}, {}, {}").format(
                tables.cosignatures, tables.checkpoints, tables.leaves
            )
        )


def analyze(settings: Settings) -> None:
    """Planner statistics of the event and audit tables, as autovacuum keeps them in a
    deployed database (a test server may run without it: then the proofs' join is
    planned blind, as a scan of the whole log)."""
    tables = AuditTables(settings.postgres_schema)
    with connect(settings) as conn:
        for table in (tables.events, tables.leaves, tables.checkpoints):
            conn.execute(SQL("ANALYZE {}").format(table))


def audit_log(settings: Settings, keys: KeyRing) -> AuditLog:
    """The follower as `pipeline run audit` makes it (pipeline/audit/service.py)."""
    return AuditLog(
        settings.postgres_schema,
        origin=settings.audit_log_origin(),
        signers=keys,
        checkpoint_every=settings.audit_checkpoint_every,
        checkpoint_interval_s=settings.audit_checkpoint_interval_s,
        batch_size=settings.audit_batch_size,
        poll_s=settings.projections_poll_s,
        metrics=AuditMetrics(),
    )


def follow(settings: Settings, keys: KeyRing) -> tuple[Logged, float]:
    """Catch the empty log up with the store, as `AuditLog.run`'s loop does; where the log
    stands and its rate (leaves/s). Then a checkpoint of the whole log, off the clock."""
    log = audit_log(settings, keys)
    with connect(settings) as conn:
        log.load(conn)
        started = time.perf_counter()
        while True:
            appended = log.step(conn)
            if log.due() and log.checkpoint(conn) is None:
                raise SystemExit("a checkpoint could not be signed (see the log above)")
            if not appended:
                break
        rate = log.size / (time.perf_counter() - started)
        log.checkpoint_interval_s = 0  # the rest is due now
        if log.due() and log.checkpoint(conn) is None:
            raise SystemExit("the last checkpoint could not be signed (see the log above)")
        return log.load(conn), rate


# -- (c) signing ------------------------------------------------------------------------


def signing_times(
    signers: Sequence[Signer], origin: str, root: bytes, count: int
) -> dict[str, list[float]]:
    """Seconds per signature of a checkpoint body: each key alone, and the whole note."""
    bodies = [Checkpoint(origin, size, root).body() for size in range(1, count + 1)]
    hsm, mldsa = signers
    times: dict[str, list[float]] = {"hsm": [], "mldsa": [], "checkpoint": []}
    for body in bodies[:20]:  # warm up: sessions, caches
        sign_note(body, signers)
    for name, sign in (
        ("hsm", hsm.sign),
        ("mldsa", mldsa.sign),
        ("checkpoint", lambda body: sign_note(body, signers)),
    ):
        for body in bodies:
            started = time.perf_counter()
            sign(body)
            times[name].append(time.perf_counter() - started)
    return times


# -- (d) proofs -------------------------------------------------------------------------


def prove_times(settings: Settings, size: int, count: int) -> list[float]:
    """Seconds per `trail.prove` of `count` random logged events, on one connection."""
    tables = AuditTables(settings.postgres_schema)
    with connect(settings) as conn:
        # The log holds the store's events in order: its first `size` leaves are the first
        # `size` events.
        conn.execute("SELECT setseed(0.5)")
        found = conn.execute(
            SQL(
                "SELECT originator_id FROM (SELECT originator_id FROM {} "
                "ORDER BY notification_id LIMIT %s) e ORDER BY random() LIMIT %s"
            ).format(tables.events),
            (size, count),
        ).fetchall()
        events = [row[0] for row in found]
        times = []
        for event in events:
            started = time.perf_counter()
            trail.prove(conn, tables, event)
            times.append(time.perf_counter() - started)
    return times


# -- (e) verification -------------------------------------------------------------------


def verify_export(
    settings: Settings, keys: Sequence[Verifier], directory: Path
) -> tuple[Report, float, float]:
    """Export the trail, then check the export as `pipeline audit verify --from DIR`
    does; the report, the export's rate and the check's (events/s)."""
    tables = AuditTables(settings.postgres_schema)
    with connect(settings) as conn:
        started = time.perf_counter()
        manifest = trail.export(
            conn, tables, directory, origin=settings.audit_log_origin(), keys=[]
        )
        exported = manifest["events"] / (time.perf_counter() - started)
    started = time.perf_counter()
    sources, manifest = trail.exported(directory)
    report = check(
        sources.events, sources.rows, sources.checkpoints, keys, origin=manifest["origin"]
    )
    return report, exported, report.events / (time.perf_counter() - started)


def verify_live(settings: Settings, keys: Sequence[Verifier]) -> tuple[Report, float]:
    """Check the live trail in one snapshot, as `pipeline audit verify` does; events/s."""
    started = time.perf_counter()
    with connect(settings) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        sources = trail.live(conn, AuditTables(settings.postgres_schema))
        report = check(
            sources.events,
            sources.rows,
            sources.checkpoints,
            keys,
            origin=settings.audit_log_origin(),
        )
    return report, report.events / (time.perf_counter() - started)


# -- (f) the event path beside the follower --------------------------------------------


class Beside:
    """What runs beside bench/events.py's workers on their schema: a sampler of the
    store's head and the log's size, and (when `audit`) a `pipeline run audit` process.

    The sampler runs either way, so both kinds of run carry the same load but the
    follower's. After the workers stop, the follower's lag is read off the samples, and
    the CPU time it took (its process and its database sessions) off /proc. The follower
    is in `watch` while it runs: the run's waits end as soon as it exits.
    """

    def __init__(
        self, keyed: Settings, audit: bool, log: Path, env: Callable[..., Any], watch: Watch
    ) -> None:
        self.keyed, self.audit, self.log, self.env = keyed, audit, log, env
        self.watch = watch
        self.behind = 0
        self.catch_up_s = 0.0
        self.stored = 0
        self.cpu_s: float | None = None
        self.process_cpu_s: float | None = None
        self.cpu_share: float | None = None
        self.busy: float | None = None

    @contextlib.contextmanager
    def __call__(self, settings: Settings) -> Iterator[None]:
        tables = AuditTables(settings.postgres_schema)
        name = f"bench-audit-{settings.postgres_schema}"
        process = self._start(settings, name) if self.audit else None
        samples: list[tuple[float, int, int]] = []
        stop = threading.Event()
        query = SQL(
            "SELECT (SELECT coalesce(max(notification_id), 0) FROM {}), "
            "(SELECT coalesce((SELECT idx + octet_length(positions) / 8 FROM {} "
            "ORDER BY idx DESC LIMIT 1), 0))"
        ).format(tables.events, tables.leaves)

        def sample(conn: psycopg.Connection[Any]) -> tuple[float, int, int]:
            head, size = conn.execute(query).fetchone() or (0, 0)
            samples.append((time.perf_counter(), head, size))
            return samples[-1]

        def run() -> None:
            with connect(settings) as conn:
                while not stop.wait(_SAMPLE_S):
                    sample(conn)

        sampler = threading.Thread(target=run, daemon=True)
        sampler.start()
        pids = self._pids(settings, process, name)
        cpu, machine = _cpu_seconds(pids), _machine_seconds()
        own = _cpu_seconds(pids[:1])
        try:
            yield
            stop.set()
            sampler.join(10)
            if process is not None:
                self._lag(settings, samples, sample)
            used, now = _cpu_seconds(pids), _machine_seconds()
            if machine and now:
                self.busy = 1 - (now[1] - machine[1]) / (now[0] - machine[0])
                if cpu is not None and used is not None:
                    self.cpu_s = used - cpu
                    ended = _cpu_seconds(pids[:1])
                    if own is not None and ended is not None:
                        self.process_cpu_s = ended - own
                    self.cpu_share = self.cpu_s / (now[0] - machine[0])
        finally:
            stop.set()
            if process is not None:
                self.watch.stop(process)

    def _start(self, settings: Settings, name: str) -> Child:
        """`pipeline run audit` on the run's schema, as the auditor; once it keeps the log.

        Its database sessions are named `name` (libpq's PGAPPNAME), to find them.
        """
        k = self.keyed
        env = {
            **self.env(settings),
            "PIPELINE_POSTGRES_USER": settings.postgres_role("auditor"),
            "PIPELINE_AUDIT_HSM_MODULE": k.audit_hsm_module,
            "PIPELINE_AUDIT_HSM_TOKEN": k.audit_hsm_token,
            "PIPELINE_AUDIT_HSM_KEY_LABEL": k.audit_hsm_key_label,
            "PIPELINE_AUDIT_HSM_PIN": k.audit_hsm_pin,
            "PIPELINE_AUDIT_MLDSA_KEY_FILE": k.audit_mldsa_key_file,
            "PIPELINE_AUDIT_METRICS_PORT": "0",
            "PGAPPNAME": name,
        }
        process = self.watch.start(
            "`pipeline run audit`",
            [sys.executable, "-m", "pipeline", "run", "audit"],
            env=env,
            log=self.log,
        )
        # The follower holds its advisory lock (AuditLog.run) once it keeps the log.
        held = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objsubid = 1 AND classid = ((hashtext(%(key)s)::bigint >> 32) & 4294967295)::oid "
            "AND objid = (hashtext(%(key)s)::bigint & 4294967295)::oid"
        )
        key = f"audit:{settings.postgres_schema}"
        try:
            with connect(settings) as conn:
                self.watch.wait_until(
                    lambda: bool((row := conn.execute(held, {"key": key}).fetchone()) and row[0]),
                    timeout_s=60,
                    waiting_for=f"`pipeline run audit` kept no log in 60 s; see {self.log}",
                )
        except BaseException:
            self.watch.stop(process, timeout_s=5)
            raise
        time.sleep(0.5)  # settled in before the workers start
        return process

    @staticmethod
    def _pids(settings: Settings, process: Child | None, name: str) -> list[int]:
        """The follower's process and its database sessions' server processes."""
        if process is None:
            return []
        with connect(settings) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
            ).fetchall()
        return [process.pid, *(row[0] for row in rows)]

    def _lag(
        self,
        settings: Settings,
        samples: list[tuple[float, int, int]],
        sample: Callable[[psycopg.Connection[Any]], tuple[float, int, int]],
    ) -> None:
        """How far behind the follower was when the last event was stored, and how long it
        took to log the rest."""
        table = AuditTables(settings.postgres_schema).events
        with connect(settings) as conn:
            head, stored = conn.execute(
                SQL("SELECT max(notification_id), count(*) FROM {}").format(table)
            ).fetchone() or (0, 0)
            self.stored = stored
            ended, _, size = next((s for s in samples if s[1] >= head), None) or sample(conn)
            self.behind = stored - size

            def caught_up() -> bool:
                nonlocal size
                if size >= stored:
                    return True
                at, _, size = sample(conn)
                self.catch_up_s = at - ended
                return size >= stored

            self.watch.wait_until(
                caught_up,
                timeout_s=300,
                waiting_for=lambda: f"the follower logged {size} of {stored} events in 300 s",
                interval_s=_SAMPLE_S,
            )


def _cpu_seconds(pids: Sequence[int]) -> float | None:
    """User and system CPU seconds of these processes so far (None: not all readable)."""
    ticks = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK") if pids else None


def _machine_seconds() -> tuple[float, float] | None:
    """CPU seconds of the whole machine so far, every core: all of them, and idle."""
    try:
        fields = [int(f) for f in Path("/proc/stat").read_text().split(maxsplit=11)[1:9]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return sum(fields) / tick, (fields[3] + fields[4]) / tick  # idle and iowait


def events_ratio(
    keyed: Settings, nats: str, processes: int, messages: int, rounds: int
) -> dict[str, Any]:
    """bench/events.py's pipeline rate without and with the follower, alternately."""
    events = bench_module("events")
    watch = Watch()
    base, server = events.bench_settings(nats, watch)
    log = Path(tempfile.mkdtemp(prefix="bench-audit-")) / "processes.log"
    rates: dict[bool, list[float]] = {False: [], True: []}
    behind, catch_up, cpu, share, own = [], [], [], [], []
    try:
        for n in range(rounds):
            for audit in (False, True) if n % 2 == 0 else (True, False):
                beside = Beside(keyed, audit, log, events.worker_env, watch)
                rate, _, _ = events.pipeline_rate(
                    base, processes, messages, log, watch, beside=beside
                )
                rates[audit].append(rate)
                line = f"    {'with' if audit else 'without'} the audit log: {rate:>8,.0f} events/s"
                if beside.busy is not None:
                    line += f" (CPU {beside.busy:.0%} busy)"
                if audit:
                    behind.append(beside.behind)
                    catch_up.append(beside.catch_up_s)
                    line += (
                        f"; the follower was {beside.behind:,} events behind at the end, "
                        f"caught up in {beside.catch_up_s:.2f} s"
                    )
                    if beside.cpu_s is not None and beside.cpu_share is not None:
                        cpu.append(1e6 * beside.cpu_s / beside.stored)
                        share.append(beside.cpu_share)
                        line += f", used {cpu[-1]:.1f} ms CPU per 1k events ({share[-1]:.1%})"
                        if beside.process_cpu_s is not None:
                            own.append(1e6 * beside.process_cpu_s / beside.stored)
                            line += f" of which its process {own[-1]:.1f}"
                print(line, flush=True)
    finally:
        if server is not None:
            server.stop()
    without, with_audit = statistics.median(rates[False]), statistics.median(rates[True])
    return {
        "events_ratio_with_audit": round(with_audit / without, 3),
        "events_per_s_without_audit": round(without),
        "events_per_s_with_audit": round(with_audit),
        "events_runs_without_audit": [round(r) for r in rates[False]],
        "events_runs_with_audit": [round(r) for r in rates[True]],
        "events_messages": messages,
        "events_processes": processes,
        "audit_behind_at_end": max(behind),
        "audit_catch_up_s": round(max(catch_up), 2),
        "audit_cpu_ms_per_1k_events": round(statistics.median(cpu), 1) if cpu else None,
        "audit_cpu_share": round(statistics.median(share), 3) if share else None,
        "audit_process_cpu_ms_per_1k_events": round(statistics.median(own), 1) if own else None,
    }


# -- all of it --------------------------------------------------------------------------


def trail_figures(settings: Settings, keyed: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """(a) to (e): the store, the follower, signing, proofs and verification."""
    projections = bench_module("projections")
    with connect(settings) as conn:
        have = EventReader(args.schema).head(conn)
    if args.reuse and have >= args.events:
        print(f"(a) reusing the {have:,} events stored")
    else:
        store = EventStore(as_role(settings, "writer").eventsourcing_env())
        try:
            write_rate = projections.fill(settings, store, args.events)
        finally:
            store.close()
        print(f"(a) {args.events:,} events written: {write_rate:>9,.0f} events/s")
    empty_log(settings)  # the follower starts from an empty log
    rows, read_rate = projections.bare_read(keyed)
    print(f"    bare read of {rows:,} stored rows:  {read_rate:>9,.0f} rows/s")

    keys = KeyRing(keyed)
    try:
        logged, log_rate = follow(keyed, keys)
        print(
            f"(b) follower, from an empty log: {logged.size:,} leaves, {log_rate:>9,.0f} "
            f"leaves/s (ratio to the bare read {log_rate / read_rate:.2f})"
        )
        signers = keys()
        times = signing_times(signers, keyed.audit_log_origin(), logged.root, args.signatures)
        verifiers = _verifiers(signers)
    finally:
        keys.close()
    signing = {name: percentiles_ms(t) for name, t in times.items()}
    print(
        f"(c) signing a checkpoint ({args.signatures} times each): HSM Ed25519 "
        f"p50 {signing['hsm'][0]:.2f} ms, p99 {signing['hsm'][1]:.2f} ms; ML-DSA-65 "
        f"p50 {signing['mldsa'][0]:.2f} ms, p99 {signing['mldsa'][1]:.2f} ms; the "
        f"signed note (both) p50 {signing['checkpoint'][0]:.2f} ms, "
        f"p99 {signing['checkpoint'][1]:.2f} ms"
    )

    analyze(settings)
    prove50, prove99 = percentiles_ms(prove_times(keyed, logged.size, args.proofs))
    print(
        f"(d) proofs of {min(args.proofs, logged.size)} random events against the checkpoint "
        f"of {logged.size:,} leaves: p50 {prove50:.2f} ms, p99 {prove99:.2f} ms"
    )

    directory = Path(tempfile.mkdtemp(prefix="bench-audit-export-"))
    try:
        report, export_rate, verify_rate = verify_export(keyed, verifiers, directory / "export")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    live_report, live_rate = verify_live(keyed, verifiers)
    for where, found in (("the export", report), ("the live trail", live_report)):
        if not found.ok:
            raise SystemExit(f"{where} does not verify:\n{found.summary()}")
    print(
        f"(e) export: {export_rate:>9,.0f} events/s; verify --from the export: "
        f"{verify_rate:>9,.0f} events/s; verify live: {live_rate:>9,.0f} events/s "
        f"({report.summary()})"
    )
    return {
        "events": rows,
        "store_rows_read_per_s": round(read_rate),
        "log_events_per_s": round(log_rate),
        "log_ratio_to_read": round(log_rate / read_rate, 3),
        "sign_hsm_ms": round(signing["hsm"][0], 3),
        "sign_hsm_ms_p99": round(signing["hsm"][1], 3),
        "sign_mldsa_ms": round(signing["mldsa"][0], 3),
        "sign_mldsa_ms_p99": round(signing["mldsa"][1], 3),
        "sign_checkpoint_ms": round(signing["checkpoint"][0], 3),
        "sign_checkpoint_ms_p99": round(signing["checkpoint"][1], 3),
        "prove_ms_p50": round(prove50, 3),
        "prove_ms_p99": round(prove99, 3),
        "export_events_per_s": round(export_rate),
        "verify_events_per_s": round(verify_rate),
        "verify_live_events_per_s": round(live_rate),
        "checkpoints": report.checkpoints,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    base = Settings()
    settings = base.model_copy(update={"postgres_schema": args.schema})
    migrate(settings)  # the schema, tables and roles; each part below runs as its role
    print(f"PostgreSQL {base.postgres_host}/{base.postgres_dbname}, schema {args.schema}")
    try:
        with audit_keys(as_role(settings, "auditor")) as keyed:
            out = trail_figures(settings, keyed, args)
            if args.events_ratio:
                print(
                    f"(f) bench/events.py's pipeline ({args.processes} worker processes, "
                    f"{args.messages:,} messages a run), without and with `pipeline run audit`:",
                    flush=True,
                )
                out.update(
                    events_ratio(keyed, args.nats, args.processes, args.messages, args.rounds)
                )
                print(
                    "    ratio of the medians (with / without): "
                    f"{out['events_ratio_with_audit']:.3f}"
                )
    finally:
        if not args.reuse:
            with connect(settings) as conn:
                conn.execute(SQL("DROP SCHEMA {} CASCADE").format(Identifier(args.schema)))
    return out


if __name__ == "__main__":
    terminate_as_interrupt()  # a `kill` stops the processes this run started
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--schema", default="bench_audit")
    parser.add_argument("--reuse", action="store_true", help="keep the schema (and reuse it)")
    parser.add_argument("--proofs", type=int, default=1000)
    parser.add_argument("--signatures", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100_000, help="per run of (f)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes in (f)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of (f) with, and without")
    parser.add_argument("--nats", choices=["settings", "embedded"], default="settings")
    parser.add_argument("--no-events-ratio", dest="events_ratio", action="store_false")
    print(json.dumps(main(parser.parse_args())))
