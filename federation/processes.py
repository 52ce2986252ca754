"""Flower's programs (`flower-superlink`, `flower-supernode`, `flwr`) run as child processes of
the `silofed` command, in an environment silofed controls.

Every child gets FLWR_HOME inside the deployment (Flower otherwise writes to `~/.flwr` and
rewrites a project's `pyproject.toml`), telemetry off, and the virtual environment's programs
first on PATH (a SuperLink starts `flwr-serverapp`, a SuperNode `flwr-clientapp`, by name). Each
runs in its own process group, so that stopping it stops everything it started, also when
silofed itself is interrupted.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from privacy.errors import ConfigurationError

STOP_SECONDS = 20.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """Linux: the child gets SIGTERM when the silofed process that started it dies, even by
    SIGKILL, so a Flower program never outlives its supervisor."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def flower_program(name: str) -> str:
    """The path of one of Flower's programs, from silofed's own environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    raise ConfigurationError(
        f"{name} is not installed beside {sys.executable}; install silofed with its Flower "
        "dependency (`pip install silofed`) in this environment"
    )


def flower_environment(flwr_home: Path) -> dict[str, str]:
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
    }


class Child:
    """A Flower program in its own process group, with its output in a log file."""

    def __init__(
        self, command: Sequence[str], *, env: dict[str, str], log: Path, cwd: Path | None = None
    ) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.command = list(command)
        with open(log, "ab") as handle:
            self.process = subprocess.Popen(
                self.command,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def output(self, start: int = 0) -> str:
        """The log from byte `start`, with terminal colours removed."""
        with open(self.log, "rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
        return strip_colours(text)

    def stop(self, timeout: float = STOP_SECONDS) -> int | None:
        """SIGTERM to the whole group, then SIGKILL if it has not ended within `timeout`; then
        the same for every process it started in a session of its own (the SuperLink starts its
        SuperExec so, and that one each run's ServerApp), which its group signal misses."""
        groups = {self.process.pid} | {_group(pid) for pid in descendants(self.process.pid)}
        groups.discard(None)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        return self.process.returncode


def descendants(pid: int) -> list[int]:
    """Every living descendant of `pid` (Linux: read from /proc; elsewhere none)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def strip_colours(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
