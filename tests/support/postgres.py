"""A throwaway PostgreSQL cluster for tests: initdb in a temporary directory, run as an unprivileged user.

PostgreSQL refuses to run as root, and CI runs as root: the cluster then runs as the Debian
`postgres` user (or `nobody`), in a directory made for it. It listens on 127.0.0.1 on an
ephemeral port (and a Unix socket inside its own directory), with scram-sha-256 password
authentication over TCP so that the bridge's `password_file` is really exercised. `stop()`
shuts it down and removes the directory.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.ports import free_port

SUPERUSER = "relay"


def postgres_bindir() -> Path | None:
    """Debian's versioned directory (/usr/lib/postgresql/N/bin), newest first; None when not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Who runs the cluster: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


@dataclass
class PostgresCluster:
    bindir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="relay-pg-")))
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    _user: pwd.struct_passwd | None = field(default_factory=_unprivileged_user)
    _databases: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgresql.log"

    @property
    def password_file(self) -> Path:
        """The superuser's password, readable by the test (root or the cluster's user)."""
        return self.root / "password"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.root)}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], env=env, capture_output=True, text=True, timeout=120, **kwargs
        )  # type: ignore[call-overload]
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def start(self) -> PostgresCluster:
        self.password_file.write_text(self.password + "\n")
        if self._user is not None:
            for path in (self.root, self.password_file):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        self.root.chmod(0o700)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(self.password_file),
            "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A new empty database; returns its URL (no password in it: use `password_file`)."""
        import psycopg

        self._databases += 1
        name = f"relay_test_{self._databases}_{secrets.token_hex(3)}"
        with psycopg.connect(self.url(), password=self.password, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # generated name
        return self.url(name)


def require_postgres(tests: str, also_missing: Sequence[str] = ()) -> Path:
    """The PostgreSQL server's bin directory; names what is missing (with `also_missing`): a failure in CI,
    a skip elsewhere."""
    bindir = postgres_bindir()
    missing = [] if bindir else ["PostgreSQL server (Debian: apt-get install -y postgresql)"]
    missing += [m for m in ("psycopg", "psycopg_pool") if importlib.util.find_spec(m) is None]
    missing += also_missing
    if missing:
        message = f"not installed: {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(f"CI requires {tests}; {message}", pytrace=False)
        pytest.skip(message)
    assert bindir is not None
    return bindir


@contextmanager
def running_cluster(bindir: Path) -> Iterator[PostgresCluster]:
    """A started throwaway cluster, stopped (and removed) afterwards."""
    cluster = PostgresCluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
