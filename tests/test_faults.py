"""Injected faults: parsing; every fault kind against the real clients and coordinator in
process (validation, quorum, the audit log and the report); SecAgg+ dropouts through the
Simulation Engine (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from federation.job import Job
from federation.wire import Phase
from privacy.errors import ConfigurationError, RunFailed
from privacy.home import UnitHome
from privacy.unit_config import UnitConfig
from simulations.faults import INFLATED_WEIGHT, KINDS, Fault, check_faults, tampered
from simulations.inprocess import run_in_process
from simulations.synthetic import synthesize
from tests.report_contract import assert_report_contract

UNITS = ["retail_stores", "ecommerce", "card_services"]


def test_a_fault_names_a_unit_by_name_or_index_and_a_round_from_one() -> None:
    assert Fault.parse("crash:ecommerce:2", UNITS) == Fault("crash", "ecommerce", 2)
    assert Fault.parse("crash:2:1", UNITS) == Fault("crash", "card_services", 1)
    for bad, phrase in (
        ("crash:ecommerce", "KIND:BU:ROUND"),
        ("melt:ecommerce:1", "unknown kind 'melt'"),
        ("crash:telecom:1", "no BU named 'telecom'"),
        ("crash:3:1", "index 3 out of range"),
        ("crash:ecommerce:0", "a number from 1"),
    ):
        with pytest.raises(ConfigurationError, match=phrase):
            Fault.parse(bad, UNITS)


def test_each_kind_is_parsed_and_tampering_is_refused_under_secure_aggregation() -> None:
    assert [Fault.parse(f"{kind}:0:1", UNITS).kind for kind in KINDS] == list(KINDS)
    secure = Job(secure_aggregation={"enabled": True}, rounds=2)
    check_faults([Fault("crash", "ecommerce", 2), Fault("timeout", "ecommerce", 1)], secure)
    with pytest.raises(ConfigurationError, match="nan:ecommerce:1: a tampered update is hidden"):
        check_faults([Fault("nan", "ecommerce", 1)], secure)
    with pytest.raises(ConfigurationError, match="crash:ecommerce:3: the job has 2 rounds"):
        check_faults([Fault("crash", "ecommerce", 3)], Job(rounds=2))


def test_tampering_changes_the_update_as_each_kind_says() -> None:
    sent = [np.array([[1.0, 2.0]], dtype=np.float32), np.array([0.5], dtype=np.float32)]
    update = [np.array([[2.0, 1.0]], dtype=np.float32), np.array([1.0], dtype=np.float32)]
    arrays, weight = tampered("scaled", sent, update, 7)
    np.testing.assert_array_equal(arrays[0], [[101.0, -98.0]])
    np.testing.assert_array_equal(arrays[1], [50.5])
    assert weight == 7 and arrays[0].dtype == np.float32
    arrays, _ = tampered("sign-flip", sent, update, 7)
    np.testing.assert_array_equal(arrays[0], [[0.0, 3.0]])
    assert tampered("inflated-weight", sent, update, 7)[1] == INFLATED_WEIGHT
    assert np.isnan(tampered("nan", sent, update, 7)[0][0][0, 0])
    assert tampered("shape", sent, update, 7)[0][0].shape == (3,)
    assert {a.dtype for a in tampered("dtype", sent, update, 7)[0]} == {np.dtype(np.float64)}
    np.testing.assert_array_equal(update[0], [[2.0, 1.0]])  # the BU's own arrays are untouched


@pytest.fixture(scope="module")
def four_units(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("fault-silos") / "silos"
    synthesize(out, units=4, customers=300, seed=5)
    return sorted(out.glob("*/bu.toml"))


JOB = {"rounds": 2, "epsilon": 3.0, "training": {"local_epochs": 1}}
REASONS = {
    "crash": "no reply: node 1: injected fault: crash:",
    "timeout": "no reply: node 1: no reply within 4 s",
    "nan": "array 0 holds 1 non-finite values",
    "shape": "array 0 has shape (",
    "dtype": "array 0 has dtype float64, the model's is float32",
    "inflated-weight": f"weight {INFLATED_WEIGHT} is outside 1..1000, the BU's declared size",
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_a_faulty_reply_is_left_out_and_the_round_ends_with_the_honest_mean(
    kind: str, four_units: list[Path], tmp_path: Path
) -> None:
    units = [UnitConfig.load(p).unit for p in four_units]
    faulty = units[1]
    replies: dict[str, tuple[list[np.ndarray], int]] = {}

    def seen(server_round, phase, unit, arrays, weight) -> None:
        if server_round == 2 and phase is Phase.TRAIN:
            replies[unit] = (arrays, weight)

    run = run_in_process(
        Job.parse(JOB, source="test"),
        four_units,
        tmp_path / "homes",
        out=tmp_path / "run",
        faults=[Fault(kind, faulty, 2)],
        round_timeout=4.0 if kind == "timeout" else None,
        on_reply=seen,
    )
    honest = {u: r for u, r in replies.items() if u != faulty}
    assert sorted(honest) == sorted(set(units) - {faulty})
    weights = np.array([w for _, w in honest.values()], dtype=float)
    for index, array in enumerate(run.parameters):
        mean = sum(w * a[index] for a, w in honest.values()) / weights.sum()
        np.testing.assert_allclose(array, mean, rtol=0, atol=1e-6)
    rejected = run.record.rejected
    # a node that is down (crash, timeout) misses the round's evaluation too; a tampered update
    # is the training reply only
    phases = ["train", "evaluate"] if kind in ("crash", "timeout") else ["train"]
    assert [(e["unit"], e["round"], e["phase"]) for e in rejected] == [
        (faulty, 2, phase) for phase in phases
    ]
    assert all(REASONS[kind] in e["reason"] for e in rejected)
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()
    ]
    assert [e["data"] for e in logged if e["event"] == "reply.rejected"] == rejected
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    assert report["federation"]["rejected"] == rejected
    assert report["federation"]["rounds_completed"] == 2


def test_below_the_quorum_the_run_stops_before_anyone_spends_on_the_next_round(
    four_units: list[Path], tmp_path: Path
) -> None:
    units = [UnitConfig.load(p).unit for p in four_units]
    job = Job.parse({**JOB, "aggregation": {"quorum": 0.75}}, source="test")
    with pytest.raises(RunFailed, match=r"round 1 \(train\): 2 valid replies of 4 BUs, below the "):
        run_in_process(
            job,
            four_units,
            tmp_path / "homes",
            out=tmp_path / "run",
            faults=[Fault("nan", units[0], 1), Fault("crash", units[3], 1)],
        )
    assert not (tmp_path / "run" / "report.json").exists()
    for config in four_units:
        unit = UnitConfig.load(config)
        with UnitHome(tmp_path / "homes" / unit.unit, unit).ledger() as ledger:
            assert max((e.round for e in ledger.entries()), default=0) <= 1  # round 2 never asked


def _simulate(
    tmp_path: Path, *faults: str, secure: bool = True, options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    args = [
        "simulate",
        "--units",
        "5",
        "--customers",
        "300",
        "--rounds",
        "1",
        "--seed",
        "4",
        *(["--secure-aggregation"] if secure else []),
        *options,
        "--out",
        "run",
    ]
    for fault in faults:
        args += ["--fault", fault]
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.slow
@pytest.mark.flower
def test_secure_aggregation_survives_dropouts_up_to_its_threshold(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "crash:ecommerce:1")  # 5 BUs, threshold 4: one may drop
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["federation"]["units"] == [
        "card_services",
        "insurance",
        "retail_stores",
        "telecom",
    ]


@pytest.mark.slow
@pytest.mark.flower
def test_more_dropouts_than_the_threshold_fail_the_run_loudly(tmp_path: Path) -> None:
    done = _simulate(tmp_path, "crash:0:1", "crash:ecommerce:1")
    assert done.returncode == 1
    assert "the train exchange did not complete" in " ".join(done.stderr.split())
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.flower
def test_through_flower_a_late_and_a_tampered_reply_are_rejected_and_reported(
    tmp_path: Path,
) -> None:
    done = _simulate(
        tmp_path,
        "nan:ecommerce:1",
        "timeout:0:1",
        secure=False,
        options=("--round-timeout", "20"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    rejected = {(e["unit"], e["phase"]): e["reason"] for e in report["federation"]["rejected"]}
    assert rejected[("ecommerce", "train")] == "array 0 holds 1 non-finite values"
    late = [reason for (unit, _), reason in rejected.items() if unit == "card_services"]
    assert late and all("no reply within 20 s" in reason for reason in late)
    assert report["federation"]["rounds_completed"] == 1
