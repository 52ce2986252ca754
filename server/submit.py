"""`silofed run JOB.toml --deployment DIR`: submit a job to the running coordinator, stream its
progress, and wait for the run directory.

The job goes to Flower as a Flower App Bundle that carries no code: only a `pyproject.toml` naming
silofed's ServerApp and ClientApp and the run's configuration (the job as JSON, the deployment
directory, the run directory). Every BU node runs the silofed it has installed, never code sent
by the coordinator. The ServerApp, started by the SuperLink on the coordinator's machine, reads
the enrolled BUs' schemas and deadlines from the deployment directory and writes the same run
directory a simulation writes, with `federation.mode = "deployment"`.

Flower's `flwr run` exits 0 even when the ServerApp failed, so the outcome is read from the run
directory (`report.json`'s `status`), never from the exit code. The whole run has a deadline
derived from the deployment's own (connect, and per exchange); past it the run is stopped.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import tomli_w

from federation.deployment import DeploymentDirectory, check_deployable
from federation.exchanges import exchange_rounds, phases, resolve_job
from federation.job import Job
from federation.processes import flower_environment, flower_program, strip_colours
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError, RunFailed
from server.artefacts import check_target, new_run_id
from server.checkpoint import find_interrupted, load_checkpoint
from server.coordinator import (
    CONNECTION,
    PROGRESS,
    control_address,
    flwr,
    healthy,
    write_connection,
)

APP_NAME = "silofed-job"
MARGIN_SECONDS = 120.0  # app start-up on both sides and writing the run directory


def write_app(directory: DeploymentDirectory) -> Path:
    """The code-free app a job is submitted as."""
    app = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": APP_NAME,
            "version": version("silofed"),
            "description": "A silofed job; the code is the silofed installed on every machine",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "silofed",
                    "components": {
                        "serverapp": "server.app:app",
                        "clientapp": "clients.app:app",
                    },
                    "config": {
                        "job": "",
                        "deployment": "",
                        "out": "",
                        "run-id": "",
                        "resume": "",
                    },
                }
            }
        },
    }
    write_atomic(directory.app / "pyproject.toml", tomli_w.dumps(app))
    return directory.app


def run_deadline(job: Job, connect: float, per_exchange: float) -> float:
    exchanges = sum(len(phases(job, r)) for r in range(1, exchange_rounds(job) + 1))
    return connect + exchanges * per_exchange + MARGIN_SECONDS


def submit(
    directory: DeploymentDirectory,
    job: Job | None,
    *,
    out: Path | None = None,
    on_progress: Callable[[str], None] = lambda line: None,
    resume: Path | None = None,
) -> tuple[Path, dict]:
    """Run `job` on the deployment; return the run directory and its report. A failed run
    raises RunFailed naming the cause (and the BU that dropped out), after its run directory,
    when the coordinator wrote one, is in place. `resume`: instead of a new job, go on with the
    interrupted run that was to write that run directory, after its last checkpointed round
    (the coordinator may have been killed and restarted in between)."""
    partial = None
    if resume is not None:
        partial = find_interrupted(resume).resolve()
        checkpoint = load_checkpoint(partial)
        job, out = checkpoint.job, Path(resume)
    assert job is not None
    deployment = directory.load()
    if not deployment.units:
        raise ConfigurationError(
            f"{directory.config_file}: no BU is enrolled; enrol them with `silofed deploy enrol`"
        )
    # a job the BUs cannot run stops here, before anything is submitted
    resolved = resolve_job(check_deployable(job), directory.schemas(deployment))
    write_connection(directory, deployment)
    if not healthy(directory, deployment):
        raise ConfigurationError(
            f"no coordinator answers at {control_address(deployment)}; start it with "
            f"`silofed deploy coordinator {directory.root}`"
        )
    run_id = new_run_id() if partial is None else checkpoint.run_id
    out = (out or directory.runs / run_id).resolve()
    check_target(out, overwrite=False)
    if any(c in str(out) for c in "'\""):
        raise ConfigurationError(f"--out {out}: the path holds a quote; choose another")
    run_config = directory.state / "submitted" / f"{run_id}.toml"
    write_atomic(
        run_config,
        tomli_w.dumps(
            {
                "job": job.model_dump_json(exclude_none=True),
                "deployment": str(directory.root),
                "out": str(out),
                "run-id": run_id,
                "resume": "" if partial is None else str(partial),
            }
        ),
    )
    app = write_app(directory)
    deadline = run_deadline(resolved, deployment.timeouts.connect, deployment.timeouts.round)
    command = [
        flower_program("flwr"),
        "run",
        str(app),
        CONNECTION,
        "--stream",
        "--run-config",
        str(run_config),
    ]
    process = subprocess.Popen(
        command,
        env=flower_environment(directory.flwr_home),
        cwd=directory.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=_read, args=(process, lines, on_progress), daemon=True, name="flwr-run-stream"
    )
    reader.start()
    try:
        process.wait(timeout=deadline)
    except BaseException as interruption:  # the deadline passed, or the analyst pressed Ctrl-C
        flower_run_id = _flower_run_id(lines)
        if flower_run_id is not None:
            flwr(directory, "stop", flower_run_id)
        process.kill()
        process.wait()
        reader.join(timeout=5)
        if isinstance(interruption, subprocess.TimeoutExpired):
            raise RunFailed(
                f"run {run_id} did not finish within {deadline:g} s (the deployment's "
                "deadlines); it was stopped"
            ) from None
        raise
    reader.join(timeout=10)
    return out, _outcome(directory, run_id, out, lines)


def _read(process: subprocess.Popen, lines: list[str], on_progress) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        line = strip_colours(raw.rstrip("\n"))
        lines.append(line)
        if PROGRESS in line and not line[:2].isdigit():  # Flower prints each log line twice
            on_progress(line.split(PROGRESS, 1)[1].strip())


def _flower_run_id(lines: list[str]) -> str | None:
    for line in lines:
        if "Successfully started run" in line:
            return line.rsplit(" ", 1)[-1].strip()
    return None


def _outcome(directory: DeploymentDirectory, run_id: str, out: Path, lines: list[str]) -> dict:
    report_file = out / "report.json"
    if report_file.exists():
        report = json.loads(report_file.read_text(encoding="utf-8"))
        if report.get("status") == "failed":
            raise RunFailed(f"run {run_id} failed: {report.get('error')} (its record: {out})")
        return report
    failed = [
        line.split("failed:", 1)[1].strip() for line in lines if f"{PROGRESS} failed:" in line
    ]
    if failed:
        raise RunFailed(f"run {run_id} failed: {failed[-1]}")
    tail = "\n".join(line for line in lines[-15:] if line.strip())
    raise RunFailed(f"run {run_id} ended without a run directory; flwr run said:\n{tail}")
