"""A throwaway PostgreSQL cluster on a loopback port, for the demo, the tests and the benchmarks.

It uses the machine's PostgreSQL binaries (Debian's ``postgresql`` package) and ``initdb`` into a
temporary folder; as root, the server runs as the ``postgres`` system user, because PostgreSQL
refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


class PostgresUnavailable(RuntimeError):
    pass


def find_pg_bin() -> Path:
    """The newest installed PostgreSQL server binaries (override with SIDEGATE_PG_BIN)."""
    env = os.environ.get("SIDEGATE_PG_BIN")
    if env:
        return Path(env)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
                        if p.parent.name.isdigit() else 0)
    for c in reversed(candidates):
        if (c / "initdb").exists():
            return c
    which = shutil.which("initdb")
    if which:
        return Path(which).resolve().parent
    raise PostgresUnavailable("no PostgreSQL server binaries found: install Debian's postgresql package "
                              "(make deps) or set SIDEGATE_PG_BIN")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PGAddress:
    host: str
    port: int
    user: str
    password: str
    database: str

    def dsn(self, **override: str | int) -> str:
        parts = {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                 "dbname": self.database, **override}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


class LocalPostgres:
    """``with LocalPostgres() as pg:`` a fresh cluster with a SCRAM-authenticated superuser."""

    def __init__(
        self,
        *,
        user: str = "sidegate_admin",
        password: str = "gateway-held-secret",
        database: str = "app",
        port: int | None = None,
        settings: Sequence[str] = (),
        base_dir: Path | None = None,
    ) -> None:
        self.bin = find_pg_bin()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.user = user
        self.password = password
        self.database = database
        self.settings = tuple(settings)
        self._tmp = tempfile.TemporaryDirectory(prefix="sidegate-pg-", dir=base_dir)
        self.root = Path(self._tmp.name)
        self.data = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self._run_as: str | None = None
        if os.geteuid() == 0:
            self._run_as = "postgres"
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root needs the 'postgres' system user "
                                          "(Debian's postgresql package creates it)") from None

    @property
    def address(self) -> PGAddress:
        return PGAddress(self.host, self.port, self.user, self.password, self.database)

    def _cmd(self, argv: Sequence[str]) -> list[str]:
        if self._run_as:
            return ["runuser", "-u", self._run_as, "--", *argv]
        return list(argv)

    def _run(self, argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._cmd(argv), check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]

    def start(self) -> LocalPostgres:
        self.sockdir.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            pw = pwd.getpwnam(self._run_as)
            for p in (self.root, self.sockdir, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile),
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8",
                   "--no-sync"])
        pwfile.unlink()
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.sockdir}'",
            "fsync = off",
            "synchronous_commit = off",
            "full_page_writes = off",
            "max_connections = 200",
            "password_encryption = 'scram-sha-256'",
            *self.settings,
        ]
        with (self.data / "postgresql.conf").open("a") as f:
            f.write("\n".join(conf) + "\n")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                   "start"])
        self.sql(f"CREATE DATABASE {self.database}", database="postgres")
        return self

    def sql(self, statements: str, *, database: str | None = None) -> str:
        """Run SQL as the superuser over the Unix socket (trust), failing loudly on errors."""
        out = self._run([str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", str(self.sockdir),
                         "-p", str(self.port), "-U", self.user, "-d", database or self.database],
                        input=statements)
        return str(out.stdout)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"])
        self._tmp.cleanup()

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


SAMPLE_SCHEMA = """
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    card text,
    salary numeric(10, 2),
    note text
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer_id int REFERENCES customers(id),
    ref text,
    amount numeric(10, 2)
);
CREATE VIEW v_customers AS SELECT id, name, email FROM customers;
CREATE TABLE tmp_import (id int);
INSERT INTO customers (name, email, card, salary, note)
SELECT 'Customer ' || i,
       'customer' || i || '@example.com',
       (ARRAY['4111 1111 1111 1111', '5500-0000-0000-0004', '3400 0000 0000 009'])[1 + i % 3],
       40000 + i * 10,
       CASE WHEN i % 10 = 0 THEN 'call back at ops' || i || '@example.org' ELSE 'ok' END
FROM generate_series(1, 100) AS i;
INSERT INTO orders (customer_id, ref, amount)
SELECT 1 + i % 100, 'ACME-' || lpad(i::text, 8, '0'), i * 1.5 FROM generate_series(1, 300) AS i;
"""


@contextlib.contextmanager
def sample_database(**kwargs: object) -> Iterator[LocalPostgres]:
    """A cluster with customers (emails, card numbers), orders and a view: the demo's data."""
    with LocalPostgres(**kwargs) as pg:  # type: ignore[arg-type]
        pg.sql(SAMPLE_SCHEMA)
        yield pg


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``: helpers never outlive us."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
