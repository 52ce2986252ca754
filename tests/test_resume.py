"""Resume: the coordinator killed with SIGKILL after a round goes on from its checkpoint and ends
with the model and the BU ledgers of an uninterrupted run; BUs replay what they already released."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from clients.replies import REPLIES_DIR
from federation.job import Job
from federation.wire import Instruction, Phase
from privacy.errors import ConfigurationError
from privacy.home import UnitHome
from privacy.unit_config import UnitConfig
from server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from simulations.inprocess import run_in_process
from simulations.synthetic import synthesize

JOB = {"rounds": 5, "epsilon": 3.0, "training": {"local_epochs": 1}}
KILL_AFTER = 2
# The run, in a process of its own, as `silofed simulate` would drive it in process.
RUN = """
import sys
from pathlib import Path
from federation.job import Job
from simulations.inprocess import run_in_process
silos, homes, out = (Path(a) for a in sys.argv[1:4])
job = Job.parse({job}, source="test")
run_in_process(job, sorted(silos.glob("*/bu.toml")), homes, out=out, seed=0)
"""


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume-silos") / "silos"
    synthesize(out, units=3, customers=500, seed=9)
    return out


def _ledgers(homes: Path, configs: list[Path]) -> dict[str, list[tuple]]:
    found = {}
    for config in configs:
        unit = UnitConfig.load(config)
        with UnitHome(homes / unit.unit, unit).ledger() as ledger:
            found[unit.unit] = [
                (e.run_id, e.round, e.purpose, e.part, e.event) for e in ledger.entries()
            ]
    return found


def _kill_in_round(silos: Path, homes: Path, out: Path, server_round: int) -> int:
    """Start the run and SIGKILL it once a BU has answered the training exchange of
    `server_round`, so that the kill lands with the round half done; the last round the
    coordinator had checkpointed."""
    process = subprocess.Popen(
        [sys.executable, "-c", RUN.format(job=repr(JOB)), str(silos), str(homes), str(out)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    answered = f"{server_round:06d}-train.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if any(homes.glob(f"*/{REPLIES_DIR}/*/{answered}")):
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
                return json.loads((out / CHECKPOINT_FILE).read_text())["server_round"]
            if process.poll() is not None:
                pytest.fail(f"the run ended before it was killed: {process.stderr.read()[-2000:]}")
            time.sleep(0.005)
        pytest.fail("no BU answered within 300 s")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    raise AssertionError("unreachable")


def test_a_run_killed_after_a_round_resumes_to_the_same_model_and_ledgers(
    silos: Path, tmp_path: Path
) -> None:
    configs = sorted(silos.glob("*/bu.toml"))
    job = Job.parse(JOB, source="test")
    checkpointed = _kill_in_round(silos, tmp_path / "homes", tmp_path / "run", KILL_AFTER + 1)
    assert checkpointed == KILL_AFTER  # killed after round 2, with round 3 half answered
    assert not (tmp_path / "run" / "report.json").exists()

    # an audit log cut short since the checkpoint: refused before any BU is asked
    shutil.copytree(tmp_path / "run", tmp_path / "cut")
    log = tmp_path / "cut" / "audit.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ConfigurationError, match="the audit log holds 3 entries, fewer than"):
        run_in_process(job, configs, tmp_path / "homes", out=tmp_path / "cut", seed=0, resume=True)

    resumed = run_in_process(
        job, configs, tmp_path / "homes", out=tmp_path / "run", seed=0, resume=True
    )
    whole = run_in_process(job, configs, tmp_path / "homes2", out=tmp_path / "run2", seed=0)

    assert len(resumed.parameters) == len(whole.parameters)
    for a, b in zip(resumed.parameters, whole.parameters, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _ledgers(tmp_path / "homes", configs) == _ledgers(tmp_path / "homes2", configs)
    first = json.loads((tmp_path / "run" / "report.json").read_text())
    second = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert first["model"]["metrics"] == second["model"]["metrics"]
    assert first["privacy"]["per_unit"] == second["privacy"]["per_unit"]
    assert first["federation"]["rounds_completed"] == job.rounds
    events = [
        json.loads(line)["event"]
        for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()
    ]
    assert events.count("run.resumed") == 1 and events.count("job.accepted") == 1


def test_a_bu_replays_an_exchange_it_answered_and_spends_nothing_more(
    silos: Path, tmp_path: Path
) -> None:
    from clients.app import BusinessUnitClient, Node
    from clients.steward import prepare_simulated_home
    from federation.exchanges import resolve_job
    from federation.models import initial_parameters

    config_path = sorted(silos.glob("*/bu.toml"))[0]
    config = UnitConfig.load(config_path)
    home = prepare_simulated_home(config, tmp_path / "home")
    job = resolve_job(Job.parse({**JOB, "training": {"ranges_share": 0.0}}, source="t"), [config])
    client = BusinessUnitClient(Node(config_path, home.directory, True))
    instruction = Instruction(
        phase=Phase.TRAIN,
        server_round=1,
        run_id="r-replay",
        started_at=datetime(2026, 11, 1, tzinfo=UTC),
        job=job,
        seed=0,
        units=1,
    )
    sent = initial_parameters(job.task, job.feature_spec.dim)
    first = client.fit(sent, instruction.to_config())
    with home.ledger() as ledger:
        before = ledger.entries()
    again = client.fit(sent, instruction.to_config())
    with home.ledger() as ledger:
        assert ledger.entries() == before  # one event for the round, whatever is asked twice
    assert again[1:] == first[1:]
    for a, b in zip(again[0], first[0], strict=True):
        np.testing.assert_array_equal(a, b)
    events = [
        json.loads(line)["event"]
        for line in (home.directory / "audit.jsonl").read_text().splitlines()
    ]
    assert events.count("exchange.answered") == 1 and events.count("exchange.replayed") == 1


def test_resuming_without_a_checkpoint_names_the_file(silos: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"checkpoint\.json: no checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_text("{not json")
    with pytest.raises(ConfigurationError, match="the checkpoint cannot be read"):
        load_checkpoint(tmp_path)


def _silofed(tmp_path: Path, *args: str, wait: bool = True):
    command = [sys.executable, "-m", "federation.cli", "simulate", *args]
    env = {**os.environ, "COLUMNS": "200"}
    if wait:
        return subprocess.run(
            command, cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env
        )
    return subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,  # its own process group: Ray's workers die with it
    )


@pytest.mark.slow
@pytest.mark.flower
def test_silofed_simulate_resume_after_kill_9_ends_like_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    import torch

    options = ("--units", "3", "--customers", "300", "--rounds", "4", "--seed", "2")
    process = _silofed(tmp_path, *options, "--out", "run", wait=False)
    answered = f"*/simulation/homes/*/{REPLIES_DIR}/*/{3:06d}-train.json"
    deadline = time.monotonic() + 600
    while not any(tmp_path.glob(f".run.partial-{answered}")):
        assert process.poll() is None, "the run ended before it was killed"
        assert time.monotonic() < deadline, "round 3 never started"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (tmp_path / "run").exists()

    resumed = _silofed(tmp_path, "--resume", "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _silofed(tmp_path, *options, "--out", "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    first = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    second = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    for key in first["state_dict"]:
        assert torch.equal(first["state_dict"][key], second["state_dict"][key])
    homes = {run: tmp_path / run / "simulation" / "homes" for run in ("run", "whole")}
    configs = sorted((tmp_path / "run" / "simulation" / "silos").glob("*/bu.toml"))
    ours, theirs = _ledgers(homes["run"], configs), _ledgers(homes["whole"], configs)
    # the run ids differ (each run has its own); everything else is the same
    assert {u: [e[1:] for e in entries] for u, entries in ours.items()} == {
        u: [e[1:] for e in entries] for u, entries in theirs.items()
    }
    assert not list(tmp_path.glob(".run.partial-*"))


def test_stored_replies_are_deleted_once_untouched_for_the_retention(tmp_path: Path) -> None:
    from clients.replies import RETENTION_SECONDS, prune

    now = time.time()
    for name, age in (("old", RETENTION_SECONDS + 60), ("recent", RETENTION_SECONDS - 60)):
        run = tmp_path / REPLIES_DIR / name
        run.mkdir(parents=True)
        for stem in ("000001-train.npz", "000001-train.json"):
            (run / stem).write_bytes(b"x")
            os.utime(run / stem, (now - age, now - age))
    assert prune(tmp_path, now=now) == [tmp_path / REPLIES_DIR / "old"]
    assert sorted(p.name for p in (tmp_path / REPLIES_DIR).iterdir()) == ["recent"]
