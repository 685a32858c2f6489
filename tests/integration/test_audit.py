"""The audit trail against the real PostgreSQL: the log, checkpoints, proofs, tampering."""

from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.audit import merkle
from pipeline.audit.keys import MldsaSigner, SigningUnavailable
from pipeline.audit.log import AuditLog, leaf_data, runs
from pipeline.audit.note import Checkpoint, Ed25519Signer, Signer, Verifier, open_note
from pipeline.audit.tables import AuditTables
from pipeline.audit.trail import consistency, exported, live, prove
from pipeline.audit.verify import check
from pipeline.metrics import AuditMetrics
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore

from ..conftest import PG_DB, PG_HOST, as_role, make_settings
from .helpers import write_events

ORIGIN = "test.example/audit"


@pytest.fixture
def settings(pg_schema: str) -> Settings:
    """The audit log's settings: as the auditor role."""
    return as_role(
        make_settings("nats://unused", pg_schema, audit_origin=ORIGIN, projections_poll_s=0.2),
        "auditor",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


@pytest.fixture
def signers(tmp_path: Path) -> list[Signer]:
    """Software keys standing in for the HSM's (the HSM is tested in test_hsm.py)."""
    mldsa_file = tmp_path / "mldsa.key"
    MldsaSigner.generate(str(mldsa_file))
    return [
        Ed25519Signer.generate(ORIGIN),
        MldsaSigner(name=f"{ORIGIN}/ml-dsa-65", path=str(mldsa_file)),
    ]


def _keys(signers: Sequence[Signer]) -> list[Verifier]:
    return [Verifier(s.name, s.key_id, s.sig_type, s.public_key) for s in signers]


def _until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll `check` until it is true, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(**settings.postgres_connection(), autocommit=True)


def _owner() -> psycopg.Connection[Any]:
    return psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True)


def _audit_log(settings: Settings, signers: Sequence[Signer], **options: Any) -> AuditLog:
    values: dict[str, Any] = {"checkpoint_every": 500, "checkpoint_interval_s": 60.0}
    values.update(options)
    return AuditLog(
        settings.postgres_schema,
        origin=ORIGIN,
        signers=lambda: signers,
        metrics=AuditMetrics(),
        **values,
    )


def _follow(log: AuditLog, conn: psycopg.Connection[Any]) -> None:
    """Log every stored event, checkpointing as due, then checkpoint the rest."""
    while log.step(conn) or log.due():
        if log.due():
            assert log.checkpoint(conn) is not None
    if log.size and log.load(conn).checkpoint_size < log.size:
        log.checkpoint_interval_s = 0
        assert log.checkpoint(conn) is not None


def _verify(settings: Settings, signers: Sequence[Signer]) -> Any:
    with _connect(settings) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        s = live(conn, AuditTables(settings.postgres_schema))
        return check(s.events, s.rows, s.checkpoints, _keys(signers), origin=ORIGIN)


def test_every_stored_event_is_a_leaf_in_store_order_and_the_checkpoints_verify(
    settings: Settings, store: EventStore, signers: list[Signer]
) -> None:
    write_events(store, 1234, seed=1)
    log = _audit_log(settings, signers)
    with _connect(settings) as conn:
        _follow(log, conn)
        events = conn.execute(
            f"SELECT notification_id, originator_id, originator_version, topic, state "
            f'FROM "{settings.postgres_schema}".journal_events ORDER BY notification_id'
        ).fetchall()
        logged = _leaves(settings)
        checkpoints = conn.execute(
            f'SELECT size, note FROM "{settings.postgres_schema}".audit_checkpoints ORDER BY size'
        ).fetchall()
    assert [idx for idx, _, _ in logged] == list(range(1234))
    assert [position for _, position, _ in logged] == [e[0] for e in events]
    for (_, ident, version, topic, state), (_, _, hashes) in zip(events, logged, strict=True):
        assert hashes[:32] == merkle.leaf_hash(leaf_data(ident, version, topic, bytes(state)))
    assert [size for size, _ in checkpoints] == [500, 1000, 1234]
    _, root = merkle.root_of(hashes[:32] for _, _, hashes in logged)
    text, _ = open_note(
        bytes(checkpoints[-1][1]), _keys(signers), require=[s.name for s in signers]
    )
    assert Checkpoint.parse(text) == Checkpoint(ORIGIN, 1234, root)
    report = _verify(settings, signers)
    assert report.ok, report.summary()
    assert (report.events, report.leaves, report.checkpoints, report.latest) == (
        1234,
        1234,
        3,
        1234,
    )


