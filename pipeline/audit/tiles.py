"""The log in the C2SP tlog-tiles layout: tiles read from the stored nodes, trees from tiles.

C2SP tlog-tiles (https://c2sp.org/tlog-tiles) serves a Merkle tree as *tiles* of height
8: the tile N of level L holds the hashes of tree level 8·L, nodes N·256 .. N·256+W-1,
each the RFC 9162 hash of 256**L leaves, 32 bytes apiece. A full tile has W = 256; the
rightmost tile of a level may be partial (1 <= W <= 255), and a partial tile is never
hashed into the level above. Paths are `tile/<L>/<N>[.p/<W>]`, N written in 3-digit
groups, all but the last prefixed with "x": 1234067 is `x001/x234/067`.

Serving (the API's `/audit/checkpoint` and `/audit/tile/...`): the checkpoint is the
latest signed note with the witnesses' cosignature lines the log holds for it. The tree
served is the one of the latest signed checkpoint: a tile is served, full or partial,
when every one of its hashes is a node of that tree. Its hashes are the stored nodes
(`merkle.node_row`), so a tile never changes once served; nothing beyond the latest
checkpoint is served.

Entry bundles (`tile/entries/<N>`) are not served: the leaves' data are the stored
events, which the authenticated `/v1` API serves (an auditor with database access
checks them with `pipeline audit verify`), and a leaf's data can exceed the bundle
format's 64 KiB entry limit (uint16 lengths). The tiles let anyone check the signed
roots and proofs without seeing an event.

Reading (`rebuild`, `tree_nodes`): a client fetches tiles of the tree of a checkpoint's
size. `rebuild` fetches every tile, recomputes the root from the leaf hashes and checks
each higher tile against the hashes of the full tiles below it. `tree_nodes` derives a
few nodes (those of a proof) from the tiles that hold them; such nodes are trusted only
through a proof that verifies against signed roots.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.sql import SQL

from . import merkle
from .log import read_nodes
from .tables import AuditTables
from .trail import latest_checkpoint

__all__ = [
    "TILE_HEIGHT",
    "TILE_WIDTH",
    "Rebuilt",
    "Tile",
    "TileError",
    "level_tiles",
    "read_checkpoint",
    "read_tile",
    "rebuild",
    "tile_hashes",
    "tiles_of",
    "tree_nodes",
]

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_LEVEL = 63
MAX_COSIGNATURES = 64
"""Cosignatures served with a checkpoint (a note is read up to 100 signature lines)."""

Fetch = Callable[["Tile"], bytes]
"""Fetches a tile's bytes (raises what the transport raises when it cannot)."""

_LEVEL = re.compile(r"0|[1-9][0-9]*")
_WIDTH = re.compile(r"[1-9][0-9]*")
_GROUP = re.compile(r"[0-9]{3}")


class TileError(ValueError):
    """A tile path that is not one, or tile data of the wrong length."""


