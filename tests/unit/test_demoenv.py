"""The demo's settings file: written by the demo, found by `--demo` or PIPELINE_ENV_FILE."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.ops.demoenv import DEMO_DIR, ENV_FILE_NAME, chosen_env_file, write_env_file
from pipeline.settings import EVENT_DOMAINS, Settings


def _demo_settings() -> Settings:
    return Settings(
        _env_file=None,
        nats_url="nats://127.0.0.1:40123",
        postgres_host="/tmp/a folder/with 'quotes' and \"more\"",
        postgres_port=5433,
        postgres_dbname="postgres",
        api_port=40124,
        api_tokens={"demo-0123": ("read", "operate")},
        domains=EVENT_DOMAINS,
        frames_max_bytes=128 * 1024**2,
        dead_letter_max_body_bytes=16 * 1024,
        sites_file="/srv/sites.yaml",
    )


def test_a_command_reads_back_what_the_demo_wrote(tmp_path: Path) -> None:
    wrote = _demo_settings()
    path = write_env_file(tmp_path / "demo", wrote)
    assert path == tmp_path / "demo" / ENV_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "it holds the API's token"
    read = Settings(_env_file=path)
    for name in (
        "nats_url",
        "postgres_host",
        "postgres_port",
        "postgres_dbname",
        "postgres_user",
        "api_port",
        "api_tokens",
        "domains",
        "frames_max_bytes",
        "dead_letter_max_body_bytes",
        "sites_file",
    ):
        assert getattr(read, name) == getattr(wrote, name), name


def test_demo_finds_the_running_demo_of_this_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no demo is running from this folder") as missing:
        chosen_env_file(True, {})
    assert missing.value.setting == "--demo"
    written = write_env_file(DEMO_DIR, _demo_settings())  # by this process: running
    assert chosen_env_file(True, {}) == written
    # --demo wins over a PIPELINE_ENV_FILE of another folder
    assert chosen_env_file(True, {"PIPELINE_ENV_FILE": "/elsewhere/demo.env"}) == written


def test_a_file_left_by_a_demo_that_stopped_is_called_stale(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    path = write_env_file(tmp_path, _demo_settings(), pid=int(gone.stdout))
    with pytest.raises(ConfigError, match=r"is not running: start it again") as stale:
        chosen_env_file(False, {"PIPELINE_ENV_FILE": str(path)})
    assert stale.value.setting == "PIPELINE_ENV_FILE"


def test_env_file_names_any_settings_file_and_none_means_dot_env(tmp_path: Path) -> None:
    mine = tmp_path / "staging.env"
    mine.write_text('PIPELINE_NATS_URL="nats://staging:4222"\n')
    assert chosen_env_file(False, {"PIPELINE_ENV_FILE": str(mine)}) == mine
    assert chosen_env_file(False, {}) is None
    assert chosen_env_file(False, {"PIPELINE_ENV_FILE": ""}) is None
    with pytest.raises(ConfigError, match="does not exist"):
        chosen_env_file(False, {"PIPELINE_ENV_FILE": str(tmp_path / "none.env")})
