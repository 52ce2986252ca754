"""The `silofed` command.

Exit codes: 0 done; 1 run failed; 2 bad usage or configuration; 3 refused by a BU (consent, budget).
Heavy modules (torch, Flower, Ray) are imported inside the commands so that `silofed --help` is fast.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from privacy.errors import SilofedError

EXIT_CODES = """Exit codes: 0 done; 1 run failed; 2 bad usage or configuration; 3 refused by a BU
(consent or budget)."""

app = typer.Typer(
    name="silofed",
    help="Privacy-preserving federated customer analytics across business-unit silos.\n\n"
    + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Create and inspect silo data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
# A pipe or a CI log has no width; 120 columns keep the summary table readable there.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True)

BuConfig = Annotated[Path, typer.Option("--bu-config", help="the BU's bu.toml")]
HomeOption = Annotated[
    Path | None, typer.Option("--home", help="the BU's home (default: `home` in bu.toml)")
]


TASKS = ("churn", "response", "ltv", "segments")
BUILT_IN_SEGMENTS = 4  # k of `--task segments`: the classic RFM quadrants and one more


def _job_from_options(
    job_file: Path | None,
    task: str | None,
    overrides: dict,
):
    """The job of `silofed simulate`: a job file, or a built-in job (`--task`) with the command
    line's settings. A job file holds every setting; the options only complete built-in jobs."""
    from federation.job import Job, JobKind, load_job_file

    given = {k: v for k, v in overrides.items() if v is not None}
    if job_file is not None:
        if task is not None or given:
            flags = ", ".join(
                f"--{k.replace('_', '-')}" for k in ([*given] + (["task"] if task else []))
            )
            raise typer.BadParameter(
                f"{flags} cannot be combined with --job {job_file}: set them in the job file"
            )
        return Job.parse(load_job_file(job_file), source=str(job_file))
    data: dict = {}
    if task == "segments":
        data["kind"] = JobKind.SEGMENTS.value
        data["segments"] = {"k": BUILT_IN_SEGMENTS}
        if "rounds" in given:
            data["segments"]["iterations"] = given.pop("rounds")
    elif task is not None:
        if task not in TASKS:
            raise typer.BadParameter(f"--task must be one of {', '.join(TASKS)}, not '{task}'")
        data["task"] = task
    secure = given.pop("secure_aggregation", False)
    data.update(given)
    data["secure_aggregation"] = {"enabled": bool(secure)}
    return Job.parse(data, source="command line")


