"""The deployment engine end to end on 127.0.0.1: `silofed deploy coordinator` (Flower SuperLink with
TLS and node authentication), one `silofed deploy node` per BU, and `silofed run` submitting a job.

The default test starts one coordinator and two nodes for the whole module (about a minute with
the run) and checks the refusals against the same coordinator; the kill test, the larger run (3
BUs, 2 rounds under SecAgg+, one BU's silo in SQLite) and the key rotation are slow. Every process is stopped by the fixture that started it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from privacy.home import UnitHome
from privacy.unit_config import UnitConfig
from simulations.synthetic import synthesize
from tests.deployment import LocalDeployment, local_deployment
from tests.report_contract import assert_report_contract

pytestmark = pytest.mark.flower
RUN_FILES = {
    *("job.json", "metrics.jsonl", "model.pt", "report.html", "report.json", "results.json"),
    *("audit.jsonl", "audit.jsonl.head", "audit.pub"),
}


def _silos(root: Path, units: int, customers: int = 300) -> dict[str, Path]:
    synthesize(root, units=units, customers=customers, seed=3)
    return {p.parent.name: p for p in sorted(root.glob("*/bu.toml"))}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> LocalDeployment:
    root = tmp_path_factory.mktemp("deployment")
    with local_deployment(root, _silos(root / "silos", units=2)) as running:
        running.start_coordinator()
        for unit in running.silos:
            running.start_node(unit).wait_for("connected to")
        yield running


def _job(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_churn_job_runs_on_the_deployment_and_writes_the_simulation_contract(
    deployment: LocalDeployment,
) -> None:
    job = _job(deployment.root / "churn.toml", 'task = "churn"\nrounds = 1\nepsilon = 3.0\n')
    out = deployment.root / "run"
    done = deployment.silofed(
        "run", str(job), "--deployment", str(deployment.directory), "--out", str(out)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 1 done" in done.stdout  # progress streamed from the coordinator
    assert {p.name for p in out.iterdir()} == RUN_FILES
    report = json.loads((out / "report.json").read_text())
    assert_report_contract(report)
    assert report["status"] == "completed"
    assert report["federation"]["mode"] == "deployment"
    assert report["federation"]["seed"] is None
    assert report["federation"]["units"] == sorted(deployment.silos)
    assert report["federation"]["rounds_completed"] == 1
    assert all(0 < u["epsilon"] <= 3.0 for u in report["privacy"]["per_unit"])
    assert "OS entropy" in report["privacy"]["randomness"]
    verified = deployment.silofed("audit", "verify", str(out))
    assert verified.returncode == 0 and "intact and complete" in verified.stdout, verified.stderr

    status = deployment.silofed("deploy", "status", str(deployment.directory), "--json")
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["coordinator"] == "running"
    assert [(u["unit"], u["state"]) for u in state["units"]] == [
        (unit, "online") for unit in sorted(deployment.silos)
    ]
    assert state["last_run"]["run_id"] == report["run_id"]
    assert state["last_run"]["status"] == "completed"


def test_a_job_with_a_seed_is_refused_before_it_is_submitted(deployment: LocalDeployment) -> None:
    job = _job(deployment.root / "seeded.toml", 'task = "churn"\nrounds = 1\nseed = 7\n')
    done = deployment.silofed("run", str(job), "--deployment", str(deployment.directory))
    assert done.returncode == 2
    assert "never carries a seed" in done.stderr
    assert "Traceback" not in done.stderr


def _node(deployment: LocalDeployment, *args: str):
    """`silofed deploy node` for the first BU, run to its end."""
    unit = sorted(deployment.silos)[0]
    return deployment.silofed(*deployment.node_args(unit, *args), timeout=120)


def test_a_node_with_an_unregistered_key_is_refused(deployment: LocalDeployment) -> None:
    stranger = deployment.root / "stranger"
    assert deployment.silofed("deploy", "keygen", "--out", str(stranger)).returncode == 0
    bundle = deployment.directory / "nodes" / sorted(deployment.silos)[0]
    done = _node(
        deployment,
        "--coordinator",
        f"127.0.0.1:{deployment.port}",
        "--ca",
        str(bundle / "ca.pem"),
        "--key",
        str(stranger / "node.key"),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not admit this node's key" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_node_without_the_ca_fails_to_connect(deployment: LocalDeployment) -> None:
    bundle = deployment.directory / "nodes" / sorted(deployment.silos)[0]
    done = _node(
        deployment,
        "--coordinator",
        f"127.0.0.1:{deployment.port}",
        "--key",
        str(bundle / "node.key"),
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not signed by the system's CAs" in done.stderr
    assert "--ca" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_node_key_without_tls_refuses_to_start(deployment: LocalDeployment) -> None:
    bundle = deployment.directory / "nodes" / sorted(deployment.silos)[0]
    done = _node(deployment, "--node-dir", str(bundle), "--insecure")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "node authentication works only over TLS" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_killing_a_node_mid_run_fails_the_run_cleanly_and_names_the_bu(tmp_path: Path) -> None:
    import subprocess
    import sys

    silos = _silos(tmp_path / "silos", units=2)
    with local_deployment(tmp_path, silos, round_timeout=60) as running:
        running.start_coordinator()
        nodes = {unit: running.start_node(unit) for unit in running.silos}
        for node in nodes.values():
            node.wait_for("connected to")
        job = _job(tmp_path / "churn3.toml", 'task = "churn"\nrounds = 3\n')
        log = tmp_path / "run.log"
        with open(log, "w") as handle:
            submitted = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "federation.cli",
                    "run",
                    str(job),
                    "--deployment",
                    str(running.directory),
                    "--out",
                    str(tmp_path / "run"),
                ],
                cwd=tmp_path,
                env=running.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 300
            while "round 1 done" not in log.read_text():
                assert submitted.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
            killed = sorted(running.silos)[1]
            started = time.monotonic()
            nodes[killed].kill()
            code = submitted.wait(timeout=300)
            elapsed = time.monotonic() - started
        finally:
            if submitted.poll() is None:
                submitted.kill()
        output = log.read_text()
        assert code == 1, output
        assert f"{killed}: node" in output
        assert elapsed < 60 + 30  # within the round deadline, never hanging
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert report["status"] == "failed"
        assert report["federation"]["rounds_completed"] == 1
        assert {d["unit"] for d in report["federation"]["dropouts"]} == {killed}
        verified = running.silofed("audit", "verify", str(tmp_path / "run"))
        assert verified.returncode == 0, verified.stdout + verified.stderr  # a complete record


@pytest.mark.slow
def test_three_bus_two_secure_rounds_one_of_them_a_sqlite_silo(tmp_path: Path) -> None:
    from simulations.sql import to_sqlite

    silos = _silos(tmp_path / "silos", units=3)
    sql_unit = sorted(silos)[0]
    silos[sql_unit] = to_sqlite(silos[sql_unit].parent, tmp_path / "sql" / f"{sql_unit}.sqlite")
    with local_deployment(tmp_path, silos) as running:
        running.start_coordinator()
        for unit in running.silos:
            running.start_node(unit).wait_for("connected to")
        job = _job(
            tmp_path / "churn2.toml",
            'task = "churn"\nrounds = 2\nepsilon = 3.0\n[secure_aggregation]\nenabled = true\n',
        )
        out = tmp_path / "run"
        done = running.silofed(
            "run", str(job), "--deployment", str(running.directory), "--out", str(out)
        )
        assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    assert_report_contract(report)
    assert report["federation"]["units"] == sorted(silos)
    assert report["federation"]["rounds_completed"] == 2
    assert report["federation"]["secure_aggregation"] is True  # SecAgg+ over the deployment
    assert report["federation"]["dropouts"] == []
    per_unit = {u["unit"]: u for u in report["privacy"]["per_unit"]}
    assert per_unit[sql_unit]["records_used"] > 0
    assert all(0 < u["epsilon"] <= 3.0 for u in per_unit.values())


@pytest.mark.slow
def test_a_rotated_key_is_refused_and_registrations_survive_a_coordinator_restart(
    tmp_path: Path,
) -> None:
    import shutil

    silos = _silos(tmp_path / "silos", units=2)
    unit = sorted(silos)[0]
    with local_deployment(tmp_path, silos) as running:
        coordinator = running.start_coordinator()
        old_key = tmp_path / "old.key"
        shutil.copy(running.directory / "nodes" / unit / "node.key", old_key)
        old_key.chmod(0o600)
        rotated = running.silofed("deploy", "rotate-key", str(running.directory), "--unit", unit)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr
        assert "now admits only the new key" in rotated.stdout
        refused = _node(
            running,
            "--coordinator",
            f"127.0.0.1:{running.port}",
            "--ca",
            str(running.directory / "ca" / "ca.pem"),
            "--key",
            str(old_key),
        )
        assert refused.returncode == 2 and "does not admit this node's key" in refused.stderr
        # the coordinator restarts with the same registrations: the new key is admitted
        coordinator.stop()
        running.start_coordinator()
        node = running.start_node(unit)
        node.wait_for("connected to")
        status = json.loads(
            running.silofed("deploy", "status", str(running.directory), "--json").stdout
        )
        states = {u["unit"]: u["state"] for u in status["units"]}
        assert states[unit] == "online"
        assert states[sorted(silos)[1]] == "registered"  # enrolled, never started


@pytest.mark.slow
def test_a_run_resumes_after_the_coordinator_is_killed_and_restarted(tmp_path: Path) -> None:
    """kill -9 of the coordinator half-way through round 3; restarted, `silofed run --resume`
    finishes the run, and every BU's ledger holds each (round, part) of the run once: a BU that
    had answered round 3 replays that reply instead of spending again."""
    silos = _silos(tmp_path / "silos", units=3)
    job = _job(
        tmp_path / "churn.toml",
        'task = "churn"\nrounds = 4\nepsilon = 3.0\n[training]\nlocal_epochs = 1\n',
    )
    out = tmp_path / "run"
    with local_deployment(tmp_path, silos) as running:
        coordinator = running.start_coordinator()
        nodes = {unit: running.start_node(unit) for unit in sorted(silos)}
        for node in nodes.values():
            node.wait_for("connected to")
        submitted = running.start(
            "run", "run", str(job), "--deployment", str(running.directory), "--out", str(out)
        )
        answered = f"replies/*/{3:06d}-train.json"
        deadline = time.monotonic() + 600
        while not any(any(h.glob(answered)) for h in running.homes.values()):
            assert submitted.process.poll() is None, submitted.output()
            assert time.monotonic() < deadline, "round 3 never started"
            time.sleep(0.05)
        coordinator.kill()
        submitted.kill()
        assert not out.exists()

        running.start_coordinator()
        for unit, node in nodes.items():
            if node.process.poll() is not None:  # gave up waiting for the coordinator
                nodes[unit] = running.start_node(unit)
        for node in nodes.values():
            node.wait_for("connected to", timeout=120)
        # a node may finish the exchange it was computing after the coordinator died: what it
        # stored by now is what it replays
        replayed = {u for u, h in running.homes.items() if any(h.glob(answered))}
        assert replayed
        resumed = running.silofed(
            "run", "--deployment", str(running.directory), "--resume", str(out)
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and report["federation"]["rounds_completed"] == 4
    assert {p.name for p in out.iterdir()} == RUN_FILES
    for unit, bu_config in silos.items():
        config = UnitConfig.load(bu_config)
        with UnitHome(running.homes[unit], config).ledger() as ledger:
            entries = ledger.entries(run_id=report["run_id"])
        keys = [(e.round, e.part) for e in entries]
        assert len(keys) == len(set(keys)) and {r for r, _ in keys} >= {1, 2, 3, 4}
        events = [
            json.loads(line)["event"]
            for line in (running.homes[unit] / "audit.jsonl").read_text().splitlines()
        ]
        assert ("exchange.replayed" in events) == (unit in replayed)
