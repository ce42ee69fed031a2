"""The `flowcopy` command line. Thin: it parses, calls the library, and prints.

Errors the user can act on exit 2 with one line on stderr, never a traceback.
"""

from __future__ import annotations

import click

from flowcopy import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="flowcopy")
def main() -> None:
    """Application-consistent FlashCopy backups of VMware VMs on IBM ESS."""


# ---- commands are registered below, one section per area -------------------------
