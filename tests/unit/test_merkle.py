"""The audit log's Merkle tree against RFC 9162's recursive definitions, written out here
as the oracle, and against Certificate Transparency's published test vectors."""

from __future__ import annotations

import hashlib
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    ProofError,
    consistency_nodes,
    consistency_proof,
    inclusion_nodes,
    inclusion_proof,
    leaf_hash,
    node_hash,
    node_row,
    range_nodes,
    root_of,
    stored_count,
    stored_offset,
    tree_root,
    verify_consistency,
    verify_inclusion,
)

LARGEST = 5000
"""Leaves of the largest tree the tests build."""

DATA = [f"event {i}".encode() for i in range(LARGEST)]

# -- The oracle: RFC 9162 section 2.1.1, 2.1.3.1 and 2.1.4.1, over D[lo:hi] of DATA. --


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


@cache
def mth(lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi])."""
    n = hi - lo
    if n == 0:
        return _sha256(b"")
    if n == 1:
        return _sha256(b"\x00" + DATA[lo])
    k = _k(n)
    return _sha256(b"\x01" + mth(lo, lo + k) + mth(lo + k, hi))


def path(m: int, lo: int, hi: int) -> list[bytes]:
    """PATH(m, D[lo:hi]), m counted from lo."""
    n = hi - lo
    if n == 1:
        return []
    k = _k(n)
    if m < k:
        return [*path(m, lo, lo + k), mth(lo + k, hi)]
    return [*path(m - k, lo + k, hi), mth(lo, lo + k)]


def subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b), m counted from lo."""
    n = hi - lo
    if m == n:
        return [] if b else [mth(lo, hi)]
    k = _k(n)
    if m <= k:
        return [*subproof(m, lo, lo + k, b), mth(lo + k, hi)]
    return [*subproof(m - k, lo + k, hi, False), mth(lo, lo + k)]


def proof(m: int, n: int) -> list[bytes]:
    """PROOF(m, D[0:n])."""
    return subproof(m, 0, n, True)


# -- The tree under test, built once: leaf hashes, rows and every stored node. --

LEAVES = [leaf_hash(data) for data in DATA]


def _build() -> tuple[list[bytes], dict[tuple[int, int], bytes]]:
    tree = CompactRange()
    rows = [tree.append(leaf) for leaf in LEAVES]
    nodes = {}
    for level in range(LARGEST.bit_length()):
        for n in range(LARGEST >> level):
            index, offset = node_row(level, n)
            nodes[level, n] = rows[index][offset : offset + HASH_SIZE]
    return rows, nodes


ROWS, NODES = _build()


def _flip(value: bytes, bit: int) -> bytes:
    """`value` with one bit flipped."""
    flipped = bytearray(value)
    flipped[bit // 8 % len(value)] ^= 1 << bit % 8
    return bytes(flipped)


# -- Hashing and known vectors. --

CT_DATA = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = [
    bytes.fromhex(h)
    for h in [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]
"""The 8 leaves of Certificate Transparency's Merkle tree tests and the root of each size."""

CT_INCLUSION = [
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
"""(leaf index, tree size, proof) of the CT tests (which count leaves from 1)."""

CT_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]
"""(old size, new size, proof) of the CT tests."""


def _ct_tree() -> tuple[list[bytes], dict[tuple[int, int], bytes]]:
    """The CT tree's roots by size (0..8) and its stored nodes."""
    tree = CompactRange()
    roots = [tree.root()]
    nodes = {}
    for index, data in enumerate(CT_DATA):
        row = tree.append(leaf_hash(data))
        for level in range(stored_count(index)):
            nodes[level, ((index + 1) >> level) - 1] = row[32 * level : 32 * level + 32]
        roots.append(tree.root())
    return roots, nodes


def test_hashes_are_rfc_9162s() -> None:
    assert EMPTY_ROOT == _sha256(b"") == CT_ROOTS[0]
    assert leaf_hash(b"") == CT_ROOTS[1]
    assert leaf_hash(b"abc") == _sha256(b"\x00abc")
    assert node_hash(b"l" * 32, b"r" * 32) == _sha256(b"\x01" + b"l" * 32 + b"r" * 32)


def test_roots_match_certificate_transparency_vectors() -> None:
    roots, nodes = _ct_tree()
    assert roots == CT_ROOTS
    for size in range(len(CT_DATA) + 1):
        leaves = [leaf_hash(data) for data in CT_DATA[:size]]
        assert root_of(leaves) == (size, CT_ROOTS[size])
        assert tree_root(size, nodes) == CT_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "expected"), CT_INCLUSION)
