"""One line for a command that failed on a server: what went wrong and which setting to fix.

A server that does not answer, or a store without the pipeline's tables, is almost
always a command pointed at the wrong place (the default servers on 127.0.0.1 rather
than a running demo's): the line names the setting and the command exits 2, as for any
other configuration error, with no traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["Failure", "causes", "explain", "no_stream"]

_DEMO_HINT = "`pipeline --demo <command>` for the running demo"
_POSTGRES_ADDRESS = "PIPELINE_POSTGRES_HOST and PIPELINE_POSTGRES_PORT"


@dataclass(frozen=True)
class Failure:
    """The line to print and the exit code."""

    message: str
    exit_code: int


def explain(exc: BaseException, settings: Settings | None) -> Failure | None:
    """The failure `exc` (or an error that caused it) means for the user; None for an
    error that is none of a server's (a bug: its traceback is wanted)."""
    import nats.errors
    import psycopg

    for cause in causes(exc):
        if isinstance(cause, psycopg.errors.UndefinedTable):
            return Failure(_no_table(cause, settings), 2)
        if isinstance(cause, psycopg.OperationalError):
            return _postgres(cause)
        if isinstance(cause, nats.errors.NoServersError):
            url = settings.nats_url if settings is not None else "PIPELINE_NATS_URL"
            return Failure(
                f"configuration error: PIPELINE_NATS_URL: NATS at {url} does not answer "
                f"({cause!r}); set it to the pipeline's server ({_DEMO_HINT})",
                2,
            )
        if isinstance(cause, nats.errors.Error | TimeoutError):
            return Failure(f"error talking to NATS: {cause!r}", 1)
    return None


def no_stream(settings: Settings, stream: str) -> ConfigError:
    """The error of a command that finds no `stream` at the NATS it was pointed at."""
    return ConfigError(
        "PIPELINE_NATS_URL",
        f"NATS at {settings.nats_url} has no stream {stream}: set PIPELINE_NATS_URL (and "
        f"PIPELINE_NAMESPACE) to the pipeline's ({_DEMO_HINT}), or make the streams with "
        "`pipeline streams apply`",
    )


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the errors it was raised from or while handling, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _no_table(exc: BaseException, settings: Settings | None) -> str:
    found = re.search(r'relation "([^"]+)" does not exist', str(exc))
    table = found.group(1) if found else "of the pipeline"
    where = ""
    if settings is not None:
        where = f" at {settings.postgres_address()}, database {settings.postgres_dbname},"
    return (
        f"configuration error: PIPELINE_POSTGRES_SCHEMA: the store{where} has no table "
        f"{table}: point PIPELINE_POSTGRES_HOST, _PORT, _DBNAME and _SCHEMA at the "
        f"pipeline's store ({_DEMO_HINT}), or make its tables with `pipeline db migrate`"
    )


def _postgres(exc: BaseException) -> Failure:
    """A connection PostgreSQL refused names the setting; an error later is reported."""
    text = " ".join(str(exc).split())
    if not text.startswith(("connection failed", "connection to server")):
        return Failure(f"error talking to PostgreSQL: {text}", 1)
    reason = text.removeprefix("connection failed: ")
    # libpq's advice to a server that does not answer; the setting to change is ours
    reason = reason.split(" Is the server running", 1)[0]
    if re.search(r'database "[^"]*" does not exist', reason):
        setting = "PIPELINE_POSTGRES_DBNAME"
    elif re.search(r'role "[^"]*" does not exist|password authentication failed', reason):
        setting = "PIPELINE_POSTGRES_USER and PIPELINE_POSTGRES_PASSWORD(_FILE)"
    else:
        setting = _POSTGRES_ADDRESS
    return Failure(
        f"configuration error: {setting}: cannot connect to PostgreSQL: {reason} ({_DEMO_HINT})",
        2,
    )
