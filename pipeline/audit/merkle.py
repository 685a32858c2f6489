"""RFC 9162 Merkle tree hashing, the tree's right edge, inclusion and consistency proofs.

Leaf i of the audit log is the i-th stored event (0-based). Hashing is RFC 9162's (the
same as RFC 6962 and Certificate Transparency):
- leaf hash: SHA-256(0x00 ‖ data); node hash: SHA-256(0x01 ‖ left ‖ right);
- the root of the empty tree is SHA-256 of nothing (`EMPTY_ROOT`);
- the root MTH of n > 1 leaves is the node hash of the MTH of the first k leaves and the
  MTH of the rest, k the largest power of two below n.

Storage (the caller keeps hashes, this module is pure): node (level, n) is the hash of
the complete subtree of 2**level leaves [n·2**level, (n+1)·2**level). As in Go's
golang.org/x/mod/sumdb/tlog, appending leaf i stores its leaf hash (level 0) and the hash
of every complete subtree that leaf i completes (levels 1..k, k the number of trailing
1 bits of i), concatenated in level order into one row of 32·(1+k) bytes for leaf i. So
node (level, n) lives in the row of leaf ((n+1) << level) - 1, at byte offset 32·level
(`node_row`), and is stored once the tree holds that leaf. Leaf rows laid end to end,
leaf i's row starts `stored_offset(i)` hashes in (`2·i - popcount(i)`), so a run of
leaves can be kept as one blob and a node found in it by arithmetic.

Proofs are exactly RFC 9162's (section 2.1.3 inclusion, 2.1.4 consistency; the same as Go's
tlog.ProveRecord / ProveTree and Certificate Transparency's), so any RFC 9162 verifier
accepts them, and the checks here follow the RFC's verification algorithms step by step.
A proof element is the MTH of some leaves D[a:b]; when b - a is not a power of two it is
not one stored node, and is made from the complete subtrees of `range_nodes(a, b)`. The
nodes a proof needs are named up front (`inclusion_nodes`, `consistency_nodes`) so that
the caller fetches them in one query and passes them in as a mapping.

Beyond the RFC, whose consistency proofs are for 0 < old < new: sizes old == new are
consistent when the roots are equal, with an empty proof; and old == 0 is consistent with
every new size, with an empty proof, when the old root is `EMPTY_ROOT`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "ProofError",
    "consistency_nodes",
    "consistency_proof",
    "inclusion_nodes",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "node_row",
    "range_nodes",
    "root_of",
    "stored_count",
    "stored_offset",
    "tree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


class ProofError(ValueError):
    """A proof that does not verify; the message says why."""


def leaf_hash(data: bytes) -> bytes:
    """The RFC 9162 hash of a leaf: SHA-256(0x00 ‖ data)."""
    digest = hashlib.sha256(_LEAF_PREFIX)
    digest.update(data)
    return digest.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an interior node: SHA-256(0x01 ‖ left ‖ right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def node_row(level: int, n: int) -> tuple[int, int]:
    """Where node (level, n) is stored: (the leaf index of its row, its byte offset there)."""
    _check_count("level", level)
    _check_count("n", n)
    return ((n + 1) << level) - 1, HASH_SIZE * level


def stored_count(index: int) -> int:
    """How many hashes the row of leaf `index` holds: 1 + the trailing 1 bits of index."""
    _check_count("index", index)
    lowest_zero = (index + 1) & -(index + 1)
    return lowest_zero.bit_length()


def stored_offset(index: int) -> int:
    """How many hashes the rows of the leaves before `index` hold together: 2·index less
    the 1 bits of index (the rows' trailing 1 bits add up to index less its 1 bits)."""
    _check_count("index", index)
    return 2 * index - index.bit_count()


def range_nodes(lo: int, hi: int) -> list[tuple[int, int]]:
    """The complete subtrees (level, n) that leaves [lo, hi) split into, left to right.

    Each is the largest complete subtree that starts at the next leaf and ends by `hi`.
    When `lo` is a multiple of the largest power of two not above hi - lo, as every range
    of an RFC 9162 proof is, the RFC's MTH of D[lo:hi] is the right fold of these:
    node_hash(c1, node_hash(c2, ...)).
    """
    _check_count("lo", lo)
    if hi < lo:
        raise ValueError(f"the range [{lo}, {hi}) ends before it starts")
    nodes = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        if lo:
            level = min(level, (lo & -lo).bit_length() - 1)
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


class CompactRange:
    """The right edge of a tree of `size` leaves: its perfect subtrees' roots, largest first."""

    __slots__ = ("_hashes", "_size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        _check_count("size", size)
        if len(hashes) != size.bit_count():
            raise ValueError(
                f"the edge of a tree of {size} leaves is {size.bit_count()} hashes, "
                f"not {len(hashes)}"
            )
        for i, value in enumerate(hashes):
            _check_hash(f"edge hash {i}", value, ValueError)
        self._size = size
        self._hashes = list(hashes)

    @property
    def size(self) -> int:
        """How many leaves the tree holds."""
        return self._size

    @staticmethod
    def edge(size: int) -> list[tuple[int, int]]:
        """The nodes (level, n) the edge of a tree of `size` leaves is made of, largest first."""
        _check_count("size", size)
        return range_nodes(0, size)

    def append(self, leaf: bytes) -> bytes:
        """Add a leaf hash; return its row: the leaf hash, then each subtree it completes."""
        _check_hash("leaf", leaf, ValueError)
        row = [leaf]
        value = leaf
        completed = self._size
        while completed & 1:
            value = node_hash(self._hashes.pop(), value)
            row.append(value)
            completed >>= 1
        self._hashes.append(value)
        self._size += 1
        return b"".join(row)

    def extend(self, leaves: Iterable[bytes]) -> bytes:
        """Add leaf hashes; return their rows end to end (what `append` returns for each,
        joined), in one loop without a call per leaf."""
        out: list[bytes] = []
        keep = out.append
        hashes, size = self._hashes, self._size
        node = hashlib.sha256(_NODE_PREFIX).copy  # a node's hash, its prefix already in
        try:
            for leaf in leaves:
                if len(leaf) != HASH_SIZE:
                    raise ValueError(f"leaf {size}: a hash is {HASH_SIZE} bytes, not {len(leaf)}")
                keep(leaf)
                value = leaf
                completed = size
                while completed & 1:
                    h = node()
                    h.update(hashes.pop())
                    h.update(value)
                    value = h.digest()
                    keep(value)
                    completed >>= 1
                hashes.append(value)
                size += 1
        finally:
            self._size = size
        return b"".join(out)

    def root(self) -> bytes:
        """The root of the tree so far (`EMPTY_ROOT` while it has no leaves)."""
        return _fold(self._hashes)

    def hashes(self) -> list[bytes]:
        """The edge's hashes, largest subtree first (a copy)."""
        return list(self._hashes)


def root_of(leaves: Iterable[bytes]) -> tuple[int, bytes]:
    """(size, root) of the tree of these leaf hashes, read once, in O(log n) memory."""
    # The loop of CompactRange.append without its rows: this runs over whole logs.
    sha256 = hashlib.sha256
    edge: list[bytes] = []
    size = 0
    for value in leaves:
        if len(value) != HASH_SIZE:
            raise ValueError(f"leaf {size} is {len(value)} bytes, not a {HASH_SIZE}-byte hash")
        completed = size
        while completed & 1:
            value = sha256(_NODE_PREFIX + edge.pop() + value).digest()
            completed >>= 1
        edge.append(value)
        size += 1
    return size, _fold(edge)


def tree_root(size: int, nodes: Mapping[tuple[int, int], bytes]) -> bytes:
    """The root of a tree of `size` leaves from stored nodes (those of `CompactRange.edge`)."""
    return _fold([_node(nodes, node) for node in CompactRange.edge(size)])


def inclusion_nodes(index: int, size: int) -> list[tuple[int, int]]:
    """The stored nodes the inclusion proof of leaf `index` in a tree of `size` leaves needs."""
    return _nodes_of(_inclusion_ranges(index, size))


def inclusion_proof(index: int, size: int, nodes: Mapping[tuple[int, int], bytes]) -> list[bytes]:
    """RFC 9162 PATH(index, D[0:size]), from the nodes of `inclusion_nodes(index, size)`."""
    return [_range_hash(lo, hi, nodes) for lo, hi in _inclusion_ranges(index, size)]


def consistency_nodes(old: int, new: int) -> list[tuple[int, int]]:
    """The stored nodes the consistency proof from `old` leaves to `new` leaves needs."""
    return _nodes_of(_consistency_ranges(old, new))


def consistency_proof(old: int, new: int, nodes: Mapping[tuple[int, int], bytes]) -> list[bytes]:
    """RFC 9162 PROOF(old, D[0:new]), from the nodes of `consistency_nodes(old, new)`.

    Empty when old == new, and when old == 0, for which the RFC defines no proof.
    """
    return [_range_hash(lo, hi, nodes) for lo, hi in _consistency_ranges(old, new)]


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that `leaf` is leaf `index` of the tree of `size` leaves with this `root`.

    RFC 9162 section 2.1.3.2; raises ProofError when the proof does not verify.
    """
    _check_count("index", index)
    _check_count("size", size)
    if index >= size:
        raise ProofError(f"leaf {index} is not in a tree of {size} leaves")
    _check_proof_hashes(proof, leaf=leaf, root=root)
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            raise ProofError(
                f"the inclusion proof of leaf {index} in a tree of {size} leaves is too long"
            )
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(
            f"the inclusion proof of leaf {index} in a tree of {size} leaves is too short"
        )
    if r != root:
        raise ProofError(
            f"leaf {index} and its inclusion proof lead to root {r.hex()}, not {root.hex()}"
        )


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of `new` leaves with `new_root` extends the one of `old` leaves.

    RFC 9162 section 2.1.4.2 for 0 < old < new; raises ProofError when the proof does not
    verify. old == new needs equal roots and an empty proof; old == 0 needs the empty
    tree's root and an empty proof (the RFC leaves both out).
    """
    _check_count("old", old)
    _check_count("new", new)
    if old > new:
        raise ProofError(f"a tree of {new} leaves cannot extend one of {old}")
    _check_proof_hashes(proof, old_root=old_root, new_root=new_root)
    if old == new or old == 0:
        _verify_trivial(old, new, old_root, new_root, proof)
        return
    if not proof:
        raise ProofError(f"the consistency proof from {old} to {new} leaves is empty")
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"the consistency proof from {old} to {new} leaves is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError(f"the consistency proof from {old} to {new} leaves is too short")
    if fr != old_root:
        raise ProofError(
            f"the consistency proof from {old} to {new} leaves leads to old root {fr.hex()}, "
            f"not {old_root.hex()}"
        )
    if sr != new_root:
        raise ProofError(
            f"the consistency proof from {old} to {new} leaves leads to new root {sr.hex()}, "
            f"not {new_root.hex()}"
        )


def _verify_trivial(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """The consistency checks the RFC leaves out: old == new, and old == 0."""
    if proof:
        raise ProofError(
            f"the consistency proof from {old} to {new} leaves must be empty, "
            f"not {len(proof)} hashes"
        )
    if old == new and old_root != new_root:
        raise ProofError(
            f"two trees of {old} leaves with different roots: {old_root.hex()}, {new_root.hex()}"
        )
    if old == 0 and old_root != EMPTY_ROOT:
        raise ProofError(f"the root of the empty tree is {EMPTY_ROOT.hex()}, not {old_root.hex()}")


def _inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges [lo, hi) of PATH(index, D[0:size]), nearest the leaf first."""
    _check_count("index", index)
    _check_count("size", size)
    if index >= size:
        raise ValueError(f"leaf {index} is not in a tree of {size} leaves")
    ranges = []
    lo, hi = 0, size
    while hi - lo > 1:
        mid = lo + _split(hi - lo)
        if index < mid:
            ranges.append((mid, hi))
            hi = mid
        else:
            ranges.append((lo, mid))
            lo = mid
    ranges.reverse()
    return ranges


def _consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """The leaf ranges [lo, hi) of PROOF(old, D[0:new]) = SUBPROOF(old, D[0:new], true)."""
    _check_count("old", old)
    _check_count("new", new)
    if old > new:
        raise ValueError(f"the old size {old} is larger than the new size {new}")
    if old in (0, new):
        return []
    ranges = []
    lo, hi = 0, new
    whole = True  # SUBPROOF's b: D[lo:hi] still holds all of the old tree.
    while old != hi:
        mid = lo + _split(hi - lo)
        if old <= mid:
            ranges.append((mid, hi))
            hi = mid
        else:
            ranges.append((lo, mid))
            lo = mid
            whole = False
    if not whole:
        ranges.append((lo, hi))
    ranges.reverse()
    return ranges


def _split(n: int) -> int:
    """The largest power of two below n (n > 1): the size of the left subtree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _nodes_of(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [node for lo, hi in ranges for node in range_nodes(lo, hi)]


def _range_hash(lo: int, hi: int, nodes: Mapping[tuple[int, int], bytes]) -> bytes:
    """MTH(D[lo:hi]) from the stored nodes of `range_nodes(lo, hi)`."""
    return _fold([_node(nodes, node) for node in range_nodes(lo, hi)])


def _fold(hashes: Sequence[bytes]) -> bytes:
    """The root over adjacent subtrees, largest first: node_hash(h1, node_hash(h2, ...))."""
    if not hashes:
        return EMPTY_ROOT
    root = hashes[-1]
    for value in reversed(hashes[:-1]):
        root = node_hash(value, root)
    return root


def _node(nodes: Mapping[tuple[int, int], bytes], node: tuple[int, int]) -> bytes:
    try:
        value = nodes[node]
    except KeyError:
        raise KeyError(f"node {node} (level, n) is not among the nodes given") from None
    _check_hash(f"node {node}", value, ValueError)
    return value


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, not {value}")


def _check_hash(what: str, value: bytes, error: type[ValueError]) -> None:
    if len(value) != HASH_SIZE:
        raise error(f"{what} is {len(value)} bytes, not a {HASH_SIZE}-byte hash")


def _check_proof_hashes(proof: Sequence[bytes], **named: bytes) -> None:
    for what, value in named.items():
        _check_hash(what, value, ProofError)
    for i, value in enumerate(proof):
        _check_hash(f"proof hash {i}", value, ProofError)