def test_inclusion_proofs_match_certificate_transparency_vectors(
    index: int, size: int, expected: list[str]
) -> None:
    roots, nodes = _ct_tree()
    got = inclusion_proof(index, size, nodes)
    assert [h.hex() for h in got] == expected
    verify_inclusion(index, size, leaf_hash(CT_DATA[index]), got, roots[size])


@pytest.mark.parametrize(("old", "new", "expected"), CT_CONSISTENCY)
def test_consistency_proofs_match_certificate_transparency_vectors(
    old: int, new: int, expected: list[str]
) -> None:
    roots, nodes = _ct_tree()
    got = consistency_proof(old, new, nodes)
    assert [h.hex() for h in got] == expected
    verify_consistency(old, new, roots[old], roots[new], got)


# -- Every tree up to 300 leaves against the oracle. --

SMALL = 300


def test_roots_and_inclusion_proofs_of_every_small_tree() -> None:
    tree = CompactRange()
    stored: dict[tuple[int, int], bytes] = {}
    for size in range(1, SMALL + 1):
        index = size - 1
        row = tree.append(LEAVES[index])
        for level in range(stored_count(index)):
            stored[level, ((index + 1) >> level) - 1] = row[32 * level : 32 * level + 32]
        root = mth(0, size)
        assert tree.root() == root, size
        assert root_of(LEAVES[:size]) == (size, root), size
        # Only the nodes stored by now: a proof never needs a later row.
        assert tree_root(size, stored) == root, size
        for i in range(size):
            got = inclusion_proof(i, size, stored)
            assert got == path(i, 0, size), (i, size)
            verify_inclusion(i, size, LEAVES[i], got, root)


def test_consistency_proofs_of_every_pair_of_small_trees() -> None:
    stored: dict[tuple[int, int], bytes] = {}
    for new in range(1, SMALL + 1):
        index = new - 1
        for level in range(stored_count(index)):
            stored[level, ((index + 1) >> level) - 1] = ROWS[index][32 * level : 32 * level + 32]
        for old in range(new + 1):
            got = consistency_proof(old, new, stored)
            assert got == ([] if old == 0 else proof(old, new)), (old, new)
            verify_consistency(old, new, mth(0, old), mth(0, new), got)


# -- Larger trees, sampled. --


@st.composite
def leaf_in_tree(draw: st.DrawFn) -> tuple[int, int]:
    """(index, size) of a leaf in a tree of up to LARGEST leaves."""
    size = draw(st.integers(1, LARGEST))
    return draw(st.integers(0, size - 1)), size


@st.composite
def two_sizes(draw: st.DrawFn) -> tuple[int, int]:
    """(old, new) sizes, 1 <= old <= new <= LARGEST."""
    new = draw(st.integers(1, LARGEST))
    return draw(st.integers(1, new)), new


