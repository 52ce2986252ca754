"""The `silofed` command's contract: help, exit codes, clear errors, nothing half written.

None of these start the Simulation Engine: every error here is caught before it would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from simulations.synthetic import synthesize


def silofed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "federation.cli", *args],
        cwd=cwd,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_documents_the_exit_codes(tmp_path: Path) -> None:
    done = silofed("simulate", "--help", cwd=tmp_path)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for phrase in ("0 done", "1 run failed", "2 bad usage or configuration", "3 refused by a BU"):
        assert phrase in text
    for option in ("--units", "--rounds", "--epsilon", "--delta", "--seed", "--data", "--out"):
        assert option in text


def test_data_synth_writes_silos_and_reports_the_ceiling(tmp_path: Path) -> None:
    done = silofed(
        "data",
        "synth",
        "--units",
        "2",
        "--customers",
        "100",
        "--out",
        "silos",
        "--csv",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "AUC ceiling" in done.stdout
    silos = tmp_path / "silos"
    assert sorted(p.name for p in silos.iterdir()) == [
        "ecommerce",
        "ground_truth.parquet",
        "manifest.json",
        "retail_stores",
    ]
    assert sorted(p.name for p in (silos / "ecommerce").iterdir()) == [
        "bu.toml",
        "consent.csv",
        "customers.csv",
        "transactions.csv",
    ]
    again = silofed("data", "synth", "--units", "2", "--out", "silos", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_units_that_disagree_with_data_is_a_usage_error(tmp_path: Path) -> None:
    synthesize(tmp_path / "silos", units=2, customers=60, seed=1)
    done = silofed("simulate", "--units", "3", "--data", "silos", "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert "--units 3 disagrees with --data" in " ".join(done.stderr.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["silos"]


def _wrong_type(path: Path) -> None:
    frame = pd.read_csv(path, dtype=str)
    frame.loc[4, "age"] = "forty"
    frame.to_csv(path, index=False)


def _missing_column(path: Path) -> None:
    pd.read_csv(path, dtype=str).drop(columns=["region"]).to_csv(path, index=False)


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_wrong_type, ["column 'age', row 5", "'forty'", "not an integer"]),
        (_missing_column, ["missing column(s) ['region']"]),
        (_empty_file, ["the file is empty"]),
    ],
    ids=["wrong-type", "missing-column", "empty-file"],
)
def test_a_malformed_silo_is_named_and_leaves_no_run_directory(
    tmp_path: Path, corrupt, expected: list[str]
) -> None:
    silos = tmp_path / "silos"
    synthesize(silos, units=2, customers=60, seed=1, file_format="csv")
    corrupt(silos / "ecommerce" / "customers.csv")
    done = silofed("simulate", "--data", "silos", "--out", "runs/bad", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    message = " ".join(done.stderr.split())
    assert "silos/ecommerce/customers.csv" in message
    for phrase in expected:
        assert phrase in message
    assert list((tmp_path / "runs").iterdir()) == []  # neither the run nor a staging directory


def test_a_bad_job_value_names_the_field(tmp_path: Path) -> None:
    done = silofed("simulate", "--epsilon", "-1", "--out", "run", cwd=tmp_path)
    assert done.returncode == 2
    assert "epsilon" in done.stderr and "greater than 0" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_existing_run_directory_is_not_overwritten_without_asking(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    done = silofed("simulate", "--out", "run", cwd=tmp_path)
    assert done.returncode == 2 and "--overwrite" in done.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
