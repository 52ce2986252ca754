"""How silofed's training defaults were chosen (issue #8, item 4): on validation customers only.

The utility benchmarks score every model on the BUs' held-out customers, which silofed chooses by
a keyed hash of the customer id below `holdout_fraction` (`clients.pipeline.held_out`). The hash
is the same whatever the fraction, so raising the fraction from 0.2 to `TUNING_FRACTION` holds out
the same test customers plus a validation set taken from the training customers only. Every
candidate setting here trains on the remaining customers and is scored on the validation
customers, never on a test customer; the setting with the smallest mean AUC gap to the
centralised logistic regression (fitted on the same training customers) over the data sets and
epsilons becomes the default of `federation.job.Training`, and the utility benchmarks then report
it on the test customers.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.datasets import BANK, CHURN, SHOPPERS, DataSet, prepared_units, resolved_job
from bench.record import Benchmark, table
from bench.utility import (
    _global_figures,
    _in_windows,
    _pooled,
    fit_logistic,
    scored_units,
)
from clients.features import FeatureMatrix
from clients.pipeline import PreparedUnit
from federation.job import Evaluation, Job, Training
from federation.tasks import adapter
from simulations.inprocess import run_in_process

TEST_FRACTION = Evaluation.model_fields["holdout_fraction"].default
TUNING_FRACTION = 0.4  # the test customers plus a quarter of the training customers
CANDIDATES: tuple[dict[str, Any], ...] = (
    {"local_epochs": 1, "learning_rate": 2.0},
    {"local_epochs": 2, "learning_rate": 2.0},
    {"local_epochs": 3, "learning_rate": 2.0},
    {"local_epochs": 2, "learning_rate": 1.0},
    {"local_epochs": 3, "learning_rate": 1.0},
)
EPSILONS = (1.0, 3.0)
SEEDS = (1, 2)


def _validation_only(tuning: list[PreparedUnit], final: list[PreparedUnit]) -> list[PreparedUnit]:
    """The BUs with their held-out customers cut down to the validation ones: held out at the
    tuning fraction, not at the test fraction (pseudonyms match: the same homes prepared both)."""
    out = []
    for unit, test_unit in zip(tuning, final, strict=True):
        keep = ~np.isin(unit.test.customer_ids, test_unit.test.customer_ids)
        validation = FeatureMatrix(
            unit.test.customer_ids[keep], unit.test.features[keep], unit.test.labels[keep]
        )
        out.append(replace(unit, test=validation))
    return out


def tune(dataset: DataSet, candidates: tuple[dict[str, Any], ...], seeds: tuple[int, ...]):
    """Each candidate's validation AUC per epsilon (mean over `seeds`), and the centralised one."""
    evaluation = {"holdout_fraction": TUNING_FRACTION}
    with tempfile.TemporaryDirectory(prefix="silofed-bench-tuning-") as directory:
        work = Path(directory)
        _, bu_configs = dataset.write_silos(work / "silos")
        job = resolved_job(Job(task=dataset.task, evaluation=evaluation), bu_configs)
        task = adapter(job.task, job.feature_spec)
        tuning = prepared_units(job, bu_configs, work / "homes")
        final = prepared_units(
            resolved_job(Job(task=dataset.task), bu_configs), bu_configs, work / "homes"
        )
        units = _validation_only(tuning, final)
        scored, _ = scored_units(task, units)
        train = _pooled([u.train for u in units])
        centralised = _global_figures(
            task, fit_logistic(train.features, train.labels), units, scored
        )[0]
        results = []
        for candidate in candidates:
            figures: dict[str, float] = {}
            for epsilon in EPSILONS:
                values = []
                for seed in seeds:
                    homes = Path(tempfile.mkdtemp(prefix="run-", dir=work))
                    run = run_in_process(
                        Job(
                            task=dataset.task,
                            epsilon=epsilon,
                            evaluation=evaluation,
                            training=Training(**candidate),
                        ),
                        bu_configs,
                        homes,
                        seed=seed,
                    )
                    windowed = _in_windows(units, run.job)
                    values.append(_global_figures(task, run.parameters, windowed, scored)[0])
                figures[f"{epsilon:g}"] = statistics.fmean(values)
            results.append({"setting": candidate, "auc": figures})
    return {"centralised": centralised, "candidates": results}


def run_tuning(quick: bool) -> dict[str, Any]:
    datasets = (BANK,) if quick else (BANK, SHOPPERS, CHURN)
    candidates = CANDIDATES[:2] if quick else CANDIDATES
    seeds = SEEDS[:1] if quick else SEEDS
    per_dataset = {d.name: tune(d, candidates, seeds) for d in datasets}
    gaps = []
    for index, candidate in enumerate(candidates):
        gap = statistics.fmean(
            figures["centralised"] - figures["candidates"][index]["auc"][f"{e:g}"]
            for figures in per_dataset.values()
            for e in EPSILONS
        )
        gaps.append({"setting": candidate, "mean_gap": gap})
    best = min(gaps, key=lambda g: g["mean_gap"])
    return {
        "test_fraction": TEST_FRACTION,
        "tuning_fraction": TUNING_FRACTION,
        "epsilons": list(EPSILONS),
        "datasets": per_dataset,
        "gaps": gaps,
        "chosen": best["setting"],
        "defaults": Training().model_dump(),
        "seeds": list(seeds),
    }


def markdown(figures: dict[str, Any]) -> str:
    datasets = list(figures["datasets"])
    header = [
        "setting",
        *(f"{d} eps {e:g}" for d in datasets for e in figures["epsilons"]),
        "mean gap",
    ]
    rows = []
    for index, gap in enumerate(figures["gaps"]):
        setting = ", ".join(f"{k} {v:g}" for k, v in gap["setting"].items())
        rows.append(
            [
                setting,
                *(
                    f"{figures['datasets'][d]['candidates'][index]['auc'][f'{e:g}']:.4f}"
                    for d in datasets
                    for e in figures["epsilons"]
                ),
                f"{gap['mean_gap']:.4f}",
            ]
        )
    rows.append(
        [
            "centralised (non-private)",
            *(
                f"{figures['datasets'][d]['centralised']:.4f}"
                for d in datasets
                for _ in figures["epsilons"]
            ),
            "",
        ]
    )
    chosen = ", ".join(f"{k} {v:g}" for k, v in figures["chosen"].items())
    defaults = figures["defaults"]
    agrees = all(defaults.get(k) == v for k, v in figures["chosen"].items())
    return "\n".join(
        [
            "Validation AUC (over all validation customers; mean over the seeds) of silofed's DP "
            "federation with each candidate training setting, everything else at its default. "
            f"Validation customers are held out at fraction {figures['tuning_fraction']:g} but "
            f"not at the test fraction {figures['test_fraction']:g}: no test customer trains or "
            "scores here (`bench/tuning.py`).",
            "",
            table(header, rows),
            "",
            f"Smallest mean gap to the centralised model: **{chosen}**; silofed's defaults "
            + ("are this setting." if agrees else f"differ ({defaults})."),
        ]
    )


BENCHMARKS = [
    Benchmark(
        name="tuning",
        title="How the training defaults were chosen (validation customers only)",
        run=run_tuning,
        markdown=markdown,
        # about 8 minutes: outside `make bench`'s 30; its figures stay in docs/benchmarks.*
        default=False,
    )
]
