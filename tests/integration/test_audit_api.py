"""The audit log as a tlog-tiles log, served for real: tiles, `verify --url`, cosignatures."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from fastapi.testclient import TestClient

from pipeline.api import create_app
from pipeline.audit import merkle
from pipeline.audit.keys import MldsaSigner
from pipeline.audit.log import AuditLog, read_nodes
from pipeline.audit.note import (
    Checkpoint,
    CosignatureSigner,
    Ed25519Signer,
    NoteSignature,
    Signer,
    Verifier,
    open_note,
    sign_note,
)
from pipeline.audit.tables import AuditTables
from pipeline.audit.tiles import Tile, level_tiles, rebuild, tiles_of, tree_nodes
from pipeline.errors import ConfigError
from pipeline.metrics import AuditMetrics
from pipeline.ops.cli import main
from pipeline.ops.migrate import migrate
from pipeline.store.eventstore import EventStore

from ..conftest import PG_DB, PG_HOST, as_role, make_settings
from .helpers import write_events

ORIGIN = "audit.test/tiles"
WITNESS = "witness.test/w1"


# -- a logged schema, the API served for real, a proxy that lies -------------------------------


class Logged:
    """A schema of its own (migrated, dropped on close) with a store and the audit log's
    follower, signing with software keys."""

    _seeds = itertools.count(1000)

    def __init__(self, signers: Sequence[Signer], witness_keys: Path | None = None) -> None:
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        migrate(make_settings("nats://unused", self.schema))
        self.settings = make_settings(
            "nats://unused",
            self.schema,
            audit_origin=ORIGIN,
            audit_witness_keys_file=str(witness_keys or ""),
        )
        self.tables = AuditTables(self.schema)
        self.store = EventStore(as_role(self.settings, "writer").eventsourcing_env())
        self.audit = AuditLog(
            self.schema,
            origin=ORIGIN,
            signers=lambda: signers,
            checkpoint_every=10**9,
            metrics=AuditMetrics(),
        )

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(**as_role(self.settings, "auditor").postgres_connection())

    def grow(self, count: int, *, sign: bool = True) -> int:
        """Store `count` new events, log them and (`sign`) checkpoint the log; its size."""
        write_events(self.store, count, seed=next(self._seeds))
        with self.connect() as conn:
            conn.autocommit = True
            while self.audit.step(conn):
                pass
            if sign:
                assert self.audit.checkpoint(conn) is not None
        return self.audit.size

    def cosignatures(self) -> list[tuple[int, str]]:
        with owner() as conn:
            rows = conn.execute(
                f'SELECT size, key_name FROM "{self.schema}".audit_cosignatures ORDER BY size'
            ).fetchall()
        return [(size, name) for size, name in rows]

    @contextlib.contextmanager
    def api(self) -> Iterator[str]:
        """The API served on a free port, as the API role; its /audit prefix."""
        with serving(create_app(as_role(self.settings, "api"))) as url:
            yield f"{url}/audit"

    def close(self) -> None:
        self.store.close()
        with owner() as conn:
            conn.execute(f'DROP SCHEMA "{self.schema}" CASCADE')


def owner() -> psycopg.Connection[Any]:
    return psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True)


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` under uvicorn on a free port of 127.0.0.1, in a thread; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


Rewrite = Callable[[str, bytes], bytes]


@contextlib.contextmanager
def lying(upstream: str, rewrite: Rewrite) -> Iterator[str]:
    """A proxy to `upstream` (a prefix, …/audit) that passes each GET answer's body through
    `rewrite(path, body)` (path relative to the prefix); its own prefix."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.removeprefix("/audit/")
            try:
                with urllib.request.urlopen(f"{upstream}/{path}", timeout=10) as answer:
                    status, body = answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, exc.read()
            body = rewrite(path, body)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/audit"
    finally:
        server.shutdown()
        server.server_close()


