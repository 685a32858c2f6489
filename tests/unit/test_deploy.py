"""The shipped NATS configuration is valid and carries the largest frame the worker accepts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pipeline.app import HEADER_ROOM
from pipeline.ops.embedded import nats_server_binary
from pipeline.settings import Settings

NATS_CONF = Path(__file__).parents[2] / "deploy" / "nats.conf"
_UNITS = {"": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def test_nats_conf_is_valid_for_the_server_the_pipeline_ships() -> None:
    result = subprocess.run(
        [str(nats_server_binary()), "-t", "-c", str(NATS_CONF)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_nats_conf_max_payload_carries_the_default_frame_limit() -> None:
    match = re.search(r"^max_payload:\s*(\d+)\s*(KB|MB|GB)?\s*$", NATS_CONF.read_text(), re.M)
    assert match, "deploy/nats.conf must set max_payload"
    max_payload = int(match.group(1)) * _UNITS[match.group(2) or ""]
    assert max_payload >= Settings(_env_file=None).max_frame_bytes + HEADER_ROOM
    assert "sync_interval: always" in NATS_CONF.read_text()
