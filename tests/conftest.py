"""Shared fixtures.

pytest-trio's own `autojump_clock` fixture runs a test on `MockClock(autojump_threshold=0)`,
so hours of site time (background copies, ELB and freeze timeouts) take milliseconds.
"""

from __future__ import annotations
