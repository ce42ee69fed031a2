"""Fuzzed definitions: thousands of structural mutations of the files in workflows/ go
through `flowcopy validate`, which must answer each with exit 0 (valid) or 2 (every
problem as FILE:LINE:COL), never a traceback, a warning or another exit."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcopy.cli import main

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
SOURCES = sorted(WORKFLOWS.glob("*.yaml"))

TAGS = ("!!omap", "!!set", "!!pairs", "!!binary", "!!timestamp", "!!python/object:os.system", "!custom",
        "!<tag:example.com,2024:x>", "!", "!!int", "!!float", "!!bool", "!!null", "!!str", "!!map", "!!seq", "!!merge")
SCALARS = ("0 0 30 2 *", '"0 0 31 4,6,9,11 *"', "-1", "1e999", "~", "[]", "{}", "yes", "2024-02-30", "&a x", "*a",
           "*undefined", '"x"', "0x10", ".inf", "!!omap [a: 1]", "'", "{a: [", "<<: *a", "99999999999999999999",
           "0 0 29 2 *", "@daily", "é", "\t", "- -", "? x", "|", ">-")
LINE = re.compile(r"^.+:\d+:\d+: .+$")


def mutate(rng: random.Random, text: str) -> str:
    """One to four structural edits: delete, duplicate, swap lines, change a scalar,
    insert a tag, re-indent, insert random bytes, append flow/anchor syntax."""
    lines = text.splitlines()
    for _ in range(rng.randint(1, 4)):
        if not lines:
            lines = [""]
        i = rng.randrange(len(lines))
        op = rng.randrange(8)
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            key, sep, _ = lines[i].partition(":")
            lines[i] = key + ": " + rng.choice(SCALARS) if sep else rng.choice(SCALARS)
        elif op == 4:
            key, sep, value = lines[i].partition(": ")
            tag = rng.choice(TAGS)
            lines[i] = f"{key}{sep}{tag} {value}" if sep else f"{tag} {lines[i]}"
        elif op == 5:
            lines[i] = " " * rng.randint(0, 7) + lines[i].lstrip()
        elif op == 6:
            at = rng.randint(0, len(lines[i]))
            noise = "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0, 32), rng.randrange(128, 0x3000))))
                            for _ in range(rng.randint(1, 3)))
            lines[i] = lines[i][:at] + noise + lines[i][at:]
        else:
            lines[i] += rng.choice((" #", ":", " - x", " {", " [", " &x", " *x", " |", " >", " !!omap", ": !x"))
    return "\n".join(lines) + "\n"


def mutations(seed: int, count: int) -> Iterator[tuple[int, str]]:
    rng = random.Random(seed)
    texts = [p.read_text() for p in SOURCES]
    for n in range(count):
        yield n, mutate(rng, rng.choice(texts))


def check_answer(code: int | None, output: str, path: Path, text: str) -> None:
    context = f"mutation:\n{text}\noutput:\n{output}"
    assert code in (0, 2), context
    assert "Traceback" not in output and "Warning" not in output, context
    lines = [line for line in output.splitlines() if line.strip()]
    if code == 0:
        assert lines == [line for line in lines if line.startswith(f"ok: {path}")] and lines, context
    else:
        assert lines and all(line.startswith(f"{path}:") and LINE.match(line) for line in lines), context


def sweep(tmp_path: Path, seed: int, count: int) -> dict[int, int]:
    runner = CliRunner()
    codes = {0: 0, 2: 0}
    for n, text in mutations(seed, count):
        path = tmp_path / f"m{n % 50}.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        result = runner.invoke(main, ["validate", str(path)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"mutation {n} raised {result.exception!r}:\n{text}")
        check_answer(result.exit_code, result.output, path, text)
        codes[result.exit_code] += 1
    return codes


def test_sources_exist() -> None:
    assert len(SOURCES) >= 5


def test_two_thousand_mutations_of_the_workflows_exit_0_or_2(tmp_path: Path) -> None:
    codes = sweep(tmp_path, seed=9, count=2000)
    assert codes[2] > 1000 and codes[0] > 50  # both answers are reached: the mutations are not all fatal


@pytest.mark.process
def test_mutations_through_a_real_process(tmp_path: Path) -> None:
    for n, text in list(mutations(seed=93, count=6)):
        path = tmp_path / f"p{n}.yaml"
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "flowcopy", "validate", str(path)], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "default"})
        check_answer(proc.returncode, proc.stdout + proc.stderr, path, text)


@pytest.mark.slow
def test_long_sweep_of_mutations(tmp_path: Path) -> None:
    for seed in range(100, 110):
        sweep(tmp_path, seed=seed, count=3000)
