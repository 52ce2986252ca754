"""The run's report: `report.json` (a contract other tools read: fields are added, never renamed or
dropped) and `report.html` (the same facts for a person, self-contained, charts inline as SVG).

Both are rendered from the run record, i.e. from what the BUs released, never from logs.
"""

from __future__ import annotations

import math
from importlib.metadata import version

from federation.job import AggregationRule, JobKind
from privacy.audit import public_key_text
from server.run import RunRecord

REPORT_SCHEMA_VERSION = 1


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def build_report(record: RunRecord) -> dict:
    plan, job = record.plan, record.plan.job
    final = _final_metrics(record)
    per_unit = [
        {
            "unit": r.unit,
            "purpose": r.purpose,
            "legal_basis": r.legal_basis,
            "jurisdictions": list(r.jurisdictions),
            "epsilon": r.epsilon,
            "epsilon_total": r.epsilon_total,
            "epsilon_unit_total": r.epsilon_unit_total,
            "budget": r.budget,
            "budget_unit": r.budget_unit,
            "noise_multiplier": r.noise_multiplier,
            "sample_rate": r.sample_rate,
            "steps": r.steps,
            "releases": r.releases,
            "records_used": r.records_used,
            "records_test": r.records_test,
            "excluded": dict(r.excluded),
            "columns_used": list(r.columns_used),
            "columns_dropped": [d.model_dump() for d in r.columns_dropped],
            "encrypted_at_rest": r.encrypted_at_rest,
            "pseudonymised": True,
            "quality": r.quality,
            "refused": False,
        }
        for r in (record.unit_reports[u] for u in record.units)
    ] + [
        {"unit": unit, "refused": True, "refusal": reason, "epsilon": 0.0, "records_used": 0}
        for unit, reason in sorted(record.refused.items())
    ]
    reports = [record.unit_reports[u] for u in record.units]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "run_id": plan.run_id,
        "status": "failed" if record.error is not None else "completed",
        "error": record.error,
        "audit": (
            {
                "log": "audit.jsonl",
                "public_key": public_key_text(record.audit.key.public_key()),
                "verify": "silofed audit verify RUN_DIR",
            }
            if record.audit is not None
            else None
        ),
        "started_at": plan.started_at.isoformat(),
        "job": {
            "task": job.task.value,
            "purpose": job.purpose,
            "rounds": job.rounds,
            "epsilon": job.epsilon,
            "delta": job.delta,
            "training": job.training.model_dump(),
            "kind": job.kind.value,
            "evaluation": job.evaluation.model_dump(),
            "query": job.query.model_dump(mode="json") if job.query is not None else None,
            "segments": job.segments.model_dump(mode="json") if job.segments is not None else None,
        },
        "federation": {
            "mode": plan.mode,
            "seed": plan.seed if plan.mode == "simulation" else None,
            "units": record.units,
            "display_names": {u: plan.display_names.get(u, u) for u in record.units},
            "refused_units": sorted(record.refused),
            "dropouts": list(record.dropouts),
            "rejected": list(record.rejected),
            "aggregation": job.aggregation.model_dump(mode="json"),
            "rounds_completed": record.rounds_completed,
            "strategy": _strategy(job),
            "secure_aggregation": job.secure_aggregation.enabled,
            "secure_aggregation_threshold": _threshold(plan),
        },
        "model": _model_section(record, final),
        "results": record.results,
        "privacy": {
            "unit": plan.privacy_unit,
            "mechanism": _mechanism(job),
            "noise_placement": job.noise.value,
            "secure_aggregation": job.secure_aggregation.enabled,
            "accountant": f"RDP (opacus {version('opacus')})",
            "delta": job.delta,
            "epsilon_target": job.epsilon,
            "randomness": (
                "simulation seed (reproducible; not for production)"
                if plan.seed is not None
                else "torch generator seeded from OS entropy (Opacus secure_mode unavailable)"
            ),
            "per_unit": per_unit,
            "feature_ranges": _feature_ranges(record),
            "disclosed": [
                {
                    "item": "records_used",
                    "description": (
                        "training customers per BU (FedAvg weight; implied by the sample rate)"
                        if job.kind is JobKind.MODEL
                        else "eligible customers per BU (after consent, minimisation and quality)"
                    ),
                    "values": {r.unit: r.records_used for r in reports},
                },
                *(
                    [
                        {
                            "item": "records_test",
                            "description": "held-out customers per BU",
                            "values": {r.unit: r.records_test for r in reports},
                        }
                    ]
                    if job.kind is JobKind.MODEL
                    else []
                ),
                {
                    "item": "excluded",
                    "description": "customers excluded per BU, by reason",
                    "values": {r.unit: dict(r.excluded) for r in reports},
                },
                *(
                    [
                        {
                            "item": "evaluation_histograms",
                            "description": (
                                "per-BU counts of held-out customers per score bin and label, and "
                                "sums of log-loss and Brier terms, exact (evaluation.mode = exact)"
                            ),
                        }
                    ]
                    if job.kind is JobKind.MODEL and job.evaluation.mode == "exact"
                    else []
                ),
                {
                    "item": "quality",
                    "description": (
                        "per BU: rows per table, invalid rows, duplicate ids, invalid customers, and "
                        "completeness and failure counts of the columns the job used (counts only)"
                    ),
                    "values": {r.unit: r.quality for r in reports},
                },
                {
                    "item": "schema_metadata",
                    "description": "column names used and dropped per BU, and the declared schemas",
                },
            ],
            "guarantees": _guarantees(job, reports),
            "guarantees_secure_aggregation": (
                [
                    "With SecAgg+ the coordinator sees, in every exchange, only the sum of the "
                    "surviving BUs' replies, never one BU's update or statistic, as long as fewer "
                    f"than {_threshold(plan)['threshold']} BUs collude with it."
                ]
                if job.secure_aggregation.enabled
                else []
            ),
            "out_of_scope": [
                "a coordinator that deviates from the protocol",
                "side channels",
                "customers present in several BUs compose across those BUs (sum of their epsilons)",
            ],
        },
        "rounds": [
            {"round": s.server_round, "metrics": s.metrics, "epsilon": s.epsilon}
            for s in record.rounds
        ],
    }


