"""`pipeline audit ...`: keys, status, proofs, export and verification of the audit trail,
and the witness."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import psycopg

from ..audit import trail
from ..audit.keys import MldsaSigner, SigningUnavailable, generate_hsm_key
from ..audit.note import Checkpoint, NoteError, Verifier, key_id, parse_note
from ..audit.remote import RemoteLog, verify_remote
from ..audit.service import mldsa_name, read_keys
from ..audit.tables import AuditTables
from ..audit.verify import Report, check
from ..audit.witness import Refused, Witness, generate_key, read_key, state_lock
from ..errors import PipelineError
from ..settings import Settings
from ..store.reader import EventReader

__all__ = [
    "consistency",
    "export",
    "keygen",
    "prove",
    "status",
    "verify",
    "witness",
    "witness_keygen",
]

Print = Callable[[str], None]

_ED25519, _MLDSA = 0x01, 0xFF


def _connect(settings: Settings) -> psycopg.Connection[Any]:
    return psycopg.connect(**settings.postgres_connection(), autocommit=True)


def keygen(settings: Settings, *, out: Print = print) -> list[str]:
    """Make the HSM's Ed25519 key and the ML-DSA-65 key file; print their vkeys."""
    origin = settings.audit_log_origin()
    if not settings.audit_mldsa_key_file:
        raise PipelineError("set PIPELINE_AUDIT_MLDSA_KEY_FILE: where to write the ML-DSA-65 key")
    if not settings.audit_hsm_pin:
        raise PipelineError("set PIPELINE_AUDIT_HSM_PIN or PIPELINE_AUDIT_HSM_PIN_FILE")
    try:
        ed25519 = generate_hsm_key(
            module=settings.audit_hsm_module,
            token=settings.audit_hsm_token,
            pin=settings.audit_hsm_pin,
            key_label=settings.audit_hsm_key_label,
        )
        mldsa = MldsaSigner.generate(settings.audit_mldsa_key_file)
    except (SigningUnavailable, ValueError, OSError) as exc:
        raise PipelineError(str(exc)) from None
    vkeys = [
        Verifier(origin, key_id(origin, _ED25519, ed25519), _ED25519, ed25519).vkey(),
        Verifier(
            mldsa_name(origin), key_id(mldsa_name(origin), _MLDSA, mldsa), _MLDSA, mldsa
        ).vkey(),
    ]
    out(
        f"# The audit log's public keys ({origin}): the Ed25519 key in the HSM "
        f"(token {settings.audit_hsm_token!r}, label {settings.audit_hsm_key_label!r}) and "
        f"the ML-DSA-65 key in {settings.audit_mldsa_key_file}. Give these lines to "
        "auditors and witnesses; save them as PIPELINE_AUDIT_KEYS_FILE."
    )
    for line in vkeys:
        out(line)
    return vkeys


def status(settings: Settings, *, as_json: bool, out: Print = print) -> trail.AuditStatus:
    with _connect(settings) as conn:
        found = trail.status(conn, AuditTables(settings.postgres_schema))
    data = found.as_json()
    if as_json:
        out(json.dumps(data))
    else:
        age = data["checkpoint_age_s"]
        out(
            f"log: {found.size} leaves up to position {found.position} (store head "
            f"{found.store_head}); latest checkpoint: {found.checkpoint_size} leaves"
            + (f", signed {age:.0f} s ago" if age is not None else ", none yet")
            + f", {found.cosignatures} cosignature(s); {data['unsigned_leaves']} leaves unsigned"
        )
    return found


def prove(settings: Settings, ident: str, *, out: Print = print) -> dict[str, Any]:
    tables = AuditTables(settings.postgres_schema)
    with _connect(settings) as conn:
        found = EventReader(settings.postgres_schema).find(conn, ident)
        if found is None:
            raise PipelineError(f"no stored event has the event id or message id {ident!r}")
        try:
            proof = trail.prove(conn, tables, found.event.originator_id)
        except LookupError as exc:
            raise PipelineError(str(exc).strip("'\"")) from None
    out(json.dumps(proof, indent=2))
    return proof


def consistency(settings: Settings, old: int, new: int, *, out: Print = print) -> dict[str, Any]:
    with _connect(settings) as conn:
        try:
            proof = trail.consistency(conn, AuditTables(settings.postgres_schema), old, new)
        except (LookupError, ValueError) as exc:
            raise PipelineError(str(exc).strip("'\"")) from None
    out(json.dumps(proof, indent=2))
    return proof


def export(settings: Settings, directory: Path, *, out: Print = print) -> dict[str, Any]:
    keys = (
        [k.vkey() for k in read_keys(settings.audit_keys_file)] if settings.audit_keys_file else []
    )
    with _connect(settings) as conn:
        try:
            manifest = trail.export(
                conn,
                AuditTables(settings.postgres_schema),
                directory,
                origin=settings.audit_log_origin(),
                keys=keys,
            )
        except FileExistsError as exc:
            raise PipelineError(str(exc)) from None
    out(
        f"exported {manifest['events']} events, {manifest['leaves']} leaves and "
        f"{manifest['checkpoints']} checkpoints to {directory}"
    )
    return manifest