@app.command(epilog=EXIT_CODES)
def simulate(
    job_file: Annotated[
        Path | None,
        typer.Option(
            "--job", help="a job file (TOML): a model, query or segments job; see docs/jobs.md"
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="a built-in job: churn (default), response, ltv or segments"),
    ] = None,
    units: Annotated[
        int | None, typer.Option(help="number of synthetic BUs (default 5); must match --data")
    ] = None,
    customers: Annotated[int, typer.Option(help="customers per synthetic BU, on average")] = 3000,
    rounds: Annotated[
        int | None,
        typer.Option(help="federated rounds (k-means iterations for segments); default 5"),
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="per-BU epsilon target for this run (default 3)")
    ] = None,
    delta: Annotated[
        float | None, typer.Option(help="delta, the same for every BU (default 1e-6)")
    ] = None,
    seed: Annotated[
        int, typer.Option(help="simulation seed (data, sampling and noise); never in a job file")
    ] = 0,
    data: Annotated[
        Path | None,
        typer.Option(help="existing silos (one directory per BU) instead of generated ones"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="the run directory (default runs/<run-id>)")
    ] = None,
    homes: Annotated[
        Path | None,
        typer.Option(
            help="persistent BU homes (consent registry, lineage, keys); default: fresh per run"
        ),
    ] = None,
    encrypt_at_rest: Annotated[
        bool, typer.Option("--encrypt-at-rest", help="store the generated silos AES-GCM encrypted")
    ] = False,
    secure_aggregation: Annotated[
        bool | None,
        typer.Option(
            "--secure-aggregation", help="Flower SecAgg+: the coordinator sees only sums (>= 3 BUs)"
        ),
    ] = None,
    noise: Annotated[
        str | None,
        typer.Option(
            help="noise placement: local (default; noise in each BU), central or distributed (both need --secure-aggregation)"
        ),
    ] = None,
    evaluation: Annotated[
        str | None,
        typer.Option(
            help="model evaluation: dp (default; DP score histograms) or exact (not DP, development only)"
        ),
    ] = None,
    aggregation: Annotated[
        str | None,
        typer.Option(
            help="how updates are combined: mean (default, FedAvg), trimmed-mean, median or krum"
        ),
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="inject a fault KIND:BU:ROUND (repeatable; BU by name or 0-based index); kinds: "
            "crash, timeout, nan, shape, dtype, inflated-weight, sign-flip, scaled"
        ),
    ] = None,
    round_timeout: Annotated[
        float,
        typer.Option(help="seconds each exchange waits for the BUs' replies", min=1.0),
    ] = 1800.0,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Ray workers, one core each (default: one per core, at most one per BU); each "
            "worker prepares every BU it serves, so large silos may run faster on fewer",
            min=1,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="go on with a killed simulation (RUN_DIR: its --out) after its last checkpointed "
            "round; every other option comes from that run",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
) -> None:
    """Run a job over simulated BUs on this machine: a federated, differentially private model
    (churn, response, ltv), a DP analytics query, or a k-means segmentation."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from federation.exchanges import exchange_rounds
    from server.artefacts import new_run_id
    from simulations.runner import SimulationSettings, resumable
    from simulations.runner import resume as resume_simulation
    from simulations.runner import simulate as run_simulation

    if resume is not None:
        from server.checkpoint import load_checkpoint

        given = {
            "--job": job_file,
            "--task": task,
            "--units": units,
            "--rounds": rounds,
            "--epsilon": epsilon,
            "--delta": delta,
            "--data": data,
            "--out": out,
            "--homes": homes,
            "--noise": noise,
            "--evaluation": evaluation,
            "--aggregation": aggregation,
            "--fault": fault,
        }
        clashing = [flag for flag, value in given.items() if value]
        if clashing:
            raise typer.BadParameter(
                f"{', '.join(clashing)} cannot be combined with --resume {resume}: a resumed "
                "run keeps the settings it started with"
            )

        checkpoint = load_checkpoint(resumable(resume))
        total, done = exchange_rounds(checkpoint.job), checkpoint.server_round
    job = _job_from_options(
        job_file,
        task,
        {
            "rounds": rounds,
            "epsilon": epsilon,
            "delta": delta,
            "secure_aggregation": secure_aggregation,
            "noise": noise,
            "evaluation": {"mode": evaluation} if evaluation is not None else None,
            "aggregation": {"rule": aggregation} if aggregation is not None else None,
        },
    )
    settings = SimulationSettings(
        out=out or Path("runs") / new_run_id(),
        units=units,
        customers=customers,
        data=data,
        seed=seed,
        homes=homes,
        encrypt_at_rest=encrypt_at_rest,
        faults=tuple(fault or ()),
        round_timeout=round_timeout,
        workers=workers,
        overwrite=overwrite,
        verbose=verbose,
    )
    with Progress(
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        if resume is None:
            total, done = exchange_rounds(job), 0
        bar = progress.add_task("starting the Simulation Engine ...", total=total, completed=done)

        def on_round(summary) -> None:
            worst = max(summary.epsilon.values(), default=0.0)
            shown = "  ".join(
                f"{name} {summary.metrics[name]:.4f}"
                for name in ("auc", "rmse")
                if name in summary.metrics
            )
            progress.update(bar, advance=1, description=f"{shown}  max epsilon {worst:.3f}".strip())

        if resume is not None:
            result = resume_simulation(resume, on_round=on_round)
        else:
            result = run_simulation(settings, job, on_round=on_round)
    _print_summary(result.report, result.out)


def _print_summary(report: dict, out: Path) -> None:
    job = report["job"]
    kind = job.get("kind", "model")
    title = job["task"] if kind == "model" else job["purpose"]
    table = Table(
        title=f"silofed run {report['run_id']}  ({kind}: {title}, purpose {job['purpose']})"
    )
    # A model job shows its DP-SGD figures; a query or k-means job its releases and their z.
    columns = (
        ("epsilon", "noise mult.", "sample rate", "steps", "records used")
        if kind == "model"
        else ("epsilon", "z", "releases", "records used")
    )
    table.add_column("unit", no_wrap=True)
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("excluded")
    shown = report["federation"].get("display_names", {})

    def name(unit: str) -> str:
        display = shown.get(unit, unit)
        return unit if display == unit else f"{display} ({unit})"

    for unit in report["privacy"]["per_unit"]:
        if unit["refused"]:
            table.add_row(
                name(unit["unit"]), "refused", *[""] * (len(columns) - 1), unit["refusal"]
            )
            continue
        figures = (
            (f"{unit['noise_multiplier']:.3f}", f"{unit['sample_rate']:.4f}", str(unit["steps"]))
            if kind == "model"
            else (f"{unit['noise_multiplier']:.3f}", str(unit.get("releases", "")))
        )
        table.add_row(
            name(unit["unit"]),
            f"{unit['epsilon']:.3f}",
            *figures,
            str(unit["records_used"]),
            ", ".join(f"{k} {v}" for k, v in unit["excluded"].items()),
        )
    console.print(table)
    model = report.get("model")
    if model is not None and model["type"] != "k_means":
        metrics = model["metrics"]

        def interval(name: str) -> str:
            bounds = metrics.get(f"{name}_interval")
            return f" [{bounds[0]:.4g}, {bounds[1]:.4g}]" if bounds else ""

        if metrics.get("rmse") is not None:
            console.print(
                f"global RMSE [bold]{metrics['rmse']:.4g}[/bold]{interval('rmse')}"
                f"  MAE {metrics['mae']:.4g}{interval('mae')}"
                f"  on {metrics['test_customers']} held-out customers ({model['evaluation']})"
            )
        elif metrics.get("auc") is not None:
            ceiling = metrics["auc_ceiling"]
            console.print(
                f"global AUC [bold]{metrics['auc']:.4f}[/bold]{interval('auc')}"
                + (f" (ceiling {ceiling:.4f})" if ceiling else "")
                + (
                    f"  log-loss {metrics['log_loss']:.4f}"
                    if metrics.get("log_loss") is not None
                    else ""
                )
                + (f"  Brier {metrics['brier']:.4f}" if metrics.get("brier") is not None else "")
                + f"  on {metrics['test_customers']} held-out customers ({model['evaluation']})"
            )
        if model["evaluation"] == "dp":
            console.print("  (intervals: 95%, for the evaluation's noise)")
    results = report.get("results") or {}
    from rich.markup import escape

    for answer in results.get("answers", [])[:40]:
        group = ", ".join(f"{k}={v}" for k, v in (answer.get("group") or {}).items())
        label = escape(f"{answer['name']}{' (' + group + ')' if group else ''}: ")
        if answer["value"] is None:  # a ratio whose noisy denominator is not positive
            console.print(label + escape(f"no value ({answer.get('note', '')})"), highlight=False)
            continue
        low, high = answer["interval"]
        console.print(
            label + f"[bold]{answer['value']:.4g}[/bold]  95% [{low:.4g}, {high:.4g}]",
            highlight=False,
        )
    if len(results.get("answers", [])) > 40:
        console.print(f"... {len(results['answers']) - 40} more answers in results.json")
    units = results.get("natural_units", {})
    for segment in results.get("segments", []):
        centroid = segment.get("centroid_natural") or segment["centroid"]
        low, high = segment["size_interval"]
        console.print(
            f"segment {segment['segment']}: {segment['size']} customers (95% [{low}, {high}]); "
            + ", ".join(
                escape(f"{k} {v:.3g}{' ' + units[k] if k in units else ''}")
                for k, v in centroid.items()
            ),
            highlight=False,
        )
    console.print(
        f"privacy: every BU epsilon <= {job['epsilon']} at delta {report['privacy']['delta']:g}"
        f" (max {max((u['epsilon'] for u in report['privacy']['per_unit']), default=0):.3f})"
    )
    console.print(f"run directory: {out}  (report.html, report.json, results.json, job.json, ...)")


@app.command(epilog=EXIT_CODES)
def preview(
    job_file: Annotated[Path, typer.Argument(help="the job file (TOML)")],
    data: Annotated[
        Path | None,
        typer.Option(help="the BUs' silos (their bu.toml files only are read); default: synthetic"),
    ] = None,
    units: Annotated[int, typer.Option(help="synthetic BUs to preview against")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="print the preview as JSON")] = False,
) -> None:
    """Print, without reading data or spending budget, the expected error of every answer and the
    privacy cost per BU."""
    import json

    from federation.job import Job, load_job_file
    from federation.preview import preview as build_preview
    from privacy.unit_config import UnitConfig

    job = Job.parse(load_job_file(job_file), source=str(job_file))
    if data is not None:
        from simulations.runner import silo_configs

        configs = [UnitConfig.load(path) for path in silo_configs(data)]
    else:
        from simulations.synthetic import unit_names, unit_schema

        configs = [unit_schema(name) for name in unit_names(units)]
    result = build_preview(job, configs)
    if json_out:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    cost = Table(
        title=f"privacy cost per BU ({result.job.kind.value} job, purpose {result.job.purpose})"
    )
    for column in ("unit", "epsilon", "delta"):
        cost.add_column(column)
    for line in result.cost:
        cost.add_row(line["unit"], f"{line['epsilon']:g}", f"{line['delta']:g}")
    console.print(cost)
    noise = Table(title="noise of each release (grid units)")
    for column in (
        "release",
        "times",
        "z",
        "part",
        "sensitivity",
        "sigma per BU",
        "std in sum",
        "95% +-",
    ):
        noise.add_column(column, justify="left" if column in ("release", "part") else "right")
    for release in result.releases:
        for part in release.parts:
            noise.add_row(
                release.phase,
                str(release.rounds),
                "exact" if release.multiplier is None else f"{release.multiplier:.3f}",
                part["part"],
                f"{part['sensitivity']:g}",
                f"{part['sigma_per_unit']:.2f}",
                f"{part['std_in_sum']:.2f}",
                str(part["half_width_95"]),
            )
    console.print(noise)
    if result.answers:
        answers = Table(title="expected error of every answer (95% interval half-width)")
        keys = [k for k in result.answers[0] if k not in ("group",)]
        answers.add_column("group")
        for key in keys:
            answers.add_column(key)
        for row in result.answers:
            answers.add_row(
                ", ".join(f"{k}={v}" for k, v in (row.get("group") or {}).items()),
                *(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys),
            )
        console.print(answers)
    for note in result.notes:
        console.print(note)
    console.print("nothing was read and nothing was spent")


@app.command(epilog=EXIT_CODES)
def score(
    run: Annotated[Path, typer.Argument(help="a run directory (of a model or segments job)")],
    data: Annotated[
        Path,
        typer.Option(help="this BU's silo directory (with its bu.toml), or its bu.toml"),
    ],
    out: Annotated[Path, typer.Option(help="the scores file to write (.csv or .parquet)")],
    home: HomeOption = None,
) -> None:
    """Score this BU's customers with a run's model, inside the BU: one row per consented customer
    (pseudonymised), e.g. this week's churn-risk list. Nothing leaves the BU."""
    from clients.scoring import score_unit
    from privacy.unit_config import UNIT_CONFIG_FILE

    bu_config = data / UNIT_CONFIG_FILE if data.is_dir() else data
    result = score_unit(run, bu_config, out, home=home)
    console.print(
        f"wrote {result.customers} {result.column}s to {result.out} "
        f"({result.held_out} of them held out in the run); excluded: "
        + ", ".join(f"{k} {v}" for k, v in result.excluded.items())
    )


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="directory to write the silos into")],
    units: Annotated[int, typer.Option(help="number of BUs")] = 5,
    customers: Annotated[int, typer.Option(help="customers per BU, on average")] = 3000,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    overlap: Annotated[
        float, typer.Option(help="share of each BU's customers who are also customers of other BUs")
    ] = 0.2,
    csv: Annotated[bool, typer.Option("--csv", help="write CSV instead of Parquet")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Write synthetic BU silos (customers, transactions, consent, schema) with a known ground truth."""
    from simulations.synthetic import synthesize

    result = synthesize(
        out,
        units=units,
        customers=customers,
        seed=seed,
        overlap=overlap,
        file_format="csv" if csv else "parquet",
        overwrite=overwrite,
    )
    console.print(
        f"wrote {len(result.units)} silos to {result.directory}: {', '.join(result.units)}"
    )
    console.print(
        "churn base rates: " + ", ".join(f"{u} {r:.3f}" for u, r in result.base_rates.items())
    )
    console.print(
        f"AUC ceiling of the true model on the held-out customers: {result.auc_ceiling:.4f}"
    )


@data_app.command("split")
def data_split(
    table: Annotated[
        Path,
        typer.Argument(
            help="one customer table (CSV or Parquet), or with --transactions one row per purchase"
        ),
    ],
    by: Annotated[
        str,
        typer.Option(
            help="the column whose values become the BUs; with --transactions also "
            "'acquisition_month' (the month of each customer's first purchase)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="directory to write the silos into")],
    label: Annotated[
        str | None, typer.Option(help="the label column: one yes/no per customer")
    ] = None,
    positive: Annotated[
        str | None, typer.Option(help="the label's value that counts as yes (e.g. 'yes')")
    ] = None,
    id: Annotated[
        str | None,
        typer.Option(
            "--id", help="the customer id column; without it each row is its own customer"
        ),
    ] = None,
    drop: Annotated[
        list[str] | None, typer.Option(help="leave a column out (repeatable), e.g. a leaky one")
    ] = None,
    sep: Annotated[
        str | None,
        typer.Option(help="field separator (default: detected; 'whitespace' for runs of blanks)"),
    ] = None,
    min_customers: Annotated[
        int, typer.Option(help="values of --by with fewer customers are merged into 'other'")
    ] = 50,
    transactions: Annotated[
        bool,
        typer.Option(
            "--transactions",
            help="TABLE holds purchases (needs --id, --timestamp, --amount); writes customers "
            "and transactions for the ltv task",
        ),
    ] = False,
    timestamp: Annotated[
        str | None, typer.Option(help="with --transactions: the purchase date column")
    ] = None,
    amount: Annotated[
        str | None, typer.Option(help="with --transactions: the purchase amount column")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
) -> None:
    """Turn one table of your own into BU silos, one per value of --by, each with its bu.toml
    (schema, purposes) and a consent export granting those purposes; review the bu.toml files."""
    from datetime import UTC, datetime

    from simulations.split import SplitRequest, split_table

    result = split_table(
        SplitRequest(
            table=table,
            by=by,
            out=out,
            label=label,
            positive=positive,
            id=id,
            drop=tuple(drop or ()),
            sep=sep,
            min_customers=min_customers,
            transactions=transactions,
            timestamp=timestamp,
            amount=amount,
            overwrite=overwrite,
        ),
        now=datetime.now(UTC),
    )
    summary = Table(title=f"{len(result.units)} silos in {result.directory}")
    for column in ("unit", by, "customers", "rows"):
        summary.add_column(column, justify="right" if column in ("customers", "rows") else "left")
    for unit in result.units:
        summary.add_row(unit.name, unit.display_name, str(unit.customers), str(unit.rows))
    console.print(summary)
    record = result.privacy_unit == "record"
    console.print(
        f"privacy unit: {result.privacy_unit}"
        + ("  (no --id: each row counts as its own customer)" if record else "")
    )
    console.print(
        f"purposes declared and granted in each consent export: {', '.join(result.purposes)}"
    )
    if result.proposed_special:
        console.print(
            "proposed as sensitive by their names (kept out of every purpose; confirm in each "
            "bu.toml): " + ", ".join(f"{c} ({t})" for c, t in result.proposed_special.items())
        )
    for note in result.notes:
        console.print(f"note: {note}")


consent_app = typer.Typer(help="A BU's consent registry.", no_args_is_help=True)
keys_app = typer.Typer(help="A BU's keys: encryption at rest and rotation.", no_args_is_help=True)
app.add_typer(consent_app, name="consent")
app.add_typer(keys_app, name="keys")


@data_app.command("to-sqlite")
def data_to_sqlite(
    silo: Annotated[Path, typer.Argument(help="a silo directory (its bu.toml and files)")],
    database: Annotated[Path, typer.Argument(help="the SQLite file to create")],
) -> None:
    """Copy a file silo into a new SQLite database, beside a bu.toml that reads it (one
    read-only query per table): to try an SQL silo."""
    from simulations.sql import to_sqlite

    bu_config = to_sqlite(silo, database)
    console.print(f"wrote {database} and {bu_config}")


def _unit(bu_config: Path, home: Path | None):
    from privacy.home import UnitHome
    from privacy.unit_config import UnitConfig

    config = UnitConfig.load(bu_config)
    return config, UnitHome.of(config, home)


@consent_app.command("import")
def consent_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="consent events (CSV or Parquet): customer_id, purpose, granted, timestamp[, guardian]"
        ),
    ],
    bu_config: BuConfig,
    home: HomeOption = None,
) -> None:
    """Import consent events into the BU's registry (erased customers are never brought back)."""
    from clients.steward import import_consent

    _, unit_home = _unit(bu_config, home)
    result = import_consent(unit_home, file)
    console.print(
        f"imported {result.imported} event(s); {result.duplicates} already present; "
        f"{result.erased} of erased customers skipped"
    )


@keys_app.command("encrypt")
def keys_encrypt(bu_config: BuConfig, home: HomeOption = None) -> None:
    """Encrypt the BU's silo files at rest (AES-GCM, a fresh data key per file) and mark it so."""
    from clients.steward import encrypt_silo

    _, unit_home = _unit(bu_config, home)
    for path in encrypt_silo(bu_config, unit_home):
        console.print(f"encrypted {path}")


@keys_app.command("encrypt-file")
def keys_encrypt_file(
    file: Annotated[Path, typer.Argument(help="a file the BU keeps: a consent export, a model")],
    bu_config: BuConfig,
    purpose: Annotated[
        str, typer.Option(help="the purpose the file is bound to, e.g. churn_model")
    ],
    home: HomeOption = None,
) -> None:
    """Encrypt one file at rest as <file>.enc (bound to its name, the BU and the purpose)."""
    from clients.steward import encrypt_file

    config, unit_home = _unit(bu_config, home)
    console.print(f"encrypted {encrypt_file(config, unit_home, file, purpose=purpose)}")


@keys_app.command("rotate")
def keys_rotate(bu_config: BuConfig, home: HomeOption = None) -> None:
    """Rotate the BU's key-encryption key: re-wrap every file's data key, destroy the old key."""
    from clients.steward import rotate_silo_key

    config, unit_home = _unit(bu_config, home)
    console.print(
        f"new key {rotate_silo_key(config, unit_home)} is active; the old key is destroyed"
    )


deploy_app = typer.Typer(
    help="A deployment: the coordinator and one node per BU, over TLS with node authentication.",
    no_args_is_help=True,
)
app.add_typer(deploy_app, name="deploy")
DeploymentDir = Annotated[
    Path, typer.Argument(help="the deployment directory (on the coordinator's machine)")
]


@deploy_app.command("init")
def deploy_init(
    directory: DeploymentDir,
    address: Annotated[
        list[str],
        typer.Option(
            "--address",
            help="a host name or IP address BU nodes reach the coordinator at (repeatable; the "
            "first goes into node bundles)",
        ),
    ],
    name: Annotated[str, typer.Option(help="the deployment's name")] = "silofed",
    port: Annotated[int, typer.Option(help="the coordinator's port")] = 9093,
    listen: Annotated[str, typer.Option(help="the interface the coordinator binds to")] = "0.0.0.0",
    bu_config: Annotated[
        list[Path] | None,
        typer.Option(
            "--bu-config",
            help="enrol this BU now, with a key pair made here (repeatable; see `deploy enrol`)",
        ),
    ] = None,
    connect_timeout: Annotated[
        float, typer.Option(help="seconds for every BU node to be connected before a run")
    ] = 300.0,
    round_timeout: Annotated[
        float, typer.Option(help="seconds for one exchange's replies before a BU counts as dropped")
    ] = 900.0,
) -> None:
    """Create a deployment: its CA, the coordinator's TLS certificate and deployment.toml."""
    from federation.deployment import Timeouts, enrol, init_deployment
    from privacy.unit_config import UnitConfig

    timeouts = Timeouts(connect=connect_timeout, round=round_timeout)
    target = init_deployment(
        directory,
        name=name,
        addresses=tuple(address),
        port=port,
        listen=listen,
        timeouts=timeouts,
    )
    console.print(f"deployment '{name}' in {target.root}; coordinator at {address[0]}:{port}")
    console.print(f"CA certificate {target.ca_certificate} (its key ca/ca.key: keep it offline)")
    for config in bu_config or []:
        enrolment = enrol(target, UnitConfig.load(config))
        console.print(
            f"enrolled {enrolment.unit} ({enrolment.fingerprint}); node bundle "
            f"{target.node_bundle(enrolment.unit)}"
        )


@deploy_app.command("enrol")
def deploy_enrol(
    directory: DeploymentDir,
    bu_config: Annotated[
        Path,
        typer.Option(
            "--bu-config",
            help="the BU's bu.toml or its public schema: only the unit, tables, columns and "
            "purposes are kept",
        ),
    ],
    public_key: Annotated[
        Path | None,
        typer.Option(
            help="the node's public key (node.pub from `silofed deploy keygen` on the BU's "
            "machine); without it a key pair is made here, in a node bundle"
        ),
    ] = None,
) -> None:
    """Admit a BU: store its public schema and its node's public key."""
    from federation.deployment import DeploymentDirectory, enrol, load_schema
    from privacy.unit_config import UnitConfig

    target = DeploymentDirectory(directory)
    schema = _schema_of(bu_config, UnitConfig, load_schema)
    text = _read_public_key(public_key)
    enrolment = enrol(target, schema, public_key=text, source=str(public_key))
    console.print(f"enrolled {enrolment.unit} ({enrolment.fingerprint})")
    if public_key is None:
        console.print(
            f"node bundle for its steward: {target.node_bundle(enrolment.unit)} (node.key is "
            "secret: hand it over only on a trusted channel)"
        )
    console.print("a running coordinator admits it after `silofed deploy coordinator` restarts")


def _schema_of(path: Path, unit_config, load_schema):
    from privacy.errors import ConfigurationError

    try:
        return unit_config.load(path)
    except ConfigurationError:
        return load_schema(path)  # a public schema written by `deploy enrol` elsewhere


def _read_public_key(path: Path | None) -> str | None:
    from privacy.errors import ConfigurationError

    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigurationError(f"--public-key {path}: cannot read it ({err})") from None


@deploy_app.command("keygen")
def deploy_keygen(
    out: Annotated[Path, typer.Option(help="directory for node.key (0600) and node.pub")],
) -> None:
    """Make a node key pair on the BU's machine; send only node.pub to the coordinator."""
    from federation.deployment import keygen

    console.print(f"node key {out / 'node.key'} (secret); public key {out / 'node.pub'}")
    console.print(f"fingerprint {keygen(out)}")


@deploy_app.command("rotate-key")
def deploy_rotate_key(
    directory: DeploymentDir,
    unit: Annotated[str, typer.Option(help="the BU whose node key is replaced")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="the new public key (else a new pair is made in the node bundle)"),
    ] = None,
) -> None:
    """Replace a BU node's key. A running coordinator admits the new key at once and no longer
    the old one."""
    from federation.deployment import DeploymentDirectory, rotate_node_key
    from server.coordinator import healthy, sync_registrations

    target = DeploymentDirectory(directory)
    old, new = rotate_node_key(
        target, unit, public_key=_read_public_key(public_key), source=str(public_key)
    )
    console.print(f"{unit}: {old.fingerprint} -> {new.fingerprint}")
    deployment = target.load()
    if healthy(target, deployment):
        sync_registrations(target, deployment)
        console.print("the running coordinator now admits only the new key")
    if public_key is None:
        console.print(f"new node bundle: {target.node_bundle(unit)}")


