"""The incident process: follows the store in store order and records incident events,
exactly once.

Where incident events live. In tables of their own in the store's schema
(`tables.py`), not in the event store: the store holds what producers sent, and the
runtime roles that write it are the workers; the incident process is a reader of the
store like the views, and records its decisions the way a view keeps its rows, in the
transaction that moves its position (a row of `projection_positions`, so
`pipeline projections status` shows its lag). A batch's decisions and the new position
commit together: a `kill -9` at any point leaves both as before the batch or after it.
The decisions' ids are derived from the stored events that caused them
(`record.recorded`), so deciding again gives the same ids: an insert of one already
recorded is refused by the primary key rather than recorded twice. Operators' actions
come through their own table (`incident_actions`), placed in store order under a share
lock on the process's position row; the process feeds each to the correlator at its
place and folds it into the read model.

Restarts. The correlator holds its windows and open incidents in memory. At every
start (and after any error) the process replays the store from position 0 up to its
recorded position, feeding the correlator the same events and actions in the same
order, and records nothing it finds recorded: the correlator is then exactly as it was
when the position was committed, whatever point the process stopped at. A snapshot of
the correlator would start faster but is a second, versioned copy of its state to keep
right (and replaying only a recent tail is not equal to a full replay: the watermark,
buffers and repeats depend on older events). The replay reads only security events,
analysed frames and health reports. A decision the replay makes that is not recorded
(the sites file changed since) is recorded then, and the read model refolded; one
recorded that the replay no longer makes is counted and named in the log.

A rebuild (`rebuild`) is that replay with the process stopped, followed by the read
model refolded from both logs into `incidents__next` and swapped in: with an unchanged
sites file it records nothing and gives the same rows.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

from pipeline.metrics import IncidentMetrics
from pipeline.store.domain import CameraFrame, HealthReport, SecurityEvent, topics_of
from pipeline.store.follow import is_outage
from pipeline.store.reader import EventReader, Positioned

from ..positions import Positions
from .correlate import Correlator
from .observations import observe
from .record import Incident, IncidentEvent, fold, order, recorded
from .sites import SiteMap
from .tables import POSITION_KEY, IncidentTables
from .threat import Level

__all__ = ["IncidentProcess", "ProcessRunning", "Rebuilt", "Replayed", "process_lock", "rebuild"]

log = logging.getLogger(__name__)

Connect = Callable[[], "psycopg.Connection[Any]"]

TOPICS = [
    topic
    for event in (SecurityEvent.Recorded, CameraFrame.FrameAnalyzed, HealthReport.Recorded)
    for topic in topics_of(event)
]
"""Topics of the events correlation reads."""

_WINDOW = 64
"""A batch reads positions up to this many times its size ahead (of any topic)."""
UNRESOLVED = ("open", "acknowledged")
"""The read model's states of an incident not resolved yet."""
_PAGE = 5000
"""Events a replay reads at a time (at least)."""


class ProcessRunning(Exception):
    """Another incident process (or rebuild) holds the schema's incident lock."""


class _Moved(Exception):
    """The recorded position is not where this process's correlator stands."""


def process_lock(schema: str) -> str:
    """The advisory lock held by the one incident process (or rebuild) of a schema."""
    return f"incidents:{schema}"


@dataclass
class Replayed:
    """What a replay from zero found."""

    position: int
    derived: int = 0
    """Decisions the replay made."""
    recorded: int = 0
    """Decisions found recorded, not recorded again."""
    new: int = 0
    """Decisions not recorded before (the sites file changed): recorded now."""
    missing: list[uuid.UUID] = field(default_factory=list)
    """Ids of recorded decisions the replay did not make."""
    seconds: float = 0.0


