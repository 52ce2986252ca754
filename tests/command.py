"""The `silofed` command as a subprocess, the way a user runs it (telemetry off)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def silofed(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=cwd,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
