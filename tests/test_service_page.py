"""The status page in a real headless Chromium (Debian's chromium + chromedriver, driven
by selenium), against a real `flowcopy serve --http` process: what a person sees — a
workflow's next fire, a run's units per state changing while it runs, a failure's reason —
on a phone-sized screen, with a screenshot kept as a test artifact."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from flowcopy.cli import main
from flowcopy.definitions import load_definition
from flowcopy.scheduler import next_fire
from tests.service_process import MIXED, VMFS, Serve, wait_for, write_folder

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PHONE = (390, 844)  # CSS pixels of a common phone


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for program in (CHROMIUM, CHROMEDRIVER):
        assert os.access(program, os.X_OK), f"{program} is missing: run .ci/system-deps (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 f"--window-size={PHONE[0]},{PHONE[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def keep_artifact(path: Path) -> None:
    target = os.environ.get("FLOWCOPY_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(target) / path.name)


def text_of(driver: webdriver.Chrome, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    try:
        return found[0].text if found else ""
    except Exception:  # redrawn between find and read: the next poll reads it
        return ""


def read(driver: webdriver.Chrome, css: str) -> str:
    """The text of an element the page always shows: read again when a redraw (every
    250 ms) replaced it between the find and the read."""
    return str(wait_for(lambda: text_of(driver, css), 10, f"{css} to be shown"))


def cli(*args: str, store: Path) -> Result:
    """The `flowcopy` command in this process (a Python start less than a real one; the
    real processes of `trigger` and `pause` are tests/test_service.py's and test_cli_engine.py's)."""
    return CliRunner().invoke(main, [*args, "--store", str(store)], env={"FLOWCOPY_SITE": ""})


def utc_text(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@pytest.mark.process
def test_status_page_in_headless_chromium(tmp_path: Path, browser: webdriver.Chrome) -> None:
    folder = write_folder(tmp_path / "wf", MIXED, VMFS)
    store = tmp_path / "store"
    served = Serve(folder, store, tmp_path / "serve.log")
    schedule = load_definition(folder / "00.yaml").schedule
    try:
        url = served.wait_url()
        browser.set_window_size(*PHONE)  # --window-size alone is not always honoured below 500 px
        t0 = time.perf_counter()
        browser.get(url + "/#period=250")  # four updates a second: the run's first second is seen too
        wait_for(lambda: text_of(browser, "#service-state") == "ready", 30, "the page to show the service ready")
        shown = time.perf_counter() - t0
        timing = browser.execute_script("const t = performance.getEntriesByType('navigation')[0];"
                                        "return [t.domContentLoadedEventEnd, t.loadEventEnd];")

        # a workflow's next fire, as the schedule says (the test computes it on its own)
        next_text = wait_for(lambda: text_of(browser, '[data-workflow="mixed"] .next-fire'), 10, "the next fire")
        now = datetime.now(UTC)
        assert any(utc_text(next_fire(schedule, t)) in next_text for t in (now, now.replace(second=0, microsecond=0)))
        assert "CET" in next_text or "CEST" in next_text  # and in the workflow's own zone
        assert "0 3 * * * (Europe/Berlin, overlap skip)" in read(browser, '[data-workflow="mixed"]')
        assert "not scheduled" in read(browser, '[data-workflow="vmfs-system-disk"] .next-fire')

        # a run's units per state change while it runs
        assert cli("trigger", "mixed", store=store).exit_code == 0
        seen: list[str] = []

        running_shot = tmp_path / "status-page-running.png"

        def run_over() -> bool:
            units = text_of(browser, "#in-flight [data-run] .units")
            if units and (not seen or seen[-1] != units):
                seen.append(units)
                if "succeeded" in units and not running_shot.exists():
                    browser.save_screenshot(str(running_shot))
            return bool(seen) and not browser.find_elements(By.CSS_SELECTOR, "#in-flight [data-run]")

        wait_for(run_over, 60, "the run to show and end", interval=0.1)
        assert len(seen) >= 2, seen  # the chips changed while the run was in flight
        # at some moment a unit had succeeded while another was still at work
        assert any("succeeded" in s and any(not line.startswith("succeeded") for line in s.splitlines()) for s in seen), seen
        recent = wait_for(lambda: text_of(browser, "#recent li[data-run]"), 10, "the finished run")
        assert recent.startswith("succeeded · mixed") and "succeeded 3" in recent and "verified" in recent
        assert "succeeded" in read(browser, '[data-workflow="mixed"] .last-run')
        assert read(browser, "#run-counts") == "1 run(s) in the journal: succeeded 1"  # the journal's own count

        # a failure's reason
        assert cli("trigger", "vmfs-system-disk", store=store).exit_code == 0
        failure = wait_for(lambda: text_of(browser, '#failures li.failure[data-workflow="vmfs-system-disk"]'), 30, "the failure")
        assert "run could not start" in failure and "not_raw_mapped" in failure and "only raw device maps (RDM) can be copied" in failure

        # paused: the card says so, and that the next fire would not happen
        assert cli("pause", "mixed", store=store).exit_code == 0
        paused = wait_for(lambda: "paused" in text_of(browser, '[data-workflow="mixed"] h3')
                          and text_of(browser, '[data-workflow="mixed"] .next-fire'), 10, "the paused workflow")
        assert paused.startswith("paused (would be ")

        # readable on a phone: nothing wider than the screen, no horizontal scrolling
        width, scroll = browser.execute_script("return [window.innerWidth, document.documentElement.scrollWidth];")
        assert scroll <= width, (scroll, width)
        # no request left the machine: every resource the page loaded came from the service
        sources = browser.execute_script("return performance.getEntriesByType('resource').map(r => r.name);")
        assert sources and all(s.startswith(url) for s in sources), sources
        shot = tmp_path / "status-page.png"
        browser.set_window_size(PHONE[0], max(PHONE[1], browser.execute_script("return document.body.scrollHeight;")))
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        keep_artifact(shot)
        assert running_shot.exists()
        keep_artifact(running_shot)
        assert served.stop() == 0
    finally:
        served.kill()
    print(f"\nstatus page: DOMContentLoaded {timing[0]:.0f} ms, load {timing[1]:.0f} ms, first data shown {shown * 1000:.0f} ms "
          f"after navigation; units per state seen in flight: {seen}; screenshot {shot}")
