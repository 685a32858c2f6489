"""Verifying a remote log from its tlog-tiles endpoints alone (`pipeline audit verify --url`).

With nothing but the log's URL prefix (the API's URL followed by `/audit`) and its
public keys:

1. fetch `<prefix>/checkpoint` and verify it: every key of the log must have signed it,
   and its origin must be the name of one of them (the log's Ed25519 key is named as
   its origin);
2. fetch every tile of the checkpoint's tree, recompute the root from the leaf hashes of
   the level-0 tiles and compare it with the signed root; check every higher tile
   against the hashes of the full tiles of the level below (`tiles.rebuild`);
3. with earlier checkpoints (`--state FILE`, the last one verified, and `--checkpoint`
   files kept elsewhere), check that the new tree extends each: a consistency proof
   built from the tiles must verify from the old root to the new one.

What passes proves that the log serves one tree, that its operator signed its root
with every key, that the tiles anyone may use for proofs are that tree's, and (with
earlier checkpoints) that the log only grew since. It does not prove that the leaves
are the hashes of the stored events: those are not public; `pipeline audit verify`
checks them, with the database or an export.

The same client serves the witness (`witness`): the checkpoint, tiles, the extension
check, and the state file that keeps the last checkpoint (written atomically).
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from . import merkle, tiles
from .note import Checkpoint, NoteError, Verifier, open_note
from .verify import Report

__all__ = [
    "NotExtension",
    "RemoteError",
    "RemoteLog",
    "RemoteReport",
    "check_extension",
    "open_checkpoint",
    "read_state",
    "verify_remote",
    "write_state",
]

MAX_CHECKPOINT_BYTES = 1 << 20
"""A checkpoint with a hundred ML-DSA-65 signatures is under 600 KiB."""
_USER_AGENT = "event-pipeline-audit/1"


class RemoteError(PipelineError):
    """The log's endpoint did not answer as expected (network, status, size); `status`
    is the HTTP status when there was one. Nothing is concluded about the log."""

    def __init__(self, url: str, problem: str, *, status: int | None = None) -> None:
        super().__init__(f"{url}: {problem}")
        self.url, self.problem, self.status = url, problem, status


class NotExtension(PipelineError):
    """A signed checkpoint that does not extend an earlier one of the same log: a fork, a
    rollback or a rewritten history. Evidence against the log: never cosign it."""


class RemoteLog:
    """A log's tlog-tiles endpoints under `url` (`https://api.example/audit`), over HTTP(S)."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def checkpoint(self) -> bytes | None:
        """The latest checkpoint note with its cosignatures, or None when the log has none."""
        try:
            return self._get("checkpoint", MAX_CHECKPOINT_BYTES)
        except RemoteError as exc:
            if exc.status == 404:
                return None
            raise

    def tile(self, tile: tiles.Tile) -> bytes:
        """The bytes served for `tile`, which must be its `width` hashes."""
        want = tile.width * merkle.HASH_SIZE
        data = self._get(tile.path(), want)
        if len(data) != want:
            raise RemoteError(
                f"{self.url}/{tile.path()}",
                f"{len(data)} bytes, not the {want} of {tile.width} hashes",
            )
        return data

    def post(self, path: str, body: bytes) -> bytes:
        """POST `body` (text) to `<prefix>/<path>`; the answer's body."""
        request = urllib.request.Request(
            f"{self.url}/{path}",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": _USER_AGENT},
        )
        return self._send(request, 1 << 16)

    def _get(self, path: str, limit: int) -> bytes:
        request = urllib.request.Request(f"{self.url}/{path}", headers={"User-Agent": _USER_AGENT})
        return self._send(request, limit)

    def _send(self, request: urllib.request.Request, limit: int) -> bytes:
        url = request.full_url
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                body: bytes = answer.read(limit + 1)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode("utf-8", "replace").strip()
            raise RemoteError(url, f"HTTP {exc.code}: {detail}", status=exc.code) from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, resets
            raise RemoteError(url, f"no answer ({exc})") from None
        if len(body) > limit:
            raise RemoteError(url, f"the answer exceeds {limit} bytes")
        return body


def open_checkpoint(note: bytes, keys: Sequence[Verifier]) -> Checkpoint:
    """The checkpoint of a note signed by every one of the log's `keys` (NoteError if
    not), whose origin is the name of one of them."""
    names = sorted({key.name for key in keys})
    text, _ = open_note(note, keys, require=names)
    checkpoint = Checkpoint.parse(text)
    if checkpoint.origin not in names:
        raise NoteError(
            f"checkpoint of {checkpoint.origin!r}: not the log of these keys ({', '.join(names)})"
        )
    return checkpoint


