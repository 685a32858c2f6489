"""The audit log's process parts: its keys and the follower's thread (`pipeline run audit`
composes them in `pipeline/ops/auditor.py`).

The follower polls rather than listening for the writers' notifications: a listening
session is woken by every writer's commit, which cost the event path about 3 % of its
rate on 2 cores (`bench/audit.py`), and a log a second behind the store is as good (its
checkpoints come every 10 s or 10,000 events)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from ..errors import ConfigError
from ..metrics import AuditMetrics
from ..settings import Settings
from .keys import HsmSigner, MldsaSigner, SigningUnavailable
from .log import AuditLog
from .note import Signer, Verifier

__all__ = ["AuditService", "KeyRing", "mldsa_name", "read_keys"]

log = logging.getLogger(__name__)


def mldsa_name(origin: str) -> str:
    """The ML-DSA-65 key's name in the notes (the Ed25519 key is named as the origin)."""
    return f"{origin}/ml-dsa-65"


class KeyRing:
    """The log's two signing keys, opened when first needed and again after a failure."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._signers: list[Signer] | None = None

    def __call__(self) -> Sequence[Signer]:
        if self._signers is None:
            s = self.settings
            origin = s.audit_log_origin()
            if not s.audit_mldsa_key_file:
                raise SigningUnavailable(
                    "no ML-DSA-65 key: set PIPELINE_AUDIT_MLDSA_KEY_FILE (made by `pipeline "
                    "audit keygen`)"
                )
            if not s.audit_hsm_pin:
                raise SigningUnavailable(
                    "no HSM PIN: set PIPELINE_AUDIT_HSM_PIN or PIPELINE_AUDIT_HSM_PIN_FILE"
                )
            try:
                mldsa = MldsaSigner(name=mldsa_name(origin), path=s.audit_mldsa_key_file)
            except (OSError, ValueError) as exc:
                raise SigningUnavailable(f"the ML-DSA-65 key: {exc}") from None
            hsm = HsmSigner(
                name=origin,
                module=s.audit_hsm_module,
                token=s.audit_hsm_token,
                pin=s.audit_hsm_pin,
                key_label=s.audit_hsm_key_label,
            )
            self._signers = [hsm, mldsa]
        return self._signers

    def close(self) -> None:
        for signer in self._signers or ():
            close = getattr(signer, "close", None)
            if close is not None:
                close()
        self._signers = None


def read_keys(path: str) -> list[Verifier]:
    """The public keys (one vkey per line; `#` comments) in `path`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read the public keys in {path}: {exc.strerror}") from None
    keys = [
        Verifier.parse(line.strip()) for line in lines if line.strip() and not line.startswith("#")
    ]
    if not keys:
        raise ValueError(
            f"{path} holds no public key (vkey lines, as `pipeline audit keygen` prints)"
        )
    return keys


class AuditService:
    """The follower's thread; `start()`, then `stop()`."""

    def __init__(self, settings: Settings, metrics: AuditMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or AuditMetrics()
        self.keys = KeyRing(settings)
        self.log = AuditLog(
            settings.postgres_schema,
            origin=settings.audit_log_origin(),
            signers=self.keys,
            checkpoint_every=settings.audit_checkpoint_every,
            checkpoint_interval_s=settings.audit_checkpoint_interval_s,
            batch_size=settings.audit_batch_size,
            poll_s=settings.projections_poll_s,
            metrics=self.metrics,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(**self.settings.postgres_connection(), autocommit=True)

    def start(self) -> None:
        self.settings.refuse_unsafe()
        with self.connect() as conn:
            found = conn.execute(
                "SELECT to_regclass(%s)", (self.log.tables.leaves.as_string(conn),)
            ).fetchone()
        if found is None or found[0] is None:
            raise ConfigError(
                "PIPELINE_POSTGRES_SCHEMA",
                f"schema {self.settings.postgres_schema!r} has no audit tables; run "
                "`pipeline db migrate` as the database owner first",
            )
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=self.log.run,
                args=(self.connect, self._stop),
                kwargs={"standby_s": self.settings.projections_standby_s},
                name="audit-log",
                daemon=True,
            ),
        ]
        for thread in self._threads:
            thread.start()
        log.info(
            "audit: keeping the log of schema %s as %s",
            self.settings.postgres_schema,
            self.settings.audit_log_origin(),
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self.log.wake.set()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads = []
        self.keys.close()

    def ready(self) -> list[str]:
        problems = []
        if not self.log.connected.is_set():
            problems.append("not connected to the event store's database")
        age = self.log.checkpoint_age()
        if age > 10 * self.settings.audit_checkpoint_interval_s:
            problems.append(f"no checkpoint signed for {age:.0f} s (see the log for why)")
        return problems
