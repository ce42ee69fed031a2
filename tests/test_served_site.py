"""The served site: its HTTP contract (token, bodies, status codes), the client's
transport errors, fault steering over the API, the admin commands, and a real
`flowcopy site serve` process killed with SIGKILL mid-copy and mid-freeze.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from click.testing import CliRunner

from flowcopy.cli import main
from flowcopy.site import api
from flowcopy.site.api import CopyMode, FlashOptions, QuiesceLevel
from flowcopy.site.client import SiteClient, connect_site
from flowcopy.site.faults import FaultPlan, GuestOutage, LssOutage
from flowcopy.site.persist import open_site
from flowcopy.site.server import build_app, serve_app

TOKEN = "served-token"
E1, E2 = "20313698", "20413698"
SPARE_A, SPARE_B = "30016698", "30116698"


@asynccontextmanager
async def served_site(tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    async with open_site(tmp_path / "state", workloads=False) as site:
        app = build_app(site, token=TOKEN, faults=site.faults)
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: serve_app(app, port=0, task_status=task_status))
            yield url, site
            nursery.cancel_scope.cancel()


def raw(url: str, token: str | None = TOKEN, scheme: str = "Bearer") -> httpx.AsyncClient:
    headers = {"Authorization": f"{scheme} {token}"} if token is not None else {}
    return httpx.AsyncClient(base_url=url + "/api/v1", headers=headers)


# --------------------------------------------------------------------------- HTTP contract


async def test_wrong_or_missing_token_is_401_and_nothing_is_done(tmp_path: Path, autojump_clock: object) -> None:
    async with served_site(tmp_path) as (url, site):
        body = {"source": SPARE_A, "target": SPARE_B, "options": {"mode": "nocopy"}}
        for token, scheme in (("wrong", "Bearer"), (None, "Bearer"), (TOKEN, "Basic"), (TOKEN + "x", "Bearer")):
            async with raw(url, token, scheme) as http:
                response = await http.post("/flashcopies", json=body)
                assert response.status_code == 401
                assert response.json()["kind"] == "unauthorized"
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert (await http.get("/volumes")).status_code == 401
        assert await site.query() == [], "a rejected request changes nothing"
        async with SiteClient(url, "wrong") as client:
            with pytest.raises(api.Unauthorized, match="wrong bearer token"):
                await client.list_volumes()
        async with raw(url) as http:
            assert (await http.post("/flashcopies", json=body)).status_code == 200
        assert len(await site.query()) == 1


async def test_bad_bodies_are_400_with_a_message(tmp_path: Path, autojump_clock: object) -> None:
    async with served_site(tmp_path) as (url, site), raw(url) as http:
        cases: list[tuple[str, str, Any, str]] = [
            ("POST", "/flashcopies", b"{not json", "not JSON"),
            ("POST", "/flashcopies", {"source": 1, "target": SPARE_B}, "expected a string, got int 1 @ body.source"),
            ("POST", "/flashcopies", {"source": SPARE_A}, "required field missing @ body.target"),
            ("POST", "/flashcopies", {"source": SPARE_A, "target": SPARE_B, "optons": {}}, "extra fields found (optons)"),
            ("POST", "/flashcopies", {"source": SPARE_A, "target": SPARE_B, "options": {"mode": "fast"}}, "'fast' is not one of 'copy', 'nocopy'"),
            ("POST", "/flashcopies", [SPARE_A, SPARE_B], "expected a JSON object, got an array"),
            ("POST", f"/vms/{'rhel3-db1'}/quiesce", {"level": "filesystem", "timeout": "10"}, "expected a number, got str '10' @ body.timeout"),
            ("POST", "/consistency-groups/unfreeze", {"lsses": "13"}, "expected a list"),
            ("POST", f"/vms/{'rhel3-db1'}/thaw", {"force": True}, "extra fields found (force)"),
            ("GET", f"/volumes/{E1}/data", None, "query parameter 'offset' is required"),
            ("DELETE", "/flashcopies/abc", None, "SOURCE:TARGET"),
            ("POST", "/faults", {"error_rate": 2}, "error_rate must be between 0 and 1"),
        ]
        for method, path, body, message in cases:
            kwargs: dict[str, Any] = {}
            if isinstance(body, bytes):
                kwargs["content"] = body
            elif body is not None:
                kwargs["json"] = body
            response = await http.request(method, path, **kwargs)
            assert response.status_code == 400, (method, path, response.text)
            error = response.json()
            assert error["kind"] == "bad_request"
            assert message in error["message"], (message, error["message"])
        assert await site.query() == []
        assert not (await site.freeze_status("rhel3-db1")).frozen


async def test_unknown_objects_are_404_with_their_kind(tmp_path: Path, autojump_clock: object) -> None:
    async with served_site(tmp_path) as (url, site), raw(url) as http:
        for method, path, body, kind in [
            ("GET", "/volumes/99999999", None, "unknown_volume"),
            ("GET", "/volumes/99999999/data?offset=0&length=1", None, "unknown_volume"),
            ("PUT", "/volumes/99999999/data?offset=0", b"x", "unknown_volume"),
            ("GET", "/volumes/99999999/extents", None, "unknown_volume"),
            ("POST", "/flashcopies", {"source": E1, "target": "99999999"}, "unknown_volume"),
            ("POST", "/check", {"serials": ["99999999"]}, "unknown_volume"),
            ("GET", "/vms/ghost", None, "unknown_vm"),
            ("GET", "/hosts/ghost/disks", None, "unknown_host"),
            ("POST", "/tasks/ghost/execute", {}, "unknown_task"),
            ("DELETE", f"/flashcopies/{E1}:{E2}", None, "relationship_not_found"),
            ("GET", f"/flashcopies/{E1}:{E2}", None, "relationship_not_found"),
        ]:
            kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body} if body else {}
            response = await http.request(method, path, **kwargs)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["kind"] == kind
        response = await http.get("/nothing-here")
        assert response.status_code == 404 and "no such endpoint" in response.json()["message"]
        assert (await http.delete("/volumes")).status_code == 405
        # conflicts and transient refusals get their own statuses
        await site.establish(SPARE_A, SPARE_B, FlashOptions(mode=CopyMode.NOCOPY))
        response = await http.post("/flashcopies", json={"source": "30216698", "target": SPARE_B})
        assert response.status_code == 409 and response.json()["kind"] == "target_in_relationship"
        response = await http.post("/flashcopies", json={"source": SPARE_A, "target": "35016698"})
        assert response.status_code == 422 and response.json()["kind"] == "size_mismatch"


async def test_data_round_trips_as_octets(tmp_path: Path, autojump_clock: object) -> None:
    blob = os.urandom(200_000)
    async with served_site(tmp_path) as (url, site), raw(url) as http:
        response = await http.put(f"/volumes/{SPARE_A}/data", params={"offset": 4096}, content=blob)
        assert response.status_code == 200 and response.json() == {"written": len(blob)}
        response = await http.get(f"/volumes/{SPARE_A}/data", params={"offset": 4096, "length": len(blob)})
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.content == blob
        assert await site.read(SPARE_A, 4096, len(blob)) == blob


async def test_get_one_relationship_and_unfreeze_one_lss(tmp_path: Path, autojump_clock: object) -> None:
    async with served_site(tmp_path) as (url, site), raw(url) as http:
        await site.establish(E1, E2, FlashOptions(freeze=True, tag="x"))
        async with SiteClient(url, TOKEN) as client:
            rel = await client.get_relationship(E1, E2)
            assert rel.tag == "x" and rel.id == f"{E1}:{E2}"
        response = await http.post("/consistency-groups/13/unfreeze")
        assert response.status_code == 200 and [r["lss"] for r in response.json()] == ["13"]
        assert await site.frozen_lsses() == []


# --------------------------------------------------------------------------- client transport errors


async def test_refused_connection_is_site_unavailable(autojump_clock: object) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there any more
    async with SiteClient(f"http://127.0.0.1:{port}", TOKEN) as client:
        with pytest.raises(api.SiteUnavailable, match="cannot reach the site") as caught:
            await client.list_volumes()
        assert caught.value.transient


async def test_no_answer_is_site_unavailable_after_the_timeout(autojump_clock: object) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts, never answers

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, mute, listeners)
        async with SiteClient(f"http://127.0.0.1:{port}", TOKEN, timeout=5) as client:
            start = trio.current_time()
            with pytest.raises(api.SiteUnavailable, match="did not answer GET /time within 5 s"):
                await client.now()
            assert trio.current_time() - start == pytest.approx(5)
        nursery.cancel_scope.cancel()


async def test_connect_site_needs_url_and_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWCOPY_SITE", raising=False)
    monkeypatch.delenv("FLOWCOPY_SITE_TOKEN_FILE", raising=False)
    with pytest.raises(api.BadRequest, match="pass --site URL"):
        async with connect_site(None, None):
            pass
    with pytest.raises(api.BadRequest, match="needs its bearer token"):
        async with connect_site("http://127.0.0.1:1", None):
            pass
    with pytest.raises(api.BadRequest, match="cannot read the token file"):
        async with connect_site("http://127.0.0.1:1", tmp_path / "missing"):
            pass
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("FLOWCOPY_SITE", "http://127.0.0.1:1/")
    async with connect_site(None, tmp_path / "token") as client:
        assert client.url == "http://127.0.0.1:1"


# --------------------------------------------------------------------------- faults over the API


async def test_faults_are_steered_over_the_api(tmp_path: Path, autojump_clock: object) -> None:
    async with served_site(tmp_path) as (url, site), SiteClient(url, TOKEN) as client:
        now = await client.now()
        plan = FaultPlan(
            offline_lsses=(LssOutage(lss="16", start=0, end=60),),
            silent_guests=(GuestOutage(vm="rhel3-db1", start=0, end=60, hang=3),),
        )
        installed = await client.set_faults(plan)  # windows count from now
        assert installed.offline_lsses[0].start == pytest.approx(now)
        assert await client.get_faults() == installed
        with pytest.raises(api.VolumeOffline, match="LSS 16 is offline"):
            await client.establish(SPARE_A, SPARE_B, FlashOptions())
        assert not (await client.get_volume(SPARE_A)).online
        assert (await client.get_volume(E1)).online
        start = trio.current_time()
        with pytest.raises(api.GuestNotResponding, match="did not answer quiesce within 3 s"):
            await client.quiesce("rhel3-db1", QuiesceLevel.FILESYSTEM, 30)
        assert trio.current_time() - start == pytest.approx(3)
        assert not (await site.local.freeze_status("rhel3-db1")).frozen, "nothing reached the guest"
        await trio.sleep(60)  # the windows close
        await client.establish(SPARE_A, SPARE_B, FlashOptions(mode=CopyMode.NOCOPY))
        await client.set_faults(FaultPlan(seed=3, error_rates={"get_volume": 1.0}))
        with pytest.raises(api.InjectedFault) as caught:
            await client.get_volume(E1)
        assert caught.value.transient and caught.value.details["operation"] == "get_volume"
        await client.clear_faults()
        assert (await client.get_volume(E1)).serial == E1
        assert (await client.get_faults()) == FaultPlan(seed=3)


# --------------------------------------------------------------------------- a real process

CRASH_LAB = """
lab: crash
arrays:
  - name: ess
    box: "698"
    elb_timeout: 120
    copy_rate: 2MiB
    lsses: ["13", "14", "15"]
    volumes:
      - {serial: "10013698", capacity: 256MiB, label: SRC}
      - {serial: "10113698", capacity: 256MiB, label: TGT}
      - {serial: "10214698", capacity: 64MiB, label: CG_SRC}
      - {serial: "10314698", capacity: 64MiB, label: CG_TGT}
      - {serial: "11015698", capacity: 64MiB, label: FS}
