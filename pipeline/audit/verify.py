"""Checking the audit trail: every event against its leaf, the log against its checkpoints.

`check` walks the stored events and the log's rows side by side, in order, and reports
what does not hold, naming what and where:

- an event whose canonical bytes no longer hash to its leaf (changed after it was logged);
- a logged position with no event (deleted), an event between logged ones with no leaf
  (inserted), events in another order (each moved one differs from its leaf);
- a log row whose stored subtree hashes are not those of the leaves before it, or a row
  missing;
- a checkpoint whose signatures do not verify with the given public keys, that lacks one
  of the log's keys, names another log, covers more leaves than the log holds
  (truncated), or whose root is not the root of the log's first `size` leaves (the log
  rewritten, even with every hash recomputed: that takes the signing keys).

The same walk runs over the live database (`pipeline audit verify`) and over an export
(`pipeline audit verify --from DIR`), which holds the events' canonical bytes, the log's
rows and the checkpoints: nothing else is trusted but the public keys.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from . import merkle
from .note import Checkpoint, NoteError, Verifier, open_note

__all__ = ["MAX_LISTED", "Report", "check", "event_label"]

MAX_LISTED = 20
"""Problems listed in full; the rest are counted."""

_EVENT_HEAD = struct.Struct(">16sQH")


def event_label(position: int, data: bytes) -> str:
    """An event named for an auditor: its position, id and topic (from its leaf data)."""
    if len(data) >= _EVENT_HEAD.size:
        ident, version, length = _EVENT_HEAD.unpack_from(data)
        topic = data[_EVENT_HEAD.size : _EVENT_HEAD.size + length].decode(errors="replace")
        return f"event {uuid.UUID(bytes=ident)} v{version} at position {position} ({topic})"
    return f"the event at position {position}"


@dataclass
class Report:
    """What a check found."""

    events: int = 0
    leaves: int = 0
    checkpoints: int = 0
    latest: int = 0
    """Size of the latest checkpoint that verified."""
    unlogged: int = 0
    """Events stored after the log's last leaf (not logged yet: not a problem)."""

    @property
    def unsigned(self) -> int:
        """Leaves after the latest checkpoint: logged, not yet covered by a signature."""
        return self.leaves - self.latest

    problems: list[str] = field(default_factory=list)
    more: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(text)
        else:
            self.more += 1

    def summary(self) -> str:
        if self.ok:
            return (
                f"verified: {self.events} events, {self.leaves} leaves, {self.checkpoints} "
                f"checkpoints (latest of {self.latest} leaves); {self.unsigned} leaves after "
                f"it, {self.unlogged} events not logged yet"
            )
        lines = [f"NOT verified: {len(self.problems) + self.more} problem(s)"]
        lines += [f"- {p}" for p in self.problems]
        if self.more:
            lines.append(f"- ... and {self.more} more")
        return "\n".join(lines)


def check(
    events: Iterable[tuple[int, bytes]],
    rows: Iterable[tuple[int, int, bytes]],
    checkpoints: Sequence[tuple[int, bytes]],
    keys: Sequence[Verifier],
    *,
    origin: str | None = None,
) -> Report:
    """Check `events` ((position, leaf data), in position order) against the log's `rows`
    ((index, position, hashes), in index order) and the log against `checkpoints`
    ((size, signed note)) signed by every one of `keys`."""
    report = Report()
    roots = _checkpoints(checkpoints, keys, origin, report)
    edge = merkle.CompactRange()
    stream = _Events(events)
    previous = 0
    for idx, position, hashes in rows:
        if idx != edge.size:
            report.problem(
                f"log row {edge.size} is missing (the next row is {idx}): the log was cut"
            )
            break
        leaf = hashes[: merkle.HASH_SIZE]
        if position <= previous:
            report.problem(
                f"log row {idx} logs position {position}, not after the row before it "
                f"({previous}): the log was reordered"
            )
        previous = position
        while stream.head is not None and stream.head[0] < position:
            report.problem(
                f"{event_label(*stream.head)} is in no leaf, yet leaf {idx} logs position "
                f"{position} after it: inserted after it was logged"
            )
            stream.next()
        if stream.head is None or stream.head[0] != position:
            report.problem(
                f"leaf {idx} logs the event at position {position}, which is not in the store: "
                "deleted after it was logged"
            )
        else:
            if merkle.leaf_hash(stream.head[1]) != leaf:
                report.problem(
                    f"{event_label(*stream.head)} does not hash to leaf {idx}: changed after "
                    "it was logged"
                )
            stream.next()
        expected = edge.append(leaf)
        if expected != hashes:
            report.problem(
                f"log row {idx} (position {position}): its subtree hashes are not those of "
                "the leaves before it: the log was altered"
            )
        report.leaves += 1
        for root in roots.pop(edge.size, ()):
            _root(edge.size, root, edge.root(), report)
    last = position if report.leaves else 0
    for position, data in stream.rest():
        if position <= last:
            report.problem(
                f"{event_label(position, data)} is in no leaf, yet the log goes on to position "
                f"{last}: inserted after it was logged"
            )
        else:
            report.unlogged += 1
    report.events = stream.count
    if report.leaves and not report.latest and report.ok:
        report.problem(
            f"no signed checkpoint covers the log's {report.leaves} leaves: nothing is proven "
            "yet (is `pipeline run audit` signing? see `pipeline audit status`)"
        )
    for size in sorted(roots):
        report.problem(
            f"checkpoint of {size} leaves: the log holds only {edge.size}: the log was truncated "
            "(or rows deleted)"
        )
    return report


def _root(size: int, signed: bytes, computed: bytes, report: Report) -> None:
    if signed == computed:
        report.latest = max(report.latest, size)
    else:
        report.problem(
            f"checkpoint of {size} leaves: its signed root is not the root of the log's first "
            f"{size} leaves: the log or the events were rewritten after it was signed"
        )


def _checkpoints(
    checkpoints: Sequence[tuple[int, bytes]],
    keys: Sequence[Verifier],
    origin: str | None,
    report: Report,
) -> dict[int, list[bytes]]:
    """The roots of the checkpoints whose note verifies, by size (the rest reported)."""
    roots: dict[int, list[bytes]] = {}
    names = sorted({key.name for key in keys})
    for size, note in checkpoints:
        report.checkpoints += 1
        try:
            text, _ = open_note(note, keys, require=names)
            checkpoint = Checkpoint.parse(text)
        except NoteError as exc:
            report.problem(f"checkpoint of {size} leaves: {exc}")
            continue
        if origin is not None and checkpoint.origin != origin:
            report.problem(
                f"checkpoint of {size} leaves is of another log ({checkpoint.origin!r}, "
                f"not {origin!r})"
            )
            continue
        if checkpoint.size != size:
            report.problem(
                f"checkpoint stored as of {size} leaves says {checkpoint.size}: replaced"
            )
            continue
        roots.setdefault(size, []).append(checkpoint.root)
    return roots


class _Events:
    """The events in order, one looked at (`head`) at a time, counted."""

    def __init__(self, events: Iterable[tuple[int, bytes]]) -> None:
        self._it: Iterator[tuple[int, bytes]] = iter(events)
        self.count = 0
        self.head: tuple[int, bytes] | None = None
        self.next()

    def next(self) -> None:
        self.head = next(self._it, None)
        if self.head is not None:
            self.count += 1

    def rest(self) -> Iterator[tuple[int, bytes]]:
        while self.head is not None:
            yield self.head
            self.next()
