"""`flwr run .` works as well as `silofed simulate` (slow: a SuperLink plus a Ray start).

The test starts the local SuperLink itself, on 127.0.0.1 with runtime dependency installation
disabled (Flower would otherwise install the app's dependencies into $FLWR_HOME at run time), lets
`flwr run` find it, and stops it at the end. FLWR_HOME is a temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from flwr.cli.constant import LOCAL_CONTROL_API_ADDRESS, LOCAL_SUPERLINK_HTTP_API_PORT

from simulations.synthetic import synthesize
from tests.report_contract import assert_report_contract

pytestmark = [pytest.mark.slow, pytest.mark.flower]
ROOT = Path(__file__).resolve().parents[1]


def _healthy() -> bool:
    try:
        return httpx.get(
            f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health", timeout=1
        ).is_success
    except httpx.HTTPError:
        return False


def test_flwr_run_on_the_simulation_engine_writes_the_run_directory(tmp_path: Path) -> None:
    assert not _healthy(), "a SuperLink is already listening on the local port; stop it first"
    silos = tmp_path / "silos"
    synthesize(silos, units=2, customers=300, seed=3)
    out = tmp_path / "run"
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    superlink = subprocess.Popen(
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            LOCAL_CONTROL_API_ADDRESS,
            "--host",
            "127.0.0.1",
            "--port",
            str(LOCAL_SUPERLINK_HTTP_API_PORT),
            "--disable-runtime-dependency-installation",
            "--database",
            str(tmp_path / "state.db"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _healthy():
            assert superlink.poll() is None, "flower-superlink exited"
            assert time.monotonic() < deadline, "flower-superlink did not become healthy in 60 s"
            time.sleep(0.5)
        done = subprocess.run(
            [
                "flwr",
                "run",
                ".",
                "--stream",
                "--run-config",
                f"data-dir='{silos}' out='{out}' rounds=2",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        assert_report_contract(report)
        assert report["federation"]["rounds_completed"] == 2
        assert report["federation"]["units"] == ["ecommerce", "retail_stores"]
        assert all(u["epsilon"] <= 3.0 for u in report["privacy"]["per_unit"])
        assert not (ROOT / "pyproject.toml").read_text().count("[tool.flwr.federations")
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)
        try:
            superlink.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait()
    assert not _healthy()