def _feature_ranges(record: RunRecord) -> dict | None:
    """The ranges exchange: its noise, and the window of every scalar feature (DP outputs),
    on the declared [0, 1] scale and in the feature's own units."""
    from federation.exchanges import ranges_multiplier, uses_ranges
    from federation.ranges import RANGE_BINS, natural_window

    job = record.plan.job
    if job.kind is not JobKind.MODEL or not uses_ranges(job):
        return None
    spec = job.feature_spec
    return {
        "share": job.training.ranges_share,
        "noise_multiplier": ranges_multiplier(job),
        "bins": RANGE_BINS,
        "description": (
            "before training, every BU released a noisy histogram of each scalar feature over "
            "its training customers; the coordinator read each feature's window off their sum, "
            "and every BU clipped the feature to it and rescaled it to [0, 1]"
        ),
        "windows": {
            name: {
                "scaled": list(window),
                # ten significant digits: the inverse scaling's float noise (52.00000000000001) off
                "natural": [float(f"{v:.10g}") for v in natural_window(spec, name, window)],
            }
            for name, window in sorted(spec.ranges.items())
        },
    }


def _final_metrics(record: RunRecord) -> dict:
    """The metrics of the last round that evaluated (a DP evaluation follows the last round only)."""
    for summary in reversed(record.rounds):
        if summary.metrics:
            return summary.metrics
    return {}