def test_proofs_verify_against_the_signed_checkpoints(
    settings: Settings, store: EventStore, signers: list[Signer]
) -> None:
    write_events(store, 700, seed=2)
    log = _audit_log(settings, signers)
    tables = AuditTables(settings.postgres_schema)
    with _connect(settings) as conn:
        _follow(log, conn)
        ids = [
            r[0]
            for r in conn.execute(
                f'SELECT originator_id FROM "{settings.postgres_schema}".journal_events'
            ).fetchall()
        ]
        for event in random.Random(3).sample(ids, 50):
            proof = prove(conn, tables, event)
            text, _ = open_note(proof["checkpoint"].encode(), _keys(signers), require=[ORIGIN])
            checkpoint = Checkpoint.parse(text)
            assert (checkpoint.size, base64.b64decode(proof["root"])) == (700, checkpoint.root)
            merkle.verify_inclusion(
                proof["leaf_index"],
                proof["tree_size"],
                base64.b64decode(proof["leaf_hash"]),
                [base64.b64decode(h) for h in proof["proof"]],
                checkpoint.root,
            )
        roots = {}
        for size, note in conn.execute(
            f'SELECT size, note FROM "{settings.postgres_schema}".audit_checkpoints'
        ).fetchall():
            roots[size] = Checkpoint.parse(open_note(bytes(note), _keys(signers))[0]).root
        proof = consistency(conn, tables, 500, 700)
        assert base64.b64decode(proof["old_root"]) == roots[500]
        assert base64.b64decode(proof["new_root"]) == roots[700]
        merkle.verify_consistency(
            500, 700, roots[500], roots[700], [base64.b64decode(h) for h in proof["proof"]]
        )
        with pytest.raises(LookupError, match="no stored event"):
            prove(conn, tables, uuid.uuid4())


def test_a_checkpoint_comes_after_the_interval_and_none_while_a_key_cannot_sign(
    settings: Settings, store: EventStore, signers: list[Signer]
) -> None:
    """Fail closed: a key that cannot sign stops checkpoints, never the log."""
    broken = threading.Event()
    broken.set()

    def keys() -> Sequence[Signer]:
        if broken.is_set():
            raise SigningUnavailable("the HSM does not answer (test)")
        return signers

    metrics = AuditMetrics()
    log = AuditLog(
        settings.postgres_schema,
        origin=ORIGIN,
        signers=keys,
        checkpoint_every=10_000,
        checkpoint_interval_s=0.3,
        poll_s=0.1,
        metrics=metrics,
    )
    stop = threading.Event()
    thread = threading.Thread(target=log.run, args=(lambda: _connect(settings), stop), daemon=True)
    thread.start()
    try:
        write_events(store, 300, seed=4)
        _until(lambda: log.size == 300, timeout_s=20)
        time.sleep(1.0)
        write_events(store, 100, seed=5)
        _until(lambda: log.size == 400, timeout_s=20)
        assert _count(settings, "audit_checkpoints") == 0
        _until(lambda: metrics.signing_failures._value.get() >= 2)  # asked again
        assert metrics.checkpoint_age._value.get() >= 1.0
        broken.clear()
        _until(lambda: _count(settings, "audit_checkpoints") >= 1, timeout_s=20)
        _until(lambda: metrics.checkpoint_age._value.get() == 0, timeout_s=20)
    finally:
        stop.set()
        log.wake.set()
        thread.join(10)
    report = _verify(settings, signers)
    assert report.ok and report.latest == 400, report.summary()


def _leaves(settings: Settings) -> list[tuple[int, int, bytes]]:
    """Every stored leaf as (index, position, stored hashes), from the log's runs."""
    with _owner() as conn:
        stored = conn.execute(
            f'SELECT idx, positions, hashes FROM "{settings.postgres_schema}".audit_leaves '
            "ORDER BY idx"
        ).fetchall()
    return [leaf for idx, p, h in stored for leaf in runs(idx, bytes(p), bytes(h))]


def _logged(settings: Settings) -> int:
    """How many leaves the log holds."""
    with _owner() as conn:
        row = conn.execute(
            "SELECT coalesce(sum(octet_length(positions) / 8), 0) "
            f'FROM "{settings.postgres_schema}".audit_leaves'
        ).fetchone()
    return int(row[0]) if row else 0


