"""The `report.json` contract (issue #2): every field other tools may read. Fields are added over
time, never renamed or dropped; this list only grows."""

from __future__ import annotations

TOP_LEVEL = {
    "schema_version": int,
    "run_id": str,
    "status": str,  # "completed", or "failed" (a deployed run that failed keeps its record)
    "audit.log": str,
    "audit.public_key": str,
    "job.task": str,
    "job.purpose": str,
    "job.rounds": int,
    "job.epsilon": float,
    "job.delta": float,
    "job.kind": str,
    "federation.mode": str,
    "federation.units": list,
    "federation.display_names": dict,
    "federation.rounds_completed": int,
    "federation.rejected": list,
    "federation.aggregation": dict,
    "privacy.unit": str,
    "privacy.delta": float,
    "privacy.disclosed": list,
    "privacy.per_unit": list,
    "privacy.noise_placement": str,
    "privacy.secure_aggregation": bool,
    "privacy.guarantees": list,
}
PER_UNIT = {
    "unit": str,
    "epsilon": float,
    "noise_multiplier": float,
    "sample_rate": float,
    "steps": int,
    "records_used": int,
    "excluded": dict,
    "columns_used": list,
    "columns_dropped": list,
    "epsilon_total": float,
    "refused": bool,
}


def lookup(report: dict, dotted: str):
    value = report
    for key in dotted.split("."):
        assert key in value, f"report.json lacks '{dotted}'"
        value = value[key]
    return value


# A model job's report (issue #2; the binary tasks' metrics), by task kind.
MODEL = {"model.evaluation": str, "model.metrics.test_customers": int}
BINARY = {"model.metrics.auc": float, "model.metrics.log_loss": float}
REGRESSION = {"model.metrics.rmse": float, "model.metrics.mae": float}


def _check(report: dict, fields: dict) -> None:
    for dotted, kind in fields.items():
        value = lookup(report, dotted)
        assert isinstance(value, kind), f"{dotted} is {type(value).__name__}, not {kind.__name__}"


def assert_report_contract(report: dict) -> None:
    _check(report, TOP_LEVEL)
    assert "seed" in report["federation"]
    assert report["federation"]["mode"] in ("simulation", "deployment")
    kind = report["job"]["kind"]
    assert kind in ("model", "query", "segments")
    if kind == "model":
        _check(report, MODEL)
        assert "auc_ceiling" in report["model"]["metrics"]
        assert report["model"]["evaluation"] in ("exact", "dp")
        _check(report, REGRESSION if report["job"]["task"] == "ltv" else BINARY)
    elif kind == "query":
        assert report["model"] is None and isinstance(report["results"]["answers"], list)
    else:
        assert report["model"]["type"] == "k_means"
        assert isinstance(report["results"]["segments"], list)
    assert report["privacy"]["unit"] in ("customer", "record")
    for unit in report["privacy"]["per_unit"]:
        if unit.get("refused"):
            continue
        for key, kind in PER_UNIT.items():
            assert isinstance(unit[key], kind), f"per_unit[].{key} is {type(unit[key]).__name__}"
        assert "no_consent" in unit["excluded"]
        for dropped in unit["columns_dropped"]:
            assert set(dropped) == {"column", "reason"}