@deploy_app.command("coordinator")
def deploy_coordinator(directory: DeploymentDir) -> None:
    """Start the coordinator (Flower SuperLink, TLS, node authentication) and keep it running
    until interrupted."""
    import signal
    import time

    from federation.deployment import DeploymentDirectory
    from privacy.errors import RunFailed
    from server.coordinator import Coordinator, control_address

    coordinator = Coordinator(DeploymentDirectory(directory))
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stopping.append(number))
    try:
        nodes = coordinator.start()
        deployment = coordinator.deployment
        console.print(
            f"coordinator of '{deployment.name}' listening on {deployment.listen}:"
            f"{deployment.port} (tools: {control_address(deployment)}); node keys registered "
            f"for: {', '.join(sorted(nodes)) or 'no BU yet'}",
            soft_wrap=True,
        )
        while not stopping and coordinator.child.running():
            time.sleep(0.5)
    finally:
        code = coordinator.stop()
    if not stopping:
        raise RunFailed(f"flower-superlink stopped (exit {code}); see {coordinator.child.log}")
    console.print("coordinator stopped")


@deploy_app.command("node")
def deploy_node(
    bu_config: BuConfig,
    node_dir: Annotated[
        Path | None,
        typer.Option(help="the node bundle from the coordinator (node.toml, ca.pem, node.key)"),
    ] = None,
    home: HomeOption = None,
    coordinator: Annotated[
        str | None, typer.Option(help="HOST:PORT of the coordinator (default: from the bundle)")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option(help="the deployment's CA certificate (default: the bundle's)")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="this node's private key (default: the bundle's)")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="no TLS and no node key: for a throwaway test on one machine")
    ] = False,
    runtime_port: Annotated[
        int, typer.Option(help="local port of the node's own runtime API (one per node)")
    ] = 9094,
    connect_timeout: Annotated[
        float, typer.Option(help="seconds to reach the coordinator before giving up")
    ] = 300.0,
) -> None:
    """Start this BU's node (Flower SuperNode) and keep it running until interrupted."""
    import signal
    import time

    from clients.node import NodeOptions, RunningNode, plan_node, probe_coordinator

    plan = plan_node(
        NodeOptions(
            bu_config=bu_config,
            home=home,
            coordinator=coordinator,
            ca=ca,
            key=key,
            insecure=insecure,
            runtime_port=runtime_port,
            connect_timeout=connect_timeout,
        ),
        node_dir,
    )
    probe_coordinator(plan)
    node = RunningNode(plan)
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stopping.append(number))
    try:
        node_id = node.wait_connected()
        console.print(
            f"node of '{plan.unit}' connected to {plan.coordinator} as node {node_id}"
            + (f" (key {plan.fingerprint})" if plan.fingerprint else " (insecure)"),
            soft_wrap=True,
        )
        while not stopping and node.running():
            time.sleep(0.5)
        failure = None if stopping else node.failure()
    finally:
        node.stop()
    if failure is not None:
        raise failure
    console.print("node stopped")


