"""The witness against the API served for real: it cosigns an honest log as it grows, and
refuses a fork, a rewritten history and a rollback without cosigning anything."""

from __future__ import annotations

import logging
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.audit.note import (
    COSIGNATURE_V1,
    Checkpoint,
    Signer,
    Verifier,
    open_note,
    parse_note,
    sign_note,
)
from pipeline.audit.remote import RemoteLog
from pipeline.audit.witness import Refused, Round, Witness, generate_key, read_key
from pipeline.ops.cli import main

from .test_audit_api import Logged, lying, software_signers, verifiers, vkeys_file

NAME = "witness.test/w2"


@pytest.fixture
def signers(tmp_path: Path) -> list[Signer]:
    return software_signers(tmp_path)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    """The witness's key file, and its vkey beside it (`witness.vkey`)."""
    path = tmp_path / "witness.key"
    (tmp_path / "witness.vkey").write_text(generate_key(path, NAME) + "\n")
    return path


@pytest.fixture
def logs(signers: list[Signer], tmp_path: Path, key: Path) -> Iterator[tuple[Logged, Logged]]:
    """Two logs of one origin and keys, each of its own events: the honest one and a fork."""
    honest = Logged(signers, tmp_path / "witness.vkey")
    fork = Logged(signers, tmp_path / "witness.vkey")
    yield honest, fork
    honest.close()
    fork.close()


