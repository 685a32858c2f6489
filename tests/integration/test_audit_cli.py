"""The audit trail as an operator runs it: `pipeline audit keygen`, `pipeline run audit` with
its Ed25519 key in a real SoftHSM2 token, and the commands an auditor runs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import psycopg
import pytest

from pipeline.app import apply_streams_once
from pipeline.audit import merkle
from pipeline.audit.keys import MldsaSigner
from pipeline.audit.note import (
    Checkpoint,
    Ed25519Signer,
    Signer,
    Verifier,
    open_note,
    parse_note,
    sign_note,
)
from pipeline.audit.publish import SIZE_HEADER
from pipeline.ops.embedded import EmbeddedNats, free_port
from pipeline.store.eventstore import EventStore
from tests.softhsm import SoftHsm, softhsm

from ..conftest import PG_DB, PG_HOST, as_role, make_settings
from .helpers import write_events

ORIGIN = "audit.test/cli"


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    with softhsm(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


async def _stream_sizes(url: str) -> list[int]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        last = (await js.stream_info("AUDIT")).state.last_seq
        sizes = []
        for seq in range(1, last + 1):
            message = await js.get_msg("AUDIT", seq)
            sizes.append(int((message.headers or {})[SIZE_HEADER]))
            assert Checkpoint.parse(parse_note(message.data or b"")[0]).size == sizes[-1]
        return sizes
    finally:
        await nc.close()


def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_an_operator_signs_in_the_hsm_and_an_auditor_verifies_live_and_offline(
    hsm: SoftHsm, nats_server: EmbeddedNats, pg_schema: str, tmp_path: Path
) -> None:
    token = hsm.token()
    settings = make_settings(nats_server.url, pg_schema)
    asyncio.run(apply_streams_once(settings))  # the AUDIT stream keeps a copy of each checkpoint
    metrics_port = free_port()
    pin_file = tmp_path / "hsm.pin"  # as a secret is mounted: the PIN never in a setting
    pin_file.write_text(token.pin + "\n")
    pin_file.chmod(0o600)
    env = {
        **os.environ,
        "SOFTHSM2_CONF": str(hsm.conf),
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_SCHEMA": pg_schema,
        "PIPELINE_POSTGRES_USER": "pipeline_auditor",
        "PIPELINE_NATS_URL": nats_server.url,
        "PIPELINE_AUDIT_ORIGIN": ORIGIN,
        "PIPELINE_AUDIT_HSM_TOKEN": token.label,
        "PIPELINE_AUDIT_HSM_PIN_FILE": str(pin_file),
        "PIPELINE_AUDIT_MLDSA_KEY_FILE": str(tmp_path / "mldsa.key"),
        "PIPELINE_AUDIT_CHECKPOINT_EVERY": "100",
        "PIPELINE_AUDIT_CHECKPOINT_INTERVAL_S": "0.5",
        "PIPELINE_AUDIT_METRICS_PORT": str(metrics_port),
        "PIPELINE_PROJECTIONS_POLL_S": "0.2",
    }

    def pipeline(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert done.returncode == 0, done.stderr + done.stdout
        return done

    keygen = pipeline("audit", "keygen")
    vkeys = [line for line in keygen.stdout.splitlines() if line and not line.startswith("#")]
    keys = [Verifier.parse(line) for line in vkeys]
    assert [k.name for k in keys] == [ORIGIN, f"{ORIGIN}/ml-dsa-65"]
    assert oct((tmp_path / "mldsa.key").stat().st_mode & 0o777) == "0o600"
    keys_file = tmp_path / "log.vkeys"
    keys_file.write_text("\n".join(vkeys) + "\n")
    again = pipeline("audit", "keygen", check=False)
    assert again.returncode == 1 and "already holds" in again.stderr

    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    events = write_events(store, 250, seed=11)
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "audit"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def status() -> dict[str, int]:
        return json.loads(pipeline("audit", "status", "--json").stdout)  # type: ignore[no-any-return]

    def copied() -> list[int]:
        """The sizes of the checkpoints in the AUDIT stream, in order."""
        return asyncio.run(_stream_sizes(nats_server.url))

    def age() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            for line in r.read().decode().splitlines():
                if line.startswith("pipeline_audit_checkpoint_age_seconds "):
                    return float(line.split()[1])
        raise AssertionError("no checkpoint age metric")

    try:
        _until(lambda: status()["checkpoint_size"] == 250)

        # The HSM goes away: events are still logged, no checkpoint is signed, the age grows.
        with hsm.unplugged(token):
            write_events(store, 50, seed=12)
            _until(lambda: status()["log_size"] == 300)
            _until(lambda: age() >= 2.0)
            assert status()["checkpoint_size"] == 250
        # Back: the next checkpoint covers everything.
        _until(lambda: status()["checkpoint_size"] == 300)
        _until(lambda: age() == 0.0)
        _until(lambda: copied() == [100, 200, 250, 300])

        # NATS away: checkpoints are signed and stored, and copied once it is back.
        nats_server.stop()
        write_events(store, 50, seed=13)
        _until(lambda: status()["checkpoint_size"] == 350)
        nats_server.start()
        _until(lambda: copied() == [100, 200, 250, 300, 350])
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
        store.close()
    assert "no checkpoint signed" in output, output

    # An inclusion proof of one event, by its message id, against the signed checkpoint.
    proof = json.loads(pipeline("audit", "prove", events[7].message_id).stdout)
    text, _ = open_note(proof["checkpoint"].encode(), keys, require=[k.name for k in keys])
    checkpoint = Checkpoint.parse(text)
    assert checkpoint.size == proof["tree_size"] == 350
    merkle.verify_inclusion(
        proof["leaf_index"],
        350,
        base64.b64decode(proof["leaf_hash"]),
        [base64.b64decode(h) for h in proof["proof"]],
        checkpoint.root,
    )
    consistency = json.loads(pipeline("audit", "consistency", "100", "350").stdout)
    merkle.verify_consistency(
        100,
        350,
        base64.b64decode(consistency["old_root"]),
        checkpoint.root,
        [base64.b64decode(h) for h in consistency["proof"]],
    )

    assert "verified: 350 events" in pipeline("audit", "verify", "--keys", str(keys_file)).stdout
    env["PIPELINE_AUDIT_KEYS_FILE"] = str(keys_file)
    pipeline("audit", "export", str(tmp_path / "export"))
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["keys"] == vkeys and manifest["events"] == 350
    # Offline: nothing but the export and the keys; no database can be reached.
    auditor = {k: v for k, v in env.items() if not k.startswith("PIPELINE_")}
    auditor["PIPELINE_POSTGRES_PORT"] = str(free_port())
    offline = _offline_verify(tmp_path / "export", keys_file, auditor)
    assert offline.returncode == 0 and "verified: 350 events" in offline.stdout, offline.stderr
    for kind, words in _tamper_export(tmp_path / "export", tmp_path / "tampered", tmp_path):
        found = _offline_verify(tmp_path / "tampered", keys_file, auditor)
        assert found.returncode == 1, (kind, found.stdout, found.stderr)
        assert words in found.stdout, (kind, found.stdout, found.stderr)

    # Someone with the owner's rights changes a stored event: verify says which, and fails.
    owner = psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True)
    with owner as conn, conn.transaction():
        conn.execute("SET LOCAL pipeline.break_glass = 'on'")
        conn.execute(
            f"UPDATE \"{pg_schema}\".journal_events SET state = state || '\\x20'::bytea "
            "WHERE notification_id = 42"
        )
    tampered = pipeline("audit", "verify", "--keys", str(keys_file), check=False)
    assert tampered.returncode == 1
    assert "at position 42" in tampered.stdout and "changed after it was logged" in tampered.stdout
    # The export made before still verifies on its own: it holds the events as logged.
    offline = _offline_verify(tmp_path / "export", keys_file, auditor)
    assert offline.returncode == 0, offline.stdout


def _offline_verify(
    export: Path, keys_file: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "audit",
            "verify",
            "--from",
            str(export),
            "--keys",
            str(keys_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


_EVENT = struct.Struct(">QI")
_ROW = struct.Struct(">QQH")


def _tamper_export(source: Path, target: Path, scratch: Path) -> Iterator[tuple[str, str]]:
    """Tamper with a copy of an export in `target`, one way after another: (the kind, the
    words verify's report must hold). The 1,000 tamperings of `test_audit.py` run the same
    checks in process; these go through the command an auditor runs."""
    data = (source / "events.bin").read_bytes()
    records, at = [], 0
    while at < len(data):
        _, length = _EVENT.unpack_from(data, at)
        records.append(data[at : at + _EVENT.size + length])
        at += _EVENT.size + length

    def fresh() -> None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)

    fresh()
    changed = bytearray(records[41])
    changed[-1] ^= 0x01  # the last byte of the 42nd event's state
    (target / "events.bin").write_bytes(b"".join([*records[:41], bytes(changed), *records[42:]]))
    yield "a byte of an event's state", "at position 42"
    fresh()
    (target / "events.bin").write_bytes(b"".join(records[:99] + records[100:]))
    yield "an event deleted", "position 100"
    fresh()
    swapped = [*records[:9], records[10], records[9], *records[11:]]
    (target / "events.bin").write_bytes(b"".join(swapped))
    yield "two events swapped", "position 10"
    fresh()
    log, at, last = (target / "log.bin").read_bytes(), 0, 0
    while at < len(log):  # index (8) ‖ position (8) ‖ length (2) ‖ hashes
        last, at = at, at + _ROW.size + _ROW.unpack_from(log, at)[2]
    (target / "log.bin").write_bytes(log[:last])  # the last row of leaves gone
    yield "the log truncated", "truncated"
    fresh()
    lines = (target / "checkpoints.jsonl").read_text().splitlines()
    other = scratch / "other-mldsa.key"  # another pair of keys with the log's key names
    MldsaSigner.generate(str(other))
    attacker: list[Signer] = [
        Ed25519Signer.generate(ORIGIN),
        MldsaSigner(name=f"{ORIGIN}/ml-dsa-65", path=str(other)),
    ]
    newest = json.loads(lines[-1])
    body, _ = parse_note(newest["note"].encode())
    forged = sign_note(body, attacker)
    lines[-1] = json.dumps({"size": newest["size"], "note": forged.decode()})
    (target / "checkpoints.jsonl").write_text("\n".join(lines) + "\n")
    yield "a checkpoint re-signed with other keys", "checkpoint of"


def test_verify_needs_the_public_keys(pg_schema: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "audit", "verify"],
        env={
            **os.environ,
            "PIPELINE_POSTGRES_HOST": PG_HOST,
            "PIPELINE_POSTGRES_DBNAME": PG_DB,
            "PIPELINE_POSTGRES_SCHEMA": pg_schema,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "PIPELINE_AUDIT_KEYS_FILE" in done.stderr + done.stdout


def test_the_settings_files_may_not_hold_the_pin(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PIPELINE_AUDIT_HSM_PIN=1234\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "audit", "status"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "PIPELINE_AUDIT_HSM_PIN_FILE" in done.stderr + done.stdout
