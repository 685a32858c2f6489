"""The witness: cosigns the log's checkpoints that extend the last one it cosigned.

A witness (https://c2sp.org/tlog-witness) keeps one thing: the last checkpoint it
cosigned (the state file). Each round it fetches the log's `/checkpoint`, verifies the
log's signatures (every key of the log), and then:

- the same size and root as before: nothing to do (its cosignature is posted again if
  the log does not serve it yet);
- a larger size: it builds a consistency proof from the log's tiles and verifies it
  from its old root to the new one (`merkle.verify_consistency`);
- the same size with another root (a fork), a smaller size (a rollback) or a proof
  that does not verify (a rewritten history): refused (`Refused`), reported and never
  cosigned; the refused note is kept beside the state file as evidence.

A checkpoint it accepts is written to the state file first, then cosigned
(tlog-cosignature/v1, note type 0x04) and POSTed to the log's `/cosignature`. The
first checkpoint a witness sees is trusted as it is (there is nothing to compare it
with): start a witness early, or give it a state file holding a checkpoint verified
some other way.

This protocol is pull, not tlog-witness's push (the log calls the witness's
add-checkpoint): the witness needs no inbound port, and the log keeps no list of
witness addresses. Its checks are the same.

The witness's key is an Ed25519 private key in a file of mode 0600 (`generate_key`),
one line in the signed-note private key form `PRIVATE+KEY+<name>+<hex key id>+<base64(
0x04 ‖ 32-byte seed)>`; the log lists the witness's vkey (`generate_key` returns it) in
`PIPELINE_AUDIT_WITNESS_KEYS_FILE`.

The log's side is here too: `accept_cosignatures` checks a cosignature POSTed to the API
and stores it.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from psycopg.sql import SQL

from ..errors import PipelineError
from .note import (
    COSIGNATURE_V1,
    Checkpoint,
    CosignatureSigner,
    NoteError,
    NoteSignature,
    Verifier,
    parse_note,
)
from .remote import (
    NotExtension,
    RemoteLog,
    check_extension,
    open_checkpoint,
    read_state,
    write_state,
)
from .tables import AuditTables

__all__ = [
    "Accepted",
    "BadCosignature",
    "CheckpointMismatch",
    "CosignatureRefused",
    "MalformedCosignature",
    "NoSuchCheckpoint",
    "Refused",
    "Round",
    "UnknownWitness",
    "Witness",
    "accept_cosignatures",
    "generate_key",
    "read_key",
    "state_lock",
]

log = logging.getLogger(__name__)

_KEY_PREFIX = "PRIVATE+KEY+"
_KEY_FILE_LIMIT = 4096


class Refused(PipelineError):
    """The log served a checkpoint the witness must not cosign: a bad signature, another
    log, a fork, a rollback or a rewritten history. Evidence against the log."""


@dataclass(frozen=True)
class Round:
    """What one round did: `cosigned` a new checkpoint, found the log `current` (already
    cosigned), or found `no_checkpoint` yet."""

    outcome: Literal["cosigned", "current", "no_checkpoint"]
    size: int = 0


class Witness:
    """Cosigns the checkpoints of the log at `log` that extend the last one it cosigned."""

    def __init__(
        self,
        log: RemoteLog,
        signer: CosignatureSigner,
        log_keys: Sequence[Verifier],
        state: Path,
    ) -> None:
        self.log = log
        self.signer = signer
        self.log_keys = list(log_keys)
        self.state = state
        self._ours = Verifier.for_signer(signer)

    def round(self) -> Round:
        """Fetch the log's checkpoint and cosign it if it extends the last one cosigned.

        Raises Refused (the log misbehaved: nothing is cosigned) or RemoteError (the log
        did not answer: try again later)."""
        note = self.log.checkpoint()
        if note is None:
            return Round("no_checkpoint")
        try:
            checkpoint = open_checkpoint(note, self.log_keys)
        except NoteError as exc:
            self._refuse(note, f"the checkpoint does not verify with the log's keys: {exc}")
        last = self._last()
        if last is not None:
            try:
                check_extension(self.log.tile, last, checkpoint)
            except NotExtension as exc:
                self._refuse(note, str(exc))
            if checkpoint.size == last.size and self._served_ours(note):
                return Round("current", checkpoint.size)
        write_state(self.state, note)  # before cosigning: never cosign behind the state
        text = parse_note(note)[0]
        line = NoteSignature(self.signer.name, self.signer.key_id, self.signer.sign(text))
        self.log.post("cosignature", text + b"\n" + line.line())
        log.info(
            "witness %s: cosigned %s at %d leaves",
            self._ours.ident,
            checkpoint.origin,
            checkpoint.size,
        )
        return Round("cosigned", checkpoint.size)

    def run(self, stop: threading.Event, interval_s: float) -> None:
        """Rounds every `interval_s` until `stop` is set (refusals are logged as errors,
        failures to reach the log as warnings)."""
        while not stop.is_set():
            try:
                self.round()
            except Refused:
                pass  # logged as an error when refused
            except PipelineError as exc:
                log.warning("witness: round failed (%s); again in %.0f s", exc, interval_s)
            except Exception:  # a bug: the witness keeps its rounds going
                log.exception("witness: round failed; again in %.0f s", interval_s)
            stop.wait(interval_s)

    def _last(self) -> Checkpoint | None:
        kept = read_state(self.state, self.log_keys)
        return kept[1] if kept else None

    def _served_ours(self, note: bytes) -> bool:
        """Whether the log serves this witness's valid cosignature with the checkpoint."""
        text, signatures = parse_note(note)
        return any(
            (s.name, s.key_id) == (self._ours.name, self._ours.key_id)
            and self._ours.verify(text, s.signature)
            for s in signatures
        )

    def _refuse(self, note: bytes, why: str) -> NoReturn:
        evidence = self.state.with_name(self.state.name + ".refused")
        try:
            evidence.write_bytes(note)
            why += f" (the note served is kept in {evidence})"
        except OSError as exc:
            why += f" (the note served could not be kept: {exc.strerror})"
        log.error("witness %s: refused the log's checkpoint: %s", self._ours.ident, why)
        raise Refused(why)