class IncidentProcess:
    """Feeds the store's events to a correlator and records its decisions, exactly once."""

    def __init__(
        self,
        sites: SiteMap,
        schema: str,
        *,
        batch_size: int = 5000,
        poll_s: float = 1.0,
        metrics: IncidentMetrics | None = None,
    ) -> None:
        self.sites = sites
        self.schema = schema
        self.tables = IncidentTables(schema)
        self.reader = EventReader(schema)
        self.positions = Positions(schema)
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.metrics = metrics or IncidentMetrics()
        self.wake = threading.Event()
        """Set when new events may be stored (a notification)."""
        self.correlator: Correlator | None = None
        self.position = 0
        """The store position the correlator has been fed up to (and recorded)."""
        self._fed_actions: set[uuid.UUID] = set()
        """Actions placed at `position` that the correlator has been fed."""
        self._current_since = time.monotonic()

    # -- starting: the replay --------------------------------------------------------

    def prepare(self, conn: psycopg.Connection[Any]) -> None:
        """Create the read model and the position row where missing."""
        self.positions.create(conn)
        with conn.transaction():
            # Two processes starting together take turns (as the views do).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"views:{self.schema}",))
            self.tables.create_model(conn)
            self.positions.start(conn, POSITION_KEY, 0)

    def replay(self, conn: psycopg.Connection[Any]) -> Replayed:
        """Feed a new correlator the stored events and actions up to the recorded
        position, recording only decisions not recorded yet (see the module)."""
        started = time.perf_counter()
        self.correlator = None
        correlator = Correlator(self.sites)
        upto = self.positions.get(conn, POSITION_KEY).position
        known = {e.event_id for e in self.tables.decided(conn, upto=upto)}
        actions = self.tables.taken(conn, upto=upto)
        result = Replayed(upto)
        fresh: list[IncidentEvent] = []
        derived: set[uuid.UUID] = set()
        after, next_action = 0, 0
        while after < upto:
            rows = self.reader.rows(conn, after, upto, TOPICS, max(self.batch_size, _PAGE))
            if not rows:
                break
            for item in self.reader.decode(rows):
                while next_action < len(actions) and actions[next_action].position < item.position:
                    _take(correlator, actions[next_action])
                    next_action += 1
                for event in _decide(correlator, item):
                    derived.add(event.event_id)
                    if event.event_id not in known:
                        fresh.append(event)
            after = rows[-1][0]
        # Actions placed at the position itself may have been taken while no process
        # ran: they are fed here and again by the next step, which also folds them into
        # the read model (taking and folding an action twice changes nothing).
        for action in actions[next_action:]:
            _take(correlator, action)
        result.derived = len(derived)
        result.recorded = len(derived & known)
        result.new = len(fresh)
        result.missing = sorted(known - derived)
        if fresh:
            with conn.transaction():
                if self.positions.lock(conn, POSITION_KEY).position != upto:
                    raise _Moved("the position moved during the replay")
                self.tables.record(conn, fresh)
                self.refold(conn)
            log.warning(
                "incidents: the replay to position %d made %d decision(s) not recorded "
                "before (has the sites file changed?): recorded them now",
                upto,
                len(fresh),
            )
        if result.missing:
            log.warning(
                "incidents: %d recorded decision(s) up to position %d are no longer made "
                "by the sites file's rules (kept in the log), such as %s",
                len(result.missing),
                upto,
                result.missing[0],
            )
        self.correlator, self.position, self._fed_actions = correlator, upto, set()
        self._measure(conn)
        result.seconds = time.perf_counter() - started
        self.metrics.replay_seconds.set(result.seconds)
        return result

    def refold(self, conn: psycopg.Connection[Any], tables: IncidentTables | None = None) -> int:
        """Fill the read model (or `tables`'s) from both logs; the number of incidents."""
        target = tables or self.tables
        events = sorted([*self.tables.decided(conn), *self.tables.taken(conn)], key=order)
        incidents: dict[uuid.UUID, Incident] = {}
        for event in events:
            folded = fold(incidents.get(event.incident_id), event)
            if folded is not None:
                incidents[event.incident_id] = folded
        conn.execute(SQL("DELETE FROM {}").format(target.model))
        target.save(conn, incidents.values())
        return len(incidents)

    # -- following: one batch ----------------------------------------------------------

    def step(self, conn: psycopg.Connection[Any]) -> int | None:
        """Take the actions placed at the position and the next batch of events, record
        the decisions and move the position, in one transaction. The number of events
        read, or None at the head. Any error leaves the correlator to be replayed."""
        if self.correlator is None:
            self.replay(conn)
        correlator = self.correlator
        assert correlator is not None
        started = time.perf_counter()
        try:
            with conn.transaction():
                at = self.positions.lock(conn, POSITION_KEY).position
                if at != self.position:
                    raise _Moved(f"the position is {at}, the correlator at {self.position}")
                head = self.reader.head(conn)
                actions = [
                    a for a in self.tables.taken(conn, at=at) if a.event_id not in self._fed_actions
                ]
                end = min(head, at + _WINDOW * self.batch_size)
                rows = self.reader.rows(conn, at, end, TOPICS, self.batch_size)
                upto = rows[-1][0] if len(rows) == self.batch_size else end
                if not actions and upto == at:
                    self._observe(at, head)
                    return None
                for action in actions:
                    _take(correlator, action)
                decided: list[IncidentEvent] = []
                for item in self.reader.decode(rows):
                    decided += _decide(correlator, item)
                self.tables.record(conn, decided)
                self._fold(conn, [*actions, *decided])
                if decided:  # the dashboards' followers read it at the commit, not their poll
                    conn.execute("SELECT pg_notify(%s, '')", (self.reader.channel,))
                if upto > at:
                    self.positions.advance(conn, POSITION_KEY, upto)
        except BaseException:
            self.correlator = None  # fed past what is committed: replay before going on
            raise
        if upto > at:
            self._fed_actions = set()
        self._fed_actions.update(a.event_id for a in actions)
        self.position = upto
        self._count(decided)
        if actions or decided:
            self._measure(conn)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        self._observe(upto, head)
        return len(rows)

    def _fold(self, conn: psycopg.Connection[Any], events: Sequence[IncidentEvent]) -> None:
        if not events:
            return
        incidents = self.tables.load(conn, (e.incident_id for e in events))
        changed: dict[uuid.UUID, Incident] = {}
        for event in events:
            folded = fold(incidents.get(event.incident_id), event)
            if folded is not None:
                incidents[event.incident_id] = changed[event.incident_id] = folded
        self.tables.save(conn, changed.values())

    def _count(self, decided: Sequence[IncidentEvent]) -> None:
        m = self.metrics
        opened: set[uuid.UUID] = set()
        for event in decided:
            m.events.labels(event.kind).inc()
            if event.kind == "IncidentOpened":
                opened.add(event.incident_id)
            elif event.kind == "Assessed" and event.incident_id in opened:
                m.opened.labels(event.data["level"]).inc()  # its first assessment
                opened.discard(event.incident_id)
        if self.correlator is not None:
            m.gathering.set(len(self.correlator.open_incidents()))
            m.late_events.set(self.correlator.late_events)

    def _measure(self, conn: psycopg.Connection[Any]) -> None:
        """Set the unresolved incidents' gauge from the read model (every level and state,
        so one that drops to none reads 0)."""
        counts = self.tables.unresolved(conn)
        for level in Level:
            for state in UNRESOLVED:
                self.metrics.unresolved.labels(level.value, state).set(
                    counts.get((level.value, state), 0)
                )

    def _observe(self, position: int, head: int) -> None:
        m = self.metrics
        m.position.set(position)
        m.head.set(head)
        m.lag_events.set(head - position)
        now = time.monotonic()
        if position >= head:
            self._current_since = now
        m.lag_seconds.set(now - self._current_since)

    def catch_up(self, conn: psycopg.Connection[Any]) -> int:
        """Apply batches until the head; the number of events read."""
        total = 0
        while (n := self.step(conn)) is not None:
            total += n
        return total

    # -- as a thread -------------------------------------------------------------------

    def run(self, connect: Connect, stop: threading.Event, *, standby_s: float = 5.0) -> None:
        """Follow the store until `stop` is set; stand by while another process does."""
        delay = 0.5
        conn: psycopg.Connection[Any] | None = None
        stop.wait(random.uniform(0, 0.2))
        while not stop.is_set():
            try:
                if conn is None:
                    conn = connect()
                    self.prepare(conn)
                    if not _try_lock(conn, process_lock(self.schema)):
                        self.metrics.active.set(0)
                        conn.close()
                        conn = None
                        stop.wait(standby_s)
                        continue
                    self.metrics.active.set(1)
                    self.correlator = None
                    replayed = self.replay(conn)
                    log.info(
                        "incidents: replayed to position %d in %.1f s (%d decisions, %d of "
                        "them recorded now); following the store",
                        replayed.position,
                        replayed.seconds,
                        replayed.derived,
                        replayed.new,
                    )
                self.wake.clear()
                if self.step(conn) is None:
                    self.wake.wait(self.poll_s)
                delay = 0.5
            except Exception as exc:
                if is_outage(exc, conn):
                    log.warning("incidents: database away (%s); again in %.1f s", exc, delay)
                elif isinstance(exc, _Moved):
                    log.warning("incidents: %s; replaying", exc)
                else:
                    log.exception("incidents: unexpected error; again in %.1f s", delay)
                self.metrics.active.set(0)
                self.correlator = None
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
        if conn is not None:
            conn.close()


