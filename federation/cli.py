"""The `silofed` command.

Exit codes: 0 done; 1 run failed; 2 bad usage or configuration; 3 refused by a BU (consent, budget).
Heavy modules (torch, Flower, Ray) are imported inside the commands so that `silofed --help` is fast.
"""

from __future__ import annotations

import os
import sys
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


@app.command(epilog=EXIT_CODES)
def simulate(
    units: Annotated[
        int | None, typer.Option(help="number of synthetic BUs (default 5); must match --data")
    ] = None,
    customers: Annotated[int, typer.Option(help="customers per synthetic BU, on average")] = 3000,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 5,
    epsilon: Annotated[float, typer.Option(help="per-BU epsilon target for this run")] = 3.0,
    delta: Annotated[float, typer.Option(help="delta, the same for every BU")] = 1e-6,
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
        bool,
        typer.Option(
            "--secure-aggregation", help="Flower SecAgg+: the coordinator sees only sums (>= 3 BUs)"
        ),
    ] = False,
    noise: Annotated[
        str,
        typer.Option(
            help="noise placement: local (DP-SGD in each BU), central or distributed (both need --secure-aggregation)"
        ),
    ] = "local",
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="inject a fault KIND:BU:ROUND (repeatable; BU by name or 0-based index); kinds: crash"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's logs")] = False,
) -> None:
    """Run a federated, differentially private churn model over simulated BUs on this machine."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from federation.job import Job
    from server.artefacts import new_run_id
    from simulations.runner import SimulationSettings
    from simulations.runner import simulate as run_simulation

    job = Job.parse(
        {
            "rounds": rounds,
            "epsilon": epsilon,
            "delta": delta,
            "secure_aggregation": {"enabled": secure_aggregation},
            "noise": noise,
        },
        source="command line",
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
        task = progress.add_task("starting the Simulation Engine ...", total=rounds)

        def on_round(summary) -> None:
            worst = max(summary.epsilon.values(), default=0.0)
            progress.update(
                task,
                advance=1,
                description=f"AUC {summary.metrics['auc']:.4f}  max epsilon {worst:.3f}",
            )

        result = run_simulation(settings, job, on_round=on_round)
    _print_summary(result.report, result.out)


def _print_summary(report: dict, out: Path) -> None:
    metrics = report["model"]["metrics"]
    table = Table(
        title=f"silofed run {report['run_id']}  ({report['job']['task']}, purpose {report['job']['purpose']})"
    )
    table.add_column("unit", no_wrap=True)
    for column in ("epsilon", "noise mult.", "sample rate", "steps", "records used"):
        table.add_column(column, justify="right")
    table.add_column("excluded")
    for unit in report["privacy"]["per_unit"]:
        if unit["refused"]:
            table.add_row(unit["unit"], "refused", "", "", "", "", unit["refusal"])
            continue
        table.add_row(
            unit["unit"],
            f"{unit['epsilon']:.3f}",
            f"{unit['noise_multiplier']:.3f}",
            f"{unit['sample_rate']:.4f}",
            str(unit["steps"]),
            str(unit["records_used"]),
            ", ".join(f"{k} {v}" for k, v in unit["excluded"].items()),
        )
    console.print(table)
    ceiling = metrics["auc_ceiling"]
    console.print(
        f"global AUC [bold]{metrics['auc']:.4f}[/bold]"
        + (f" (ceiling {ceiling:.4f}, gap {ceiling - metrics['auc']:.4f})" if ceiling else "")
        + f"  log-loss {metrics['log_loss']:.4f}  Brier {metrics['brier']:.4f}"
        + f"  on {metrics['test_customers']} held-out customers ({report['model']['evaluation']})"
    )
    console.print(
        f"privacy: every BU epsilon <= {report['job']['epsilon']} at delta {report['privacy']['delta']:g}"
        f" (max {max((u['epsilon'] for u in report['privacy']['per_unit']), default=0):.3f})"
    )
    console.print(
        f"run directory: {out}  (report.html, report.json, model.pt, metrics.jsonl, job.json)"
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


consent_app = typer.Typer(help="A BU's consent registry.", no_args_is_help=True)
keys_app = typer.Typer(help="A BU's keys: encryption at rest and rotation.", no_args_is_help=True)
app.add_typer(consent_app, name="consent")
app.add_typer(keys_app, name="keys")

BuConfig = Annotated[Path, typer.Option("--bu-config", help="the BU's bu.toml")]
HomeOption = Annotated[
    Path | None, typer.Option("--home", help="the BU's home (default: `home` in bu.toml)")
]


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