def _count(settings: Settings, table: str) -> int:
    with _owner() as conn:
        row = conn.execute(f'SELECT count(*) FROM "{settings.postgres_schema}".{table}').fetchone()
    return int(row[0]) if row else 0


def test_a_follower_killed_mid_batch_resumes_and_logs_each_event_once(
    settings: Settings, store: EventStore
) -> None:
    write_events(store, 20_000, seed=6, chunk=2000)
    env = {
        **os.environ,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema,
        "PIPELINE_POSTGRES_USER": settings.postgres_user,
        "PIPELINE_AUDIT_BATCH_SIZE": "50",
        "PIPELINE_AUDIT_METRICS_PORT": "0",
    }
    killed_midway = 0
    for _ in range(3):
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "audit"], env=env)
        try:
            before = _logged(settings)
            _until(lambda b=before: _logged(settings) > b, timeout_s=60)
            time.sleep(random.uniform(0, 0.2))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        if _logged(settings) == 20_000:
            break
        killed_midway += 1
    assert killed_midway >= 1
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "audit"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _until(lambda: _logged(settings) == 20_000, timeout_s=120)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    logged = _leaves(settings)
    assert [idx for idx, _, _ in logged] == list(range(20_000))
    assert len({position for _, position, _ in logged}) == 20_000
    log = _audit_log(settings, [])
    with _connect(settings) as conn:
        root = log.load(conn).root
    assert root == merkle.root_of(hashes[:32] for _, _, hashes in logged)[1]


_STATEMENTS = ("UPDATE {t} SET {c} = {c}", "DELETE FROM {t}", "TRUNCATE {t} CASCADE")
_TABLES = {
    "journal_events": "topic",
    "audit_leaves": "idx",
    "audit_checkpoints": "size",
    "audit_cosignatures": "size",
    "audit_break_glass": "operation",
}


@pytest.mark.parametrize("kind", ["writer", "projector", "api", "auditor", "owner"])
def test_the_event_and_audit_tables_refuse_changes_to_every_role(
    settings: Settings, kind: str
) -> None:
    user = "postgres" if kind == "owner" else settings.postgres_role(kind)  # type: ignore[arg-type]
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user=user, autocommit=True) as conn:
        for table, column in _TABLES.items():
            for statement in _STATEMENTS:
                sql = statement.format(t=f'"{settings.postgres_schema}".{table}', c=column)
                with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                    conn.execute(sql)
                expected = "append-only" if kind == "owner" else "permission denied"
                assert expected in str(refused.value), sql


def test_break_glass_lets_the_owner_change_a_row_and_is_logged(
    settings: Settings, store: EventStore
) -> None:
    write_events(store, 3, seed=7)
    schema = settings.postgres_schema
    with _owner() as conn:
        with conn.transaction():
            conn.execute("SET LOCAL pipeline.break_glass = 'on'")
            conn.execute(f'DELETE FROM "{schema}".journal_events WHERE notification_id = 1')
        logged = conn.execute(
            f'SELECT by_role, table_name, operation FROM "{schema}".audit_break_glass'
        ).fetchall()
        assert logged == [("postgres", "journal_events", "DELETE")]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="break_glass"):
            conn.execute(f'DELETE FROM "{schema}".journal_events')


# -- tampering ------------------------------------------------------------------------

Events = list[tuple[int, bytes]]
Rows = list[tuple[int, int, bytes]]
Notes = list[tuple[int, bytes]]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ (1 << random.randrange(8))]) + data[at + 1 :]


def _rows_of(events: Events) -> Rows:
    edge = merkle.CompactRange()
    return [(i, p, edge.append(merkle.leaf_hash(d))) for i, (p, d) in enumerate(events)]


