"""The shipped NATS configuration (deploy/nats/), run by a real nats-server: users per role,
nobody anonymous, TLS only; and the pipeline working end to end with its own credentials."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.app import Worker, apply_streams
from pipeline.errors import ConfigError
from pipeline.ops.embedded import free_port, nats_server_binary, wait_for_port
from pipeline.ops.simulate import Traffic
from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

from ..conftest import make_settings, wait_until
from .helpers import ids_of, stored_ids

CONF = Path(__file__).parents[2] / "deploy" / "nats" / "nats.conf"
ROLES = ("operator", "worker", "security-producer", "monitoring-producer")
ROLES += ("metrics-producer", "frames-producer")


@dataclass(frozen=True)
class SecureNats:
    url: str
    ca: Path
    passwords: dict[str, str]

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    async def connect(self, user: str | None, **options: object) -> nats.NATS:
        auth = {"user": user, "password": self.passwords[user]} if user else {}
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
    passwords = {role: f"p{secrets.token_hex(16)}" for role in ROLES}
    env = {
        **os.environ,
        "NATS_TLS_CERT": str(cert),
        "NATS_TLS_KEY": str(key),
        "NATS_STORE_DIR": str(tmp_path / "jetstream"),
        **{f"NATS_{r.upper().replace('-', '_')}_PASSWORD": p for r, p in passwords.items()},
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
        yield SecureNats(f"tls://127.0.0.1:{port}", ca, passwords)
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

    producer = await secure_nats.connect("security-producer", error_cb=record)
    js = producer.jetstream()
    ack = await js.publish("security.v1.door-7", b"{}")
    assert ack.stream == "SECURITY"
    with pytest.raises(nats.errors.Error):
        await js.publish("metrics.v1.worker-1", b"{}", timeout=1)
    await wait_until(lambda: any("permissions violation" in str(e).lower() for e in refused), 5)

    worker = await secure_nats.connect("worker", error_cb=record)
    with pytest.raises(nats.errors.Error):
        await worker.jsm(timeout=1.0).delete_stream("SECURITY")
    with pytest.raises(nats.errors.Error):
        await worker.jsm(timeout=1.0).purge_stream("SECURITY")
    assert (await operator.jsm().stream_info("SECURITY")).state.messages == 1
    for nc in (operator, producer, worker):
        await nc.close()


async def test_the_pipeline_runs_with_its_own_credentials(
    secure_nats: SecureNats, pg_schema: str
) -> None:
    settings = _settings(secure_nats, pg_schema, "worker")
    producer = await secure_nats.connect("security-producer")
    traffic = Traffic(Subjects(), domains=(Domain.SECURITY,), seed=3, bad_ratio=0.0)
    sent = [traffic.valid(Domain.SECURITY) for _ in range(50)]
    async with Worker(settings):
        js = producer.jetstream()
        for out in sent:
            await js.publish(out.subject, out.body, headers=out.headers)
        await wait_until(lambda: len(stored_ids(pg_schema)) == 50, timeout_s=30)
    assert set(stored_ids(pg_schema)) == ids_of(Domain.SECURITY, [o.message_id for o in sent])
    await producer.close()


async def test_a_wrong_password_is_a_clear_error(secure_nats: SecureNats, pg_schema: str) -> None:
    settings = _settings(secure_nats, pg_schema, "worker").model_copy(
        update={"nats_password": "wrong"}
    )
    with pytest.raises(ConfigError, match="PIPELINE_NATS_USER"):
        async with Worker(settings):
            pass
    await asyncio.sleep(0)
