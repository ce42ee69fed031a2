"""The array's admin commands against a served process: the freeze per source volume,
per-LSS ELB timeouts (lslss / chlss), the hold records, lsflash's source-write-enabled and
ELB columns, resyncflash's flags replacing the old ones, reverseflash --fast; space-efficient
pools (lssestg), failed relationships in lsflash, rmflash --tgtreleasespace."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowcopy.cli import main
from tests.test_served_site import CRASH_LAB, serving

pytestmark = pytest.mark.process


def test_array_admin_commands(tmp_path: Path) -> None:
    lab = tmp_path / "crash.yaml"
    lab.write_text(CRASH_LAB)
    state = tmp_path / "state"
    runner = CliRunner()
    with serving(state, lab, tmp_path / "serve.log") as served:
        env = {"FLOWCOPY_SITE": served.url, "FLOWCOPY_SITE_TOKEN_FILE": str(state / "token"), "COLUMNS": "400"}

        def run(*args: str) -> Any:
            result = runner.invoke(main, ["site", *args], env=env, catch_exceptions=False)
            assert "Traceback" not in result.output
            return result

        lsses = json.loads(run("lslss", "--json").output)
        assert [(i["lss"], i["elb_timeout"]) for i in lsses] == [("13", 120.0), ("14", 120.0), ("15", 120.0)]
        result = run("chlss", "14", "--extlongbusy", "45")
        assert result.exit_code == 0 and "LSS 14: ELB timeout 45 s" in result.output
        result = run("chlss", "77", "--extlongbusy", "45")
        assert result.exit_code == 2 and "no volume in it" in result.output and result.output.count("\n") == 1
        assert run("mkflash", "10214698", "10314698", "--nocp", "--record", "--persist", "--freeze").exit_code == 0
        (frozen,) = json.loads(run("lsfrozen", "--json").output)
        assert (frozen["lss"], frozen["sources"], frozen["elb_timeout"]) == ("14", ["10214698"], 45.0)
        table = run("lsfrozen").output
        assert "10214698" in table and "45" in table
        (rel,) = json.loads(run("lsflash", "--json").output)
        assert rel["source_write_enabled"] is False and rel["elb_deadline"] == pytest.approx(frozen["deadline"])
        assert "SourceWriteEnabled" in run("lsflash").output
        released = json.loads(run("unfreeze", "14", "--json").output)
        assert released[0]["sources"] == ["10214698"]
        (hold,) = json.loads(run("lsholds", "--json").output)
        assert hold["serial"] == "10214698" and hold["released_at"] is not None and not hold["by_timeout"]
        result = run("reverseflash", "10214698", "10314698")
        assert result.exit_code == 2 and "forward copy is unfinished" in result.output
        (back,) = json.loads(run("reverseflash", "10214698", "10314698", "--fast", "--json").output)
        assert (back["source"], back["target"]) == ("10314698", "10214698")
        unusable = {v["serial"]: v["unusable"] for v in json.loads(run("lsvol", "--json").output)}
        assert "fast reverse restore" in unusable["10314698"] and unusable["10214698"] is None
        (kept,) = json.loads(run("resyncflash", "10314698", "10214698", "--record", "--persist", "--nocp", "--json").output)
        assert kept["recording"] and kept["persistent"] and kept["mode"] == "nocopy"
        (plain,) = json.loads(run("resyncflash", "10314698", "10214698", "--json").output)
        assert not plain["recording"] and not plain["persistent"]  # the flags given replace the old ones


SE_LAB = """
lab: se
arrays:
  - name: ess
    box: "698"
    lsses: ["13"]
    space_pools: {repo1: 128KiB}
    volumes:
      - {serial: "10013698", capacity: 1MiB, label: SRC}
      - {serial: "10113698", capacity: 1MiB, label: SE_TGT, space_pool: repo1}
hosts:
  - {name: esx1, kind: esx}
"""


def test_space_efficient_admin_commands(tmp_path: Path) -> None:
    lab = tmp_path / "se.yaml"
    lab.write_text(SE_LAB)
    state = tmp_path / "state"
    runner = CliRunner()
    with serving(state, lab, tmp_path / "serve.log") as served:
        env = {"FLOWCOPY_SITE": served.url, "FLOWCOPY_SITE_TOKEN_FILE": str(state / "token"), "COLUMNS": "400"}

        def run(*args: str) -> Any:
            result = runner.invoke(main, ["site", *args], env=env, catch_exceptions=False)
            assert "Traceback" not in result.output
            return result

        (pool,) = json.loads(run("lssestg", "--json").output)
        assert (pool["name"], pool["capacity"], pool["used"], pool["volumes"]) == ("repo1", 128 * 1024, 0, ["10113698"])
        assert "repo1" in run("lssestg").output and "SE pool" in run("lsvol").output
        result = run("mkflash", "10013698", "10113698")
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "space-efficient (pool repo1): no background copy" in result.output
        assert run("mkflash", "10013698", "10113698", "--nocp").exit_code == 0
        assert "TargetSE" in run("lsflash").output
        (rel,) = json.loads(run("lsflash", "--json").output)
        assert rel["space_efficient"] is True and rel["state"] == "copying"
        # three written tracks, a two-track pool: the relationship fails, the source flows on
        for track in range(3):
            _write(served.url, state / "token", "10013698", track * 65536, b"x")
        (rel,) = json.loads(run("lsflash", "--json").output)
        assert rel["state"] == "failed" and "space-efficient pool repo1 full" in rel["failed"]
        assert "failed (space-efficient pool full)" in run("lsflash").output
        result = run("rmflash", "10013698", "10113698", "--tgtreleasespace")
        assert result.exit_code == 0 and "target space released" in result.output
        (pool,) = json.loads(run("lssestg", "--json").output)
        assert pool["used"] == 0
        assert json.loads(run("lsflash", "--json").output) == []


def _write(url: str, token_file: Path, serial: str, offset: int, data: bytes) -> None:
    """A host write through the served site's HTTP API (the admin CLI has no write command)."""
    import trio

    from flowcopy.site.client import SiteClient

    async def main() -> None:
        async with SiteClient(url, token_file.read_text().strip()) as client:
            await client.write(serial, offset, data)

    trio.run(main)
