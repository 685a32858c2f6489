"""How the store connects: eventsourcing's Postgres factory, told which server to keep.

`POSTGRES_HOST` and `POSTGRES_PORT` may list several servers (a primary and its
standbys, comma-separated); eventsourcing hands them to libpq unchanged, and libpq tries
each in turn. Two libpq options it does not pass are added to every connection of the
pool: `target_session_attrs` (`POSTGRES_TARGET_SESSION_ATTRS`; `read-write` keeps only
the primary, so after a fail-over new connections reach the promoted standby and never
a read-only one) and `connect_timeout`, which libpq applies to each host separately, so
a server that does not answer at all delays the next one by seconds, not by the
operating system's TCP time-out. (eventsourcing reads `POSTGRES_CONNECT_TIMEOUT` as the
pool's wait for a connection only.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from eventsourcing import postgres
from eventsourcing.utils import Environment, EnvType

__all__ = ["PostgresFactory", "connect_options", "connection_kwargs"]

TARGET_SESSION_ATTRS = "POSTGRES_TARGET_SESSION_ATTRS"


def connect_options(env: Mapping[str, str]) -> dict[str, Any]:
    """The libpq options eventsourcing leaves out, from an eventsourcing environment."""
    options: dict[str, Any] = {}
    attrs = env.get(TARGET_SESSION_ATTRS)
    if attrs:
        options["target_session_attrs"] = attrs
    timeout = env.get("POSTGRES_CONNECT_TIMEOUT")
    if timeout:
        options["connect_timeout"] = int(timeout)
    return options


def connection_kwargs(env: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments of `psycopg.connect` for the server(s) an eventsourcing
    environment names, with the same options as the store's pool."""
    return {
        "host": env["POSTGRES_HOST"],
        "port": env["POSTGRES_PORT"],
        "dbname": env["POSTGRES_DBNAME"],
        "user": env["POSTGRES_USER"],
        "password": env["POSTGRES_PASSWORD"],
        **connect_options(env),
    }


class PostgresFactory(postgres.PostgresFactory):
    """eventsourcing's Postgres factory whose pool also passes `connect_options`."""

    def __init__(self, env: Environment | EnvType | None) -> None:
        super().__init__(env)
        kwargs = self.datastore.pool.kwargs
        # The pool is opened on first use, and reads its kwargs at each connect.
        assert isinstance(kwargs, dict), kwargs
        # `Environment.get` also finds keys prefixed with the application's name.
        kwargs.update(connect_options(self.env))
