"""A one-line progress display for the CLI's long phases; library calls pass none and stay quiet."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Call it with each phase's name: ``[2/6] solving (3.1 s)`` rewrites one line of ``stream``
    (only when it is a terminal); ``done()`` clears it."""

    def __init__(self, total: int | None = None, stream: TextIO = sys.stderr) -> None:
        self.total, self.stream, self.step = total, stream, 0
        self.t0 = time.perf_counter()
        self.live = stream.isatty()

    def __call__(self, phase: str) -> None:
        self.step += 1
        if not self.live:
            return
        count = f"[{self.step}/{self.total}] " if self.total else ""
        self.stream.write(f"\r\033[K{count}{phase} ({time.perf_counter() - self.t0:.1f} s)")
        self.stream.flush()

    def done(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()
