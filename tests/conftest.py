"""Shared fixtures.

pytest-trio's own `autojump_clock` fixture runs a test on `MockClock(autojump_threshold=0)`,
so hours of site time (background copies, ELB and freeze timeouts) take milliseconds.
"""

from __future__ import annotations

from hypothesis import settings

# No per-example deadline: on a loaded 2-core CI machine a deadline is a timing assertion,
# and timing belongs in `flowcopy bench`, not in tests.
settings.register_profile("flowcopy", deadline=None)
settings.load_profile("flowcopy")
