"""The `report.json` contract (issue #2): every field other tools may read. Fields are added over
time, never renamed or dropped; this list only grows."""

from __future__ import annotations

TOP_LEVEL = {
    "schema_version": int,
    "run_id": str,
    "job.task": str,
    "job.purpose": str,
    "job.rounds": int,
    "job.epsilon": float,
    "job.delta": float,
    "federation.mode": str,
    "federation.units": list,
    "federation.rounds_completed": int,
    "model.metrics.auc": float,
    "model.metrics.log_loss": float,
    "model.evaluation": str,
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


def assert_report_contract(report: dict) -> None:
    for dotted, kind in TOP_LEVEL.items():
        value = lookup(report, dotted)
        assert isinstance(value, kind), f"{dotted} is {type(value).__name__}, not {kind.__name__}"
    assert "seed" in report["federation"]
    assert "auc_ceiling" in report["model"]["metrics"]
    assert report["federation"]["mode"] in ("simulation", "deployment")
    assert report["model"]["evaluation"] in ("exact", "dp")
    assert report["privacy"]["unit"] in ("customer", "record")
    for unit in report["privacy"]["per_unit"]:
        if unit.get("refused"):
            continue
        for key, kind in PER_UNIT.items():
            assert isinstance(unit[key], kind), f"per_unit[].{key} is {type(unit[key]).__name__}"
        assert "no_consent" in unit["excluded"]
        for dropped in unit["columns_dropped"]:
            assert set(dropped) == {"column", "reason"}