@dataclass(frozen=True)
class Tile:
    """Tile `index` of `level`, `width` hashes wide (256: full)."""

    level: int
    index: int
    width: int = TILE_WIDTH

    def __post_init__(self) -> None:
        if not 0 <= self.level <= MAX_LEVEL:
            raise TileError(f"tile level {self.level} is not in [0, {MAX_LEVEL}]")
        if self.index < 0:
            raise TileError(f"tile index {self.index} is negative")
        if not 1 <= self.width <= TILE_WIDTH:
            raise TileError(f"tile width {self.width} is not in [1, {TILE_WIDTH}]")

    @property
    def partial(self) -> bool:
        return self.width < TILE_WIDTH

    @property
    def tree_level(self) -> int:
        """The level in the Merkle tree of the tile's hashes: 8 · level."""
        return TILE_HEIGHT * self.level

    def path(self) -> str:
        """`tile/<L>/<N>[.p/<W>]`, N in the "x001/x234/067" form."""
        groups = []
        n = self.index
        while True:
            groups.append(f"{n % 1000:03d}")
            n //= 1000
            if not n:
                break
        encoded = "/".join([*(f"x{g}" for g in reversed(groups[1:])), groups[0]])
        suffix = f".p/{self.width}" if self.partial else ""
        return f"tile/{self.level}/{encoded}{suffix}"

    @classmethod
    def parse(cls, path: str) -> Tile:
        """The tile of a path `tile/<L>/<N>[.p/<W>]` (or the same without `tile/`), read
        strictly: the one canonical spelling of each tile is accepted."""
        rest = path.removeprefix("tile/")
        level, slash, rest = rest.partition("/")
        if not slash or not _LEVEL.fullmatch(level):
            raise TileError(f"{path!r}: the level is not a decimal without leading zeros")
        rest, dot, width = rest.partition(".p/")
        if dot and not _WIDTH.fullmatch(width):
            raise TileError(f"{path!r}: the width is not a decimal without leading zeros")
        *upper, last = rest.split("/")
        if not _GROUP.fullmatch(last) or not all(
            g.startswith("x") and _GROUP.fullmatch(g[1:]) for g in upper
        ):
            raise TileError(f"{path!r}: the index is not in the x001/x234/067 form")
        index = int("".join(g.removeprefix("x") for g in [*upper, last]))
        tile = cls(int(level), index, int(width) if dot else TILE_WIDTH)
        if dot and not tile.partial:
            raise TileError(f"{path!r}: a tile of {TILE_WIDTH} hashes is full (no .p/)")
        if tile.path() != "tile/" + path.removeprefix("tile/"):
            raise TileError(f"{path!r}: not the canonical path of {tile.path()}")
        return tile

    def nodes(self) -> list[tuple[int, int]]:
        """The tree nodes (level, n) whose hashes the tile holds, in order."""
        first = self.index * TILE_WIDTH
        return [(self.tree_level, first + i) for i in range(self.width)]

    def within(self, size: int) -> bool:
        """Whether every hash of the tile is a node of the tree of `size` leaves."""
        return (self.index * TILE_WIDTH + self.width) << self.tree_level <= size

    def label(self) -> str:
        """The path and the leaves it spans, for messages."""
        first = (self.index * TILE_WIDTH) << self.tree_level
        last = ((self.index * TILE_WIDTH + self.width) << self.tree_level) - 1
        return f"{self.path()} (leaves {first}..{last})"


def level_tiles(level: int, size: int) -> list[Tile]:
    """The tiles of `level` of the tree of `size` leaves: the full ones, then the partial."""
    hashes = size >> (TILE_HEIGHT * level)
    full, width = divmod(hashes, TILE_WIDTH)
    tiles = [Tile(level, n) for n in range(full)]
    if width:
        tiles.append(Tile(level, full, width))
    return tiles


def tiles_of(size: int) -> list[Tile]:
    """Every tile of the tree of `size` leaves, level by level."""
    tiles: list[Tile] = []
    level = 0
    while size >> (TILE_HEIGHT * level):
        tiles += level_tiles(level, size)
        level += 1
    return tiles


def tile_hashes(tile: Tile, data: bytes) -> list[bytes]:
    """The hashes of `data` served as `tile`; TileError unless it has their exact length."""
    want = tile.width * merkle.HASH_SIZE
    if len(data) != want:
        raise TileError(f"{tile.path()} is {len(data)} bytes, not {want} ({tile.width} hashes)")
    size = merkle.HASH_SIZE
    return [data[i : i + size] for i in range(0, want, size)]


# -- serving ------------------------------------------------------------------------------


def read_checkpoint(conn: psycopg.Connection[Any], tables: AuditTables) -> bytes | None:
    """The latest checkpoint note with the cosignature lines stored for it appended (the
    first `MAX_COSIGNATURES`, oldest first), or None before the first checkpoint."""
    latest = latest_checkpoint(conn, tables)
    if latest is None:
        return None
    size, _, note = latest
    lines = conn.execute(
        SQL("SELECT line FROM {} WHERE size = %s ORDER BY received_at, key_name LIMIT %s").format(
            tables.cosignatures
        ),
        (size, MAX_COSIGNATURES),
    ).fetchall()
    return note + b"".join(line.encode() + b"\n" for (line,) in lines)


def read_tile(conn: psycopg.Connection[Any], tables: AuditTables, tile: Tile) -> bytes | None:
    """The tile's bytes from the stored nodes, or None unless the tree of the latest signed
    checkpoint holds all of them."""
    latest = latest_checkpoint(conn, tables)
    if latest is None or not tile.within(latest[0]):
        return None
    return b"".join(value for _, value in read_nodes(conn, tables, tile.nodes()))