def _strategy(job) -> str:
    if job.kind is JobKind.QUERY:
        return "sum of the BUs' noisy integer vectors"
    if job.kind is JobKind.SEGMENTS:
        return "federated k-means (Lloyd iterations on summed per-cluster sums and counts)"
    if job.secure_aggregation.enabled:
        return "FedAvg (uniform weights under SecAgg+)"
    rule = job.aggregation
    match rule.rule:
        case AggregationRule.TRIMMED_MEAN:
            return f"trimmed mean (Flower's FedTrimmedAvg, {rule.trim:g} cut at each end)"
        case AggregationRule.MEDIAN:
            return "coordinate-wise median (Flower's FedMedian)"
        case AggregationRule.KRUM:
            return f"Krum (Flower's Krum, tolerating {rule.byzantine} hostile BUs)"
    return "FedAvg (weighted by records used)"


def _mechanism(job) -> str:
    releases = (
        "discrete Gaussian (Canonne, Kamath & Steinke 2020) on integer counts and grid sums, "
        f"{_placement_words(job)}"
    )
    if job.kind is not JobKind.MODEL:
        return releases
    if job.noise.value == "central":
        training = (
            "central Gaussian: BU updates clipped to the norm C, summed under SecAgg+, exact "
            "discrete Gaussian noise of std 2zC added by the coordinator"
        )
    elif job.noise.value == "distributed":
        training = (
            "distributed discrete Gaussian: BU updates clipped to the norm C, rounded onto "
            "SecAgg+'s grid, plus each BU's discrete Gaussian share, summed under SecAgg+"
        )
    else:
        training = "DP-SGD (Opacus): Poisson sampling, per-customer clipping, Gaussian noise"
    from federation.exchanges import uses_ranges

    if uses_ranges(job):
        training = f"feature ranges: {releases}; {training}"
    if job.evaluation.mode == "dp":
        return f"{training}; evaluation: {releases}"
    return training


def _placement_words(job) -> str:
    return {
        "local": "each BU adding the full noise to its own vector",
        "central": "the coordinator adding the noise to the secure sum",
        "distributed": "each BU adding a share of the noise under SecAgg+",
    }[job.noise.value]


def _model_section(record: RunRecord, final: dict) -> dict | None:
    plan, job = record.plan, record.plan.job
    if job.kind is JobKind.QUERY:
        return None
    if job.kind is JobKind.SEGMENTS:
        return {
            "type": "k_means",
            "features": list(job.feature_spec.output_names),
            "metrics": {},
            "evaluation": "none",
            "evaluation_note": "segments are described by their DP sizes and centroids (results)",
        }
    from federation.tasks import adapter

    task = adapter(job.task)
    dp = job.evaluation.mode == "dp"
    metrics: dict = {
        "auc": _finite(final.get("auc")),
        "log_loss": _finite(final.get("log_loss")),
        "brier": _finite(final.get("brier")),
        "auc_ceiling": _finite(plan.auc_ceiling),
        "test_customers": round(final.get("test_customers", 0) or 0),
    }
    if task.kind == "regression":
        metrics.update({"rmse": _finite(final.get("rmse")), "mae": _finite(final.get("mae"))})
    if dp and record.evaluation is not None:
        metrics.update(
            {
                k: v
                for k, v in record.evaluation.items()
                if k.endswith("_interval") and isinstance(v, list | tuple)
            }
        )
    return {
        # ltv: a linear layer with a logistic link on the scaled spend (docs/tasks.md)
        "type": "fractional_logistic_regression"
        if task.kind == "regression"
        else "logistic_regression",
        "features": list(job.feature_spec.output_names),
        "metrics": metrics,
        "metric_names": list(task.metrics),
        "evaluation": job.evaluation.mode,
        "evaluation_epsilon": job.evaluation_epsilon if dp else None,
        "evaluation_note": (
            (
                "Metrics are computed from the sum of the BUs' sums of clipped errors of their "
                "held-out customers"
                if task.kind == "regression"
                else "Metrics are computed from the sum of the BUs' score histograms of their "
                "held-out customers"
            )
            + ", each released with discrete Gaussian noise (evaluation.epsilon of the job's "
            "epsilon); curves and intervals are in results.json."
            if dp
            else "Metrics are computed from the BUs' exact score histograms of their held-out "
            "customers; these histograms are not differentially private (see privacy.disclosed)."
        ),
        "curves": record.evaluation,
    }