@contextmanager
def state_lock(state: Path) -> Iterator[None]:
    """Hold `<state>.lock` for as long as this process witnesses with `state` (one witness
    per state file: two would race between checking and writing it)."""
    path = state.with_name(state.name + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{path} is held: another witness uses {state}") from None
        yield
    finally:
        os.close(fd)


# -- the witness's key ----------------------------------------------------------------------


def generate_key(path: Path, name: str) -> str:
    """Write a new witness key named `name` to `path` (mode 0600, never over a file); its
    vkey, for the log's PIPELINE_AUDIT_WITNESS_KEYS_FILE."""
    private = Ed25519PrivateKey.generate()
    signer = CosignatureSigner(name, private)  # checks the name
    seed = private.private_bytes_raw()
    line = (
        f"{_KEY_PREFIX}{name}+{signer.key_id.hex()}+"
        f"{base64.b64encode(bytes([COSIGNATURE_V1]) + seed).decode()}\n"
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: refusing to overwrite a witness key") from None
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        out.write(line)
        out.flush()
        os.fsync(out.fileno())
    return Verifier.for_signer(signer).vkey()


def read_key(path: Path) -> CosignatureSigner:
    """The witness key in `path`, refused unless only its owner may read the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"witness key file {path}: {exc.strerror}") from None
    with os.fdopen(fd) as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise ValueError(
                f"witness key file {path} has mode {stat.S_IMODE(mode):04o} or is not a file: "
                f"only its owner may read it (`chmod 600 {path}`; consider the key exposed)"
            )
        text = file.read(_KEY_FILE_LIMIT).strip()
    parts = text.removeprefix(_KEY_PREFIX).split("+", 2)
    if not text.startswith(_KEY_PREFIX) or len(parts) != 3:
        raise ValueError(f"{path}: not a witness key ({_KEY_PREFIX}<name>+<id>+<key>)")
    name, hex_id, encoded = parts
    try:
        material = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{path}: the key is not base64") from None
    if len(material) != 33 or material[0] != COSIGNATURE_V1:
        raise ValueError(f"{path}: not a cosignature/v1 (0x04) Ed25519 key")
    signer = CosignatureSigner(name, Ed25519PrivateKey.from_private_bytes(material[1:]))
    if signer.key_id.hex() != hex_id.lower():
        raise ValueError(f"{path}: the key id {hex_id} does not match the key")
    return signer


# -- the log's side: cosignatures received ----------------------------------------------------


class CosignatureRefused(PipelineError):
    """A cosignature the log does not take; the subclass says why."""


class MalformedCosignature(CosignatureRefused):
    """The body is not a checkpoint note with signature lines."""


class UnknownWitness(CosignatureRefused):
    """No line is by a witness the log accepts."""


class BadCosignature(CosignatureRefused):
    """A listed witness's line does not verify over the checkpoint sent."""


class NoSuchCheckpoint(CosignatureRefused):
    """The log signed no checkpoint of that size."""


class CheckpointMismatch(CosignatureRefused):
    """The witness cosigned a checkpoint of that size that is not the one the log signed."""


@dataclass(frozen=True)
class Accepted:
    """A witness's cosignature the log holds now; `new` unless it held one already."""

    key: str
    new: bool


def accept_cosignatures(
    conn: psycopg.Connection[Any],
    tables: AuditTables,
    body: bytes,
    witnesses: Sequence[Verifier],
) -> tuple[int, list[Accepted]]:
    """Check the cosignatures in `body` (the checkpoint note with the witness's lines, as
    tlog-witness's client assembles it) and store them; (size, what was accepted).

    Lines by keys not in `witnesses` are ignored (the log's own signatures among them).
    Raises a CosignatureRefused subclass naming what does not hold.
    """
    try:
        text, lines = parse_note(body)
        checkpoint = Checkpoint.parse(text)
    except (NoteError, UnicodeDecodeError) as exc:
        raise MalformedCosignature(
            f"not a checkpoint note with cosignature lines ({exc})"
        ) from None
    known = {(w.name, w.key_id): w for w in witnesses}
    ours = [line for line in lines if (line.name, line.key_id) in known]
    if not ours:
        listed = ", ".join(w.ident for w in witnesses) or "none: PIPELINE_AUDIT_WITNESS_KEYS_FILE"
        raise UnknownWitness(
            f"no line is by a witness this log accepts (signed by "
            f"{', '.join(s.ident for s in lines)}; accepted: {listed})"
        )
    for line in ours:
        if not known[(line.name, line.key_id)].verify(text, line.signature):
            raise BadCosignature(
                f"the cosignature by {line.ident} does not verify over the checkpoint of "
                f"{checkpoint.size} leaves sent with it"
            )
    row = conn.execute(
        SQL("SELECT note FROM {} WHERE size = %s").format(tables.checkpoints), (checkpoint.size,)
    ).fetchone()
    if row is None:
        raise NoSuchCheckpoint(f"this log signed no checkpoint of {checkpoint.size} leaves")
    if parse_note(bytes(row[0]))[0] != text:
        log.warning(
            "audit: %s cosigned a checkpoint of %d leaves this log did not sign: %r",
            ", ".join(line.ident for line in ours),
            checkpoint.size,
            text.decode(),
        )
        raise CheckpointMismatch(
            f"the checkpoint of {checkpoint.size} leaves cosigned is not the one this log "
            "signed (another origin, root or extension lines)"
        )
    return checkpoint.size, [_store(conn, tables, checkpoint.size, line) for line in ours]


def _store(
    conn: psycopg.Connection[Any], tables: AuditTables, size: int, line: NoteSignature
) -> Accepted:
    """Keep the line (without its newline); the first line of a key for a size stays."""
    inserted = conn.execute(
        SQL(
            "INSERT INTO {} (size, key_name, key_id, line) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING RETURNING size"
        ).format(tables.cosignatures),
        (size, line.name, line.key_id, line.line().decode().rstrip("\n")),
    ).fetchone()
    return Accepted(line.ident, inserted is not None)
