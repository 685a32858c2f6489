"""Benchmark: how long the `pipeline` command takes to start.

    python bench/startup.py [--runs 9]

Each figure is the median of `--runs` fresh processes (wall-clock seconds, and the CPU
seconds they used, which a busy machine inflates less):
  (a) `pipeline --help` (`help_s`);
  (b) importing what `pipeline projections status` imports before it connects: the CLI,
      the settings, the read side's commands and the logging (`projections_status_import_s`);
  (c) `pipeline projections status` itself against a port where no PostgreSQL listens, so
      that it ends at once with its one-line error (`projections_status_refused_s`): its
      start-up, settings and error path, with no query;
and, from one `python -X importtime` run, the import of `pipeline.ops.cli` alone
(`cli_import_ms`). The target is under 0.5 s for (a) and (b) on an idle machine.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATUS_IMPORTS = "import pipeline.ops.cli, pipeline.settings, pipeline.ops.readside, pipeline.logs"


def _pipeline() -> list[str]:
    """The console script installed beside this Python, as a user runs it."""
    script = Path(sys.executable).parent / "pipeline"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when this returns


def _timed(command: list[str], env: dict[str, str], runs: int, cwd: str) -> dict[str, float]:
    """Median wall and CPU seconds of `runs` runs of `command`."""
    walls, cpus = [], []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - started)
        cpus.append(usage.ru_utime + usage.ru_stime)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
        if proc.returncode not in (0, 2):
            raise RuntimeError(f"{command} exited {proc.returncode}: {err[-2000:]}")
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def _cli_import_ms(env: dict[str, str], cwd: str) -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import pipeline.ops.cli"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    found = re.search(r"\|\s*(\d+) \| pipeline\.ops\.cli$", out, re.MULTILINE)
    assert found, out[-2000:]
    return int(found.group(1)) / 1000


def main(args: argparse.Namespace) -> dict[str, Any]:
    # No settings from the caller's environment, nor from a .env file (an empty cwd).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    cwd = tempfile.mkdtemp(prefix="bench-startup-")
    refused = {
        **env,
        "PIPELINE_POSTGRES_HOST": "127.0.0.1",
        "PIPELINE_POSTGRES_PORT": str(_closed_port()),
    }
    figures = {
        "help": _timed([*_pipeline(), "--help"], env, args.runs, cwd),
        "projections_status_import": _timed(
            [sys.executable, "-c", STATUS_IMPORTS], env, args.runs, cwd
        ),
        "projections_status_refused": _timed(
            [*_pipeline(), "projections", "status"], refused, args.runs, cwd
        ),
    }
    for name, figure in figures.items():
        print(f"{name:<28} {figure['wall_s']:.3f} s wall, {figure['cpu_s']:.3f} s CPU")
    cli_ms = _cli_import_ms(env, cwd)
    os.rmdir(cwd)
    print(f"import pipeline.ops.cli      {cli_ms:.0f} ms (-X importtime)")
    result: dict[str, Any] = {"runs": args.runs, "cli_import_ms": round(cli_ms, 1)}
    for name, figure in figures.items():
        result[f"{name}_s"] = round(figure["wall_s"], 3)
        result[f"{name}_cpu_s"] = round(figure["cpu_s"], 3)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs of each command (median)")
    print(json.dumps(main(parser.parse_args())))
