"""How many writes a guest application has sent through its I/O path, and a way to wait for it.

Lets a trial cut a copy at a chosen point of the application's write stream (and then a
random fraction of one write's latency later), independent of how long the application's
own programs (debugfs) take in real time.
"""

from __future__ import annotations

import trio


class WriteProgress:
    def __init__(self) -> None:
        self.written = 0
        self._event = trio.Event()

    def wrote(self) -> None:
        self.written += 1
        self._event.set()
        self._event = trio.Event()

    async def wait(self, n: int) -> None:
        """Return once at least `n` writes (since the application was built) have landed."""
        while self.written < n:
            await self._event.wait()
