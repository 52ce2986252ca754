"""The run's report: `report.json` (a contract other tools read: fields are added, never renamed or
dropped) and `report.html` (the same facts for a person, self-contained, charts inline as SVG).

Both are rendered from the run record, i.e. from what the BUs released, never from logs.
"""

from __future__ import annotations

import html
import io
import math
from importlib.metadata import version

from server.run import RunRecord

REPORT_SCHEMA_VERSION = 1


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def build_report(record: RunRecord) -> dict:
    plan, job = record.plan, record.plan.job
    final = record.rounds[-1].metrics if record.rounds else {}
    per_unit = [
        {
            "unit": r.unit,
            "purpose": r.purpose,
            "epsilon": r.epsilon,
            "epsilon_total": r.epsilon_total,
            "epsilon_unit_total": r.epsilon_unit_total,
            "budget": r.budget,
            "budget_unit": r.budget_unit,
            "noise_multiplier": r.noise_multiplier,
            "sample_rate": r.sample_rate,
            "steps": r.steps,
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
        "started_at": plan.started_at.isoformat(),
        "job": {
            "task": job.task.value,
            "purpose": job.purpose,
            "rounds": job.rounds,
            "epsilon": job.epsilon,
            "delta": job.delta,
            "training": job.training.model_dump(),
        },
        "federation": {
            "mode": plan.mode,
            "seed": plan.seed if plan.mode == "simulation" else None,
            "units": record.units,
            "refused_units": sorted(record.refused),
            "dropouts": list(record.dropouts),
            "rounds_completed": record.rounds_completed,
            "strategy": (
                "FedAvg (uniform weights under SecAgg+)"
                if job.secure_aggregation.enabled
                else "FedAvg (weighted by records used)"
            ),
            "secure_aggregation": job.secure_aggregation.enabled,
            "secure_aggregation_threshold": _threshold(plan),
        },
        "model": {
            "type": "logistic_regression",
            "features": list(job.feature_spec.output_names),
            "metrics": {
                "auc": _finite(final.get("auc")),
                "log_loss": _finite(final.get("log_loss")),
                "brier": _finite(final.get("brier")),
                "auc_ceiling": _finite(plan.auc_ceiling),
                "test_customers": int(final.get("test_customers", 0)),
            },
            "evaluation": "exact",
            "evaluation_note": (
                "Metrics are computed from the BUs' exact score histograms of their held-out "
                "customers; these histograms are not differentially private (see privacy.disclosed)."
            ),
        },
        "privacy": {
            "unit": "customer",
            "mechanism": (
                "central Gaussian: BU updates clipped to the norm C, summed under SecAgg+, exact "
                "discrete Gaussian noise of std 2zC added by the coordinator"
                if job.noise.value == "central"
                else "distributed discrete Gaussian: BU updates clipped to the norm C, rounded onto "
                "SecAgg+'s grid, plus each BU's discrete Gaussian share, summed under SecAgg+"
                if job.noise.value == "distributed"
                else "DP-SGD (Opacus): Poisson sampling, per-customer clipping, Gaussian noise"
            ),
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
            "disclosed": [
                {
                    "item": "records_used",
                    "description": "training customers per BU (FedAvg weight; implied by the sample rate)",
                    "values": {r.unit: r.records_used for r in reports},
                },
                {
                    "item": "records_test",
                    "description": "held-out customers per BU",
                    "values": {r.unit: r.records_test for r in reports},
                },
                {
                    "item": "excluded",
                    "description": "customers excluded per BU, by reason",
                    "values": {r.unit: dict(r.excluded) for r in reports},
                },
                {
                    "item": "evaluation_histograms",
                    "description": (
                        "per-BU counts of held-out customers per score bin and label, and sums of "
                        "log-loss and Brier terms, exact (not DP) in this version"
                    ),
                },
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


def _guarantees(job, reports) -> list[str]:
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
    from privacy.accounting import DpSgdEvent, central_noise_multiplier, dp_sgd_epsilon

    z = central_noise_multiplier(job.epsilon, job.delta, job.rounds)
    unit_level = dp_sgd_epsilon([DpSgdEvent(2 * z, 1.0, job.rounds)], job.delta)
    return (
        f"BU level: the released models are ({unit_level:.3f}, {job.delta:g})-DP with respect to "
        "any one BU's whole contribution (sensitivity C instead of 2C)."
    )


def _threshold(plan) -> dict | None:
    if not plan.job.secure_aggregation.enabled:
        return None
    from federation.secagg import shares_and_threshold

    shares, threshold = shares_and_threshold(plan.expected_units)
    return {"shares": shares, "threshold": threshold, "units": plan.expected_units}


def _svg_chart(
    series: dict[str, list[tuple[int, float]]], ylabel: str, hline: tuple[str, float] | None
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[1], linestyle="--", color="grey", label=hline[0])
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg") :]


def render_html(report: dict) -> str:
    e = html.escape
    metrics = report["model"]["metrics"]
    rounds = report["rounds"]
    auc_chart = _svg_chart(
        {"global AUC": [(r["round"], r["metrics"]["auc"]) for r in rounds]},
        "AUC",
        ("ceiling (true model)", metrics["auc_ceiling"]) if metrics["auc_ceiling"] else None,
    )
    units = report["federation"]["units"]
    eps_chart = _svg_chart(
        {u: [(r["round"], r["epsilon"][u]) for r in rounds if u in r["epsilon"]] for u in units},
        "epsilon (cumulative)",
        ("target", report["job"]["epsilon"]),
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{e(str(v))}</td>"
            for v in (
                u["unit"],
                "refused: " + u["refusal"] if u["refused"] else f"{u['epsilon']:.3f}",
                f"{u.get('noise_multiplier', 0):.3f}",
                f"{u.get('sample_rate', 0):.4f}",
                u.get("steps", ""),
                u.get("records_used", ""),
                ", ".join(f"{k}: {n}" for k, n in u.get("excluded", {}).items()),
                ", ".join(u.get("columns_used", [])),
                ", ".join(f"{d['column']} ({d['reason']})" for d in u.get("columns_dropped", [])),
            )
        )
        + "</tr>"
        for u in report["privacy"]["per_unit"]
    )
    disclosed = "".join(
        f"<li><b>{e(d['item'])}</b>: {e(d['description'])}</li>"
        for d in report["privacy"]["disclosed"]
    )
    guarantees = "".join(f"<li>{e(g)}</li>" for g in report["privacy"]["guarantees"])
    out_of_scope = "".join(f"<li>{e(g)}</li>" for g in report["privacy"]["out_of_scope"])

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>silofed run {e(report["run_id"])}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:.85em}}td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top}}
th{{background:#f3f3f3}}.kv td:first-child{{font-weight:600}}
</style></head><body>
<h1>silofed run <code>{e(report["run_id"])}</code></h1>
<table class="kv">
<tr><td>task / purpose</td><td>{e(report["job"]["task"])} / {e(report["job"]["purpose"])}</td></tr>
<tr><td>mode</td><td>{e(report["federation"]["mode"])} (seed: {e(str(report["federation"]["seed"]))})</td></tr>
<tr><td>business units</td><td>{e(", ".join(units))}</td></tr>
<tr><td>rounds completed</td><td>{report["federation"]["rounds_completed"]} of {report["job"]["rounds"]}</td></tr>
<tr><td>privacy target</td><td>epsilon &le; {report["job"]["epsilon"]} per BU at delta = {report["privacy"]["delta"]:g}, unit: {e(report["privacy"]["unit"])}</td></tr>
<tr><td>global AUC</td><td>{fmt(metrics["auc"])} (ceiling {fmt(metrics["auc_ceiling"])}); log-loss {fmt(metrics["log_loss"])}; Brier {fmt(metrics["brier"])}; evaluation: {e(report["model"]["evaluation"])}</td></tr>
</table>
<h2>Model quality per round</h2>{auc_chart}
<h2>Privacy spent per round</h2>{eps_chart}
<h2>Per business unit</h2>
<table><tr><th>unit</th><th>epsilon</th><th>noise multiplier</th><th>sample rate</th><th>steps</th><th>records used</th><th>excluded</th><th>columns used</th><th>columns dropped</th></tr>{rows}</table>
<h2>Guarantees</h2><ul>{guarantees}</ul>
<h2>Disclosed without differential privacy</h2><ul>{disclosed}</ul>
<h2>Out of scope</h2><ul>{out_of_scope}</ul>
<p><small>{e(report["privacy"]["mechanism"])}; accountant {e(report["privacy"]["accountant"])}; randomness: {e(report["privacy"]["randomness"])}. {e(report["model"]["evaluation_note"])}</small></p>
</body></html>
"""
