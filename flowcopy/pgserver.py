"""A throwaway local PostgreSQL server (initdb + pg_ctl) for tests and `flowcopy bench`.

Uses the distribution's binaries (/usr/lib/postgresql/*/bin, or on PATH) and a data
directory of its own on a free loopback port. PostgreSQL refuses to run as root, so as
root the server runs as the `postgres` user (`runuser -u postgres --`) with a data
directory that user owns. Missing binaries are a loud error, never a skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class PgUnavailable(RuntimeError):
    pass


def find_bin() -> Path:
    """The folder holding initdb, pg_ctl and postgres (newest version first)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if all((Path(folder) / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise PgUnavailable(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and PATH): "
        "install them (Debian/Ubuntu: apt-get install postgresql; .ci/system-deps does it)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """`with PgServer() as server: server.url("dbname")`; stopped and removed on exit."""

    def __init__(self, base: Path | None = None) -> None:
        self.bin = find_bin()
        self.root = Path(tempfile.mkdtemp(prefix="flowcopy-pg-", dir=base))
        self.data = self.root / "data"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else (os.environ.get("USER") or "postgres")
        self._started = False

    def _cmd(self, *argv: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)

    def start(self) -> PgServer:
        if self.as_root:
            if shutil.which("runuser") is None:
                raise PgUnavailable("running as root needs runuser to start PostgreSQL as the postgres user")
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run(self.bin / "initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync", "-E", "UTF8")
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            "-c max_connections=200 -c fsync=on -c synchronous_commit=on -c shared_buffers=64MB"
        )
        self._run(self.bin / "pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "-t", "60", "start")
        self._started = True
        return self

    def _run(self, *argv: object) -> None:
        result = subprocess.run(self._cmd(*map(str, argv)), capture_output=True, text=True)
        if result.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise PgUnavailable(f"{' '.join(map(str, argv[:2]))} failed: {result.stderr.strip()[-2000:]} {tail}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh database on this server (the distribution's createdb); its URL."""
        result = subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise PgUnavailable(f"createdb {name} failed: {result.stderr.strip()}")
        return self.url(name)

    def stop(self) -> None:
        if self._started:
            subprocess.run(self._cmd(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"),
                           capture_output=True)
            self._started = False
        for _ in range(3):
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.2)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