@deploy_app.command("status")
def deploy_status(
    directory: DeploymentDir,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Enrolled BUs, whether their nodes are connected, and the last run."""
    import json

    from federation.deployment import DeploymentDirectory
    from server.coordinator import deployment_status

    status = deployment_status(DeploymentDirectory(directory))
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return
    console.print(
        f"deployment '{status['deployment']}' at {status['address']}: coordinator "
        f"{status['coordinator']}"
    )
    table = Table("BU", "node", "state", "key fingerprint", "enrolled")
    for unit in status["units"]:
        table.add_row(
            unit["unit"],
            str(unit["node_id"] or "-"),
            unit["state"],
            unit["fingerprint"],
            unit["enrolled_at"][:19],
        )
    console.print(table)
    last = status["last_run"]
    if last is None:
        console.print("no run yet")
    else:
        dropped = ", ".join(sorted({str(d["unit"]) for d in last["dropouts"]})) or "none"
        rounds = last.get("rounds_completed")
        console.print(
            f"last run {last['run_id']} ({last['directory']}): {last['status']}"
            + (f", {rounds} round(s), BUs dropped: {dropped}" if rounds is not None else "")
            + (f"; error: {last['error']}" if last.get("error") else ""),
            soft_wrap=True,
        )


@app.command(epilog=EXIT_CODES)
def run(
    job_file: Annotated[
        Path | None, typer.Argument(help="the job (TOML), as for `simulate --job`")
    ] = None,
    deployment: Annotated[
        Path | None,
        typer.Option("--deployment", help="the deployment directory of the coordinator"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="the run directory (default: DEPLOYMENT/runs/RUN_ID)")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="go on with an interrupted run (RUN_DIR: its run directory) after its last "
            "checkpointed round, instead of a new JOB",
        ),
    ] = None,
) -> None:
    """Run a job on the deployment: every enrolled BU's node takes part; seeds are refused."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from federation.deployment import DeploymentDirectory
    from federation.job import Job, load_job_file
    from server.submit import submit

    if deployment is None:
        raise typer.BadParameter("--deployment DIR is required")
    if (job_file is None) == (resume is None):
        raise typer.BadParameter("give a JOB to run, or --resume RUN_DIR, not both")
    if resume is not None and out is not None:
        raise typer.BadParameter("--out cannot be combined with --resume: the run keeps its own")
    job = None if job_file is None else Job.parse(load_job_file(job_file), source=str(job_file))
    name = job_file.name if job_file is not None else f"the resumed run {resume}"
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=not sys.stdout.isatty(),
    ) as progress:
        bar = progress.add_task(f"submitting {name} ...", total=None)

        def on_progress(line: str) -> None:
            progress.update(bar, description=line)
            if not sys.stdout.isatty():
                console.print(line, soft_wrap=True)

        directory, report = submit(
            DeploymentDirectory(deployment), job, out=out, on_progress=on_progress, resume=resume
        )
    _print_summary(report, directory)


