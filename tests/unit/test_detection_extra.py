"""Detection is an extra: where it is configured but not installed, one line names the
extra and the setting (simulated here by hiding its modules), before anything starts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.detection.extra import (
    EXTRA,
    LOCAL_MODULES,
    DetectionMissing,
    missing,
    require_for_frames,
)
from pipeline.errors import ConfigError
from pipeline.ops import demo
from pipeline.ops.cli import main
from pipeline.ops.embedded import free_port
from pipeline.ops.simulate import Cameras
from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects


@pytest.fixture
def without_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extra's modules cannot be imported (as in a core install); Ray's client can."""
    for name in ("ultralytics", "torch", "cv2"):
        monkeypatch.setitem(sys.modules, name, None)


def _frames_settings(**values: object) -> Settings:
    return Settings(_env_file=None, domains=(Domain.FRAMES,), **values)  # type: ignore[arg-type]


def test_the_dev_install_has_every_module_of_the_extra() -> None:
    assert missing(LOCAL_MODULES) == []


def test_a_frames_worker_without_the_extra_is_refused_naming_it(without_detection: None) -> None:
    with pytest.raises(DetectionMissing) as raised:
        require_for_frames(_frames_settings())
    error = raised.value
    assert isinstance(error, ConfigError) and error.setting == "PIPELINE_DOMAINS"
    assert error.modules == ("ultralytics", "torch", "cv2")
    assert str(error) == (
        "PIPELINE_DOMAINS: for the frames domain, install the detection extra: pip install "
        f"'{EXTRA}' (no module ultralytics, torch, cv2 here), or leave frames out of "
        "PIPELINE_DOMAINS"
    )


def test_a_ray_cluster_s_client_needs_ray_only(
    without_detection: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_for_frames(_frames_settings(ray_address="ray://ray-head:10001"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DetectionMissing, match=r"\(no module ray here\)"):
        require_for_frames(_frames_settings(ray_address="ray://ray-head:10001"))


def test_a_folder_named_like_a_module_is_not_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's temporary folder /tmp/ray, from /tmp, is a namespace package, not Ray."""
    (tmp_path / "not_a_module_here").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing(["not_a_module_here", "json"]) == ["not_a_module_here"]


def test_pipeline_run_worker_says_so_in_one_line_before_connecting(
    without_detection: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("PIPELINE_DOMAINS", '["frames", "security"]')
    monkeypatch.setenv("PIPELINE_NATS_URL", f"nats://127.0.0.1:{free_port()}")  # nothing there
    monkeypatch.setenv("PIPELINE_METRICS_PORT", "0")
    assert main(["run", "worker"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("configuration error: PIPELINE_DOMAINS: for the frames domain, ")
    assert f"pip install '{EXTRA}'" in err


def test_export_cameras_and_the_demo_name_the_extra(
    without_detection: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["model", "export", "yolov8n.yaml", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configuration error: pipeline model export: for exporting a model")
    assert err.count("\n") == 1 and EXTRA in err
    with pytest.raises(DetectionMissing, match=r"--cameras: .* or --cameras 0$"):
        Cameras(Subjects(""), cameras=1)
    with pytest.raises(DetectionMissing, match=r"or run it with --cameras 0$"):
        asyncio.run(demo.run_demo(tmp_path / "demo", rate=1, duration_s=1, stop=asyncio.Event()))
    assert not (tmp_path / "demo").exists(), "refused before any server started"


def test_the_core_modules_import_without_the_extra(tmp_path: Path) -> None:
    """The worker of the other domains, the projections, the API and the audit trail."""
    hidden = ("ultralytics", "torch", "cv2", "numpy", "ray")
    hide = f"import sys\nfor m in {hidden!r}: sys.modules[m] = None\n"
    code = (
        hide + "import pipeline.app, pipeline.api.server, projections.service, "
        "pipeline.ops.auditor, pipeline.ops.cli\nimport json\nprint(json.dumps('ok'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.splitlines()[-1]) == "ok"