def _tamper(
    rng: random.Random, events: Events, rows: Rows, notes: Notes, attacker: Sequence[Signer]
) -> tuple[str, str, Events, Rows, Notes]:
    """One random tampering: its kind, the words the report must hold, and the result."""
    events, rows, notes = list(events), list(rows), list(notes)
    kind = rng.choice(
        [
            "change a byte of a state",
            "delete an event",
            "insert an event",
            "swap two events",
            "truncate the log",
            "delete a log row",
            "change a log hash",
            "replace a checkpoint",
            "re-sign with another key",
            "re-hash the log without the keys",
            "delete the checkpoints and re-hash",
        ]
    )
    i = rng.randrange(len(events))
    if kind == "change a byte of a state":
        position, data = events[i]
        head = 16 + 8 + 2 + int.from_bytes(data[24:26], "big")
        events[i] = (position, _flip(data, rng.randrange(head, len(data))))
        return kind, "changed after it was logged", events, rows, notes
    if kind == "delete an event":
        del events[i]
        return kind, "deleted after it was logged", events, rows, notes
    if kind == "insert an event":  # beside a logged one (one after the log is not logged yet)
        i = rng.randrange(len(events) - 1)
        position, data = events[i]
        events.insert(i + 1, (position, _flip(data, rng.randrange(len(data)))))
        return kind, "inserted", events, rows, notes
    if kind == "swap two events":
        j = rng.choice([k for k in range(len(events)) if k != i])
        (pi, di), (pj, dj) = events[i], events[j]
        events[i], events[j] = (pi, dj), (pj, di)
        return kind, "changed after it was logged", events, rows, notes
    if kind == "truncate the log":
        return kind, "truncated", events, rows[: rng.randrange(notes[-1][0])], notes
    if kind == "delete a log row":
        del rows[rng.randrange(len(rows) - 1)]
        return kind, "missing", events, rows, notes
    if kind == "change a log hash":
        idx, position, hashes = rows[i]
        rows[i] = (idx, position, _flip(hashes, rng.randrange(len(hashes))))
        return kind, "log", events, rows, notes
    if kind == "replace a checkpoint":
        k = rng.randrange(len(notes))
        size, note = notes[k]
        notes[k] = (size, _flip(note, rng.randrange(len(note) - 10)))
        return kind, "checkpoint of", events, rows, notes
    # The rest rewrite an event and every hash after it, as someone with the database but
    # not the keys could.
    position, data = events[i]
    events[i] = (position, _flip(data, rng.randrange(len(data))))
    rows = _rows_of(events)
    if kind == "re-sign with another key":
        from pipeline.audit.note import sign_note

        edge = merkle.CompactRange()
        for _, _, hashes in rows:
            edge.append(hashes[:32])
        body = Checkpoint(ORIGIN, edge.size, edge.root()).body()
        notes = [(size, note) for size, note in notes if size != edge.size]
        notes.append((edge.size, sign_note(body, attacker)))
        return kind, "checkpoint of", events, rows, notes
    if kind == "re-hash the log without the keys":
        return kind, "rewritten", events, rows, notes
    return kind, "no signed checkpoint", events, rows, []


def test_a_thousand_random_tamperings_are_each_found_and_named(
    settings: Settings, store: EventStore, signers: list[Signer], tmp_path: Path
) -> None:
    write_events(store, 300, seed=8)
    log = _audit_log(settings, signers, checkpoint_every=50)
    tables = AuditTables(settings.postgres_schema)
    with _connect(settings) as conn:
        _follow(log, conn)
        from pipeline.audit.trail import export

        export(conn, tables, tmp_path / "export", origin=ORIGIN, keys=[])
    sources, manifest = exported(tmp_path / "export")
    events, rows, notes = list(sources.events), list(sources.rows), sources.checkpoints
    keys = _keys(signers)
    clean = check(events, rows, notes, keys, origin=manifest["origin"])
    assert clean.ok and clean.latest == 300, clean.summary()
    # Another pair of keys with the log's names: only the key ids differ.
    attacker_file = tmp_path / "attacker.key"
    MldsaSigner.generate(str(attacker_file))
    attacker = [
        Ed25519Signer.generate(ORIGIN),
        MldsaSigner(name=f"{ORIGIN}/ml-dsa-65", path=str(attacker_file)),
    ]
    rng = random.Random(9)
    kinds: dict[str, int] = {}
    for _ in range(1000):
        kind, words, t_events, t_rows, t_notes = _tamper(rng, events, rows, notes, attacker)
        report = check(t_events, t_rows, t_notes, keys, origin=ORIGIN)
        assert not report.ok, f"{kind}: not found"
        assert any(words in problem for problem in report.problems), (kind, report.problems)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(kinds) == 11 and min(kinds.values()) >= 50, kinds


# -- the log's runs ---------------------------------------------------------------------