@pytest.fixture
def log_vkeys(signers: list[Signer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The log's vkeys in a file, for the command (run in tmp_path: no stray .env file)."""
    monkeypatch.chdir(tmp_path)
    return vkeys_file(tmp_path / "log.vkeys", signers)


def _witness(prefix: str, key: Path, signers: list[Signer], state: Path) -> Witness:
    return Witness(RemoteLog(prefix), read_key(key), verifiers(signers), state)


def _size(note: bytes) -> int:
    return Checkpoint.parse(parse_note(note)[0]).size


def test_witness_keygen_writes_a_private_key_file_and_prints_its_vkey(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "w.key"
    assert main(["audit", "witness-keygen", str(path), "--name", NAME]) == 0
    vkey = capsys.readouterr().out.splitlines()[-1]
    public = Verifier.parse(vkey)
    assert (public.name, public.sig_type) == (NAME, COSIGNATURE_V1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signer = read_key(path)
    assert Verifier.for_signer(signer) == public
    assert main(["audit", "witness-keygen", str(path), "--name", NAME]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    path.chmod(0o640)
    with pytest.raises(ValueError, match="chmod 600"):
        read_key(path)


def test_the_witness_cosigns_an_honest_growing_log(
    logs: tuple[Logged, Logged],
    signers: list[Signer],
    key: Path,
    log_vkeys: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    log, _ = logs
    state = tmp_path / "witness.state"
    ours = Verifier.for_signer(read_key(key))
    with log.api() as prefix:
        witness = _witness(prefix, key, signers, state)
        assert witness.round().outcome == "no_checkpoint"
        log.grow(300)
        assert witness.round() == Round("cosigned", 300)
        assert witness.round().outcome == "current"  # served with its cosignature: no more
        log.grow(400)
        assert witness.round().outcome == "cosigned"
        assert _size(state.read_bytes()) == 700
        served = httpx.get(f"{prefix}/checkpoint", timeout=10).content
        text, found = open_note(served, [ours], require=[NAME])
        assert Checkpoint.parse(text).size == 700 and found[0].ident == ours.ident
        open_note(served, verifiers(signers), require=[s.name for s in signers])
        # The command, one round, on the state the rounds above kept.
        log.grow(11)
        args = ["audit", "witness", "--url", prefix, "--key", str(key), "--once"]
        args += ["--log-keys", str(log_vkeys)]
        assert main([*args, "--state", str(state)]) == 0
        assert "cosigned: the log's checkpoint of 711 leaves" in capsys.readouterr().out
    assert log.cosignatures() == [(300, NAME), (700, NAME), (711, NAME)]


def test_a_fork_a_rewrite_and_a_rollback_are_refused_and_never_cosigned(
    logs: tuple[Logged, Logged],
    signers: list[Signer],
    key: Path,
    log_vkeys: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    honest, fork = logs
    state = tmp_path / "witness.state"
    honest.grow(300)
    fork.grow(300)
    with honest.api() as prefix:
        assert _witness(prefix, key, signers, state).round().outcome == "cosigned"
    kept = state.read_bytes()
    evidence = tmp_path / "witness.state.refused"
    with fork.api() as prefix:
        witness = _witness(prefix, key, signers, state)
        with pytest.raises(Refused, match="two signed checkpoints of 300 leaves") as forked:
            witness.round()
        assert str(evidence) in str(forked.value) and _size(evidence.read_bytes()) == 300
        fork.grow(100)
        with pytest.raises(Refused, match="does not extend the one of 300 leaves"):
            witness.round()
        assert _size(evidence.read_bytes()) == 400
        # The command exits non-zero and logs an error.
        args = ["audit", "witness", "--url", prefix, "--key", str(key), "--once"]
        args += ["--log-keys", str(log_vkeys)]
        with caplog.at_level(logging.ERROR, logger="pipeline.audit.witness"):
            assert main([*args, "--state", str(state)]) == 1
        assert "refused the log's checkpoint" in capsys.readouterr().err
        assert any(
            r.levelno == logging.ERROR and "does not extend" in r.getMessage()
            for r in caplog.records
        )
    with honest.api() as prefix:
        honest.grow(200)
        assert _witness(prefix, key, signers, state).round().outcome == "cosigned"
    rolled_back = "smaller than the one of 500 leaves seen before: the log was rolled back"
    with fork.api() as prefix, pytest.raises(Refused, match=rolled_back):  # 400 leaves
        _witness(prefix, key, signers, state).round()
    assert state.read_bytes() != kept and _size(state.read_bytes()) == 500
    assert fork.cosignatures() == []
    assert honest.cosignatures() == [(300, NAME), (500, NAME)]


def test_a_checkpoint_the_log_did_not_sign_is_refused(
    logs: tuple[Logged, Logged], signers: list[Signer], key: Path, tmp_path: Path
) -> None:
    """A server in the log's place: another key, or the log's keys over a crafted tree."""
    log, _ = logs
    log.grow(40)
    state = tmp_path / "witness.state"
    other = software_signers(tmp_path)

    def resigned(path: str, body: bytes) -> bytes:
        text = body[: body.index(b"\n\n") + 1] if path == "checkpoint" else b""
        return sign_note(text, other) if text else body

    def crafted(path: str, body: bytes) -> bytes:  # the log's own keys, another root
        if path != "checkpoint":
            return body
        return sign_note(Checkpoint(log.audit.origin, 80, bytes(32)).body(), signers)

    with log.api() as prefix:
        unsigned = "does not verify with the log's keys"
        with lying(prefix, resigned) as liar, pytest.raises(Refused, match=unsigned):
            _witness(liar, key, signers, state).round()
        assert _witness(prefix, key, signers, state).round().outcome == "cosigned"
        log.grow(40)
        rewritten = "does not extend the one of 40 leaves"
        with lying(prefix, crafted) as liar, pytest.raises(Refused, match=rewritten):
            _witness(liar, key, signers, state).round()
        assert _size(state.read_bytes()) == 40
        assert _witness(prefix, key, signers, state).round().outcome == "cosigned"
    assert log.cosignatures() == [(40, NAME), (80, NAME)]


def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_witness_process_cosigns_round_after_round_until_sigterm(
    logs: tuple[Logged, Logged], key: Path, log_vkeys: Path, tmp_path: Path
) -> None:
    log, _ = logs
    log.grow(50)
    output = tmp_path / "witness.log"
    with log.api() as prefix, output.open("wb") as out:
        command = ["audit", "witness", "--url", prefix, "--key", str(key), "--interval", "0.2"]
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *command, "--log-keys", str(log_vkeys)],
            cwd=tmp_path,
            stdout=out,
            stderr=out,
        )
        try:
            _until(lambda: log.cosignatures() == [(50, NAME)])
            log.grow(25)
            _until(lambda: log.cosignatures() == [(50, NAME), (75, NAME)])
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0, output.read_text()
        finally:
            if process.poll() is None:
                process.kill()
    assert _size((tmp_path / "witness.key.state").read_bytes()) == 75
    assert "Traceback" not in output.read_text()
