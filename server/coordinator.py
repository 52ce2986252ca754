"""The coordinator of a deployment: Flower's SuperLink with TLS and node authentication, the
enrolled BUs' node keys registered with it, and Flower's state kept under the deployment.

`silofed deploy coordinator DIR` starts `flower-superlink` with the deployment's certificate,
`--enable-supernode-auth` (only registered node keys may connect) and
`--disable-runtime-dependency-installation` (a run never installs packages), waits until it
answers, brings the registered node keys in line with `deployment.toml` (registers enrolled keys,
unregisters rotated ones), and stays up. Flower's own command line (`flwr`) is driven with a
connection written into FLWR_HOME inside the deployment; its JSON output is parsed, since `flwr`
exits 0 even when the SuperLink refused the request.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import tomli_w

from federation.deployment import Deployment, DeploymentDirectory, check_private, join_address
from federation.processes import Child, flower_environment, flower_program
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError, RunFailed

PROGRESS = "silofed:"  # the prefix of the ServerApp's progress lines `silofed run` shows
CONNECTION = "deployment"  # the name of the SuperLink connection in FLWR_HOME/config.toml
START_SECONDS = 60.0
FLWR_SECONDS = 60.0
_IN_USE = "Public key already in use"


def control_address(deployment: Deployment) -> str:
    """Where the coordinator's own tools reach the SuperLink: loopback when it listens on every
    interface or on loopback (the certificate always names 127.0.0.1), else the listen address."""
    host = deployment.listen
    if host in ("0.0.0.0", "::", "127.0.0.1", "localhost"):
        host = "127.0.0.1"
    return join_address(host, deployment.port)


def write_connection(directory: DeploymentDirectory, deployment: Deployment) -> None:
    """The `flwr` command's connection to this deployment's SuperLink, in FLWR_HOME."""
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {
                "address": control_address(deployment),
                "root-certificates": str(directory.ca_certificate),
            },
        }
    }
    write_atomic(directory.flwr_home / "config.toml", tomli_w.dumps(config))


def flwr(directory: DeploymentDirectory, *args: str, timeout: float = FLWR_SECONDS) -> dict:
    """Run `flwr ARGS CONNECTION --format json` and return its JSON answer."""
    try:
        done = subprocess.run(
            [flower_program("flwr"), *args, CONNECTION, "--format", "json"],
            env=flower_environment(directory.flwr_home),
            cwd=directory.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise RunFailed(
            f"`flwr {' '.join(args)}` got no answer from the coordinator within {timeout:g} s"
        ) from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RunFailed(
            f"`flwr {' '.join(args)}` failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-800:]}"
        ) from None
    return answer


def healthy(directory: DeploymentDirectory, deployment: Deployment, timeout: float = 2.0) -> bool:
    """Whether the SuperLink answers on its TLS port, with a certificate the deployment's CA
    signed."""
    context = ssl.create_default_context(cafile=str(directory.ca_certificate))
    url = f"https://{control_address(deployment)}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


@dataclass
class Registration:
    """Which Flower node id each enrolled BU's key has, kept beside the SuperLink's database."""

    path: Path

    def read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def write(self, nodes: dict[str, dict]) -> None:
        write_atomic(self.path, json.dumps(nodes, indent=2, sort_keys=True))


def registration(directory: DeploymentDirectory) -> Registration:
    return Registration(directory.state / "nodes.json")


def sync_registrations(directory: DeploymentDirectory, deployment: Deployment) -> dict[str, dict]:
    """Register every enrolled BU's current key; unregister keys that were rotated away or whose
    BU is no longer enrolled. Returns unit -> {node_id, fingerprint}."""
    store = registration(directory)
    known = store.read()
    for unit, entry in sorted(known.items()):
        enrolled = deployment.units.get(unit)
        if enrolled is None or enrolled.fingerprint != entry["fingerprint"]:
            answer = flwr(directory, "supernode", "unregister", str(entry["node_id"]))
            if not answer.get("success"):
                raise RunFailed(
                    f"could not unregister the old key of unit '{unit}' (node "
                    f"{entry['node_id']}): {answer.get('error-message', answer)}"
                )
            del known[unit]
            store.write(known)
    for unit, enrolled in sorted(deployment.units.items()):
        if unit in known:
            continue
        answer = flwr(directory, "supernode", "register", str(directory.public_key_file(unit)))
        if not answer.get("success"):
            message = str(answer.get("error-message", answer))
            raise RunFailed(
                f"could not register the node key of unit '{unit}' ({enrolled.fingerprint}): "
                + (
                    "the SuperLink already holds this key under a node id silofed has no record "
                    f"of ({registration(directory).path} was lost); rotate the unit's key with "
                    f"`silofed deploy rotate-key {directory.root} --unit {unit}`"
                    if _IN_USE in message
                    else message
                )
            )
        known[unit] = {"node_id": int(answer["node-id"]), "fingerprint": enrolled.fingerprint}
        store.write(known)
    return known


def node_units(directory: DeploymentDirectory) -> dict[int, str]:
    """Flower node id -> BU, from the registrations."""
    return {int(e["node_id"]): unit for unit, e in registration(directory).read().items()}


class Coordinator:
    """A running SuperLink for one deployment."""

    def __init__(self, directory: DeploymentDirectory) -> None:
        self.directory = directory
        self.deployment = directory.load()
        check_private(directory.server_key)
        write_connection(directory, self.deployment)
        directory.state.mkdir(parents=True, exist_ok=True)
        if healthy(directory, self.deployment):
            raise ConfigurationError(
                f"a coordinator already answers at {control_address(self.deployment)}; stop it "
                "first, or give this deployment another port"
            )
        command = [
            sys.executable,  # Flower's flower-superlink, behind silofed's network guard
            "-m",
            "server.superlink",
            "--ssl-ca-certfile",
            str(directory.ca_certificate),
            "--ssl-certfile",
            str(directory.server_certificate),
            "--ssl-keyfile",
            str(directory.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
            "--database",
            str(directory.state / "superlink.db"),
            "--host",
            self.deployment.listen,
            "--port",
            str(self.deployment.port),
        ]
        self.log_offset = _size(directory.state / "superlink.log")
        self.child = Child(
            command,
            env=flower_environment(directory.flwr_home),
            log=directory.state / "superlink.log",
            cwd=directory.root,
        )
        self.started_at = datetime.now(UTC)

    def wait_ready(self, timeout: float = START_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not healthy(self.directory, self.deployment):
            if not self.child.running():
                raise RunFailed(
                    "flower-superlink stopped while starting:\n"
                    + self.child.output(self.log_offset)[-2000:]
                )
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"flower-superlink did not answer at {control_address(self.deployment)} "
                    f"within {timeout:g} s; see {self.child.log}"
                )
            time.sleep(0.3)

    def start(self) -> dict[str, dict]:
        """Wait until the SuperLink answers, register the enrolled keys, record the status."""
        try:
            self.wait_ready()
            nodes = sync_registrations(self.directory, self.deployment)
        except BaseException:
            self.stop()
            raise
        write_atomic(
            self.directory.status_file,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "superlink_pid": self.child.pid,
                    "address": control_address(self.deployment),
                    "started_at": self.started_at.isoformat(),
                },
                indent=2,
            ),
        )
        return nodes

    def stop(self) -> int | None:
        code = self.child.stop()
        self.directory.status_file.unlink(missing_ok=True)
        return code


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def deployment_status(directory: DeploymentDirectory) -> dict:
    """Enrolled BUs with their node's state at the coordinator, and the last run."""
    deployment = directory.load()
    running = healthy(directory, deployment)
    states: dict[int, str] = {}
    if running:
        write_connection(directory, deployment)
        answer = flwr(directory, "supernode", "list")
        states = {int(n["node-id"]): str(n["status"]) for n in answer.get("nodes", [])}
    registered = registration(directory).read()
    units = []
    for unit, enrolment in sorted(deployment.units.items()):
        node = registered.get(unit, {}).get("node_id")
        units.append(
            {
                "unit": unit,
                "fingerprint": enrolment.fingerprint,
                "enrolled_at": enrolment.enrolled_at.isoformat(),
                "rotated_at": enrolment.rotated_at.isoformat() if enrolment.rotated_at else None,
                "node_id": node,
                "state": states.get(node, "unknown") if running else "coordinator down",
            }
        )
    return {
        "deployment": deployment.name,
        "address": deployment.coordinator_address,
        "coordinator": "running" if running else "stopped",
        "units": units,
        "last_run": last_run(directory),
    }


def last_run(directory: DeploymentDirectory) -> dict | None:
    """The outcome of the job submitted last (`silofed run` records each submission; run ids
    sort by start time)."""
    submissions = sorted((directory.state / "submitted").glob("*.toml"))
    if not submissions:
        return None
    submitted = tomllib.loads(submissions[-1].read_text(encoding="utf-8"))
    out = Path(submitted["out"])
    summary = {"run_id": submitted["run-id"], "directory": str(out)}
    if not (out / "report.json").exists():
        return {**summary, "status": "running, or ended without a record", "dropouts": []}
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    federation = report.get("federation", {})
    return {
        **summary,
        "status": report.get("status", "completed"),
        "started_at": report.get("started_at"),
        "units": federation.get("units", []),
        "rounds_completed": federation.get("rounds_completed"),
        "dropouts": federation.get("dropouts", []),
        "error": report.get("error"),
    }
