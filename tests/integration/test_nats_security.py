"""The shipped NATS configuration (deploy/nats/), run by a real nats-server: users per role,
nobody anonymous, TLS only; and the pipeline working end to end with its own credentials."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import os
import secrets
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import nats
import nkeys
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.app import Worker, apply_streams, apply_streams_once
from pipeline.audit.log import AuditLog
from pipeline.audit.note import Ed25519Signer
from pipeline.audit.publish import CheckpointPublisher
from pipeline.audit.tables import AuditTables
from pipeline.errors import ConfigError
from pipeline.metrics import AuditMetrics
from pipeline.ops.embedded import free_port, nats_server_binary, wait_for_port
from pipeline.ops.simulate import Traffic
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import EventStore
from projections.incidents import load_sites
from projections.incidents.evidence import EvidenceKeeper, NatsLink
from projections.incidents.process import IncidentProcess
from schemas import Domain
from streams import Subjects

from ..conftest import as_role, make_settings, wait_until
from .helpers import ids_of, stored_ids, write_events
from .incidents import T0, frame, frame_meta, publish_frame, security, sites_file

CONF = Path(__file__).parents[2] / "deploy" / "nats" / "nats.conf"
ROLES = ("operator", "worker", "auditor", "security-producer", "monitoring-producer")
ROLES += ("metrics-producer", "frames-producer", "incidents", "api")


@dataclass(frozen=True)
class SecureNats:
    url: str
    ca: Path
    passwords: dict[str, str]
    monitor_port: int = 0

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    async def connect(self, user: str | None, **options: object) -> nats.NATS:
        """A connection as `user`, with the inbox prefix the shipped accounts give it."""
        auth = {"user": user, "password": self.passwords[user]} if user else {}
        if user:
            auth["inbox_prefix"] = f"_INBOX_{user}"
        return await nats.connect(
            self.url,
            tls=self.tls(),
            allow_reconnect=False,
            **auth,
            **options,  # type: ignore[arg-type]
        )


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 and localhost (with its key)."""
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("pipeline test CA"))
        .issuer_name(name("pipeline test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(name("nats"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[SecureNats]:
    """nats-server started from deploy/nats/nats.conf, as shipped (port and folders aside)."""
    ca, cert, key = _certificates(tmp_path)
    # nats-server reads an environment variable as a configuration value: a password
    # starts with a letter and has letters and digits (or is wrapped in double quotes).
    passwords = {role: secrets.token_urlsafe(16) for role in ROLES}
    # The server holds bcrypt hashes only (in double quotes: nats-server reads the variable
    # as a configuration value); clients send the passwords.
    hashes = {
        r: bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode() for r, p in passwords.items()
    }
    env = {
        **os.environ,
        "NATS_TLS_CERT": str(cert),
        "NATS_TLS_KEY": str(key),
        "NATS_STORE_DIR": str(tmp_path / "jetstream"),
        **{f"NATS_{r.upper().replace('-', '_')}_PASSWORD": f'"{h}"' for r, h in hashes.items()},
    }
    port = free_port()
    monitor = free_port()
    while monitor == port:
        monitor = free_port()
    with (tmp_path / "nats.log").open("wb") as log:
        server = subprocess.Popen(
            [
                str(nats_server_binary()),
                "-c",
                str(CONF),
                "-a",
                "127.0.0.1",
                "-p",
                str(port),
                "-m",
                str(monitor),
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        try:
            wait_for_port("127.0.0.1", port, timeout_s=10, process=server)
        except RuntimeError:
            raise RuntimeError((tmp_path / "nats.log").read_text()[-2000:]) from None
        yield SecureNats(f"tls://127.0.0.1:{port}", ca, passwords, monitor)
    finally:
        server.terminate()
        server.wait(timeout=10)


def _settings(secure: SecureNats, schema: str, user: str, **overrides: object) -> Settings:
    return make_settings(
        secure.url,
        schema,
        nats_user=user,
        nats_password=secure.passwords[user],
        nats_tls_ca_file=str(secure.ca),
        domains=(Domain.SECURITY,),
        **overrides,
    )


async def test_nobody_connects_without_a_user_or_without_tls(secure_nats: SecureNats) -> None:
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await secure_nats.connect(None)
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):  # TLS only
        await nats.connect(
            secure_nats.url.replace("tls://", "nats://"),
            user="operator",
            password=secure_nats.passwords["operator"],
            allow_reconnect=False,
            connect_timeout=2,
        )
    wrong = SecureNats(secure_nats.url, secure_nats.ca, {"worker": "not-the-password"})
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await wrong.connect("worker")


async def test_each_role_may_do_its_part_only(secure_nats: SecureNats, pg_schema: str) -> None:
    operator = await secure_nats.connect("operator")
    await apply_streams(operator, _settings(secure_nats, pg_schema, "operator"))
    refused: list[Exception] = []

    async def record(exc: Exception) -> None:
        refused.append(exc)

    def violations() -> int:
        return sum("permissions violation" in str(e).lower() for e in refused)

    producer = await secure_nats.connect("security-producer", error_cb=record)
    js = producer.jetstream()
    ack = await js.publish("security.v1.door-7", b"{}")
    assert ack.stream == "SECURITY"
    with pytest.raises(nats.errors.Error):
        await js.publish("metrics.v1.worker-1", b"{}", timeout=1)
    await wait_until(lambda: violations() >= 1, 5)

    worker = await secure_nats.connect("worker", error_cb=record)
    jsm = worker.jsm(timeout=1.0)
    security = (await jsm.stream_info("SECURITY")).config
    for forbidden in (
        jsm.delete_stream("SECURITY"),
        jsm.purge_stream("SECURITY"),
        jsm.update_stream(dataclasses.replace(security, max_msgs=1)),
        jsm.add_stream(name="MINE", subjects=["mine.>"]),
        jsm.add_consumer("SECURITY", durable_name="mine"),
        jsm.delete_consumer("SECURITY", "pipeline-security"),
    ):
        with pytest.raises(nats.errors.Error):
            await forbidden
    info = await operator.jsm().stream_info("SECURITY")
    assert info.state.messages == 1
    assert info.config.max_msgs == security.max_msgs
    for nc in (operator, producer, worker):
        await nc.close()


async def test_the_auditor_copies_checkpoints_to_a_stream_nobody_may_delete_from(
    secure_nats: SecureNats, pg_schema: str
) -> None:
    operator = await secure_nats.connect("operator")
    await apply_streams(operator, _settings(secure_nats, pg_schema, "operator"))
    settings = make_settings("nats://unused", pg_schema)
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    write_events(store, 120, seed=1)
    store.close()
    signer = Ed25519Signer.generate("test/audit")
    log = AuditLog(pg_schema, origin="test/audit", signers=lambda: [signer], checkpoint_every=50)

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            **as_role(settings, "auditor").postgres_connection(), autocommit=True
        )

    with connect() as conn:
        while log.step(conn):
            if log.due():
                log.checkpoint(conn)
        log.checkpoint_interval_s = 0
        log.checkpoint(conn)

    refused: list[Exception] = []

    async def record(exc: Exception) -> None:
        refused.append(exc)

    auditor = await secure_nats.connect("auditor", error_cb=record)
    publisher = CheckpointPublisher(
        auditor.jetstream(),
        Subjects(),
        AuditTables(pg_schema),
        "test/audit",
        connect,
        AuditMetrics(),
    )
    assert await publisher.copy() == 3  # 50, 100 and 120 leaves
    assert await publisher.copy() == 0
    assert await publisher.published() == 120
    # The auditor may publish checkpoints only; nobody may take one back.
    with pytest.raises(nats.errors.Error):
        await auditor.jetstream().publish("security.v1.door-7", b"{}", timeout=1)
    await wait_until(lambda: any("permissions violation" in str(e).lower() for e in refused), 5)
    jsm = operator.jsm(timeout=2.0)
    for forbidden in (jsm.delete_msg("AUDIT", 1), jsm.purge_stream("AUDIT")):
        with pytest.raises(nats.errors.Error):
            await forbidden
    assert (await jsm.stream_info("AUDIT")).state.messages == 3
    for nc in (operator, auditor):
        await nc.close()


async def test_the_incident_process_keeps_evidence_frames_the_api_only_reads(
    secure_nats: SecureNats, pg_schema: str, tmp_path: Path
) -> None:
    """The incident process's user copies a frame from FRAMES into the evidence bucket;
    the API's user reads it back; neither may do more."""
    operator = await secure_nats.connect("operator")
    await apply_streams(operator, _settings(secure_nats, pg_schema, "operator"))
    camera = await secure_nats.connect("frames-producer")
    meta = frame_meta(str(uuid.uuid4()), T0, "cam-1")
    body = secrets.token_bytes(200_000)
    seq = await publish_frame(camera, meta, body)
    later = T0 + datetime.timedelta(seconds=10)
    analysed = frame(meta.id, T0, "cam-1", [("person", 0.9)], later, stream_seq=seq)
    settings = _settings(secure_nats, pg_schema, "incidents", sites_file=str(sites_file(tmp_path)))
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    store.write(
        [
            security("door", T0, "door.forced", "high", "door-1", later),
            analysed,
        ]
    )
    store.close()

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(
            **as_role(settings, "projector").postgres_connection(), autocommit=True
        )

    with connect() as conn:
        process = IncidentProcess(load_sites(settings.sites_file), pg_schema)
        process.prepare(conn)
        process.catch_up(conn)
    keeper = EvidenceKeeper(settings, connect)
    try:
        while await keeper.step():
            pass
    finally:
        await keeper.link.close()
    name = str(event_id(Domain.FRAMES, meta.id))
    reader = NatsLink(_settings(secure_nats, pg_schema, "api"))
    try:
        stored = await (await reader.bucket()).read(name)
    finally:
        await reader.close()
    assert stored is not None and stored.data == body

    refused: list[Exception] = []

    async def record(exc: Exception) -> None:
        refused.append(exc)

    for user in ("incidents", "api"):
        nc = await secure_nats.connect(user, error_cb=record)
        jsm = nc.jsm(timeout=1.0)
        forbidden = [
            jsm.delete_stream("OBJ_EVIDENCE"),
            jsm.get_msg("SECURITY", seq=1),
            jsm.delete_msg("OBJ_EVIDENCE", 1),
            jsm.add_consumer("OBJ_EVIDENCE", durable_name="mine"),
        ]
        if user == "api":
            forbidden += [
                jsm.purge_stream("OBJ_EVIDENCE"),
                jsm.get_msg("FRAMES", seq=seq),
                nc.jetstream().publish("$O.EVIDENCE.C.mine", b"x", timeout=1),
            ]
        for call in forbidden:
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await call
        await nc.close()
    assert any("permissions violation" in str(e).lower() for e in refused)
    info = await operator.jsm().stream_info("OBJ_EVIDENCE")
    assert info.state.messages == 3  # the frame in two chunks (of 128 KiB at most), its metadata
    for nc in (operator, camera):
        await nc.close()


async def test_nobody_reads_another_users_replies(secure_nats: SecureNats, pg_schema: str) -> None:
    """Every user may subscribe to its own inbox prefix only: not to `_INBOX.>`, nor to
    another user's, where the worker's pulled batches and the operator's answers arrive."""
    operator = await secure_nats.connect("operator")
    await apply_streams(operator, _settings(secure_nats, pg_schema, "operator"))
    await operator.close()
    for user in ROLES:
        refused: list[Exception] = []

        async def record(exc: Exception, into: list[Exception] = refused) -> None:
            into.append(exc)

        nc = await secure_nats.connect(user, error_cb=record)
        others = [f"_INBOX_{other}.>" for other in ROLES if other != user]
        for subject in ["_INBOX.>", ">", *others]:
            await nc.subscribe(subject)
        await wait_until(lambda: len(refused) == 2 + len(others), 5)  # noqa: B023
        assert all("permissions violation for subscription" in str(e).lower() for e in refused)
        # Its own inbox works: a JetStream request answers.
        if user in ("operator", "worker"):
            assert (await nc.jsm().stream_info("SECURITY")).config.name == "SECURITY"
        await nc.close()


async def test_a_json_producer_may_not_send_a_frame_sized_message(
    secure_nats: SecureNats, pg_schema: str, tmp_path: Path
) -> None:
    operator = await secure_nats.connect("operator")
    await apply_streams(operator, _settings(secure_nats, pg_schema, "operator"))
    big = b"x" * (8 * 1024 * 1024)
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    producer = await secure_nats.connect("security-producer", error_cb=record)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.jetstream().publish("security.v1.door-7", big), 3)
    # The server refuses it and closes the connection (over TLS the client sees the close).
    await wait_until(lambda: producer.is_closed or bool(errors), 5)
    log = tmp_path / "nats.log"
    await wait_until(lambda: "maximum payload exceeded: 8388608 vs 278528" in log.read_text(), 5)
    assert (await operator.jsm().stream_info("SECURITY")).state.messages == 0
    camera = await secure_nats.connect("frames-producer")
    ack = await camera.jetstream().publish("frames.v1.cam-1", big, timeout=10)
    assert ack.stream == "FRAMES"
    for nc in (operator, producer, camera):
        with contextlib.suppress(Exception):
            await nc.close()


def test_the_monitoring_port_listens_on_the_loopback_only(secure_nats: SecureNats) -> None:
    """`/connz` lists every user: other hosts and containers must not reach it."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) == secure_nats.monitor_port:  # LISTEN
            listening.add(address)
    assert listening == {"0100007F"}  # 127.0.0.1


async def test_the_pipeline_runs_with_its_own_credentials(
    secure_nats: SecureNats, pg_schema: str
) -> None:
    operator = _settings(secure_nats, pg_schema, "operator")
    settings = _settings(secure_nats, pg_schema, "worker")
    producer = await secure_nats.connect("security-producer")
    await _stored_end_to_end(settings, producer, pg_schema, operator=operator)


async def test_a_wrong_password_is_a_clear_error(secure_nats: SecureNats, pg_schema: str) -> None:
    settings = _settings(secure_nats, pg_schema, "worker").model_copy(
        update={"nats_password": "wrong"}
    )
    with pytest.raises(ConfigError, match="PIPELINE_NATS_USER"):
        async with Worker(settings):
            pass
    await asyncio.sleep(0)


def _nkey_user() -> tuple[str, str]:
    """A new NKey user: (seed, public key)."""
    seed, pair = _nkey(nkeys.PREFIX_BYTE_USER)
    return seed, pair.public_key.decode()


def _nkey(prefix: int) -> tuple[str, Any]:
    """A new NKey of a role (operator, account, user): (seed, key pair)."""
    seed = nkeys.encode_seed(secrets.token_bytes(32), prefix)
    return seed.decode(), nkeys.from_seed(bytearray(seed))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: Any, subject: Any, name: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (v2) about `subject`, signed by `issuer` (NKey pairs)."""
    body = {
        "jti": _b64(secrets.token_bytes(24)),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject.public_key.decode(),
        "name": name,
        "nats": {**claims, "version": 2},
    }
    header = {"typ": "JWT", "alg": "ed25519-nkey"}
    signed = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


@pytest.fixture
def operator_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, Path]]]:
    """nats-server in operator mode (decentralized JWT authentication, as NGS and nsc set
    up): one account with JetStream, a worker and a producer user, each with a .creds file."""
    _, operator = _nkey(nkeys.PREFIX_BYTE_OPERATOR)
    _, account = _nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    _, system = _nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
    unlimited |= {"wildcards": True, "conn": -1, "leaf": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    accounts = {
        account: _jwt(
            operator, account, "PIPELINE", {"type": "account", "limits": unlimited | jetstream}
        ),
        system: _jwt(operator, system, "SYS", {"type": "account", "limits": unlimited}),
    }
    creds = {}
    for role in ("worker", "producer"):
        seed, user = _nkey(nkeys.PREFIX_BYTE_USER)
        token = _jwt(
            account,
            user,
            role,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        creds[role] = tmp_path / f"{role}.creds"
        creds[role].write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        )
        creds[role].chmod(0o600)
    preload = "\n".join(f"  {a.public_key.decode()}: {j}" for a, j in accounts.items())
    with _nats_server(
        tmp_path,
        f"operator: {_jwt(operator, operator, 'operator', {'type': 'operator'})}\n"
        f"system_account: {system.public_key.decode()}\n"
        f"resolver: MEMORY\nresolver_preload: {{\n{preload}\n}}\n",
    ) as url:
        yield url, creds


@contextlib.contextmanager
def _nats_server(tmp_path: Path, config: str) -> Iterator[str]:
    """nats-server with JetStream and `config` (its authentication); its URL."""
    port = free_port()
    conf = tmp_path / "server.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"jetstream {{ store_dir: {str(tmp_path / 'jetstream')!r} }}\n{config}"
    )
    with (tmp_path / "nats.log").open("wb") as log:
        server = subprocess.Popen(
            [str(nats_server_binary()), "-c", str(conf)], stdout=log, stderr=log
        )
    try:
        wait_for_port("127.0.0.1", port, timeout_s=10, process=server)
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


