"""`silofed simulate` through the Flower Simulation Engine (Ray): the one end-to-end run of the
default suite (a Ray start costs about 18 s here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clients.features import compute_features
from clients.silo import load_silo
from federation.evaluation import exact_auc
from federation.models import predict_proba
from federation.saved import load_model
from privacy.unit_config import UnitConfig
from tests.command import silofed
from tests.report_contract import assert_report_contract

pytestmark = pytest.mark.flower


def test_simulate_three_units_two_rounds_writes_a_complete_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = silofed(
        "simulate",
        "--units",
        "3",
        "--rounds",
        "2",
        "--customers",
        "500",
        "--epsilon",
        "3",
        "--seed",
        "11",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "global AUC" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "audit.jsonl",
        "audit.jsonl.head",
        "audit.pub",
        "job.json",
        "metrics.jsonl",
        "model.pt",
        "report.html",
        "report.json",
        "results.json",
        "simulation",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging directory left behind

    report = json.loads((out / "report.json").read_text())
    assert_report_contract(report)
    verified = silofed("audit", "verify", str(out), cwd=tmp_path)
    assert verified.returncode == 0 and "intact and complete" in verified.stdout, verified.stderr
    assert report["federation"]["mode"] == "simulation"
    assert report["federation"]["seed"] == 11
    assert report["federation"]["units"] == ["card_services", "ecommerce", "retail_stores"]
    assert report["federation"]["rounds_completed"] == 2
    assert report["job"] == {
        **report["job"],
        "task": "churn",
        "purpose": "churn_model",
        "rounds": 2,
    }
    for unit in report["privacy"]["per_unit"]:
        assert 0.9 * 3 <= unit["epsilon"] <= 3.0
        assert unit["purpose"] == "churn_model" and unit["pseudonymised"] is True
        assert set(unit["excluded"]) == {"no_consent", "revoked", "minor", "erased", "quality"}
        assert unit["quality"]["invalid_customers"] == 0
        assert unit["excluded"]["no_consent"] > 0
        assert {"column": "customers.religion", "reason": "special_category"} in unit[
            "columns_dropped"
        ]
        assert not any("religion" in c or "health" in c for c in unit["columns_used"])
    metrics = report["model"]["metrics"]
    assert metrics["auc_ceiling"] is not None
    # DP evaluation (the default) on ~300 held-out customers: an honest, wide interval; the
    # model's quality itself is checked exactly below, inside one BU.
    assert report["model"]["evaluation"] == "dp"
    low, high = metrics["auc_interval"]
    assert 0.0 <= low <= high <= 1.0 and high - low > 0.05

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert json.loads(lines[-1])["auc"] == metrics["auc"]

    # The saved model scores with its saved feature spec, loaded with weights_only=True.
    model, spec = load_model(out / "model.pt")
    assert spec.output_names == tuple(report["model"]["features"])
    silo = load_silo(UnitConfig.load(out / "simulation" / "silos" / "ecommerce" / "bu.toml"))
    matrix = compute_features(silo.tables, spec)
    scores = predict_proba(model, matrix.features)
    assert scores.shape == (len(silo.tables["customers"]),)
    assert exact_auc(scores, matrix.labels) > 0.75
    assert torch.load(out / "model.pt", weights_only=True)["format"] == "silofed.model/1"


def test_encrypted_silos_give_the_same_results_as_plaintext(tmp_path: Path) -> None:
    """`--encrypt-at-rest`: the BUs read AES-GCM encrypted silos transparently; with the same
    seed, the run is the same as on plaintext silos (a second Ray start of the default suite)."""
    reports = {}
    for name, extra in (("plain", ()), ("encrypted", ("--encrypt-at-rest",))):
        out = tmp_path / name
        done = silofed(
            "simulate",
            "--units",
            "2",
            "--rounds",
            "2",
            "--customers",
            "300",
            "--seed",
            "5",
            "--out",
            str(out),
            *extra,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        reports[name] = json.loads((out / "report.json").read_text())
    silo_files = sorted(
        p.name for p in (tmp_path / "encrypted" / "simulation" / "silos" / "ecommerce").iterdir()
    )
    assert silo_files == [
        "bu.toml",
        "consent.parquet",
        "customers.parquet.enc",
        "transactions.parquet.enc",
    ]
    plain, encrypted = reports["plain"], reports["encrypted"]
    assert encrypted["model"]["metrics"] == plain["model"]["metrics"]  # same seed, same run
    for a, b in zip(plain["privacy"]["per_unit"], encrypted["privacy"]["per_unit"], strict=True):
        assert (a["encrypted_at_rest"], b["encrypted_at_rest"]) == (False, True)
        for key in (
            "epsilon",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "records_used",
            "excluded",
        ):
            assert a[key] == b[key]
