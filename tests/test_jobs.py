"""Jobs of the three kinds, run in process over synthetic BUs with the real clients and strategy:
what each releases, what each spends, what the run directory holds, and the job file's edges."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from clients.app import BusinessUnitClient
from clients.pipeline import UnitKeys, prepare_unit
from clients.scoring import score_unit
from clients.silo import load_silo
from federation.cli import app
from federation.evaluation import ScoreHistogram
from federation.exchanges import exchange_rounds
from federation.job import Job, JobKind, load_job_file
from federation.saved import load_run_model
from privacy.accounting import dp_sgd_epsilon, partitioned_epsilon
from privacy.errors import ConfigurationError
from privacy.home import UnitHome
from privacy.ledger import GaussianEvent
from privacy.unit_config import UnitConfig
from simulations.inprocess import run_in_process
from simulations.synthetic import synthesize
from tests.report_contract import assert_report_contract


@pytest.fixture(scope="module")
def silos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("job-silos") / "silos"
    synthesize(out, units=3, customers=700, seed=11)
    return sorted(out.glob("*/bu.toml"))


def _ledger_events(homes: Path, config: Path):
    unit = UnitConfig.load(config)
    with UnitHome(homes / unit.unit, unit).ledger() as ledger:
        return ledger.entries(), ledger.epsilon(1e-6, purpose=None)


@pytest.fixture(scope="module")
def model_run(silos: list[Path], tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("model-run")
    job = Job.parse({"rounds": 2, "epsilon": 3.0}, source="test")
    return run_in_process(job, silos, base / "homes", out=base / "run"), base


def test_a_model_job_trains_then_spends_its_evaluation_within_the_job_epsilon(model_run, silos):
    run, base = model_run
    job = run.job
    assert job.evaluation.mode == "dp" and job.evaluation_epsilon == job.epsilon
    for config in silos:
        entries, total = _ledger_events(base / "homes", config)
        kinds = [(e.round, type(e.event).__name__) for e in entries]
        # the ranges release before training (round 0), two DP-SGD rounds, then the evaluation
        # release recorded after the last round
        assert kinds == [
            (0, "GaussianEvent"),
            (1, "DpSgdEvent"),
            (2, "DpSgdEvent"),
            (3, "GaussianEvent"),
        ]
        assert 0.9 * job.epsilon <= total <= job.epsilon
    report = json.loads((base / "run" / "report.json").read_text())
    assert_report_contract(report)
    assert report["model"]["evaluation"] == "dp"
    metrics = report["model"]["metrics"]
    low, high = metrics["auc_interval"]
    assert low <= high and low >= 0.0 and high <= 1.0
    assert report["rounds"][0]["metrics"] == {}  # no evaluation, no spending, in round 1
    assert "auc" in report["rounds"][1]["metrics"]
    assert not any(d["item"] == "evaluation_histograms" for d in report["privacy"]["disclosed"])
    results = json.loads((base / "run" / "results.json").read_text())
    assert results["kind"] == "model" and set(results["epsilon"]) == set(
        report["federation"]["units"]
    )
    assert {"roc", "gain", "calibration", "lift"} <= set(results["evaluation"])


def test_training_and_evaluation_compose_in_parallel_on_disjoint_customers(model_run, silos):
    run, base = model_run
    job = run.job
    assert job.evaluation_epsilon == job.epsilon  # each side may spend the whole target
    for config in silos:
        entries, _ = _ledger_events(base / "homes", config)
        # the ranges histograms are of the training customers: they compose with training
        assert [e.part for e in entries] == ["train", "train", "train", "holdout"]
        training = [
            e.event.as_dp_sgd() if isinstance(e.event, GaussianEvent) else e.event
            for e in entries
            if e.part == "train"
        ]
        evaluation = [e.event.as_dp_sgd() for e in entries if e.part == "holdout"]
        train_alone = dp_sgd_epsilon(training, job.delta)
        eval_alone = dp_sgd_epsilon(evaluation, job.delta)
        report = run.record.unit_reports[UnitConfig.load(config).unit]
        assert report.releases == 2  # the ranges and the evaluation
        # the run's curve is the pointwise larger of the two sides' RDP curves: its epsilon is
        # at least the larger side's, and far below the composition of both
        assert report.epsilon == pytest.approx(
            partitioned_epsilon([{"train": training, "holdout": evaluation}], job.delta), rel=1e-12
        )
        assert max(train_alone, eval_alone) <= report.epsilon <= job.epsilon
        assert dp_sgd_epsilon([*training, *evaluation], job.delta) > job.epsilon
        # training (with the ranges before it) was calibrated for the whole target, as without
        # any evaluation
        assert 0.95 * job.epsilon <= train_alone <= job.epsilon


def test_score_reproduces_the_scores_the_bu_evaluated(model_run, silos, tmp_path):
    run, base = model_run
    config_path = silos[0]
    out = tmp_path / "scores.parquet"
    result = score_unit(
        base / "run", config_path, out, home=base / "homes" / UnitConfig.load(config_path).unit
    )
    scores = pd.read_parquet(out)
    assert result.customers == len(scores) and result.held_out == int(scores["held_out"].sum())
    assert set(scores.columns) == {"customer", "score", "held_out"}
    # The BU's own evaluation vector, computed as in the run, from the run's final model.
    client = BusinessUnitClient(run.nodes[0])
    unit = UnitConfig.load(config_path)
    home = UnitHome.of(unit, run.nodes[0].home)
    with home.registry() as registry:
        prepared = prepare_unit(
            load_silo(unit),
            run.job,
            registry=registry,
            keys=UnitKeys(home.pseudonym_key(), home.linkage_key()),
            as_of=run.record.plan.started_at,
        )
    evaluated = client._evaluation_vector(prepared, run.parameters, run.job)
    held = scores[scores["held_out"]]
    labels = pd.Series(prepared.test.labels, index=prepared.test.customer_ids)
    rescored = ScoreHistogram.of(
        held["score"].to_numpy(), labels.loc[held["customer"]].to_numpy(), run.job.evaluation.bins
    ).to_vector()
    assert np.array_equal(rescored, evaluated)
    assert np.array_equal(np.sort(held["customer"].to_numpy()), np.sort(prepared.test.customer_ids))


def test_a_segments_job_releases_one_vector_per_iteration(silos, tmp_path):
    job = Job.parse(
        {"kind": "segments", "epsilon": 2.0, "segments": {"k": 3, "iterations": 3}}, source="t"
    )
    assert (
        job.kind is JobKind.SEGMENTS and exchange_rounds(job) == 3 and job.purpose == "segmentation"
    )
    run = run_in_process(job, silos, tmp_path / "homes", out=tmp_path / "run")
    segments = run.record.results["segments"]
    assert len(segments) == 3 and all(
        set(s["centroid"]) == {"recency", "frequency", "monetary"} for s in segments
    )
    for config in silos:
        entries, total = _ledger_events(tmp_path / "homes", config)
        assert [e.round for e in entries] == [1, 2, 3]
        assert 0.9 * 2.0 <= total <= 2.0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    assert report["model"]["type"] == "k_means" and report["results"]["segments"] == segments
    saved = load_run_model(tmp_path / "run")
    assert saved.model is None and saved.centroids.shape == (3, 3)
    assert np.allclose(saved.centroids, run.parameters[0])
    out = tmp_path / "segments.csv"
    score_unit(
        tmp_path / "run", silos[1], out, home=tmp_path / "homes" / UnitConfig.load(silos[1]).unit
    )
    assigned = pd.read_csv(out)
    assert set(assigned["segment"]) <= {0, 1, 2}


def test_model_files_load_only_as_weights(tmp_path):
    # A pickle with a __reduce__ payload is refused by weights_only loading, with no side effect.
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "run").mkdir()
    torch.save({"format": "silofed.model/1", "x": Payload()}, tmp_path / "run" / "model.pt")
    with pytest.raises(ConfigurationError, match="weights_only"):
        load_run_model(tmp_path / "run")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConfigurationError, match=r"no model\.pt"):
        load_run_model(tmp_path)


def test_job_files_name_the_file_and_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("kind = 'query'\n[query\n")
    with pytest.raises(ConfigurationError, match=r"bad\.toml: not valid TOML"):
        load_job_file(bad)
    with pytest.raises(ConfigurationError, match="no such job file"):
        load_job_file(tmp_path / "missing.toml")
    seeded = {"kind": "model", "seed": 3}
    with pytest.raises(ConfigurationError, match="never carries a seed"):
        Job.parse(seeded, source="job.toml")
    with pytest.raises(ConfigurationError, match=r"needs a \[query\] table"):
        Job.parse({"kind": "query"}, source="job.toml")
    with pytest.raises(ConfigurationError, match=r"segments\.k"):
        Job.parse({"kind": "segments"}, source="job.toml")
    with pytest.raises(ConfigurationError, match="one round per iteration"):
        Job.parse({"kind": "segments", "rounds": 2, "segments": {"k": 3}}, source="job.toml")
    with pytest.raises(ConfigurationError, match=r"exceeds the job's epsilon"):
        Job.parse({"epsilon": 1.0, "evaluation": {"epsilon": 1.5}}, source="job.toml")
    assert Job.parse({"epsilon": 1.0}, source="j").evaluation_epsilon == 1.0


def test_simulate_with_a_job_file_refuses_the_options_the_file_holds(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text("kind = 'model'\nrounds = 2\n")
    result = CliRunner().invoke(app, ["simulate", "--job", str(job), "--rounds", "3"])
    assert result.exit_code == 2 and "--rounds cannot be combined with --job" in result.output


def test_preview_spends_nothing_and_reads_no_data(silos, tmp_path):
    job = tmp_path / "segments.toml"
    job.write_text("kind = 'segments'\nepsilon = 2.0\n[segments]\nk = 3\niterations = 3\n")
    data = silos[0].parent.parent
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["preview", str(job), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    preview = json.loads(result.output)
    assert [c["epsilon"] for c in preview["cost"]] == [2.0, 2.0, 2.0]
    phases = {(r["phase"], r["rounds"]) for r in preview["releases"]}
    assert phases == {("segments", 1), ("segments", 2)}  # the seeding round, then k centroids
    for release in preview["releases"]:
        for part in release["parts"]:
            assert part["half_width_95"] >= 1.96 * part["std_in_sum"] - 1
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*") if p.is_file()}
    assert after == before  # no home, no ledger, no file was created or changed


QUERY_JOB = """
kind = "query"
epsilon = 1.0

