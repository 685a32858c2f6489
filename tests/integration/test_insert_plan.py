"""The store's insert probes the event table's index for each row, however large the
table has grown since a session first planned it (see `pipeline/store/recorder.py`).

A session caches the plans of the insert function's statements. Planned on an empty table,
PostgreSQL's choice was to hash the whole table: every later insert of that session read
every stored event, a transaction of one event taking 8 ms at 45,000 stored events and
growing with the store."""

from __future__ import annotations

from typing import Any

import psycopg

from pipeline.ops.simulate import stored_events

from ..conftest import PG_DB, PG_HOST, PG_PORT
from .helpers import writer_store


def test_the_insert_probes_the_index_however_large_the_table_has_grown() -> None:
    events = iter(stored_events(5020, seed=21))
    with (
        writer_store("insert_plan_test") as store,
        psycopg.connect(
            host=PG_HOST, port=PG_PORT, dbname=PG_DB, user="postgres", autocommit=True
        ) as conn,
    ):
        plans: list[str] = []
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary or ""))
        # The plans of the statements inside the function, as notices to this session.
        conn.execute("LOAD 'auto_explain'")
        for setting in ("log_min_duration = 0", "log_nested_statements = on", "log_level = notice"):
            conn.execute(f"SET auto_explain.{setting}")
        recorder: Any = store._recorder

        def insert(count: int) -> str:
            """Insert `count` events in this session; the plan of its INSERT."""
            rows = [store._to_stored(next(events)) for _ in range(count)]
            plans.clear()
            conn.execute(recorder.call_insert_new, recorder.arguments(rows, []), prepare=True)
            [plan] = [p for p in plans if "INSERT INTO" in p]
            return plan

        for _ in range(6):  # first planned while the table is all but empty
            insert(1)
        for _ in range(10):
            store.write([next(events) for _ in range(500)])
        for count in (1, 4):
            plan = insert(count)
            assert "Index Only Scan using journal_events_pkey" in plan, plan
            assert "Seq Scan" not in plan and "Hash" not in plan, plan