def test_runs_of_any_length_prove_and_verify(
    settings: Settings, store: EventStore, signers: list[Signer]
) -> None:
    """A batch of more than ROW_LEAVES leaves is split into runs; batches of a few leaves
    are runs of a few: proofs, consistency and verification read across them all."""
    write_events(store, 2600, seed=11)
    log = _audit_log(settings, signers, checkpoint_every=5000, batch_size=2500)
    tables = AuditTables(settings.postgres_schema)
    with _connect(settings) as conn:
        _follow(log, conn)
        write_events(store, 300, seed=12)
        log.batch_size = 7
        _follow(log, conn)
        with _owner() as owner:
            lengths = [
                r[0]
                for r in owner.execute(
                    "SELECT octet_length(positions) / 8 FROM "
                    f'"{settings.postgres_schema}".audit_leaves ORDER BY idx'
                ).fetchall()
            ]
        assert lengths[:4] == [1024, 1024, 452, 100] and set(lengths[4:]) <= {7, 6}
        assert sum(lengths) == 2900
        ids = [
            r[0]
            for r in conn.execute(
                f'SELECT originator_id FROM "{settings.postgres_schema}".journal_events'
            ).fetchall()
        ]
        for event in random.Random(13).sample(ids, 200):
            proof = prove(conn, tables, event)
            merkle.verify_inclusion(
                proof["leaf_index"],
                proof["tree_size"],
                base64.b64decode(proof["leaf_hash"]),
                [base64.b64decode(h) for h in proof["proof"]],
                base64.b64decode(proof["root"]),
            )
        for old, new in [(1, 2900), (1023, 1025), (2048, 2600), (2600, 2900), (2899, 2900)]:
            consistency(conn, tables, old, new)
    report = _verify(settings, signers)
    assert report.ok and report.leaves == 2900, report.summary()


@pytest.mark.parametrize(
    "change",
    [
        "hashes = substring(hashes FROM 1 FOR octet_length(hashes) - 5)",
        "hashes = hashes || '\\x00'::bytea",
        "positions = substring(positions FROM 1 FOR octet_length(positions) - 3)",
        "positions = substring(positions FROM 1 FOR octet_length(positions) - 8)",
    ],
)
def test_a_run_whose_lengths_do_not_add_up_is_found_not_crashed_on(
    settings: Settings, store: EventStore, signers: list[Signer], change: str
) -> None:
    write_events(store, 300, seed=14)
    log = _audit_log(settings, signers, batch_size=100)
    with _connect(settings) as conn:
        _follow(log, conn)
    with _owner() as conn, conn.transaction():
        conn.execute("SET LOCAL pipeline.break_glass = 'on'")
        conn.execute(
            f'UPDATE "{settings.postgres_schema}".audit_leaves SET {change} WHERE idx = 100'
        )
    report = _verify(settings, signers)
    assert not report.ok
    assert "log row 199" in report.summary() or "log row 198" in report.summary(), report.summary()
    assert "the log was altered" in report.summary(), report.summary()


def test_a_log_kept_a_row_per_leaf_is_made_into_runs_by_the_migration(
    settings: Settings, store: EventStore, signers: list[Signer]
) -> None:
    """An earlier release kept one row per leaf: `pipeline db migrate` converts it, and
    the log goes on from where it was."""
    from pipeline.ops.migrate import migrate

    write_events(store, 2100, seed=15)
    log = _audit_log(settings, signers, checkpoint_every=1000)
    with _connect(settings) as conn:
        _follow(log, conn)
    before = _leaves(settings)
    schema = settings.postgres_schema
    with _owner() as conn, conn.transaction():
        conn.execute(f'DROP TABLE "{schema}".audit_leaves')
        conn.execute(
            f'CREATE TABLE "{schema}".audit_leaves (idx bigint PRIMARY KEY, '
            "position bigint NOT NULL UNIQUE, hashes bytea NOT NULL)"
        )
        with conn.cursor().copy(
            f'COPY "{schema}".audit_leaves (idx, position, hashes) FROM STDIN'
        ) as copy:
            for row in before:
                copy.write_row(row)
    migrate(make_settings("nats://unused", schema))
    assert _leaves(settings) == before
    write_events(store, 50, seed=16)
    log = _audit_log(settings, signers, checkpoint_every=1000)
    with _connect(settings) as conn:
        _follow(log, conn)
    report = _verify(settings, signers)
    assert report.ok and report.leaves == 2150, report.summary()
