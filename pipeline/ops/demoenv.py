"""The running demo's settings file: written by `pipeline demo`, read by `pipeline --demo`.

The demo runs its servers on random ports (PostgreSQL behind a Unix socket), so it writes
the `PIPELINE_*` values a command needs to reach them to `<data dir>/demo.env`, with its
process id in a comment, and removes the file when it stops. A command given `--demo`
(or `PIPELINE_ENV_FILE=<that file>`) reads it instead of `./.env`; one whose demo is no
longer running says so instead of trying servers that are gone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["DEMO_DIR", "ENV_FILE_NAME", "chosen_env_file", "remove_env_file", "write_env_file"]

DEMO_DIR = Path(".pipeline-demo")
"""The demo's data folder unless `pipeline demo --data-dir` says otherwise."""
ENV_FILE_NAME = "demo.env"
_PID = "# pid "


def write_env_file(data_dir: Path, settings: Settings, pid: int | None = None) -> Path:
    """Write the settings a command needs to reach the demo (mode 0600: it holds the API's
    token) to `data_dir/demo.env`, marked with the demo's process id; return the file."""
    values = {
        "PIPELINE_NATS_URL": settings.nats_url,
        "PIPELINE_POSTGRES_HOST": settings.postgres_host,
        "PIPELINE_POSTGRES_PORT": str(settings.postgres_port),
        "PIPELINE_POSTGRES_DBNAME": settings.postgres_dbname,
        "PIPELINE_POSTGRES_USER": settings.postgres_user,
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema,
        "PIPELINE_DOMAINS": json.dumps([domain.value for domain in settings.domains]),
        # `pipeline --demo streams apply` keeps the demo's smaller streams
        "PIPELINE_FRAMES_MAX_BYTES": str(settings.frames_max_bytes),
        "PIPELINE_DEAD_LETTERS_MAX_BYTES": str(settings.dead_letters_max_bytes),
        "PIPELINE_DEAD_LETTER_MAX_BODY_BYTES": str(settings.dead_letter_max_body_bytes),
        "PIPELINE_API_PORT": str(settings.api_port),
        "PIPELINE_API_TOKENS": json.dumps(settings.api_tokens),
        # `pipeline --demo incidents rebuild` reads the demo's sites
        "PIPELINE_SITES_FILE": settings.sites_file,
    }
    path = data_dir / ENV_FILE_NAME
    lines = [
        "# The running `pipeline demo`'s settings, for `pipeline --demo <command>` or",
        f"# PIPELINE_ENV_FILE={path.resolve()}; removed when the demo stops.",
        f"{_PID}{os.getpid() if pid is None else pid}",
        # Double-quoted and escaped as JSON strings, which dotenv files read back.
        *(f"{name}={json.dumps(value)}" for name, value in values.items()),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("\n".join(lines) + "\n")
    return path


def remove_env_file(path: Path) -> None:
    """Remove the demo's settings file (the demo stops)."""
    path.unlink(missing_ok=True)


def chosen_env_file(demo: bool, environ: Mapping[str, str]) -> Path | None:
    """The settings file a command reads instead of `./.env`: the running demo's with
    `--demo`, else `PIPELINE_ENV_FILE`'s; None for `./.env`.

    Raises `ConfigError` when the file is missing or was written by a demo that is no
    longer running.
    """
    if demo:
        setting, path = "--demo", DEMO_DIR / ENV_FILE_NAME
        if not path.is_file():
            raise ConfigError(
                setting,
                f"no demo is running from this folder ({path} does not exist): start one "
                "with `pipeline demo`, or give its file as PIPELINE_ENV_FILE=<data dir>/"
                f"{ENV_FILE_NAME}",
            )
    elif environ.get("PIPELINE_ENV_FILE"):
        setting, path = "PIPELINE_ENV_FILE", Path(environ["PIPELINE_ENV_FILE"])
        if not path.is_file():
            raise ConfigError(
                setting, f"{path} does not exist (a demo removes its file when it stops)"
            )
    else:
        return None
    pid = _demo_pid(path)
    if pid is not None and not _running(pid):
        raise ConfigError(
            setting,
            f"the demo that wrote {path} (pid {pid}) is not running: start it again with "
            "`pipeline demo`",
        )
    return path


def _demo_pid(path: Path) -> int | None:
    """The process id a demo wrote into its settings file; None for any other file."""
    for line in path.read_text().splitlines():
        if line.startswith(_PID) and line[len(_PID) :].strip().isdigit():
            return int(line[len(_PID) :])
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
