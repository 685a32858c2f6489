"""A progress bar on a terminal (stderr); nothing when stderr is not one."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """`update(done)` redraws `label [#####.....] 50% 5,000/10,000`; `close()` ends the line."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.shown = self.stream.isatty()
        self._started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int) -> None:
        """Show `done` of the total (at most ten times a second)."""
        now = time.monotonic()
        if not self.shown or (now - self._drawn < 0.1 and done < self.total):
            return
        self._drawn = now
        share = min(done / self.total, 1.0)
        bar = "#" * int(share * 30)
        rate = done / max(now - self._started, 1e-9)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {share:4.0%} {done:,}/{self.total:,} ({rate:,.0f}/s)"
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