audit_app = typer.Typer(
    help="Audit logs: verify a run's record, render it, check it against a BU's own log, and "
    "export records of processing.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    run_dir: Annotated[Path, typer.Argument(help="a run directory, or a BU's home")],
    public_key: Annotated[
        str | None,
        typer.Option(
            help="the coordinator's audit public key (base64); default: the run's audit.pub, "
            "which proves integrity only as far as that file is trusted"
        ),
    ] = None,
) -> None:
    """Check a run's audit log (chain, hashes, signatures) and every artefact it lists; exit 0
    only when the log is intact and complete and no artefact changed."""
    from privacy.audit import verify_home
    from privacy.errors import RunFailed
    from server.audit_trail import verify_run

    if (run_dir / "keys" / "audit.key").exists():  # a BU home: checked with the BU's own key
        result, problems, public_key = verify_home(run_dir), [], "the BU's own key"
    elif (run_dir / "deployment.toml").exists():  # a deployment: enrolments and key rotations
        from privacy.audit import load_or_create_signing_key, verify

        key = load_or_create_signing_key(run_dir / "coordinator" / "audit.key").public_key()
        result, problems, public_key = (
            verify(run_dir / "audit.jsonl", key),
            [],
            "the coordinator's key",
        )
    else:
        result, problems = verify_run(run_dir, public_key)
    console.print(f"{run_dir / 'audit.jsonl'}: {result.message}", soft_wrap=True)
    for problem in problems:
        console.print(problem, soft_wrap=True)
    if public_key is None:
        console.print(
            "(checked against the run's own audit.pub; pass --public-key to check "
            "against the coordinator's published key)"
        )
    if not result.ok or problems:
        raise RunFailed(
            "the run's record does not verify: "
            + "; ".join([result.message] * (not result.ok) + problems)
        )


