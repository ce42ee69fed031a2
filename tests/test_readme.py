"""The README tells the truth: its workflow sample loads, and CI runs its test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

from flowcopy import definitions

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_workflow_sample_is_a_valid_definition() -> None:
    (sample,) = re.findall(r"```yaml\n(.*?)```", README, re.S)
    workflow = definitions.load_text(sample, "README.md")
    assert workflow.name == "w2k-e-drive" and workflow.units[0].vm == "rich-w2k-os-1"


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert len(commands) == 2  # exactly two: the demo and the tests
    demo, tests = commands
    assert demo.endswith("flowcopy demo") and tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
