"""A NATS JetStream cluster on loopback for tests, and a TCP proxy that partitions it.

Three `nats-server` processes from the wheel (`EmbeddedNats` as cluster members), each
with a store folder, a server name and a monitoring port of its own. One member may be
made isolable: every route to or from it then runs through `RouteProxy`, which the test
cuts (all route connections reset, new ones refused) and heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pipeline.ops.embedded import EmbeddedNats, NatsClusterMember, free_port

__all__ = ["NatsCluster", "RouteProxy"]

HOST = "127.0.0.1"
T = TypeVar("T")


class RouteProxy:
    """Forwards TCP on loopback from each listening port to its target port until cut.

    It runs its own event loop in a thread, so a test may call it from anywhere. `cut`
    resets every connection it carries and stops listening (a peer's connect is then
    refused); `heal` listens again.
    """

    def __init__(self, ports: dict[int, int]) -> None:
        self.ports = dict(ports)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._listeners: list[asyncio.Server] = []
        self._open: set[asyncio.StreamWriter] = set()
        self.connections = 0
        """Connections accepted so far."""

    def start(self) -> None:
        """Start the loop's thread and listen on every port."""
        self._thread.start()
        self._call(self._listen())

    def cut(self) -> None:
        """Reset every connection and refuse new ones."""
        self._call(self._cut())

    def heal(self) -> None:
        """Listen again: peers reconnect on their own."""
        self._call(self._listen())

    def close(self) -> None:
        """Cut and stop the loop."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        for port, target in self.ports.items():
            server = await asyncio.start_server(
                partial(self._forward, target), HOST, port, reuse_address=True
            )
            self._listeners.append(server)

    async def _cut(self) -> None:
        listeners, self._listeners = self._listeners, []
        for server in listeners:
            server.close()
        for writer in list(self._open):
            writer.transport.abort()  # a reset, as a peer that vanished mid-stream
        self._open.clear()

    async def _shutdown(self) -> None:
        await self._cut()
        forwarding = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in forwarding:
            task.cancel()
        await asyncio.gather(*forwarding, return_exceptions=True)

    async def _forward(
        self, target: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream = await asyncio.open_connection(HOST, target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, upstream}
        self._open |= pair
        await asyncio.gather(
            _pipe(reader, upstream), _pipe(upstream_reader, writer), return_exceptions=True
        )
        self._open -= pair


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


class NatsCluster:
    """`size` JetStream servers named n1, n2, ... in one cluster, routes on loopback.

    With `isolable` (a server's name), that server's routes all run through a
    `RouteProxy`: it gives its route address as the proxy's and solicits the others
    through it, and they solicit it through it, while the others route to each other
    directly. `cut()` then separates it from the rest; `heal()` joins it again.
    """

    def __init__(
        self, root: Path, size: int = 3, *, isolable: str = "", name: str = "pipeline"
    ) -> None:
        self.names = [f"n{i + 1}" for i in range(size)]
        if isolable and isolable not in self.names:
            raise ValueError(f"no server {isolable} in {self.names}")
        self.isolable = isolable
        route_ports = {n: free_port() for n in self.names}
        proxied = {n: free_port() for n in self.names} if isolable else {}
        self.proxy = (
            RouteProxy({proxied[n]: route_ports[n] for n in self.names}) if isolable else None
        )

        def route(to: str, by: str) -> str:
            through_proxy = isolable in (to, by)
            return f"nats://{HOST}:{(proxied if through_proxy else route_ports)[to]}"

        self.servers: dict[str, EmbeddedNats] = {}
        for n in self.names:
            member = NatsClusterMember(
                name=name,
                port=route_ports[n],
                routes=tuple(route(other, n) for other in self.names if other != n),
                advertise=f"{HOST}:{proxied[n]}" if isolable else "",
            )
            self.servers[n] = EmbeddedNats(
                root / n, server_name=n, cluster=member, monitor_port=free_port()
            )

    @property
    def url(self) -> str:
        """Every server's client URL, comma-separated, as PIPELINE_NATS_URL takes them."""
        return ",".join(server.url for server in self.servers.values())

    def url_of(self, *names: str) -> str:
        """The client URLs of the named servers, comma-separated, in that order."""
        return ",".join(self.servers[n].url for n in names)

    def name_of(self, url: str) -> str:
        """The name of the server whose client URL (or `host:port`) this is."""
        for n, server in self.servers.items():
            if url.endswith(f"{server.host}:{server.port}"):
                return n
        raise KeyError(url)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start every server (the isolable one last, once the others have their routes)
        and wait until the cluster is ready."""
        if self.proxy is not None:
            self.proxy.start()
        first = [n for n in self.names if n != self.isolable]
        for n in first:
            self.servers[n].start()
        if self.isolable:
            # The others must know each other by their direct routes before they hear
            # of each other's proxied address from the isolable one.
            wanted = len(first) - 1
            _wait(lambda: all(self.routed(n) >= wanted for n in first), timeout_s, "routes")
            self.servers[self.isolable].start()
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 60.0, names: list[str] | None = None) -> None:
        """Wait until each named (default: every) server is healthy and JetStream's meta
        group has every server and a leader."""
        names = names or self.names
        _wait(lambda: all(self.ready(n) for n in names), timeout_s, f"{names} ready")

    def ready(self, name: str) -> bool:
        """Whether the server's `/healthz` answers OK and it knows the meta group's leader
        and every member."""
        if self.monitor(name, "healthz") != {"status": "ok"}:
            return False
        meta = (self.monitor(name, "jsz") or {}).get("meta_cluster") or {}
        return bool(meta.get("leader")) and meta.get("cluster_size") == len(self.names)

    def routed(self, name: str) -> int:
        """How many other servers this one has a route to."""
        routes = (self.monitor(name, "routez") or {}).get("routes") or []
        return len({r.get("remote_name") or r.get("remote_id") for r in routes})

    def serving(self, client_prefix: str) -> list[str]:
        """The servers holding a client connection whose name starts with `client_prefix`."""
        found = []
        for n in self.names:
            connections = (self.monitor(n, "connz") or {}).get("connections") or []
            if any(str(c.get("name", "")).startswith(client_prefix) for c in connections):
                found.append(n)
        return found

    def monitor(self, name: str, endpoint: str) -> dict[str, Any] | None:
        """A monitoring endpoint's JSON, or None when the server does not answer it."""
        port = self.servers[name].monitor_port
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/{endpoint}", timeout=2) as r:
                body: dict[str, Any] = json.load(r)
                return body
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(ValueError):
                error: dict[str, Any] = json.load(exc)
                return error
            return None
        except (OSError, ValueError):
            return None

    def kill(self, name: str) -> None:
        """kill -9 the server."""
        self.servers[name].kill()

    def restart(self, name: str, timeout_s: float = 60.0) -> None:
        """Start the server again on its port and store; wait until it is healthy."""
        self.servers[name].start()
        _wait(lambda: self.monitor(name, "healthz") == {"status": "ok"}, timeout_s, name)

    def cut(self) -> None:
        """Separate the isolable server from the others."""
        assert self.proxy is not None, "no isolable server"
        self.proxy.cut()

    def heal(self) -> None:
        """Join the isolable server to the others again."""
        assert self.proxy is not None, "no isolable server"
        self.proxy.heal()

    def logs(self, lines: int = 40) -> str:
        """The last lines of each server's log, for a failing test's message."""
        out = []
        for n, server in self.servers.items():
            text = server.log.read_text(errors="replace") if server.log.exists() else ""
            out.append(f"--- {n}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Stop every server and the proxy."""
        for server in self.servers.values():
            server.stop()
        if self.proxy is not None:
            self.proxy.close()


def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"NATS cluster: {what} not within {timeout_s} s")
        time.sleep(0.1)