@audit_app.command("report")
def audit_report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
    pdf: Annotated[bool, typer.Option("--pdf", help="also write report.pdf")] = False,
    public_key: Annotated[
        str | None,
        typer.Option(
            help="the coordinator's audit public key (base64); default: the run's audit.pub"
        ),
    ] = None,
) -> None:
    """Render the run's compliance record from its verified audit log: audit-report.html, and
    report.pdf with --pdf. Exit 1 (after writing) unless the log is intact and complete and no
    artefact changed; the rendering says which."""
    from privacy.atomic import write_atomic
    from privacy.errors import RunFailed
    from server.audit_trail import LOG_FILE, render_record, verify_run
    from server.compliance import ComplianceRecord

    result, problems = verify_run(run_dir, public_key, renderings=False)  # rendered anew below
    if result.entries == 0:
        raise RunFailed(f"{run_dir / LOG_FILE}: {result.message}; nothing verified to render")
    record = ComplianceRecord.of_log(run_dir / LOG_FILE, result)
    if problems:
        record = dataclasses.replace(
            record, message=f"{record.message}; but " + "; ".join(problems)
        )
    for name in ("audit-report.html", *(["report.pdf"] if pdf else [])):
        write_atomic(run_dir / name, render_record(record, name))
        console.print(f"wrote {run_dir / name}")
    console.print(f"the audit log is {result.message}", soft_wrap=True)
    if not result.ok or problems:
        raise RunFailed(
            "the run's record does not verify: "
            + "; ".join([result.message] * (not result.ok) + problems)
        )


