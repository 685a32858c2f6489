"""The `pipeline` command without servers: start-up, `--demo`, failures in one line, counts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import nats.errors
import psycopg
import pytest

from pipeline.errors import ConfigError
from pipeline.metrics import Metrics
from pipeline.ops import cli
from pipeline.ops.cli import main
from pipeline.ops.demo import LEGEND, WINDOW, disk_usage, status_line
from pipeline.ops.demoenv import write_env_file
from pipeline.ops.failures import explain
from pipeline.settings import Settings
from schemas import Domain

HEAVY = ("pipeline.app", "faststream", "redis", "torch", "ultralytics", "ray", "handlers")


def _imported_after(code: str, tmp_path: Path) -> list[str]:
    """The heavy modules a fresh interpreter holds after running `code`."""
    probe = (
        f"import json, sys\n{code}\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    return list(json.loads(out.stdout.splitlines()[-1]))


def test_the_cli_starts_without_the_worker_s_modules(tmp_path: Path) -> None:
    # What made every command slow (bench/startup.py times it): the worker, its broker,
    # Redis and the detector, imported whatever the command.
    assert _imported_after("import pipeline.ops.cli", tmp_path) == []
    help_run = (
        "from pipeline.ops.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert _imported_after(help_run, tmp_path) == []
    status = "import pipeline.ops.cli, pipeline.ops.readside, pipeline.settings"
    assert _imported_after(status, tmp_path) == []


def test_demo_without_a_running_demo_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--demo", "projections", "status"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--demo: no demo is running from this folder" in err

    write_env_file(tmp_path / ".pipeline-demo", Settings(_env_file=None), pid=2**22 + 1)
    assert main(["--demo", "dlq", "list"]) == 2
    assert "(pid 4194305) is not running" in capsys.readouterr().err


def test_a_new_demo_starts_whatever_file_an_old_one_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Path] = []

    async def run_demo(data_dir: Path, **options: object) -> None:
        started.append(data_dir)

    monkeypatch.setattr("pipeline.ops.demo.run_demo", run_demo)
    monkeypatch.chdir(tmp_path)
    stale = write_env_file(tmp_path / ".pipeline-demo", Settings(_env_file=None), pid=2**22 + 1)
    monkeypatch.setenv("PIPELINE_ENV_FILE", str(stale))
    assert main(["demo"]) == 0
    assert started == [tmp_path / ".pipeline-demo"]


def test_pipeline_env_file_is_read_instead_of_dot_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PIPELINE_NAMESPACE=from-dot-env\n")
    mine = tmp_path / "mine.env"
    mine.write_text("PIPELINE_NAMESPACE=from-mine\n")
    args = cli._parser().parse_args(["dlq", "list"])
    assert cli._settings(args).namespace == "from-dot-env"
    args.env_file = mine
    assert cli._settings(args).namespace == "from-mine"


def _raised(outer: Exception, cause: BaseException) -> Exception:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise outer from exc
    except Exception as caught:
        return caught


def test_a_store_without_tables_names_the_settings() -> None:
    missing = psycopg.errors.UndefinedTable('relation "elsewhere.journal_events" does not exist')
    failure = explain(_raised(RuntimeError("reading"), missing), Settings(_env_file=None))
    assert failure is not None and failure.exit_code == 2
    assert "\n" not in failure.message
    assert "has no table elsewhere.journal_events" in failure.message
    assert (
        "PIPELINE_POSTGRES_SCHEMA" in failure.message and "pipeline db migrate" in failure.message
    )


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        (
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
            "connections?",
            "PIPELINE_POSTGRES_HOST and PIPELINE_POSTGRES_PORT",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            'FATAL:  database "nodb" does not exist',
            "PIPELINE_POSTGRES_DBNAME",
        ),
        (
            'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
            'FATAL:  role "nobody" does not exist',
            "PIPELINE_POSTGRES_USER",
        ),
    ],
)
def test_a_postgres_that_refuses_the_connection_names_the_setting(text: str, setting: str) -> None:
    failure = explain(psycopg.OperationalError(text), None)
    assert failure is not None and failure.exit_code == 2
    assert failure.message.startswith(f"configuration error: {setting}")
    assert "\n" not in failure.message and "Is the server running" not in failure.message


def test_other_server_errors_are_reported_and_bugs_keep_their_traceback() -> None:
    later = explain(psycopg.OperationalError("server closed the connection unexpectedly"), None)
    assert later is not None and later.exit_code == 1
    assert later.message.startswith("error talking to PostgreSQL")
    away = explain(nats.errors.NoServersError(), None)
    assert away is not None and away.exit_code == 2 and "PIPELINE_NATS_URL" in away.message
    assert explain(ValueError("a bug"), None) is None


def test_dlq_list_says_how_many_there_are_beside_how_many_it_shows() -> None:
    assert cli._listed(100, 1138, None) == (
        "showing 100 of 1,138 dead letter(s); --limit N or --all for more"
    )
    assert cli._listed(2, 2, None) == "2 dead letter(s)"
    assert cli._listed(0, 0, Domain.SECURITY) == "0 security dead letter(s)"
    args = cli._parser().parse_args(["dlq", "list", "--all"])
    assert args.all and args.limit == 100
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["dlq", "list", "--all", "--limit", "5"])


def test_the_demo_s_status_line_adds_up() -> None:
    metrics = Metrics()
    metrics.stored.labels("security").inc(850)
    metrics.duplicates.labels("security", "store").inc(7)
    metrics.dead_lettered.labels("security", "invalid_json").inc(40)
    published = Counter({"store": 900, "duplicate": 20, "dead_letter": 40, WINDOW: 12})
    line = status_line(published, metrics)
    expected = (
        "published 960 = stored 850 + duplicates dropped 19 (JetStream 12, pipeline 7) "
        "+ dead-lettered 40 + not yet handled 51 | frames analysed 0, detections 0"
    )
    assert " ".join(line.split()) == expected
    assert LEGEND.startswith("published = stored + duplicates dropped")


def test_disk_usage_counts_the_files_under_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"x" * 100_000)
    assert 100_000 <= disk_usage(tmp_path) < 200_000


def test_a_bad_setting_is_named_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """pydantic's "Value error, " prefix is left out, and a message that names its
    setting itself is not prefixed with the name again."""
    monkeypatch.setenv("PIPELINE_NATS_URL", "nats://a:4222,b:4222")
    monkeypatch.setenv("PIPELINE_BATCH_SIZE", "many")
    with pytest.raises(ConfigError) as raised:
        cli._settings(cli._parser().parse_args(["streams", "apply"]))
    message = str(raised.value)
    assert "Value error" not in message
    assert message.count("PIPELINE_NATS_URL") == 1
    assert "PIPELINE_NATS_URL: entry 2 ('b:4222')" in message
    assert "PIPELINE_BATCH_SIZE: Input should be a valid integer" in message
