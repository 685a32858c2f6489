"""`free_port`: ports for servers started a moment later, out of the way of outgoing
connections."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path

import pytest

from pipeline.ops import embedded
from pipeline.ops.embedded import free_port


def _ephemeral_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_ports_are_below_the_ephemeral_range_and_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port of the ephemeral range may become the local end of any outgoing connection
    between the pick and the server's bind (a NATS route once failed so in CI)."""
    low = _ephemeral_start()
    monkeypatch.setattr(embedded, "_candidates", embedded._port_candidates())  # a new process's
    ports = [free_port() for _ in range(500)]
    ordered = sorted(ports)
    # Nor one just after a port it gave: worker processes count their ports up from one.
    assert min(b - a for a, b in itertools.pairwise(ordered)) >= 16
    assert all(1024 <= port < low for port in ports), sorted(ports)[-3:]


def test_a_port_in_use_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        taken, next_free = free_port(), free_port()
        held.bind(("127.0.0.1", taken))
        held.listen()
        monkeypatch.setattr(embedded, "_candidates", iter([taken, next_free]))
        assert free_port() == next_free