def verify(
    settings: Settings,
    *,
    source: Path | None = None,
    url: str = "",
    state: Path | None = None,
    keys_file: str = "",
    trusted: Sequence[Path] = (),
    as_json: bool = False,
    out: Print = print,
) -> Report:
    """Check the live trail (or an export, or a remote log from its endpoints alone) with
    the public keys; raise if it fails."""
    path = keys_file or settings.audit_keys_file
    if not path:
        raise PipelineError(
            "name the log's public keys: --keys FILE or PIPELINE_AUDIT_KEYS_FILE (the lines "
            "`pipeline audit keygen` printed)"
        )
    try:
        keys = read_keys(path)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    extra = [_checkpoint_file(path) for path in trusted]
    if url:
        if source is not None:
            raise PipelineError("--url and --from: verify one log at a time")
        return _verify_url(url, keys, state, [note for _, note in extra], as_json, out)
    if state is not None:
        raise PipelineError("--state goes with --url (the last checkpoint verified remotely)")
    if source is not None:
        try:
            sources, manifest = trail.exported(source)
            report = check(
                sources.events,
                sources.rows,
                sources.checkpoints + extra,
                keys,
                origin=manifest["origin"],
            )
        except ValueError as exc:
            raise PipelineError(str(exc)) from None
    else:
        with _connect(settings) as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            sources = trail.live(conn, AuditTables(settings.postgres_schema))
            report = check(
                sources.events,
                sources.rows,
                sources.checkpoints + extra,
                keys,
                origin=settings.audit_log_origin(),
            )
    if as_json:
        out(
            json.dumps(
                {
                    "ok": report.ok,
                    "events": report.events,
                    "leaves": report.leaves,
                    "checkpoints": report.checkpoints,
                    "latest_checkpoint": report.latest,
                    "unlogged": report.unlogged,
                    "problems": report.problems,
                    "more_problems": report.more,
                }
            )
        )
    else:
        out(report.summary())
    if not report.ok:
        raise PipelineError("the audit trail does not verify (see above)")
    return report


def _verify_url(
    url: str,
    keys: Sequence[Verifier],
    state: Path | None,
    earlier: Sequence[bytes],
    as_json: bool,
    out: Print,
) -> Report:
    """`verify --url`: the remote log's checkpoint, tiles and (with `state` or earlier
    checkpoints) its consistency with what was seen before."""
    try:
        remote = RemoteLog(url)
    except ValueError as exc:
        raise PipelineError(f"--url: {exc}") from None
    report = verify_remote(remote, keys, state=state, earlier=earlier)
    out(json.dumps(report.as_json()) if as_json else report.summary())
    if not report.ok:
        raise PipelineError(f"the log at {url} does not verify (see above)")
    return report


def witness_keygen(path: Path, name: str, *, out: Print = print) -> str:
    """Make a witness's key file (mode 0600); print its vkey for the log's operator."""
    try:
        vkey = generate_key(path, name)
    except (OSError, NoteError) as exc:
        raise PipelineError(str(exc)) from None
    out(
        f"# The witness {name}'s public key (its private key is in {path}): give this line "
        "to the log's operator, for PIPELINE_AUDIT_WITNESS_KEYS_FILE."
    )
    out(vkey)
    return vkey


async def witness(
    *,
    url: str,
    key: Path,
    log_keys: str,
    state: Path | None,
    interval_s: float,
    once: bool,
    stop: asyncio.Event,
    out: Print = print,
) -> None:
    """Witness the log at `url`: one round (`once`; raises unless it cosigned or found the
    log as cosigned), or rounds every `interval_s` until `stop` is set."""
    try:
        signer = read_key(key)
        keys = read_keys(log_keys)
        remote = RemoteLog(url)
    except ValueError as exc:
        raise PipelineError(str(exc)) from None
    state = state or key.with_name(key.name + ".state")
    watcher = Witness(remote, signer, keys, state)
    with state_lock(state):
        if once:
            try:
                done = await anyio.to_thread.run_sync(watcher.round)
            except Refused as exc:
                raise PipelineError(f"refused the log's checkpoint: {exc}") from None
            out(f"{done.outcome}: the log's checkpoint of {done.size} leaves")
            return
        stopped = threading.Event()
        relay = asyncio.create_task(stop.wait())
        relay.add_done_callback(lambda _: stopped.set())
        try:
            await anyio.to_thread.run_sync(watcher.run, stopped, interval_s)
        finally:
            relay.cancel()


def _checkpoint_file(path: Path) -> tuple[int, bytes]:
    """A checkpoint kept outside the database (a witness's copy, the stream's): its size
    and note."""
    try:
        note = path.read_bytes()
        return Checkpoint.parse(parse_note(note)[0]).size, note
    except (OSError, NoteError) as exc:
        raise PipelineError(f"{path}: not a signed checkpoint: {exc}") from None
