"""`/audit/...`: the audit log as a C2SP tlog-tiles log, and witnesses' cosignatures.

- `GET /audit/checkpoint`: the latest signed checkpoint with the witnesses'
  cosignatures the log holds for it (text/plain; cached for a few seconds at most).
- `GET /audit/tile/<L>/<N>[.p/<W>]`: the tiles of the latest checkpoint's tree
  (application/octet-stream; immutable). Entry bundles are not served: events are read
  through `/v1/events/{id}` with a token (see `pipeline.audit.tiles`).
- `POST /audit/cosignature`: a witness's cosignature, as the checkpoint note followed by
  the witness's tlog-cosignature/v1 line(s).

No bearer token: the GETs are a transparency log's public face. They disclose the
number of events and when checkpoints were signed, and leaf hashes, each SHA-256 over
an event's whole stored bytes: enough to confirm a guess of an event byte for byte,
never to read one. A deployment for which the event count itself is sensitive serves
`/audit/` only to its witnesses and auditors (at its proxy). Full tiles never change:
a caching proxy in front takes the load of public readers. The POST is authenticated by
the cosignature itself: only a line that verifies with a key of
`PIPELINE_AUDIT_WITNESS_KEYS_FILE` over a checkpoint this log signed is stored.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ...audit import tiles
from ...audit.note import COSIGNATURE_V1, Verifier
from ...audit.service import read_keys
from ...audit.witness import (
    BadCosignature,
    CheckpointMismatch,
    CosignatureRefused,
    MalformedCosignature,
    NoSuchCheckpoint,
    UnknownWitness,
    accept_cosignatures,
)
from ...errors import ConfigError
from ...settings import Settings
from ..deps import Context, Db
from ..errors import ApiError

__all__ = ["router", "witness_keys"]

MAX_COSIGNATURE_BYTES = 64 * 1024
CHECKPOINT_CACHE = "public, max-age=5"
TILE_CACHE = "public, max-age=31536000, immutable"

_REFUSED: dict[type[CosignatureRefused], tuple[int, str]] = {
    MalformedCosignature: (400, "invalid_cosignature"),
    UnknownWitness: (403, "unknown_witness"),
    BadCosignature: (403, "bad_cosignature"),
    NoSuchCheckpoint: (404, "not_found"),
    CheckpointMismatch: (409, "checkpoint_mismatch"),
}


def witness_keys(settings: Settings) -> list[Verifier]:
    """The witnesses whose cosignatures the log takes (none when the setting is empty)."""
    path = settings.audit_witness_keys_file
    if not path:
        return []
    try:
        keys = read_keys(path)
    except ValueError as exc:
        raise ConfigError("PIPELINE_AUDIT_WITNESS_KEYS_FILE", str(exc)) from None
    for key in keys:
        if key.sig_type != COSIGNATURE_V1:
            raise ConfigError(
                "PIPELINE_AUDIT_WITNESS_KEYS_FILE",
                f"{key.ident} is not a cosignature/v1 (type 0x04) key: list witnesses' vkeys "
                "(`pipeline audit witness-keygen` prints one)",
            )
    return keys


async def _body(request: Request) -> bytes:
    """The request's body, refused past MAX_COSIGNATURE_BYTES."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_COSIGNATURE_BYTES:
            limit = f"a cosignature is under {MAX_COSIGNATURE_BYTES} bytes"
            raise ApiError(413, "too_large", limit)
    return bytes(body)


router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("/checkpoint", response_class=Response)
def checkpoint(api: Context, conn: Db) -> Response:
    """The latest signed checkpoint, with the witnesses' cosignatures (a signed note)."""
    note = tiles.read_checkpoint(conn, api.audit_tables)
    if note is None:
        raise ApiError(404, "not_found", "the log has no signed checkpoint yet")
    return Response(
        note,
        media_type="text/plain; charset=utf-8",
        headers={"Cache-Control": CHECKPOINT_CACHE},
    )


@router.get("/tile/{path:path}", response_class=Response)
def tile(api: Context, conn: Db, path: str) -> Response:
    """A tile of the latest checkpoint's tree: `<L>/<N>[.p/<W>]`, N as x001/x234/067."""
    if path.startswith("entries/"):
        raise ApiError(
            404,
            "not_found",
            "entry bundles are not served: read events through /v1/events/{id}",
        )
    try:
        wanted = tiles.Tile.parse(path)
    except tiles.TileError as exc:
        raise ApiError(400, "invalid_tile", str(exc)) from None
    data = tiles.read_tile(conn, api.audit_tables, wanted)
    if data is None:
        raise ApiError(404, "not_found", f"{wanted.path()} is not in the latest checkpoint's tree")
    return Response(
        data, media_type="application/octet-stream", headers={"Cache-Control": TILE_CACHE}
    )


@router.post("/cosignature")
def cosignature(api: Context, conn: Db, body: Annotated[bytes, Depends(_body)]) -> dict[str, Any]:
    """Take a witness's cosignature: the checkpoint note followed by its cosignature
    line(s) (tlog-cosignature/v1). Stored once per witness key and checkpoint."""
    try:
        size, accepted = accept_cosignatures(conn, api.audit_tables, body, api.witnesses)
    except CosignatureRefused as exc:
        status, code = _REFUSED[type(exc)]
        raise ApiError(status, code, str(exc)) from None
    return {"size": size, "cosignatures": [{"key": a.key, "new": a.new} for a in accepted]}
