"""What the projections retry (the database is away) and what stops a view (the data)."""

from __future__ import annotations

import psycopg
import pytest

from pipeline.store.follow import is_outage


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection lost"),  # no SQLSTATE: the client lost it
        psycopg.InterfaceError("the connection is closed"),
        psycopg.errors.AdminShutdown(),
        psycopg.errors.CannotConnectNow(),
        psycopg.errors.TooManyConnections(),
        psycopg.errors.DiskFull(),
        psycopg.errors.LockNotAvailable(),
        psycopg.errors.DeadlockDetected(),
        psycopg.errors.SerializationFailure(),
        psycopg.errors.ReadOnlySqlTransaction(),
    ],
)
def test_a_server_away_busy_or_read_only_is_an_outage(error: Exception) -> None:
    assert is_outage(error)


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.ProgramLimitExceeded(),  # e.g. an index row too large
        psycopg.errors.CharacterNotInRepertoire(),
        psycopg.errors.NumericValueOutOfRange(),
        psycopg.errors.CardinalityViolation(),
        psycopg.errors.UniqueViolation(),
        KeyError("source"),
    ],
)
def test_data_the_database_refuses_is_not(error: Exception) -> None:
    assert not is_outage(error)