# -- reading ------------------------------------------------------------------------------


def _holder(level: int, n: int, size: int) -> tuple[Tile, int]:
    """The tile of the tree of `size` leaves that holds the hashes under node (level, n),
    and the offset of the first of them in it."""
    tile_level, height = divmod(level, TILE_HEIGHT)
    first = n << height  # its first hash at tree level 8 · tile_level
    index, offset = divmod(first, TILE_WIDTH)
    available = size >> (TILE_HEIGHT * tile_level)
    width = min(TILE_WIDTH, available - index * TILE_WIDTH)
    if width < offset + (1 << height):
        raise ValueError(f"node {(level, n)} is not in the tree of {size} leaves")
    return Tile(tile_level, index, width), offset


def tree_nodes(
    fetch: Fetch, size: int, wanted: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], bytes]:
    """The nodes (level, n) of the tree of `size` leaves, derived from the tiles that hold
    them (each fetched once). Not authenticated here: check what they prove."""
    holders = {node: _holder(*node, size) for node in wanted}
    fetched = {tile: tile_hashes(tile, fetch(tile)) for tile in {t for t, _ in holders.values()}}
    nodes = {}
    for (level, n), (tile, offset) in holders.items():
        count = 1 << (level - tile.tree_level)
        nodes[(level, n)] = merkle.root_of(fetched[tile][offset : offset + count])[1]
    return nodes


@dataclass
class Rebuilt:
    """The root of a tree recomputed from all of its tiles, and what did not hold."""

    size: int
    root: bytes | None = None
    """None when a level-0 tile could not be read (see the problems)."""
    tiles: int = 0
    problems: list[str] = field(default_factory=list)


def rebuild(fetch: Fetch, size: int, *, workers: int = 8) -> Rebuilt:
    """Fetch every tile of the tree of `size` leaves; recompute its root from the level-0
    tiles and check every higher tile against the full tiles of the level below.

    A level-0 tile of the wrong length stops the rebuild (there is no root without it);
    each higher tile that is not what the level below gives is reported. What `fetch`
    raises passes through.
    """
    result = Rebuilt(size)
    with ThreadPoolExecutor(workers, thread_name_prefix="tiles") as pool:
        tiles = level_tiles(0, size)
        below: list[bytes] = []
        try:
            _, result.root = merkle.root_of(_leaves(tiles, pool.map(fetch, tiles), below))
        except TileError as exc:
            result.problems.append(f"{exc}: the tree's root cannot be recomputed")
            return result
        result.tiles += len(tiles)
        level = 1
        while below:
            tiles = level_tiles(level, size)
            below = _check_level(tiles, pool.map(fetch, tiles), below, result.problems)
            result.tiles += len(tiles)
            level += 1
    return result


def _leaves(tiles: Sequence[Tile], data: Iterator[bytes], upper: list[bytes]) -> Iterator[bytes]:
    """The leaf hashes of the level-0 tiles, in order; each full tile's hash into `upper`."""
    for tile, raw in zip(tiles, data, strict=True):
        hashes = tile_hashes(tile, raw)
        if not tile.partial:
            upper.append(merkle.root_of(hashes)[1])
        yield from hashes


def _check_level(
    tiles: Sequence[Tile], data: Iterator[bytes], below: list[bytes], problems: list[str]
) -> list[bytes]:
    """Check the tiles of one level against the hashes of the full tiles below them, as
    served; the hashes of the full tiles of this level, as served (each problem names
    two tiles that disagree, one of which was altered)."""
    upper = []
    for tile, raw in zip(tiles, data, strict=True):
        first = tile.index * TILE_WIDTH
        want = below[first : first + tile.width]
        try:
            served = tile_hashes(tile, raw)
        except TileError as exc:
            problems.append(str(exc))
            served = want
        for i, (got, hashed) in enumerate(zip(served, want, strict=True)):
            if got != hashed:
                lower = Tile(tile.level - 1, first + i)
                problems.append(
                    f"{tile.path()}: hash {i} is not the hash of {lower.label()}: the tile or "
                    "the one below it was altered"
                )
                break
        if not tile.partial:
            upper.append(merkle.root_of(served)[1])
    return upper