def flip(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def software_signers(directory: Path) -> list[Signer]:
    """The log's two keys in software (the HSM is tested in test_hsm.py)."""
    mldsa = directory / f"mldsa-{uuid.uuid4().hex[:6]}.key"
    MldsaSigner.generate(str(mldsa))
    return [
        Ed25519Signer.generate(ORIGIN),
        MldsaSigner(name=f"{ORIGIN}/ml-dsa-65", path=str(mldsa)),
    ]


def verifiers(signers: Sequence[Any]) -> list[Verifier]:
    return [Verifier.for_signer(s) for s in signers]


def vkeys_file(path: Path, signers: Sequence[Any]) -> Path:
    path.write_text("".join(f"{v.vkey()}\n" for v in verifiers(signers)))
    return path


@pytest.fixture
def signers(tmp_path: Path) -> list[Signer]:
    return software_signers(tmp_path)


@pytest.fixture
def cosigner() -> CosignatureSigner:
    return CosignatureSigner.generate(WITNESS)


@pytest.fixture
def logged(signers: list[Signer], cosigner: CosignatureSigner, tmp_path: Path) -> Iterator[Logged]:
    made = Logged(signers, vkeys_file(tmp_path / "witnesses", [cosigner]))
    yield made
    made.close()


@pytest.fixture
def log_vkeys(signers: list[Signer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The log's vkeys in a file, for the command (run in tmp_path: no stray .env file)."""
    monkeypatch.chdir(tmp_path)
    return vkeys_file(tmp_path / "log.vkeys", signers)


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=10)


# -- tiles -------------------------------------------------------------------------------------


def test_tiles_are_the_stored_nodes_and_rebuild_each_signed_root(
    logged: Logged, signers: list[Signer]
) -> None:
    keys = verifiers(signers)
    with logged.api() as prefix:
        none = _get(f"{prefix}/checkpoint")
        assert (none.status_code, none.json()["error"]) == (404, "not_found")
        assert _get(f"{prefix}/tile/0/000.p/1").status_code == 404
        for size in (1, 255, 256, 257, 600):
            assert logged.grow(size - logged.audit.size) == size
            answer = _get(f"{prefix}/checkpoint")
            assert answer.headers["content-type"] == "text/plain; charset=utf-8"
            assert answer.headers["cache-control"] == "public, max-age=5"
            text, _ = open_note(answer.content, keys, require=[s.name for s in signers])
            checkpoint = Checkpoint.parse(text)
            assert checkpoint.size == size
            served: dict[Tile, bytes] = {}
            with logged.connect() as conn:
                for tile in tiles_of(size):
                    got = _get(f"{prefix}/{tile.path()}")
                    assert got.status_code == 200, (tile, got.text)
                    assert got.headers["content-type"] == "application/octet-stream"
                    assert got.headers["cache-control"] == "public, max-age=31536000, immutable"
                    stored = b"".join(h for _, h in read_nodes(conn, logged.tables, tile.nodes()))
                    assert got.content == stored, tile
                    served[tile] = got.content
            rebuilt = rebuild(served.__getitem__, size)
            assert rebuilt.problems == [] and rebuilt.root == checkpoint.root, size
            assert rebuilt.tiles == len(served)
        # The partial tiles of earlier checkpoints stay; nothing past the latest is served.
        assert _get(f"{prefix}/tile/0/000.p/1").status_code == 200
        assert _get(f"{prefix}/tile/0/002.p/88").status_code == 200
        logged.grow(20, sign=False)
        for beyond in ("tile/0/002.p/89", "tile/0/003", "tile/1/000.p/3", "tile/1/000"):
            answer = _get(f"{prefix}/{beyond}")
            assert (answer.status_code, answer.json()["error"]) == (404, "not_found"), beyond
            assert "latest checkpoint" in answer.json()["detail"]
        for malformed in ("tile/01/000", "tile/0/1", "tile/0/x000/001", "tile/0/000.p/256"):
            answer = _get(f"{prefix}/{malformed}")
            assert (answer.status_code, answer.json()["error"]) == (400, "invalid_tile"), malformed
        bundle = _get(f"{prefix}/tile/entries/000")
        assert bundle.status_code == 404 and "/v1/events" in bundle.json()["detail"]


def _rows(size: int) -> tuple[dict[tuple[int, int], bytes], dict[int, bytes]]:
    """The nodes of a tree of `size` random leaves, as the log stores them, and the roots
    of some of its prefixes."""
    edge = merkle.CompactRange()
    nodes: dict[tuple[int, int], bytes] = {}
    roots = {}
    for index in range(size):
        row = edge.append(merkle.leaf_hash(index.to_bytes(8, "big")))
        for level in range(len(row) // 32):
            nodes[(level, ((index + 1) >> level) - 1)] = row[32 * level : 32 * (level + 1)]
        if index + 1 in (70, 256, 65536, size):
            roots[index + 1] = edge.root()
    return nodes, roots


def test_a_tree_past_one_level_one_tile_from_nodes_in_memory() -> None:
    """65,539 leaves: full level-0 and level-1 tiles, partial ones at levels 0, 1 and 2."""
    assert Tile(0, 1234067).path() == "tile/0/x001/x234/067"
    assert Tile.parse("tile/3/x001/x234/067.p/8") == Tile(3, 1234067, 8)
    # The example of c2sp.org/tlog-tiles: 273 full level-0 tiles, one of 112, one full
    # level-1 tile, one of 17, and a level-2 tile of 1.
    shapes = [(t.level, t.width) for t in tiles_of(70_000)]
    assert shapes == [(0, 256)] * 273 + [(0, 112), (1, 256), (1, 17), (2, 1)]
    size = 65_536 + 3
    nodes, roots = _rows(size)

    def fetch(tile: Tile) -> bytes:
        return b"".join(nodes[node] for node in tile.nodes())

    for at in (256, 65_536, size):
        rebuilt = rebuild(fetch, at)
        assert (rebuilt.root, rebuilt.problems, rebuilt.tiles) == (roots[at], [], len(tiles_of(at)))
    assert [t.path() for t in level_tiles(1, size)] == ["tile/1/000"]
    assert [t.path() for t in level_tiles(2, size)] == ["tile/2/000.p/1"]
    # A consistency proof from the tiles of the larger tree, across the level-1 boundary.
    proof = merkle.consistency_proof(
        70, size, tree_nodes(fetch, size, merkle.consistency_nodes(70, size))
    )
    merkle.verify_consistency(70, size, roots[70], roots[size], proof)

    def lying(wrong: Tile) -> Callable[[Tile], bytes]:
        return lambda tile: flip(fetch(tile), 40) if tile == wrong else fetch(tile)

    rebuilt = rebuild(lying(Tile(1, 0)), size)
    assert rebuilt.root == roots[size]
    assert rebuilt.problems == [
        "tile/1/000: hash 1 is not the hash of tile/0/001 (leaves 256..511): the tile or the "
        "one below it was altered",
        "tile/2/000.p/1: hash 0 is not the hash of tile/1/000 (leaves 0..65535): the tile or "
        "the one below it was altered",
    ]
    rebuilt = rebuild(lying(Tile(0, 7)), size)
    assert rebuilt.root != roots[size]
    assert [p.split(":")[0] for p in rebuilt.problems] == ["tile/1/000"]
    assert "tile/0/007" in rebuilt.problems[0]
    rebuilt = rebuild(lambda tile: fetch(tile)[:-1], size)
    assert rebuilt.problems == [
        "tile/0/000 is 8191 bytes, not 8192 (256 hashes): the tree's root cannot be recomputed"
    ]


# -- verify --url ------------------------------------------------------------------------------


def test_verify_url_passes_on_the_honest_log_and_names_what_a_lying_one_changed(
    logged: Logged, log_vkeys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logged.grow(600)
    other = software_signers(tmp_path)  # the same names, other keys

    def resigned(path: str, body: bytes) -> bytes:
        if path != "checkpoint":
            return body
        text = body[: body.index(b"\n\n") + 1]
        return sign_note(text, other)

    cases: list[tuple[Rewrite, list[str]]] = [
        (lambda p, b: flip(b) if p == "tile/0/000" else b, ["tile/0/000", "not the signed root"]),
        (lambda p, b: flip(b, 33) if p == "tile/1/000.p/2" else b, ["tile/1/000.p/2: hash 1"]),
        (
            lambda p, b: b[:-32] if p == "tile/0/002.p/88" else b,
            ["tile/0/002.p/88: 2784 bytes, not the 2816 of 88 hashes"],
        ),
        (resigned, ["/checkpoint: note: no signature by a known key"]),
    ]
    with logged.api() as prefix:
        assert main(["audit", "verify", "--url", prefix, "--keys", str(log_vkeys)]) == 0
        out = capsys.readouterr().out
        assert f"verified {prefix}: checkpoint of 600 leaves signed by every key" in out
        assert "from 4 tiles" in out  # 2 full and 1 partial at level 0, 1 partial at level 1
        for rewrite, words in cases:
            with lying(prefix, rewrite) as liar:
                code = main(["audit", "verify", "--url", liar, "--keys", str(log_vkeys), "--json"])
                report = json.loads(capsys.readouterr().out)
            assert code == 1 and report["ok"] is False
            for word in words:
                assert any(word in problem for problem in report["problems"]), (word, report)
        # A log that answers nothing is a failure too, and says where.
        assert main(
            ["audit", "verify", "--url", "http://127.0.0.1:9/audit", "--keys", str(log_vkeys)]
        )
        assert "127.0.0.1:9/audit/checkpoint: no answer" in capsys.readouterr().out


def test_verify_url_with_a_state_file_sees_growth_and_refuses_a_fork(
    logged: Logged,
    signers: list[Signer],
    log_vkeys: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = tmp_path / "verified.note"
    fork = Logged(signers)
    try:
        logged.grow(300)
        fork.grow(300)
        args = ["audit", "verify", "--keys", str(log_vkeys), "--state", str(state)]
        with logged.api() as prefix:
            assert main([*args, "--url", prefix]) == 0
            assert Checkpoint.parse(state.read_bytes().split(b"\n\n")[0] + b"\n").size == 300
            logged.grow(213)
            assert main([*args, "--url", prefix]) == 0
            assert "extends the earlier checkpoint(s) of 300 leaves" in capsys.readouterr().out
        kept = state.read_bytes()
        with fork.api() as prefix:
            assert main([*args, "--url", prefix]) == 1
            assert "smaller than the one of 513 leaves" in capsys.readouterr().out
            fork.grow(213)
            assert main([*args, "--url", prefix]) == 1
            out = capsys.readouterr().out
            assert "two signed checkpoints of 513 leaves with different roots" in out
            fork.grow(100)
            assert main([*args, "--url", prefix]) == 1
            out = capsys.readouterr().out
            assert "does not extend the one of 513 leaves" in out
        assert state.read_bytes() == kept, "a failed verification keeps the state"
    finally:
        fork.close()


# -- cosignatures ------------------------------------------------------------------------------


def _cosign(cosigner: CosignatureSigner, text: bytes) -> bytes:
    line = NoteSignature(cosigner.name, cosigner.key_id, cosigner.sign(text))
    return text + b"\n" + line.line()


def _post(prefix: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{prefix}/cosignature", content=body, timeout=10)


def _refused(answer: httpx.Response, status: int, code: str, words: str) -> None:
    body = answer.json()
    assert (answer.status_code, body["error"]) == (status, code), answer.text
    assert words in body["detail"], body


def test_a_cosignature_is_taken_once_served_with_its_checkpoint_and_otherwise_refused(
    logged: Logged, signers: list[Signer], cosigner: CosignatureSigner
) -> None:
    with logged.api() as prefix:
        logged.grow(300)
        first = _get(f"{prefix}/checkpoint").content
        logged.grow(100)
        note = _get(f"{prefix}/checkpoint").content
        text = note[: note.index(b"\n\n") + 1]
        taken = _post(prefix, _cosign(cosigner, text))
        assert taken.status_code == 200, taken.text
        ident = Verifier.for_signer(cosigner).ident
        assert taken.json() == {"size": 400, "cosignatures": [{"key": ident, "new": True}]}
        again = _post(prefix, note + _cosign(cosigner, text).split(b"\n\n")[1])
        assert again.json()["cosignatures"] == [{"key": ident, "new": False}]
        served = _get(f"{prefix}/checkpoint").content
        assert served.startswith(note) and served.count(b"\n\xe2\x80\x94 ") == 3
        open_note(served, verifiers([cosigner]), require=[WITNESS])
        open_note(served, verifiers(signers), require=[s.name for s in signers])
        assert logged.cosignatures() == [(400, WITNESS)]
        # An older checkpoint may be cosigned too.
        older = first[: first.index(b"\n\n") + 1]
        assert _post(prefix, _cosign(cosigner, older)).status_code == 200

        stranger = CosignatureSigner.generate("stranger.test/w9")
        _refused(_post(prefix, _cosign(stranger, text)), 403, "unknown_witness", "stranger")
        impostor = CosignatureSigner.generate(WITNESS)  # the listed name, another key
        _refused(_post(prefix, _cosign(impostor, text)), 403, "unknown_witness", WITNESS)
        forged = Checkpoint(ORIGIN, 400, bytes(32)).body()
        _refused(_post(prefix, _cosign(cosigner, forged)), 409, "checkpoint_mismatch", "400")
        unsigned = Checkpoint(ORIGIN, 12345, bytes(32)).body()
        _refused(_post(prefix, _cosign(cosigner, unsigned)), 404, "not_found", "12345")
        moved = text + b"\n" + _cosign(cosigner, older).split(b"\n\n")[1]
        _refused(_post(prefix, moved), 403, "bad_cosignature", "does not verify")
        _refused(_post(prefix, b"hello\n"), 400, "invalid_cosignature", "not a checkpoint")
        _refused(_post(prefix, b"x" * 70_000), 413, "too_large", "bytes")
        assert logged.cosignatures() == [(300, WITNESS), (400, WITNESS)]


def test_the_log_takes_no_cosignature_without_witnesses_and_refuses_a_wrong_key_file(
    logged: Logged, signers: list[Signer], cosigner: CosignatureSigner, tmp_path: Path
) -> None:
    logged.grow(5)
    settings = as_role(logged.settings, "api")
    none = settings.model_copy(update={"audit_witness_keys_file": ""})
    with TestClient(create_app(none)) as client:
        note = client.get("/audit/checkpoint").content
        text = note[: note.index(b"\n\n") + 1]
        answer = client.post("/audit/cosignature", content=_cosign(cosigner, text))
        _refused(answer, 403, "unknown_witness", "PIPELINE_AUDIT_WITNESS_KEYS_FILE")
    wrong = vkeys_file(tmp_path / "wrong", signers[:1])  # the log's own Ed25519 key
    for path in (wrong, tmp_path / "missing"):
        bad = settings.model_copy(update={"audit_witness_keys_file": str(path)})
        with pytest.raises(ConfigError, match="PIPELINE_AUDIT_WITNESS_KEYS_FILE"):
            create_app(bad)
