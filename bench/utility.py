"""Utility benchmarks on real data (issue #8, item 2): what federation and DP cost in accuracy.

Each data set is split into BUs non-IID (`bench.datasets`), and four kinds of model are trained on
the same BUs' training customers and features, and scored on the same held-out customers (silofed's
own keyed-hash split, `clients.pipeline`):

1. centralised: non-private logistic regression (scikit-learn's defaults) on the pooled training
   customers of all BUs, the ceiling;
2. local-only: each BU fits the same model on its own training customers alone;
3. federated, non-private: a plain FedAvg loop over silofed's own local SGD step
   (`clients.training.train_clipped_update`) with the job's Training defaults, no clipping and no
   noise, for the job's default number of rounds;
4. silofed: the in-process federation (`simulations.inprocess.run_in_process`) at epsilon 1, 3 and
   8 per BU with every other setting at silofed's defaults, nothing tuned.

Figures: AUC (binary tasks) or RMSE in the amount's units (`ltv`) over all held-out customers, and
the customer-weighted mean of each BU's figure on its own held-out customers (weights: its
held-out customers), over the same BUs for every model. Every model is one linear layer with a
sigmoid link on silofed's [0, 1] features (for `ltv` a fractional logistic regression on the
scaled spend, `federation.tasks`), kept as parameters in silofed's layout and scored through the
task's own `predict`. Silofed's DP runs are scored exactly on the held-out customers; the DP
estimate silofed itself releases is shown beside.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bench.datasets import (
    BANK,
    CDNOW,
    CHURN,
    SHOPPERS,
    DataSet,
    prepared_units,
    resolved_job,
    seeds,
    spread,
)
from bench.record import Benchmark, table
from clients.features import FeatureMatrix
from clients.pipeline import PreparedUnit
from clients.training import train_clipped_update
from federation.job import Job
from federation.models import initial_parameters, set_parameters
from federation.ranges import apply_ranges
from federation.tasks import TaskAdapter, adapter
from simulations.inprocess import run_in_process

EPSILONS = (1.0, 3.0, 8.0)
MAX_ITERATIONS = 2000  # scikit-learn's L-BFGS; its default 100 stops short on 40 features


def predictions(
    task: TaskAdapter, parameters: list[np.ndarray], features: np.ndarray
) -> np.ndarray:
    """The task's predictions (probabilities, or natural units) of the model `parameters`."""
    model = task.build_model(features.shape[1])
    set_parameters(model, parameters)
    return task.predict(model, features)


def metric(task: TaskAdapter, test: FeatureMatrix, predicted: np.ndarray) -> float | None:
    """AUC (binary) or RMSE in natural units (regression) on `test`; None where it is undefined
    (no customer, or a binary test set holding one class only)."""
    if not len(test.labels):
        return None
    labels = task.natural_labels(test.labels)
    if task.kind == "regression":
        return float(np.sqrt(np.mean((predicted - labels) ** 2)))
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, predicted))


def weighted_mean(values: list[float], weights: list[int]) -> float:
    """The mean of `values` weighted by `weights` (each BU's held-out customers)."""
    return float(np.average(np.asarray(values), weights=np.asarray(weights, dtype=np.float64)))