@audit_app.command("compare")
def audit_compare(
    run_dir: Annotated[Path, typer.Argument(help="the coordinator's run directory")],
    bu_config: BuConfig,
    home: HomeOption = None,
) -> None:
    """A BU checks the coordinator's report against its own audit log: what the report says the
    BU released (purpose, customers, exclusions, columns, epsilon after every round) must be what
    the BU's log says. Exit 1 on any difference."""
    from clients.audit_check import compare_with_report
    from privacy.errors import RunFailed

    config, unit_home = _unit(bu_config, home)
    comparison = compare_with_report(unit_home.directory, config.unit, run_dir)
    console.print(
        f"{config.unit}: own log {comparison.own_log.message}; {comparison.exchanges} "
        f"exchange(s) of run {comparison.run_id} logged",
        soft_wrap=True,
    )
    for mismatch in comparison.mismatches:
        console.print(f"  differs: {mismatch}", soft_wrap=True, highlight=False)
    if not comparison.agrees:
        raise RunFailed(
            f"the report of run {comparison.run_id} does not agree with {config.unit}'s own log"
        )
    console.print("the report agrees with the BU's own log")


@audit_app.command("records")
def audit_records(
    unit: Annotated[str, typer.Option(help="the BU whose processing is exported")],
    since: Annotated[
        datetime, typer.Option(formats=["%Y-%m-%d"], help="first day of the period (UTC)")
    ],
    until: Annotated[
        datetime | None,
        typer.Option(formats=["%Y-%m-%d"], help="last day of the period (default: today)"),
    ] = None,
    runs: Annotated[Path, typer.Option(help="the coordinator's run directories")] = Path("runs"),
    out: Annotated[Path, typer.Option(help="where to write the files")] = Path("."),
    public_key: Annotated[
        str | None,
        typer.Option(help="the coordinator's audit public key (default: each run's audit.pub)"),
    ] = None,
) -> None:
    """Records of processing (GDPR Art. 30(1)(a)-(g)) of one BU over a period, from the runs'
    verified audit logs, as JSON and CSV, and a DPIA input pack as Markdown."""
    from privacy.errors import RunFailed
    from server.records import processing_records, write_records

    records = processing_records(
        runs, unit, since.date(), until.date() if until else None, public_key=public_key
    )
    for path in write_records(records, out):
        console.print(f"wrote {path}")
    console.print(f"{len(records.activities)} processing activit(y/ies) of {unit}")
    if records.unverified:
        raise RunFailed(
            "runs left out because their audit record does not verify: "
            + "; ".join(f"{u['run']}: {u['status']}" for u in records.unverified)
        )


