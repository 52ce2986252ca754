"""A throw-away PostgreSQL server for tests of SQL silos (`postgres_server`, used by a fixture):
initdb into a temporary directory, a server on 127.0.0.1 at a free port with its socket in that
directory, one database, and an immediate stop afterwards, also when the test fails. The test is
skipped, with the reason, when the server's programs or psycopg are missing.

The server's files live in a directory of their own under the system's temporary directory (its
socket's path must stay short), removed afterwards. PostgreSQL refuses to run as root: run as root
(as in CI containers), the server runs as the `postgres` account, or else `nobody`, through
subprocess's `user=`/`group=`, and that directory is given to the account.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

USER = "silofed"  # the database superuser initdb creates; trust authentication on 127.0.0.1 only
DATABASE = "silo"
_SERVICE_ACCOUNTS = ("postgres", "nobody")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_as() -> dict[str, Any]:
    """subprocess arguments that drop root for an unprivileged account; none when not root."""
    if os.geteuid() != 0:
        return {}
    for name in _SERVICE_ACCOUNTS:
        with contextlib.suppress(KeyError):
            account = pwd.getpwnam(name)
            return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    pytest.skip(
        "PostgreSQL refuses to run as root, and there is no 'postgres' or 'nobody' account to "
        "run it as"
    )


def _programs() -> dict[str, str]:
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip('psycopg is not installed (pip install "psycopg[binary]>=3.1")')
    found = {name: shutil.which(name) for name in ("pg_ctl", "initdb")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"PostgreSQL's {', '.join(missing)} not on PATH")
    return {name: str(path) for name, path in found.items()}


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """The URL of an empty database on a new server (no password: trust authentication)."""
    programs = _programs()
    account = _run_as()
    # a short path of its own: the socket's path must fit in 107 bytes
    root = Path(tempfile.mkdtemp(prefix="silofed-pg-"))
    if account:
        os.chown(root, account["user"], account["group"])
    data, log = root / "data", root / "server.log"
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "TZ": "UTC"}
    run = {"env": env, "cwd": root, "capture_output": True, "text": True, "timeout": 60, **account}
    port = _free_port()
    try:
        made = subprocess.run(
            [
                programs["initdb"], "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                "--no-sync",
            ],
            **run,
        )  # fmt: skip
        if made.returncode != 0:
            pytest.fail(f"initdb failed: {made.stderr}")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
        try:
            started = subprocess.run(
                [programs["pg_ctl"], "-D", str(data), "-l", str(log), "-w", "-o", options, "start"],
                **run,
            )
            if started.returncode != 0:
                server_log = log.read_text() if log.exists() else ""
                pytest.fail(f"PostgreSQL did not start: {started.stderr}{server_log}")
            yield another_database(
                f"postgresql+psycopg://{USER}@127.0.0.1:{port}/postgres", DATABASE
            )
        finally:
            _stop(programs["pg_ctl"], data, run)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def another_database(url: str, name: str) -> str:
    """The URL of a new, empty database `name` on the server of `url` (one per BU: each BU's
    tables have the same names)."""
    import psycopg
    from sqlalchemy.engine import make_url

    server = make_url(url)
    with psycopg.connect(
        host=server.host, port=server.port, user=server.username, dbname="postgres", autocommit=True
    ) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.set(database=name).render_as_string(hide_password=False)


def _stop(pg_ctl: str, data: Path, run: dict[str, Any]) -> None:
    stopped = subprocess.run([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], **run)
    pid_file = data / "postmaster.pid"
    if stopped.returncode != 0 and pid_file.exists():  # the server we started, by its own pid
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