async def _stored_end_to_end(
    settings: Settings, producer: nats.NATS, schema: str, *, operator: Settings | None = None
) -> None:
    """Messages published by `producer` are stored by a worker with `settings`, once each,
    on streams applied with `operator` (by default, the worker's own settings)."""
    traffic = Traffic(Subjects(), domains=(Domain.SECURITY,), seed=4, bad_ratio=0.0)
    sent = [traffic.valid(Domain.SECURITY) for _ in range(20)]
    await apply_streams_once(operator or settings)
    async with Worker(settings):
        js = producer.jetstream()
        for out in sent:
            await js.publish(out.subject, out.body, headers=out.headers)
        await wait_until(lambda: len(stored_ids(schema)) == 20, timeout_s=30)
    assert set(stored_ids(schema)) == ids_of(Domain.SECURITY, [o.message_id for o in sent])
    await producer.close()


@pytest.fixture
def nkey_nats(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """nats-server whose users are NKeys (a worker and a producer); (url, seeds by role)."""
    users = {role: _nkey_user() for role in ("worker", "producer")}
    listed = ", ".join(f"{{nkey: {public}}}" for _, public in users.values())
    with _nats_server(tmp_path, f"authorization {{ users = [{listed}] }}\n") as url:
        yield url, {role: seed for role, (seed, _) in users.items()}


async def test_the_pipeline_runs_with_an_nkey(
    nkey_nats: tuple[str, dict[str, str]], pg_schema: str, tmp_path: Path
) -> None:
    url, seeds = nkey_nats
    files = {}
    for role, seed in seeds.items():
        files[role] = tmp_path / f"{role}.nk"
        files[role].write_text(seed + "\n")
        files[role].chmod(0o600)
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(url, allow_reconnect=False)  # no key: refused
    settings = make_settings(
        url, pg_schema, nats_nkey_seed_file=str(files["worker"]), domains=(Domain.SECURITY,)
    )
    producer = await nats.connect(url, nkeys_seed=str(files["producer"]))
    await _stored_end_to_end(settings, producer, pg_schema)

    stranger, _ = _nkey_user()  # a valid key the server does not know
    (tmp_path / "stranger.nk").write_text(stranger)
    unknown = settings.model_copy(update={"nats_nkey_seed_file": str(tmp_path / "stranger.nk")})
    with pytest.raises(ConfigError, match="PIPELINE_NATS_USER/PASSWORD, _CREDS_FILE or _NKEY"):
        async with Worker(unknown):
            pass


async def test_the_pipeline_runs_with_a_credentials_file(
    operator_nats: tuple[str, dict[str, Path]], pg_schema: str
) -> None:
    url, creds = operator_nats
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        await nats.connect(url, allow_reconnect=False)  # no credentials: refused
    settings = make_settings(
        url, pg_schema, nats_creds_file=str(creds["worker"]), domains=(Domain.SECURITY,)
    )
    producer = await nats.connect(url, user_credentials=str(creds["producer"]))
    await _stored_end_to_end(settings, producer, pg_schema)