@settings(max_examples=500, deadline=None)
@given(leaf_in_tree(), st.integers(0, 10_000))
def test_inclusion_proofs_verify_and_tampering_fails(at: tuple[int, int], bit: int) -> None:
    index, size = at
    root = mth(0, size)
    got = inclusion_proof(index, size, NODES)
    assert got == path(index, 0, size)
    assert all(node_row(*node)[0] < size for node in inclusion_nodes(index, size))
    verify_inclusion(index, size, LEAVES[index], got, root)

    def fails(i: int, n: int, leaf: bytes, hashes: list[bytes], r: bytes) -> None:
        with pytest.raises(ProofError):
            verify_inclusion(i, n, leaf, hashes, r)

    for k in range(len(got)):
        fails(index, size, LEAVES[index], [*got[:k], _flip(got[k], bit), *got[k + 1 :]], root)
    fails(index, size, _flip(LEAVES[index], bit), got, root)
    fails(index, size, LEAVES[index], got, _flip(root, bit))
    fails(index, size, LEAVES[index], [*got, root], root)
    fails(index, size, LEAVES[index], [root, *got], root)
    if got:
        fails(index, size, LEAVES[index], got[:-1], root)
    for other in {index - 1, index + 1, index ^ 2, bit % size} - {index}:
        if 0 <= other < size:
            fails(other, size, LEAVES[index], got, root)
    for other in {size - 1, size + 1, size * 2, size // 2, bit % LARGEST + 1} - {size}:
        if index < other <= LARGEST:
            fails(index, other, LEAVES[index], got, mth(0, other))
    fails(index + size, size, LEAVES[index], got, root)


@settings(max_examples=500, deadline=None)
@given(two_sizes(), st.integers(0, 10_000))
def test_consistency_proofs_verify_and_tampering_fails(sizes: tuple[int, int], bit: int) -> None:
    old, new = sizes
    old_root, new_root = mth(0, old), mth(0, new)
    got = consistency_proof(old, new, NODES)
    assert got == proof(old, new)
    assert all(node_row(*node)[0] < new for node in consistency_nodes(old, new))
    verify_consistency(old, new, old_root, new_root, got)

    def fails(m: int, n: int, r1: bytes, r2: bytes, hashes: list[bytes]) -> None:
        with pytest.raises(ProofError):
            verify_consistency(m, n, r1, r2, hashes)

    for k in range(len(got)):
        fails(old, new, old_root, new_root, [*got[:k], _flip(got[k], bit), *got[k + 1 :]])
    fails(old, new, _flip(old_root, bit), new_root, got)
    fails(old, new, old_root, _flip(new_root, bit), got)
    fails(old, new, old_root, new_root, [*got, new_root])
    fails(old, new, old_root, new_root, [old_root, *got])
    if got:
        fails(old, new, old_root, new_root, got[:-1])
        fails(old, new, new_root, old_root, got)
    for other in {old - 1, old + 1, old ^ 2, bit % new + 1} - {old}:
        if 1 <= other <= new:
            fails(other, new, mth(0, other), new_root, got)
    for other in {new - 1, new + 1, new * 2, new // 2, bit % LARGEST + 1} - {new}:
        if old <= other <= LARGEST:
            fails(old, other, old_root, mth(0, other), got)


# -- Storage layout. --


def test_each_row_holds_the_leaf_and_the_subtrees_it_completes() -> None:
    for index, row in enumerate(ROWS):
        count = stored_count(index)
        assert len(row) == HASH_SIZE * count
        assert count == 1 + len(bin(index)) - len(bin(index).rstrip("1"))
        for level in range(count):
            n = ((index + 1) >> level) - 1
            assert (n + 1) << level == index + 1
            assert node_row(level, n) == (index, HASH_SIZE * level)
            expected = mth(n << level, (n + 1) << level)
            assert row[HASH_SIZE * level : HASH_SIZE * (level + 1)] == expected
    assert len(NODES) == 2 * LARGEST - LARGEST.bit_count()
    assert [stored_count(i) for i in range(8)] == [1, 2, 1, 3, 1, 2, 1, 4]
    assert node_row(0, 5) == (5, 0)
    assert node_row(3, 1) == (15, 96)


def test_rows_laid_end_to_end_start_at_their_stored_offset() -> None:
    blob = b"".join(ROWS)
    for index, row in enumerate(ROWS):
        start = HASH_SIZE * stored_offset(index)
        assert blob[start : start + len(row)] == row
    assert stored_offset(len(ROWS)) * HASH_SIZE == len(blob)
    assert [stored_offset(i) for i in range(9)] == [0, 1, 3, 4, 7, 8, 10, 11, 15]
    with pytest.raises(ValueError):
        stored_offset(-1)


def test_range_nodes_split_into_complete_subtrees() -> None:
    assert range_nodes(0, 0) == []
    assert range_nodes(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert range_nodes(3, 13) == [(0, 3), (2, 1), (2, 2), (0, 12)]
    assert range_nodes(8, 14) == [(2, 2), (1, 6)]
    for lo in range(70):
        for hi in range(lo, 70):
            covered: list[int] = []
            for level, n in range_nodes(lo, hi):
                covered.extend(range(n << level, (n + 1) << level))
            assert covered == list(range(lo, hi))
            if lo == 0:
                assert range_nodes(lo, hi) == CompactRange.edge(hi)


def test_a_compact_range_restored_from_storage_goes_on_as_before() -> None:
    for size in [0, 1, 2, 7, 8, 255, 256, 1000]:
        edge = [NODES[node] for node in CompactRange.edge(size)]
        restored = CompactRange(size, edge)
        assert restored.size == size
        assert restored.hashes() == edge
        assert restored.root() == mth(0, size)
        for index in range(size, size + 20):
            assert restored.append(LEAVES[index]) == ROWS[index]
            assert restored.root() == mth(0, index + 1)


def test_hashes_returns_a_copy() -> None:
    tree = CompactRange()
    tree.append(LEAVES[0])
    tree.hashes().clear()
    assert tree.hashes() == [LEAVES[0]]


# -- Arguments. --


def test_wrong_arguments_are_refused_with_a_reason() -> None:
    with pytest.raises(ValueError, match="edge of a tree of 3 leaves is 2 hashes, not 1"):
        CompactRange(3, [LEAVES[0]])
    with pytest.raises(ValueError, match="size must be 0 or more, not -1"):
        CompactRange(-1)
    with pytest.raises(ValueError, match="leaf is 3 bytes"):
        CompactRange().append(b"abc")
    with pytest.raises(ValueError, match="leaf 1 is 0 bytes"):
        root_of([LEAVES[0], b""])
    with pytest.raises(ValueError, match="level must be 0 or more"):
        node_row(-1, 0)
    with pytest.raises(ValueError, match="index must be 0 or more"):
        stored_count(-1)
    with pytest.raises(ValueError, match=r"the range \[5, 4\) ends before it starts"):
        range_nodes(5, 4)
    with pytest.raises(ValueError, match="leaf 8 is not in a tree of 8 leaves"):
        inclusion_nodes(8, 8)
    with pytest.raises(ValueError, match="leaf 0 is not in a tree of 0 leaves"):
        inclusion_proof(0, 0, NODES)
    with pytest.raises(ValueError, match="old size 9 is larger than the new size 8"):
        consistency_nodes(9, 8)
    with pytest.raises(ValueError, match="new must be 0 or more"):
        consistency_proof(0, -1, NODES)
    with pytest.raises(KeyError, match=r"node \(0, 6\) \(level, n\) is not among"):
        inclusion_proof(7, 8, {})
    with pytest.raises(ValueError, match=r"node \(0, 0\) is 1 bytes"):
        tree_root(1, {(0, 0): b"x"})
    with pytest.raises(ValueError, match="size must be 0 or more"):
        verify_inclusion(0, -1, LEAVES[0], [], LEAVES[0])


def test_verification_edge_cases() -> None:
    root = mth(0, 1)
    verify_inclusion(0, 1, LEAVES[0], [], root)
    with pytest.raises(ProofError, match="leaf 1 is not in a tree of 1 leaves"):
        verify_inclusion(1, 1, LEAVES[0], [], root)
    with pytest.raises(ProofError, match="leaf 0 is not in a tree of 0 leaves"):
        verify_inclusion(0, 0, EMPTY_ROOT, [], EMPTY_ROOT)
    with pytest.raises(ProofError, match="leaf is 0 bytes"):
        verify_inclusion(0, 1, b"", [], b"")
    with pytest.raises(ProofError, match="proof hash 0 is 5 bytes"):
        verify_inclusion(0, 2, LEAVES[0], [b"short"], mth(0, 2))
    with pytest.raises(ProofError, match="too long"):
        verify_inclusion(0, 1, LEAVES[0], [LEAVES[1]], root)
    with pytest.raises(ProofError, match="too short"):
        verify_inclusion(0, 2, LEAVES[0], [], mth(0, 2))

    # Equal sizes: an empty proof and equal roots.
    verify_consistency(5, 5, mth(0, 5), mth(0, 5), [])
    with pytest.raises(ProofError, match="different roots"):
        verify_consistency(5, 5, mth(0, 5), mth(0, 6), [])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(5, 5, mth(0, 5), mth(0, 5), [mth(0, 5)])
    # The empty tree, which RFC 9162 leaves out: every tree extends it, with an empty proof.
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 7, EMPTY_ROOT, mth(0, 7), [])
    with pytest.raises(ProofError, match="root of the empty tree"):
        verify_consistency(0, 7, mth(0, 1), mth(0, 7), [])
    with pytest.raises(ProofError, match="must be empty"):
        verify_consistency(0, 7, EMPTY_ROOT, mth(0, 7), [EMPTY_ROOT])
    with pytest.raises(ProofError, match="cannot extend"):
        verify_consistency(2, 1, mth(0, 2), mth(0, 1), [])
    with pytest.raises(ProofError, match="is empty"):
        verify_consistency(1, 2, mth(0, 1), mth(0, 2), [])
    with pytest.raises(ProofError, match="new_root is 3 bytes"):
        verify_consistency(1, 2, mth(0, 1), b"abc", [LEAVES[1]])
    assert consistency_proof(0, 9, NODES) == []
    assert consistency_nodes(9, 9) == []


def test_extend_is_append_for_each_leaf_joined() -> None:
    leaves = [leaf_hash(bytes([i % 256, i // 256])) for i in range(1000)]
    one, many = CompactRange(), CompactRange()
    rows = [one.append(leaf) for leaf in leaves[:333]]
    assert many.extend(leaves[:333]) == b"".join(rows)
    rows = [one.append(leaf) for leaf in leaves[333:]]
    assert many.extend(leaves[333:]) == b"".join(rows)
    assert (many.size, many.root(), many.hashes()) == (one.size, one.root(), one.hashes())
    with pytest.raises(ValueError, match="leaf 1001"):
        many.extend([leaves[0], b"short"])
    assert many.size == 1001  # the leaf before the bad one was added
