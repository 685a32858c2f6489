"""`pipeline demo` runs on its own embedded servers, tells the CLI where they are, opens
incidents on the simulator's traffic, serves the dashboard, keeps to its disk budget and
stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _cli(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`pipeline ARGS` as a user types it in `folder`, with none of the test's settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=folder,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _incidents(url: str, token: str, *, within_s: float) -> list[dict[str, object]]:
    """The demo's incidents once there are some (none after `within_s`)."""
    deadline = time.monotonic() + within_s
    while True:
        page = httpx.get(
            f"{url}/v1/incidents",
            params={"limit": 50},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert page.status_code == 200, page.text
        items: list[dict[str, object]] = page.json()["items"]
        if items or time.monotonic() > deadline:
            return items
        time.sleep(1)


def test_demo_processes_traffic_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "demo", "--rate", "400", "--fps", "2"],
        cwd=tmp_path,  # its data in ./.pipeline-demo, where `pipeline --demo` looks
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as in a terminal
    )
    data = tmp_path / ".pipeline-demo"
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    api: re.Match[str] | None = None
    dashboard: re.Match[str] | None = None
    try:
        for line in proc.stdout:
            lines.append(line)
            dashboard = dashboard or re.search(r"^dashboard on (http://127.0.0.1:\d+/) ", line)
            api = api or re.search(r"Bearer (\S+)' '(http://127.0.0.1:\d+)/", line)
            match = re.search(
                r"stored\s+(\d+).*dead-lettered\s+(\d+).*frames analysed\s+(\d+)", line
            )
            if match and int(match.group(1)) > 500 and min(map(int, match.groups()[1:])) > 0:
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        # The CLI finds the demo with the line it printed, from the same folder.
        assert "CLI in another terminal: pipeline --demo projections status" in "".join(lines)
        status = _cli(tmp_path, "--demo", "projections", "status")
        assert status.returncode == 0 and "security" in status.stdout, status
        letters = _cli(tmp_path, "--demo", "dlq", "list", "--limit", "1")
        assert letters.returncode == 0, letters
        assert re.search(r"showing 1 of \d+ dead letter\(s\)", letters.stdout), letters.stdout
        # ... or from anywhere, given the file.
        status = _cli(Path("/"), "events", "tail", PIPELINE_ENV_FILE=str(data / "demo.env"))
        assert status.returncode == 0 and status.stdout.count("\n") == 20, status
        # The query API answers from the views the projections keep.
        assert api is not None, lines
        token, url = api.groups()
        page = httpx.get(
            f"{url}/v1/security/events",
            params={"limit": 3},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert page.status_code == 200 and len(page.json()["items"]) == 3, page.text
        # The incident process opens incidents on the example site's rules ...
        opened = _incidents(url, token, within_s=60)
        assert opened and all(item["state"] == "open" for item in opened), opened
        assert {item["rule"] for item in opened} & {
            "critical-security-event",
            "badge-rejected-burst",
            "service-down",
        }, opened
        # ... and the dashboard answers at the address the demo printed.
        assert dashboard is not None and dashboard.group(1) == f"{url}/", lines[:8]
        home = httpx.get(dashboard.group(1))
        assert home.status_code == 200, home.text
        assert home.headers["content-type"].startswith("text/html"), home.headers
        # Ctrl-C in a terminal signals the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    final = re.search(
        r"final: published\s+(\d+) = stored\s+(\d+) \+ duplicates dropped\s+(\d+) "
        r"\(JetStream\s+(\d+), pipeline\s+(\d+)\) \+ dead-lettered\s+(\d+) "
        r"\+ not yet handled\s+(\d+)",
        output,
    )
    assert final, output[-3000:]
    published, stored, dropped, window, deduplicated, dead, waiting = map(int, final.groups())
    assert stored > 500 and dead > 0 and window > 0 and deduplicated > 0
    assert dropped == window + deduplicated
    assert published == stored + dropped + dead + waiting, "the counts add up"
    analysed = re.search(r"final: .*frames analysed\s+(\d+)", output)
    assert analysed and int(analysed.group(1)) > 0, output[-3000:]
    assert "stopped" in output
    # A clean first minute: the demo's own lines first, and no traceback at the end.
    assert lines[0].startswith("NATS nats://127.0.0.1:"), lines[:5]
    assert all(
        re.match(
            r"(NATS|detector|metrics on|dashboard on|query API|CLI in another|published) ", line
        )
        for line in lines
    ), lines
    assert "Traceback" not in output and "exception was never retrieved" not in output, output
    assert (data / "embedded-postgres.log").stat().st_size > 0
    # The embedded servers are gone with the demo, and so is its settings file.
    assert not (data / "postgres" / "postmaster.pid").exists()
    assert not (data / "demo.env").exists()
    gone = _cli(tmp_path, "--demo", "dlq", "list")
    assert gone.returncode == 2 and "no demo is running from this folder" in gone.stderr, gone


def test_demo_stops_its_producers_at_its_disk_budget(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "demo",
            "--data-dir",
            str(tmp_path / "demo"),
            "--cameras",
            "0",
            "--rate",
            "200",
            "--max-disk-mb",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("final: "):
                break
        # Stopped producing, it still serves the CLI, from another folder with the file.
        assert any("the demo's --max-disk-mb 1: the producers stop" in x for x in lines), lines
        assert "CLI in another terminal: PIPELINE_ENV_FILE=" in "".join(lines)
        status = _cli(
            tmp_path, "projections", "status", PIPELINE_ENV_FILE=str(tmp_path / "demo/demo.env")
        )
        assert status.returncode == 0, status
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and rest.strip().endswith("stopped"), "".join(lines) + rest
