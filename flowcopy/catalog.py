"""The workflows an admin can name: the service's folder of definitions, by workflow name.

`flowcopy run NAME`, `plan NAME`, `pause NAME` and shell completion look names up here.
Names are read with a line scan (a definition's top-level `name:`), not a full YAML load,
so completion and a refused typo stay fast; the matched file is loaded properly by the
caller, which reports any problem in it with file, line and column.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path

ENV_FOLDER = "FLOWCOPY_WORKFLOWS"
DEFAULT_FOLDER = Path("workflows")
_NAME_LINE = re.compile(r"^name:\s*['\"]?([A-Za-z0-9][A-Za-z0-9\-_.]*)['\"]?\s*(#.*)?$", re.MULTILINE)


def default_folder() -> Path:
    """The service's folder: $FLOWCOPY_WORKFLOWS, else ./workflows (what `serve` reads)."""
    return Path(os.environ.get(ENV_FOLDER) or DEFAULT_FOLDER)


def names(folder: Path) -> dict[str, Path]:
    """Workflow name -> definition file, for the *.yaml/*.yml of `folder` (first file wins)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()):
        try:
            match = _NAME_LINE.search(path.read_text(errors="replace")[:65536])
        except OSError:
            continue
        if match:
            found.setdefault(match.group(1), path)
    return found


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownWorkflow(LookupError):
    """A name that is no workflow of the folder; the message lists what is there."""


def resolve(name_or_file: str, folder: Path | None = None) -> Path:
    """A definition file from a path, or from a workflow name of the service's folder."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_file or path.exists():
        return path
    folder = folder or default_folder()
    known = names(folder)
    if name_or_file in known:
        return known[name_or_file]
    listing = ", ".join(sorted(known)) or "none"
    raise UnknownWorkflow(
        f"no workflow named {name_or_file!r} in {folder}/{did_you_mean(name_or_file, known)} "
        f"(workflows there: {listing}; another folder: --workflows DIR or ${ENV_FOLDER})"
    )
