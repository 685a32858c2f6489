"""`pipeline demo` runs on its own embedded servers and stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def test_demo_processes_traffic_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "demo",
            "--data-dir",
            str(tmp_path / "demo"),
            "--rate",
            "400",
            "--fps",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as in a terminal
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    api: re.Match[str] | None = None
    try:
        for line in proc.stdout:
            lines.append(line)
            api = api or re.search(r"Bearer (\S+)' '(http://127.0.0.1:\d+)/", line)
            match = re.search(
                r"stored\s+(\d+).*dead-lettered\s+(\d+).*frames analysed\s+(\d+)", line
            )
            if match and int(match.group(1)) > 500 and min(map(int, match.groups()[1:])) > 0:
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        # The query API answers from the views the projections keep.
        assert api is not None, lines
        token, url = api.groups()
        page = httpx.get(
            f"{url}/v1/security/events",
            params={"limit": 3},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert page.status_code == 200 and len(page.json()["items"]) == 3, page.text
        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    final = re.search(r"final: published\s+(\d+).*stored\s+(\d+)", output)
    assert final, output[-3000:]
    assert int(final.group(2)) > 500
    analysed = re.search(r"final: .*frames analysed\s+(\d+)", output)
    assert analysed and int(analysed.group(1)) > 0, output[-3000:]
    assert "stopped" in output
    # A clean first minute: the demo's own lines first, and no traceback at the end.
    assert lines[0].startswith("NATS nats://127.0.0.1:"), lines[:5]
    assert all(
        re.match(r"(NATS|detector|metrics on|query API|published) ", line) for line in lines
    ), lines
    assert "Traceback" not in output and "exception was never retrieved" not in output, output
    assert (tmp_path / "demo" / "embedded-postgres.log").stat().st_size > 0
    # The embedded servers are gone with the demo.
    assert not (tmp_path / "demo" / "postgres" / "postmaster.pid").exists()