def build_results(record: RunRecord, report: dict) -> dict:
    """`results.json`: what the run answered, with noise scales, intervals and epsilon per BU."""
    job = record.plan.job
    return {
        "schema_version": 1,
        "run_id": record.plan.run_id,
        "kind": job.kind.value,
        "purpose": job.purpose,
        "noise_placement": job.noise.value,
        "delta": job.delta,
        "epsilon": {u["unit"]: u["epsilon"] for u in report["privacy"]["per_unit"]},
        "results": record.results,
        "evaluation": record.evaluation,
    }


def _guarantees(job, reports) -> list[str]:
    if job.kind is not JobKind.MODEL:
        trust = {
            "local": "holds without trusting the coordinator",
            "central": "trusting the coordinator to add the noise to the secure sum",
            "distributed": (
                "provided SecAgg+ completes and at most "
                f"{job.secure_aggregation.colluding} BU(s) reveal their shares"
            ),
        }[job.noise.value]
        return [
            f"Each BU's released counts and sums are ({r.epsilon:.3f}, {job.delta:g})-DP for "
            f"its customers over this run ({trust})."
            for r in reports
        ]
    if job.noise.value == "distributed":
        return [
            f"Each BU's customers get ({r.epsilon:.3f}, {job.delta:g})-DP over this run from the "
            "noise shares the BUs add themselves (distributed discrete Gaussian), provided SecAgg+ "
            "completes (it refuses to with fewer BUs than its threshold) and at most "
            f"{job.secure_aggregation.colluding} BU(s) reveal their shares to the coordinator; "
            "the coordinator saw only the noisy sum."
            for r in reports
        ] + [_unit_level(job)]
    if job.noise.value == "central":
        return [
            f"Record level: each BU's customers get ({r.epsilon:.3f}, {job.delta:g})-DP over this "
            "run, trusting the coordinator to add the noise (central placement: the coordinator "
            "saw the exact sum of the BUs' clipped updates before adding it)."
            for r in reports
        ] + [_unit_level(job) + " Under the same trust."]
    return [
        f"Each BU's model updates are ({r.epsilon:.3f}, {job.delta:g})-DP for its customers "
        "over this run (local noise; holds without trusting the coordinator)."
        for r in reports
    ] + [
        "BU level: local DP-SGD bounds each customer's influence, not a whole BU's; a BU's "
        "participation is protected only by group privacy over its customers."
    ]


def _unit_level(job) -> str:
    from federation.exchanges import planned_evaluation, planned_ranges
    from privacy.accounting import DpSgdEvent, central_noise_multiplier, dp_sgd_epsilon

    ranges = planned_ranges(job)
    z = central_noise_multiplier(
        job.epsilon, job.delta, job.rounds, spent=ranges, holdout=planned_evaluation(job)
    )
    unit_level = dp_sgd_epsilon([DpSgdEvent(2 * z, 1.0, job.rounds)], job.delta)
    return (
        f"BU level: the released models are ({unit_level:.3f}, {job.delta:g})-DP with respect to "
        "any one BU's whole contribution (sensitivity C instead of 2C)."
        + (
            " The feature windows of the ranges exchange are DP for each customer, not for a "
            "BU's whole contribution."
            if ranges
            else ""
        )
    )


def _threshold(plan) -> dict | None:
    if not plan.job.secure_aggregation.enabled:
        return None
    from federation.secagg import shares_and_threshold

    shares, threshold = shares_and_threshold(plan.expected_units)
    return {"shares": shares, "threshold": threshold, "units": plan.expected_units}


from server.html import render_html  # noqa: E402  (re-exported: the report's two renderings)

__all__ = ["build_report", "build_results", "render_html"]