def _decide(correlator: Correlator, item: Positioned) -> list[IncidentEvent]:
    observation = observe(item)
    if observation is None:
        return []
    return [recorded(d, i) for i, d in enumerate(correlator.feed(observation))]


def _take(correlator: Correlator, action: IncidentEvent) -> None:
    if action.kind == "Resolved":
        correlator.resolve(action.incident_id)


def _try_lock(conn: psycopg.Connection[Any], key: str) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuild did: the replay's findings and the incidents refolded."""

    replayed: Replayed
    incidents: int
    seconds: float


def rebuild(conn: psycopg.Connection[Any], process: IncidentProcess) -> Rebuilt:
    """Replay from zero (recording only what is not recorded), then refold the read model
    into `incidents__next` and swap it in. `conn` in autocommit mode; raises
    `ProcessRunning` while an incident process holds the lock."""
    started = time.perf_counter()
    key = process_lock(process.schema)
    if not _try_lock(conn, key):
        raise ProcessRunning(
            "an incident process is running on this schema: stop `pipeline run incidents` "
            "first (it replays every incident from zero whenever it starts)"
        )
    try:
        process.prepare(conn)
        replayed = process.replay(conn)
        shadow = process.tables.shadow()
        shadow.drop_model(conn)
        with conn.transaction():
            process.positions.lock(conn, POSITION_KEY)
            shadow.create_model(conn)
            count = process.refold(conn, shadow)
            live = process.tables
            old = Identifier(f"{live.model_name}__old")
            conn.execute(SQL("ALTER TABLE {} RENAME TO {}").format(live.model, old))
            conn.execute(
                SQL("ALTER TABLE {} RENAME TO {}").format(shadow.model, Identifier(live.model_name))
            )
            conn.execute(SQL("DROP TABLE {}.{}").format(Identifier(process.schema), old))
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
    return Rebuilt(replayed, count, time.perf_counter() - started)