budget_app = typer.Typer(help="A BU's privacy budget and ledger.", no_args_is_help=True)
app.add_typer(budget_app, name="budget")


@budget_app.command("show")
def budget_show(
    bu_config: BuConfig,
    home: HomeOption = None,
    delta: Annotated[float, typer.Option(help="delta at which epsilon is reported")] = 1e-6,
) -> None:
    """Per purpose and in total: budget, spent, reserved by runs in progress, remaining, events."""
    from datetime import UTC, datetime

    from clients.budget import sync_budgets

    config, unit_home = _unit(bu_config, home)
    with unit_home.ledger() as ledger:
        sync_budgets(ledger, config, now=datetime.now(UTC))
        lines = ledger.summary(delta)
    table = Table(title=f"privacy budget of unit '{config.unit}' (epsilon at delta {delta:g})")
    for column in ("purpose", "budget", "spent", "reserved", "remaining", "events"):
        table.add_column(column, justify="left" if column == "purpose" else "right")

    def number(value: float | None) -> str:
        return "no limit" if value is None else f"{value:.4f}"

    for line in lines:
        table.add_row(
            line.purpose or "[bold]all purposes[/bold]",
            number(line.budget),
            f"{line.spent:.4f}",
            f"{line.reserved:.4f}",
            number(line.remaining),
            str(line.events),
        )
    console.print(table)


@app.command()
def erase(
    customer_id: Annotated[str, typer.Argument(help="the customer's id in the BU's silo")],
    bu_config: BuConfig,
    home: HomeOption = None,
) -> None:
    """Erase a customer (GDPR Art. 17): from the silo and the consent registry, with a tombstone
    against re-import; lists the runs whose models were trained with their data."""
    import json
    from datetime import UTC, datetime

    from clients.steward import erase_customer

    config, unit_home = _unit(bu_config, home)
    result = erase_customer(config, unit_home, customer_id, now=datetime.now(UTC))
    console.print_json(json.dumps(result.__dict__))


@app.command()
def access(
    customer_id: Annotated[str, typer.Argument(help="the customer's id in the BU's silo")],
    bu_config: BuConfig,
    home: HomeOption = None,
) -> None:
    """Export, as JSON, everything the BU holds about one customer (GDPR Art. 15)."""
    import json

    from clients.steward import access_report

    config, unit_home = _unit(bu_config, home)
    sys.stdout.write(json.dumps(access_report(config, unit_home, customer_id), indent=2) + "\n")


def main() -> None:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower telemetry is off unless turned on
    # Flower writes state (even with telemetry off) under FLWR_HOME, ~/.flwr by default; keep it in
    # silofed's own home so that nothing lands elsewhere.
    silofed_home = Path(os.environ.get("SILOFED_HOME", Path.home() / ".silofed"))
    os.environ.setdefault("FLWR_HOME", str(silofed_home / "flwr"))
    try:
        app(standalone_mode=False)
    except SilofedError as err:
        errors.print(f"[bold red]error:[/bold red] {err}", highlight=False, soft_wrap=True)
        raise SystemExit(err.exit_code) from None
    except (typer.Abort, KeyboardInterrupt):
        errors.print("aborted")
        raise SystemExit(1) from None
    except Exception as err:
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    main()
