"""A deployment on 127.0.0.1 for tests: `silofed deploy coordinator` and one `silofed deploy node`
per BU, started as the `silofed` command (each in its own process group) and stopped by the test
that started them, also when it fails.

The processes run with the network limited to loopback as far as a test can arrange it: package
indexes are off (`PIP_NO_INDEX`, `UV_OFFLINE`) and every HTTP(S) request not to 127.0.0.1 goes to a
proxy address where nothing listens, so a download attempt would fail the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clients.steward import consent_export, import_consent
from privacy.home import UnitHome
from privacy.unit_config import UnitConfig

CONNECT_SECONDS = 60.0
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_environment(silofed_home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SILOFED_HOME": str(silofed_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
        "HTTP_PROXY": DEAD_PROXY,
        "HTTPS_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY,
        "https_proxy": DEAD_PROXY,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def silofed_command(*args: str, cwd: Path, env: dict, timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Process:
    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def wait_for(self, text: str, timeout: float = CONNECT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}):\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no '{text}' within {timeout} s:\n{self.output()}"
                )
            time.sleep(0.3)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the `silofed` process and everything it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class LocalDeployment:
    root: Path  # the test's directory
    directory: Path  # the deployment directory
    env: dict[str, str]
    silos: dict[str, Path]  # unit -> bu.toml
    homes: dict[str, Path]
    port: int
    processes: list[Process] = field(default_factory=list)

    def silofed(self, *args: str, timeout: float = 600):
        return silofed_command(*args, cwd=self.root, env=self.env, timeout=timeout)

    def start(self, name: str, *args: str) -> Process:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "federation.cli", *args],
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started = Process(name, process, log)
        self.processes.append(started)
        return started

    def start_coordinator(self) -> Process:
        coordinator = self.start("coordinator", "deploy", "coordinator", str(self.directory))
        coordinator.wait_for("coordinator of")
        return coordinator

    def node_args(self, unit: str, *extra: str) -> list[str]:
        """`silofed deploy node` for `unit` on a free runtime port, with `extra` options."""
        return [
            "deploy",
            "node",
            "--bu-config",
            str(self.silos[unit]),
            "--home",
            str(self.homes[unit]),
            "--runtime-port",
            str(free_port()),
            "--connect-timeout",
            "20",
            *extra,
        ]

    def start_node(self, unit: str) -> Process:
        """The node of `unit`, from its node bundle."""
        bundle = str(self.directory / "nodes" / unit)
        return self.start(f"node-{unit}", *self.node_args(unit, "--node-dir", bundle))

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


@contextlib.contextmanager
def local_deployment(
    root: Path, silos: dict[str, Path], *, round_timeout: float = 120.0
) -> Iterator[LocalDeployment]:
    """A deployment directory for `silos` (unit -> bu.toml), each BU enrolled with a key pair in
    a node bundle and a home whose consent registry holds the silo's consent export; the
    processes started through it are stopped on exit."""
    env = offline_environment(root / "silofed-home")
    port = free_port()
    directory = root / "deployment"
    homes = {}
    for unit, bu_config in silos.items():
        config = UnitConfig.load(bu_config)
        home = UnitHome(root / "homes" / unit, config)
        export = consent_export(config.source.directory)
        assert export is not None, f"{bu_config}: the test silo has no consent export"
        import_consent(home, export)
        homes[unit] = home.directory
    deployment = LocalDeployment(root, directory, env, dict(silos), homes, port)
    done = deployment.silofed(
        "deploy",
        "init",
        str(directory),
        "--address",
        "127.0.0.1",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--connect-timeout",
        "60",
        "--round-timeout",
        str(round_timeout),
        *[arg for path in silos.values() for arg in ("--bu-config", str(path))],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        yield deployment
    finally:
        deployment.stop_all()
