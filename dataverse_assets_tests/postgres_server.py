"""A throwaway PostgreSQL server for the tests that need one: its own cluster in a temporary
folder (initdb), on a free loopback port, stopped and deleted afterwards. Uses the server
binaries of Debian's `postgresql` package (.ci/run installs it); where they are missing the
tests that need them are skipped, except in CI (CI=true), where that fails.

PostgreSQL refuses to run as root, so as root (CI's containers) the cluster runs as the
`postgres` user the package creates.

benchmarks/store_backends.py starts its cluster here too (`durable=True`: the server's own
defaults, fsync on), so there is one way to start a throwaway PostgreSQL; this module and
servers.py import nothing of pytest until a test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dataverse_assets_tests.servers import free_port, missing

SERVER_USER = "postgres"  # the system user to run as when we are root
ROLE = "dataverse"  # the cluster's superuser role (trust authentication on loopback only)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    log: Path
    data: Path  # the cluster's folder (postmaster.pid names the server's process)
    pg_ctl: tuple[str, ...] = ()  # pg_ctl with the cluster's folder, log and options

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (fast: its sessions are ended, their transactions rolled back), as
        an administrator or a crash would; `start` brings it back on the same port."""
        self._control("-m", mode, "stop")

    def start(self) -> None:
        self._control("start")

    def _control(self, *action: str) -> None:
        completed = subprocess.run([*self.pg_ctl, *action], capture_output=True, text=True,
                                   timeout=120)
        if completed.returncode != 0:
            raise RuntimeError(f"pg_ctl {action[-1]} failed: {completed.stderr.strip()}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        connection = connect(self.url())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)


def connect(url: str):
    """A connection through psycopg2, the driver dagster-postgres brings."""
    import psycopg2

    return psycopg2.connect(url)


def server_binaries() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else Debian's newest
    /usr/lib/postgresql/<version>/bin."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                      else 0)
    return versions[-1].parent if versions else None


def require_server_binaries() -> Path:
    """The binaries, or the test is skipped (failed in CI) with what to install."""
    found = server_binaries()
    if found is None:
        missing("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: "
                "apt-get install postgresql",
                "CI must run the PostgreSQL tests (.ci/run installs it)")
    return found


@contextmanager
def throwaway_postgres(*, binaries: Path | None = None, durable: bool = False,
                       settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """Start a cluster of our own; stop it and delete its files afterwards. The tests' cluster
    does not fsync (a test's data); `durable` keeps the server's defaults (fsync, full page
    writes), as a benchmark wants. `settings`: more server settings (`-c name=value`).
    `binaries`: initdb's folder (default: found, or the test skipped)."""
    binaries = binaries or require_server_binaries()
    as_root = os.geteuid() == 0
    folder = Path(tempfile.mkdtemp(prefix="dataverse-pg-"))
    data, log = folder / "data", folder / "server.log"
    run_as = ["runuser", "-u", SERVER_USER, "--"] if as_root else []
    if as_root:
        shutil.chown(folder, SERVER_USER)
    port = free_port()

    def run(*command: str) -> None:
        completed = subprocess.run([*run_as, *command], capture_output=True, text=True,
                                   timeout=120)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed: {completed.stderr.strip()}"
                               + (f"\n{log.read_text()[-2000:]}" if log.exists() else ""))

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", ROLE, "--auth=trust",
            "-E", "UTF8", "--no-instructions")
        # Loopback only, sockets in the cluster's own folder; no fsync (a test's data) unless
        # durable.
        options = {"listen_addresses": "127.0.0.1", "max_connections": "200"}
        if not durable:
            options |= {"fsync": "off", "full_page_writes": "off"}
        options |= dict(settings or {})
        pg_ctl = (str(binaries / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                  "-o", f"-p {port} -k {folder} "
                        + " ".join(f"-c {name}={value}" for name, value in options.items()))
        run(*pg_ctl, "start")
        yield PostgresServer("127.0.0.1", port, ROLE, log, data, (*run_as, *pg_ctl))
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*run_as, str(binaries / "pg_ctl"), "-D", str(data), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