hosts:
  - {name: esx1, kind: esx}
vms:
  - name: vm1
    host: esx1
    quiesce: [none, filesystem]
    freeze_limit: 3600
    disks:
      - {name: Disk1, rdm: "11015698", guest_path: /data}
workloads:
  - {name: fs1, kind: filesystem, vm: vm1, disk: Disk1, seed: 5, interval: 1.0, autostart: true}
"""

SPEED = 20.0  # the copy takes 128 site s = 6.4 s; the ELB 120 site s = 6 s


class ServedProcess:
    """`python -m flowcopy site serve` as a child process, with its announced URL."""

    def __init__(self, state: Path, lab: Path, log: Path, speed: float = SPEED) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flowcopy", "site", "serve", "--port", "0", "--state", str(state),
             "--lab", str(lab), "--speed", str(speed)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=state.parent,
        )
        self.url = self._wait_for_url(deadline=time.monotonic() + 60)

    def _wait_for_url(self, deadline: float) -> str:
        import selectors

        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buffered = b""
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buffered += chunk
                for line in buffered.decode(errors="replace").splitlines():
                    if line.startswith("flowcopy site listening on "):
                        return line.split()[4]
        self.proc.kill()
        raise AssertionError(f"the served site did not announce its address: {buffered!r}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@contextmanager
def serving(state: Path, lab: Path, log: Path) -> Iterator[ServedProcess]:
    served = ServedProcess(state, lab, log)
    try:
        yield served
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(timeout=30)


async def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    with trio.move_on_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.process
async def test_kill9_mid_copy_and_mid_freeze_then_restart_keeps_everything(tmp_path: Path) -> None:
    lab = tmp_path / "crash.yaml"
    lab.write_text(CRASH_LAB)
    state = tmp_path / "state"
    token_file = state / "token"
    track = api.TRACK_SIZE
    pattern = {t: bytes([t % 251 + 1]) * 1000 + f"track {t}".encode() for t in range(0, 4096, 97)}

    first = ServedProcess(state, lab, tmp_path / "serve.log")
    try:
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        async with SiteClient(first.url, token) as client:
            for t, data in pattern.items():
                await client.write("10013698", t * track, data)
            rel = await client.establish("10013698", "10113698", FlashOptions(tag="crash"))
            assert rel.out_of_sync_tracks == 4096
            await client.write("10013698", 0, b"after the point in time")  # copy-on-write
            ticket = await client.quiesce("vm1", QuiesceLevel.FILESYSTEM, 3000)
            await trio.sleep(1.0)
            (before,) = await client.query(tag="crash")
            assert 0 < before.out_of_sync_tracks < 4096, "killed mid background copy"
            # last, so the restart has most of the ELB window (6 s) to come back in
            await client.establish("10214698", "10314698", FlashOptions(mode=CopyMode.NOCOPY, freeze=True))
            (frozen,) = await client.frozen_lsses()
            assert await client.now() < frozen.deadline, "killed during the freeze"
    finally:
        first.kill9()
    assert first.proc.returncode == -signal.SIGKILL

    with serving(state, lab, tmp_path / "serve.log") as second:
        async with SiteClient(second.url, token) as client:
            (after,) = await client.query(tag="crash")
            assert after.out_of_sync_tracks <= before.out_of_sync_tracks, "the copy went on from where it was"
            assert (after.created, after.source, after.target, after.tag) == (rel.created, rel.source, rel.target, "crash")
            # the freeze: same LSS, same deadline, and the ELB ends it at that deadline
            assert await client.frozen_lsses() == [frozen]
            assert await client.now() < frozen.deadline
            await client.write("10214698", 0, b"held until the ELB deadline")
            assert await client.now() >= frozen.deadline
            assert await client.frozen_lsses() == []
            # the guest's freeze survived too
            status = await client.freeze_status("vm1")
            assert status.frozen and status.freeze_id == ticket.freeze_id and status.deadline == ticket.deadline
            assert (await client.thaw("vm1")).was_frozen
            # the copy completes and the target is the source's point-in-time image
            await wait_until(lambda: _copy_gone(client), 60, "the background copy to finish")
            for t, data in pattern.items():
                assert await client.read("10113698", t * track, len(data)) == data
            assert await client.read("10113698", 0, 23) == pattern[0][:23]
            assert await client.read("10013698", 0, 23) == b"after the point in time"
            # the guest workload carries on, its file system consistent
            assert (await client.check(["11015698"])).consistent
        assert second.stop() == 0, "SIGTERM is a clean stop"
    log = (tmp_path / "serve.log").read_text()
    assert "site state restored" in log and "site stopped" in log


async def _copy_gone(client: SiteClient) -> bool:
    return await client.query(tag="crash") == []


@pytest.mark.process
def test_admin_commands_against_a_served_process(tmp_path: Path) -> None:
    lab = tmp_path / "crash.yaml"
    lab.write_text(CRASH_LAB)
    state = tmp_path / "state"
    runner = CliRunner()
    with serving(state, lab, tmp_path / "serve.log") as served:
        env = {"FLOWCOPY_SITE": served.url, "FLOWCOPY_SITE_TOKEN_FILE": str(state / "token")}

        def run(*args: str) -> Any:
            return runner.invoke(main, ["site", *args], env=env, catch_exceptions=False)

        result = run("lsvol", "--json")
        assert result.exit_code == 0, result.output
        assert [v["serial"] for v in json.loads(result.output)] == ["10013698", "10113698", "10214698", "10314698", "11015698"]
        result = run("lsvol")
        assert "10013698" in result.output and "256 MiB" in result.output
        result = run("mkflash", "10214698", "10314698", "--nocp", "--seqnum", "hand", "--freeze", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)[0]["tag"] == "hand"
        result = run("lsflash", "--json", "--seqnum", "hand")
        rel = json.loads(result.output)[0]
        assert (rel["source"], rel["target"], rel["mode"], rel["out_of_sync_tracks"]) == ("10214698", "10314698", "nocopy", 1024)
        assert "10214698:10314698" in run("lsflash").output
        assert json.loads(run("lsfrozen", "--json").output)[0]["lss"] == "14"
        assert json.loads(run("unfreeze", "14", "--json").output)[0]["lss"] == "14"
        result = run("mkflash", "10214698", "99999999")
        assert result.exit_code == 2 and "unknown volume 99999999" in result.output
        assert "Traceback" not in result.output
        result = run("rmflash", "10214698", "10314698")
        assert result.exit_code == 0 and "withdrawn" in result.output
        result = run("rmflash", "10214698", "10314698")
        assert result.exit_code == 2 and result.output.count("\n") == 1
        disks = json.loads(run("list-disks", "--host", "esx1", "--json").output)
        assert {d["serial"] for d in disks} >= {"11015698"}
        primed = json.loads(run("prime", "--host", "esx1", "--json").output)
        assert any(d["primed_name"] == "vm1:/data" for d in primed)
        assert json.loads(run("lshost", "--json").output)[0]["name"] == "esx1"
        assert json.loads(run("lspool", "--json").output) == {}
        result = run("mktask", "t1", "--pair", "10014698:10114698", "--pair", "10013698:10113698", "--nocp")
        assert result.exit_code == 2 and "unknown volume 10014698" in result.output  # refused when saved
        result = run("exec-task", "t1", "--json")
        assert result.exit_code == 2 and "no saved task t1" in result.output
        run("mktask", "t2", "--pair", "10013698:10113698", "--nocp", "--persist")
        result = run("exec-task", "t2", "--seqnum", "task-run", "--json")
        assert result.exit_code == 0 and json.loads(result.output)[0]["tag"] == "task-run"
        assert {t["name"] for t in json.loads(run("lstask", "--json").output)} == {"t2"}
        result = run("lsvol", "--token-file", str(tmp_path / "crash.yaml"))
        assert result.exit_code == 2 and "does not hold a bearer token" in result.output
        (tmp_path / "wrong").write_text("not-the-token\n")
        result = run("lsvol", "--token-file", str(tmp_path / "wrong"))
        assert result.exit_code == 2 and result.output == "flowcopy site: wrong bearer token\n"
        assert served.stop() == 0


async def test_bench_reports_http_and_direct_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcopy.site.server import run_bench

    monkeypatch.delenv("FLOWCOPY_SITE", raising=False)
    results = await run_bench(None, None, calls=20, concurrency=2)
    names = [r["name"] for r in results]
    assert "http get_volume" in names and "direct establish+withdraw (2 calls)" in names
    assert all(r["per_second"] > 0 for r in results if r["calls"] and r["concurrency"])