def check_extension(fetch: tiles.Fetch, old: Checkpoint, new: Checkpoint) -> None:
    """Check that `new` extends `old`: the same log, no fewer leaves, the same root at the
    same size, and a consistency proof built from the tiles of the new tree that
    verifies between the two roots. NotExtension if not; what `fetch` raises passes."""
    if new.origin != old.origin:
        raise NotExtension(f"checkpoint of {new.origin!r}, not of {old.origin!r}: another log")
    if new.size < old.size:
        raise NotExtension(
            f"the log's checkpoint of {new.size} leaves is smaller than the one of {old.size} "
            "leaves seen before: the log was rolled back"
        )
    if new.size == old.size:
        if new.root != old.root:
            raise NotExtension(
                f"two signed checkpoints of {new.size} leaves with different roots "
                f"({_b64(old.root)} seen before, {_b64(new.root)} now): the log forked"
            )
        return
    nodes = tiles.tree_nodes(fetch, new.size, merkle.consistency_nodes(old.size, new.size))
    proof = merkle.consistency_proof(old.size, new.size, nodes)
    try:
        merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)
    except merkle.ProofError as exc:
        raise NotExtension(
            f"the checkpoint of {new.size} leaves does not extend the one of {old.size} "
            f"leaves seen before ({exc}): the log's history was rewritten or forked"
        ) from None


# -- the state file -----------------------------------------------------------------------


def read_state(path: Path, keys: Sequence[Verifier]) -> tuple[bytes, Checkpoint] | None:
    """The checkpoint note kept in `path` and its checkpoint, or None if there is no file."""
    try:
        note = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PipelineError(f"state file {path}: {exc.strerror}") from None
    try:
        return note, open_checkpoint(note, keys)
    except NoteError as exc:
        raise PipelineError(
            f"state file {path} does not hold a checkpoint of this log ({exc}): was it "
            "made with other keys? Move it away to start afresh"
        ) from None


def write_state(path: Path, note: bytes) -> None:
    """Replace `path` with `note`, atomically and durably (a crash leaves old or new)."""
    directory = path.resolve().parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(note)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- verification -------------------------------------------------------------------------


@dataclass
class RemoteReport(Report):
    """What verifying a remote log found (the fields of `Report` that apply, and more)."""

    url: str = ""
    root: bytes = b""
    tiles: int = 0
    extends: list[int] = field(default_factory=list)
    """Sizes of the earlier checkpoints the new one was shown to extend."""

    def summary(self) -> str:
        if not self.ok:
            return super().summary()
        earlier = (
            f"; extends the earlier checkpoint(s) of {', '.join(map(str, self.extends))} leaves"
            if self.extends
            else ""
        )
        return (
            f"verified {self.url}: checkpoint of {self.latest} leaves signed by every key, "
            f"its root recomputed from {self.tiles} tiles{earlier}"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "url": self.url,
            "tree_size": self.latest,
            "root": _b64(self.root) if self.root else None,
            "tiles": self.tiles,
            "extends": self.extends,
            "problems": self.problems,
            "more_problems": self.more,
        }


def verify_remote(
    log: RemoteLog,
    keys: Sequence[Verifier],
    *,
    state: Path | None = None,
    earlier: Sequence[bytes] = (),
    workers: int = 8,
) -> RemoteReport:
    """Verify the log at `log.url` from its endpoints (see the module's docstring). The new
    checkpoint must extend the one kept in `state` and each note of `earlier`; `state`
    then keeps the new one."""
    report = RemoteReport(url=log.url)
    try:
        found = _signed_checkpoint(log, keys, report)
        if found is None:
            return report
        note, checkpoint = found
        _rebuild(log, checkpoint, report, workers)
        kept = read_state(state, keys) if state is not None else None
        for old in [*(_earlier(n, keys, report) for n in earlier), kept and kept[1]]:
            if old:
                _extends(log, old, checkpoint, report)
    except RemoteError as exc:
        report.problem(str(exc))
        return report
    if report.ok:
        report.latest, report.root = checkpoint.size, checkpoint.root
        if state is not None:
            write_state(state, note)
    return report


def _signed_checkpoint(
    log: RemoteLog, keys: Sequence[Verifier], report: RemoteReport
) -> tuple[bytes, Checkpoint] | None:
    note = log.checkpoint()
    if note is None:
        report.problem(f"{log.url}/checkpoint: the log has no checkpoint yet")
        return None
    try:
        checkpoint = open_checkpoint(note, keys)
    except NoteError as exc:
        report.problem(f"{log.url}/checkpoint: {exc}")
        return None
    report.checkpoints, report.leaves = 1, checkpoint.size
    return note, checkpoint


def _rebuild(log: RemoteLog, checkpoint: Checkpoint, report: RemoteReport, workers: int) -> None:
    rebuilt = tiles.rebuild(log.tile, checkpoint.size, workers=workers)
    report.tiles = rebuilt.tiles
    for problem in rebuilt.problems:
        report.problem(problem)
    if rebuilt.root is not None and rebuilt.root != checkpoint.root:
        report.problem(
            f"the root of the {checkpoint.size} leaf hashes in the level-0 tiles is "
            f"{_b64(rebuilt.root)}, not the signed root {_b64(checkpoint.root)}: the tiles "
            "served are not the tree the checkpoint signs"
        )


def _earlier(note: bytes, keys: Sequence[Verifier], report: Report) -> Checkpoint | None:
    """An earlier checkpoint given to compare with; None (reported) if it does not verify."""
    try:
        return open_checkpoint(note, keys)
    except NoteError as exc:
        report.problem(f"an earlier checkpoint given: {exc}")
        return None


def _extends(log: RemoteLog, old: Checkpoint, new: Checkpoint, report: RemoteReport) -> None:
    try:
        check_extension(log.tile, old, new)
    except NotExtension as exc:
        report.problem(str(exc))
    else:
        report.extends.append(old.size)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