[query]
purpose = "analytics"
group_by = [{ column = "customers.region" }]

[[query.aggregates]]
kind = "count"
name = "customers"

[[query.aggregates]]
kind = "mean"
name = "mean_age"
column = "customers.age"
"""


def test_a_query_job_answers_with_intervals_and_spends_once(silos, tmp_path):
    path = tmp_path / "query.toml"
    path.write_text(QUERY_JOB)
    job = Job.parse(load_job_file(path), source=str(path))
    assert job.kind is JobKind.QUERY and job.rounds == 1 and job.purpose == "analytics"
    run = run_in_process(job, silos, tmp_path / "homes", out=tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    answers = results["results"]["answers"]
    counts = [a for a in answers if a["name"] == "customers"]
    assert len(counts) == 5  # the five declared regions
    for answer in answers:
        low, high = answer["interval"]
        assert low <= answer["value"] <= high
    for config in silos:
        entries, total = _ledger_events(tmp_path / "homes", config)
        assert [type(e.event).__name__ for e in entries] == ["GaussianEvent"]
        assert 0.9 <= total <= 1.0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert_report_contract(report)
    assert report["model"] is None and report["job"]["kind"] == "query"
    assert not (tmp_path / "run" / "model.pt").exists()
    assert run.record.results == results["results"]


def test_a_recipe_query_expands_from_the_declared_schemas(silos, tmp_path):
    job = Job.parse(
        {"kind": "query", "query": {"purpose": "analytics", "recipe": "churn_rate_by_segment"}},
        source="t",
    )
    run = run_in_process(job, silos, tmp_path / "homes")
    assert run.job.query_spec.recipe == "churn_rate_by_segment"
    assert any(a["name"] == "churn_rate" for a in run.record.results["answers"])


def test_a_query_is_refused_before_any_bu_reads_data(silos, tmp_path):
    # A purpose no BU declares, or a special category, stops the job at resolution: the silos'
    # data files are never opened (resolution reads the bu.toml files only).
    undeclared = Job.parse(
        {
            "kind": "query",
            "query": {"purpose": "marketing_mix", "aggregates": [{"kind": "count", "name": "n"}]},
        },
        source="t",
    )
    with pytest.raises(ConfigurationError, match="does not declare the purpose 'marketing_mix'"):
        run_in_process(undeclared, silos, tmp_path / "homes")
    special = Job.parse(
        {
            "kind": "query",
            "query": {
                "purpose": "analytics",
                "group_by": [{"column": "customers.religion"}],
                "aggregates": [{"kind": "count", "name": "n"}],
            },
        },
        source="t",
    )
    with pytest.raises(ConfigurationError, match="religion"):
        run_in_process(special, silos, tmp_path / "homes")
    unbounded = Job.parse(
        {
            "kind": "query",
            "query": {
                "purpose": "analytics",
                "group_by": [{"column": "customers.age"}],
                "aggregates": [{"kind": "count", "name": "n"}],
            },
        },
        source="t",
    )
    with pytest.raises(ConfigurationError, match="bins"):
        run_in_process(unbounded, silos, tmp_path / "homes")
    assert not (tmp_path / "homes").exists()  # no BU home was even prepared


def test_the_summary_shows_a_ratio_without_value_as_such(capsys, tmp_path):
    from federation.cli import _print_summary

    report = {
        "run_id": "r",
        "job": {"kind": "query", "task": "churn", "purpose": "analytics", "epsilon": 1.0},
        "model": None,
        "privacy": {"per_unit": [], "delta": 1e-6},
        "federation": {"display_names": {}},
        "results": {
            "answers": [
                {
                    "name": "repeat_to_loyal",
                    "group": {"channel": "phone"},
                    "value": None,
                    "interval": [None, None],
                    "note": "the noisy denominator is not positive: no value",
                },
                {"name": "customers", "group": {}, "value": 12.0, "interval": [9.0, 15.0]},
            ]
        },
    }
    _print_summary(report, tmp_path)
    printed = capsys.readouterr().out
    assert (
        "repeat_to_loyal (channel=phone): no value (the noisy denominator is not positive"
        in printed
    )
    assert "customers: 12  95% [9, 15]" in printed


def test_the_ranges_exchange_spends_its_share_and_its_windows_reach_the_report(model_run, silos):
    """Before training every BU released its scalar features' histograms once (ledger round 0,
    at the multiplier the public job fixes); the windows read off their sum are in the job the
    BUs trained with, in the saved model's spec and in the report, in the features' own units."""
    from federation.exchanges import RANGES_ROUND, ranges_multiplier
    from federation.ranges import natural_window
    from federation.saved import load_model

    run, base = model_run
    job = run.job
    windows = job.feature_spec.ranges
    assert set(windows) == set(job.feature_spec.scalar_outputs)
    assert all(0.0 <= low < high <= 1.0 for low, high in windows.values())
    for config in silos:
        entries, _ = _ledger_events(base / "homes", config)
        (ranges,) = [e for e in entries if e.round == RANGES_ROUND]
        assert ranges.part == "train"
        assert ranges.event.as_dp_sgd().noise_multiplier == pytest.approx(ranges_multiplier(job))
    report = json.loads((base / "run" / "report.json").read_text())
    stated = report["privacy"]["feature_ranges"]
    assert stated["share"] == job.training.ranges_share == 0.1
    assert {n: tuple(w["scaled"]) for n, w in stated["windows"].items()} == windows
    for name, window in stated["windows"].items():
        assert window["natural"] == pytest.approx(
            list(natural_window(job.feature_spec, name, windows[name]))
        )
    _, spec = load_model(base / "run" / "model.pt")
    assert spec.ranges == windows
    html = (base / "run" / "report.html").read_text()
    assert "Feature windows (differentially private)" in html


def test_a_job_without_a_ranges_share_keeps_the_declared_scale(silos, tmp_path):
    job = Job.parse({"rounds": 1, "epsilon": 3.0, "training": {"ranges_share": 0}}, source="test")
    run = run_in_process(job, silos, tmp_path / "homes", out=tmp_path / "run", seed=1)
    assert run.job.feature_spec.ranges == {}
    for config in silos:
        entries, _ = _ledger_events(tmp_path / "homes", config)
        assert [e.round for e in entries] == [1, 2]  # training, then the DP evaluation
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["privacy"]["feature_ranges"] is None
    assert_report_contract(report)
