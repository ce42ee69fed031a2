"""Whether the running trio loop is on trio's MockClock (tests, the site's simulated time).

`import trio.testing` imports pytest: 0.3–0.6 s of every process start (`flowcopy run`,
`serve`, the served site) for an answer that is "no" whenever nothing imported it. A
MockClock exists only once trio.testing was imported, so look there first.
"""

from __future__ import annotations

import sys

import trio


def on_mock_clock() -> bool:
    testing = sys.modules.get("trio.testing")
    return testing is not None and isinstance(trio.lowlevel.current_clock(), testing.MockClock)