def fit_logistic(features: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Non-private logistic regression (scikit-learn's defaults: L2 with C = 1, L-BFGS) in
    silofed's parameter layout. A label in [0, 1] enters as two rows weighted y and 1 - y, whose
    loss is the task's cross-entropy: for 0/1 labels the ordinary fit, for the scaled spend the
    fractional one."""
    count = len(labels)
    stacked = np.vstack([features, features])
    outcome = np.concatenate([np.ones(count), np.zeros(count)])
    weight = np.concatenate([labels, 1.0 - labels]).astype(np.float64)
    model = LogisticRegression(max_iter=MAX_ITERATIONS).fit(stacked, outcome, sample_weight=weight)
    return [model.coef_.astype(np.float32), model.intercept_.astype(np.float32)]


def plain_fedavg(
    task: TaskAdapter, job: Job, trains: list[FeatureMatrix], seed: int
) -> list[np.ndarray]:
    """FedAvg without DP: every round each BU runs silofed's local SGD step from the global
    parameters (the job's Training, clipping norm infinite), and the coordinator averages the
    updates weighted by the BUs' training customers, as silofed's FedAvg weights them."""
    training = job.training.model_copy(update={"clip_norm": math.inf})
    parameters = initial_parameters(job.task, job.feature_spec.dim)
    taking_part = [(i, t) for i, t in enumerate(trains) if len(t.labels)]
    for server_round in range(1, job.rounds + 1):
        updates, weights = [], []
        for index, train in taking_part:
            generator = torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, server_round, index]).generate_state(1)[0])
            )
            update, _ = train_clipped_update(
                task.build_model(job.feature_spec.dim),
                parameters,
                train.features,
                train.labels,
                training,
                generator,
                loss=task.loss(),
            )
            updates.append(update)
            weights.append(len(train.labels))
        share = np.asarray(weights, dtype=np.float64) / sum(weights)
        parameters = [
            (p + sum(s * u[k] for s, u in zip(share, updates, strict=True))).astype(np.float32)
            for k, p in enumerate(parameters)
        ]
    return parameters


def scored_units(task: TaskAdapter, units: list[PreparedUnit]) -> tuple[list[int], dict[str, str]]:
    """The BUs every per-BU figure averages over (their indices), and why the others are left
    out: no eligible customer, no held-out customer, or (binary) one class only in the training
    or the held-out customers, where a local model or an AUC is undefined."""
    scored, skipped = [], {}
    for index, unit in enumerate(units):
        if not len(unit.train.labels) and not len(unit.test.labels):
            excluded = ", ".join(f"{k} {v}" for k, v in unit.excluded.items() if v)
            rule = " (the minors rule: no guardian's consent)" if unit.excluded.get("minor") else ""
            skipped[unit.unit] = f"no eligible customer; the pipeline excluded {excluded}{rule}"
        elif not len(unit.test.labels):
            skipped[unit.unit] = "no held-out customer"
        elif task.kind == "binary" and len(np.unique(unit.test.labels)) < 2:
            skipped[unit.unit] = "one class only among its held-out customers"
        elif task.kind == "binary" and len(np.unique(unit.train.labels)) < 2:
            skipped[unit.unit] = "one class only among its training customers"
        else:
            scored.append(index)
    return scored, skipped


def _pooled(matrices: list[FeatureMatrix]) -> FeatureMatrix:
    return FeatureMatrix(
        np.concatenate([m.customer_ids for m in matrices]),
        np.concatenate([m.features for m in matrices]),
        np.concatenate([m.labels for m in matrices]),
    )


def _global_figures(
    task: TaskAdapter, parameters: list[np.ndarray], units: list[PreparedUnit], scored: list[int]
) -> tuple[float, float]:
    """A global model's figure over all held-out customers, and its per-BU weighted mean."""
    test = _pooled([u.test for u in units])
    overall = metric(task, test, predictions(task, parameters, test.features))
    per_unit = [
        metric(task, units[i].test, predictions(task, parameters, units[i].test.features))
        for i in scored
    ]
    assert overall is not None and all(v is not None for v in per_unit)
    return overall, weighted_mean(per_unit, [len(units[i].test.labels) for i in scored])


def _in_windows(units: list[PreparedUnit], job: Job) -> list[PreparedUnit]:
    """The BUs' features rescaled to the feature windows of `job`'s ranges exchange."""
    spec = job.feature_spec
    return [
        replace(
            u,
            train=replace(u.train, features=apply_ranges(u.train.features, spec)),
            test=replace(u.test, features=apply_ranges(u.test.features, spec)),
        )
        for u in units
    ]


def _local_only(task: TaskAdapter, units: list[PreparedUnit], scored: list[int]) -> float:
    values = []
    for i in scored:
        parameters = fit_logistic(units[i].train.features, units[i].train.labels)
        values.append(
            metric(task, units[i].test, predictions(task, parameters, units[i].test.features))
        )
    return weighted_mean(values, [len(units[i].test.labels) for i in scored])


def _unit_facts(task: TaskAdapter, unit: PreparedUnit, display_name: str) -> dict[str, Any]:
    labels = task.natural_labels(np.concatenate([unit.train.labels, unit.test.labels]))
    return {
        "display_name": display_name,
        "train": len(unit.train.labels),
        "test": len(unit.test.labels),
        "label_mean": float(labels.mean()) if len(labels) else None,
        "excluded": {k: v for k, v in unit.excluded.items() if v},
    }


def _silofed_runs(
    dataset: DataSet,
    bu_configs: list[Path],
    work: Path,
    task: TaskAdapter,
    units: list[PreparedUnit],
    scored: list[int],
    chosen: tuple[int, ...],
) -> dict[str, Any]:
    """Silofed's DP federation at each epsilon and seed, scored exactly on the held-out
    customers: figures per epsilon, with each BU's epsilon spent (largest over the seeds)."""
    name = task.metrics[0]
    out: dict[str, Any] = {}
    for epsilon in EPSILONS:
        overall, per_unit, reported = [], [], []
        spent: dict[str, float] = {}
        refused: dict[str, str] = {}
        for seed in chosen:
            homes = Path(tempfile.mkdtemp(prefix=f"dp-{epsilon:g}-{seed}-", dir=work))
            run = run_in_process(
                Job(task=dataset.task, epsilon=epsilon), bu_configs, homes, seed=seed
            )
            # the model was trained on the features rescaled to the run's DP windows
            figures = _global_figures(task, run.parameters, _in_windows(units, run.job), scored)
            overall.append(figures[0])
            per_unit.append(figures[1])
            assert run.record.evaluation is not None
            reported.append(float(run.record.evaluation[name]))
            for unit, report in run.record.unit_reports.items():
                spent[unit] = max(spent.get(unit, 0.0), float(report.epsilon))
            refused |= run.record.refused
        out[f"{epsilon:g}"] = {
            "all": spread(overall),
            "per_unit": spread(per_unit),
            "reported": spread(reported),
            "epsilon_spent": dict(sorted(spent.items())),
            "refused": refused,
        }
    return out


def utility(dataset: DataSet, quick: bool) -> dict[str, Any]:
    """The figures of one data set (module docstring)."""
    chosen = seeds(quick)
    with tempfile.TemporaryDirectory(prefix="silofed-bench-utility-") as directory:
        work = Path(directory)
        split, bu_configs = dataset.write_silos(work / "silos")
        job = resolved_job(Job(task=dataset.task), bu_configs)
        task = adapter(job.task, job.feature_spec)
        units = prepared_units(job, bu_configs, work / "homes")
        scored, skipped = scored_units(task, units)
        train = _pooled([u.train for u in units])
        centralised = _global_figures(
            task, fit_logistic(train.features, train.labels), units, scored
        )
        federated = [
            _global_figures(
                task, plain_fedavg(task, job, [u.train for u in units], s), units, scored
            )
            for s in chosen
        ]
        dp = _silofed_runs(dataset, bu_configs, work, task, units, scored, chosen)
    return {
        "data": dataset.title,
        "split_by": dataset.split_by,
        "task": job.task.value,
        "metric": task.metrics[0],
        "privacy_unit": split.privacy_unit,
        "defaults": {
            "rounds": job.rounds,
            "delta": job.delta,
            "training": job.training.model_dump(),
            "evaluation": job.evaluation.mode,
        },
        "units": {
            u.unit: _unit_facts(task, u, s.display_name)
            for u, s in zip(units, split.units, strict=True)
        },
        "scored_units": [units[i].unit for i in scored],
        "skipped_units": skipped,
        "centralised": {"all": centralised[0], "per_unit": centralised[1]},
        "local_only": {"per_unit": _local_only(task, units, scored)},
        "federated": {
            "all": spread([f[0] for f in federated]),
            "per_unit": spread([f[1] for f in federated]),
        },
        "dp": dp,
        "seeds": list(chosen),
    }


# --- rendering -----------------------------------------------------------------------------------


def _value(figure: dict[str, Any] | float | None) -> str:
    """A figure, with its range over the seeds when there were several."""
    if figure is None:
        return "-"
    if isinstance(figure, float):
        return f"{figure:.4f}"
    if len(figure["runs"]) == 1:
        return f"{figure['mean']:.4f}"
    return f"{figure['mean']:.4f} ({figure['min']:.4f}-{figure['max']:.4f})"


def _gaps(figures: dict[str, Any]) -> list[str]:
    """The comparisons issue #8 sets targets for, as signed differences of the means."""
    central = figures["centralised"]["all"]
    lines = []
    for epsilon in ("1", "3"):
        if epsilon in figures["dp"]:
            gap = figures["dp"][epsilon]["all"]["mean"] - central
            lines.append(f"DP epsilon={epsilon} minus centralised: {gap:+.4f}")
    if "3" in figures["dp"]:
        gap = figures["dp"]["3"]["per_unit"]["mean"] - figures["local_only"]["per_unit"]
        lines.append(f"DP epsilon=3 per-BU weighted minus local-only: {gap:+.4f}")
    direction = "higher" if figures["metric"] == "auc" else "lower"
    return [
        f"Differences of means ({figures['metric'].upper()}, {direction} is better): "
        + "; ".join(lines)
        + "."
    ]


def markdown(figures: dict[str, Any]) -> str:
    """The data set's section of docs/benchmarks.md."""
    name = figures["metric"].upper()
    model = "logistic regression" if name == "AUC" else "fractional logistic regression"
    units = figures["units"]
    defaults = figures["defaults"]
    training = ", ".join(f"{k} {v:g}" for k, v in defaults["training"].items())
    runs = len(figures["federated"]["all"]["runs"])
    lines = [
        f"{figures['data']} split by {figures['split_by']} into {len(units)} BUs; task "
        f"`{figures['task']}`; privacy unit: {figures['privacy_unit']}. Training customers "
        f"{sum(u['train'] for u in units.values()):,}, held-out customers "
        f"{sum(u['test'] for u in units.values()):,} (silofed's keyed-hash split). Silofed's "
        f"defaults, untuned: {defaults['rounds']} rounds, delta {defaults['delta']:g}, "
        f"{training}. Over {runs} seed(s): mean (min-max).",
        "",
    ]
    rows: list[list[Any]] = [
        [
            f"centralised {model} (pooled, non-private)",
            _value(figures["centralised"]["all"]),
            _value(figures["centralised"]["per_unit"]),
            "-",
            "-",
        ],
        [
            "local-only (each BU alone, non-private)",
            "-",
            _value(figures["local_only"]["per_unit"]),
            "-",
            "-",
        ],
        [
            "FedAvg (non-private, same rounds and local step)",
            _value(figures["federated"]["all"]),
            _value(figures["federated"]["per_unit"]),
            "-",
            "-",
        ],
    ]
    for epsilon, dp in figures["dp"].items():
        spent = max(dp["epsilon_spent"].values(), default=0.0)
        rows.append(
            [
                f"silofed DP, epsilon={epsilon} per BU",
                _value(dp["all"]),
                _value(dp["per_unit"]),
                _value(dp["reported"]),
                f"{spent:.3f}",
            ]
        )
    header = [
        "model",
        f"{name}, all held-out customers",
        f"{name}, per-BU weighted mean",
        f"silofed's own DP estimate of {name}",
        "epsilon spent (largest BU)",
    ]
    lines += [table(header, rows), "", *_gaps(figures), ""]
    lines.append(
        f"Per-BU figures average over {len(figures['scored_units'])} of {len(units)} BUs, "
        "weighted by their held-out customers."
    )
    for unit, reason in figures["skipped_units"].items():
        lines.append(f"- `{unit}` ({units[unit]['display_name']}) left out: {reason}.")
    refused = sorted({u for dp in figures["dp"].values() for u in dp["refused"]})
    if refused:
        lines.append(
            f"- Refused silofed's DP runs (no eligible customer, so no part in them): "
            f"{', '.join(f'`{u}`' for u in refused)}."
        )
    label = "positive rate" if figures["metric"] == "auc" else "mean label"
    unit_rows = [
        [
            unit,
            facts["display_name"],
            facts["train"],
            facts["test"],
            facts["label_mean"],
            ", ".join(f"{k} {v}" for k, v in facts["excluded"].items()) or "-",
        ]
        for unit, facts in units.items()
    ]
    lines += [
        "",
        table(["BU", "split value", "training", "held-out", label, "excluded"], unit_rows),
    ]
    return "\n".join(lines)


def _benchmark(dataset: DataSet) -> Benchmark:
    return Benchmark(
        name=f"utility-{dataset.name}",
        title=f"Utility on {dataset.title}, split by {dataset.split_by.split(' (')[0]}",
        run=lambda quick: utility(dataset, quick),
        markdown=markdown,
    )


BENCHMARKS = [_benchmark(d) for d in (BANK, SHOPPERS, CHURN, CDNOW)]
