"""Following the store: telling an outage from bad data, and waking followers on commits.

The views' runners and the audit log follow the event table in position order. Both
retry when the database is away (`is_outage`) and wait between batches on a `wake`
event that the `Listener` sets when a writer's commit notifies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg.sql import SQL, Identifier

__all__ = ["Listener", "Wakeable", "is_outage"]

log = logging.getLogger(__name__)

Connect = Callable[[], "psycopg.Connection[Any]"]
_OUTAGE_STATES = ("08", "53", "57P", "40001", "40P01", "55P03", "25006")
"""SQLSTATEs of a server that is away, restarting, out of resources, read-only or busy
(connection exception, insufficient resources, operator intervention, serialization
failure, deadlock, lock not available, read-only transaction): not the events' fault."""


def is_outage(exc: BaseException, conn: psycopg.Connection[Any] | None = None) -> bool:
    """Whether `exc` says the database is away (retry later) rather than refusing the data."""
    if conn is not None and (conn.closed or conn.broken):
        return True
    if isinstance(exc, psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        # No SQLSTATE: the client lost the connection (or never had one).
        return not state or state.startswith(_OUTAGE_STATES)
    return False


_LISTENER_CHECK_S = 10.0
"""How often the listener checks that its connection still answers."""


class Wakeable(Protocol):
    """A follower of the store that waits on `wake` between batches."""

    wake: threading.Event


class Listener:
    """Wakes runners when the store notifies a commit; reconnects after a failure."""

    def __init__(self, channel: str, runners: Sequence[Wakeable]) -> None:
        self.channel = channel
        self.runners = runners
        self.connected = threading.Event()

    def run(self, connect: Connect, stop: threading.Event) -> None:
        """Listen until `stop` is set."""
        delay = 0.5
        while not stop.is_set():
            try:
                with connect() as conn:
                    conn.execute(SQL("LISTEN {}").format(Identifier(self.channel)))
                    conn.commit()
                    self.connected.set()
                    delay = 0.5
                    self._wake()  # anything stored while not listening
                    checked = time.monotonic()
                    while not stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self._wake()
                        if time.monotonic() - checked > _LISTENER_CHECK_S:
                            # A connection that died silently delivers nothing and
                            # raises nothing: ask the server now and then.
                            conn.execute("SELECT 1")
                            checked = time.monotonic()
            except Exception as exc:
                self.connected.clear()
                if is_outage(exc):
                    log.warning("not listening for new events (%s); again in %.1f s", exc, delay)
                else:
                    log.exception("listener: unexpected error; again in %.1f s", delay)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
        self.connected.clear()

    def _wake(self) -> None:
        for runner in self.runners:
            runner.wake.set()
