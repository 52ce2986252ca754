"""The silofed ServerApp (`server.app:app`): plan the run, drive the rounds, write the run directory.

`silofed simulate` builds the app with a ready plan (`make_server_app(plan_for)`); `flwr run .` and
`silofed run JOB --deployment DIR` use the module-level `app`, which reads its plan from the Flower
run config: `[tool.flwr.app.config]` for `flwr run .`, or, on a deployment, the submitted job, the
deployment directory (enrolled BUs, their public schemas, deadlines) and the run directory.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.serverapp import Grid, ServerApp

from federation.deployment import DeploymentDirectory, check_deployable
from federation.exchanges import (
    exchange_rounds,
    planned_evaluation,
    planned_ranges,
    resolve_job,
)
from federation.job import Job, JobKind, NoisePlacement
from federation.saved import saved_model
from privacy.accounting import central_noise_multiplier
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError, SilofedError
from privacy.samplers import SecureSource, SeededSource
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from server.aggregation import declared_sizes, model_strategy
from server.artefacts import new_run_id, publish, staging_dir
from server.audit_trail import (
    PUBLIC_KEY_FILE,
    log_artefacts,
    log_outcome,
    logged_record,
    open_run_log,
)
from server.checkpoint import CHECKPOINT_FILE, discard_checkpoint, load_checkpoint
from server.coordinator import PROGRESS, node_units
from server.noise import AppliedUpdates, CentralGaussianNoise
from server.report import build_report, build_results, render_html
from server.run import RunPlan, RunRecord
from server.secure_aggregation import secure_workflows
from server.strategy import FederatedRounds, no_fit_metrics
from server.workflow import DeadlineGrid, RoundsWorkflow


def coordinator_strategy(record: RunRecord) -> FederatedRounds:
    """The strategy of a run: the job's aggregation rule over every BU's validated reply, with the
    coordinator's noise under the central placement (or the BUs' noise shares, distributed)."""
    plan = record.plan
    units = plan.expected_units
    job = plan.job
    inner = model_strategy(
        job.aggregation,
        units,
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=units,
        min_available_clients=units,
        fit_metrics_aggregation_fn=no_fit_metrics,
    )
    if job.noise is NoisePlacement.DISTRIBUTED:
        inner = AppliedUpdates(inner)  # the BUs' noise shares are inside the secure sum
    elif job.noise is NoisePlacement.CENTRAL:
        source = SecureSource() if plan.seed is None else SeededSource(plan.seed)
        inner = CentralGaussianNoise(
            inner,
            clip_norm=job.training.clip_norm,
            noise_multiplier=central_noise_multiplier(
                job.epsilon,
                job.delta,
                job.rounds,
                spent=planned_ranges(job),
                holdout=planned_evaluation(job),
            ),
            source=source,
        )
    return FederatedRounds(inner, record)


def run_federation(grid: Grid, context: Context, plan: RunPlan) -> RunRecord:
    record = RunRecord(plan)
    record.audit = open_run_log(plan)
    units = plan.expected_units
    strategy = coordinator_strategy(record)
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=exchange_rounds(plan.job)),
        strategy=strategy,
    )
    secure = plan.job.secure_aggregation
    workflows = secure_workflows(units, secure) if secure.enabled else None
    grid = DeadlineGrid(grid, plan.round_timeout)
    try:
        parameters = RoundsWorkflow(workflows, connect_timeout=plan.connect_timeout)(grid, legacy)
    except SilofedError as err:
        if plan.mode == "deployment":
            # The BUs may have spent budget before the failure: the record says what, and who
            # dropped out, for the steward and the DPO.
            record.error = str(err)
            write_run_directory(record, None)
        raise
    write_run_directory(record, parameters)
    return record


def write_run_directory(record: RunRecord, parameters: list | None) -> None:
    """The run directory. A failed run (`record.error` set, no final `parameters`) keeps the
    job, the rounds that completed and the report (status `failed`, the error, the dropped
    BUs), and has no model and no results."""
    plan, job = record.plan, record.plan.job
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    discard_checkpoint(out)
    write_atomic(out / "job.json", job.model_dump_json(indent=2))
    if parameters is not None and job.kind is not JobKind.QUERY:
        buffer = io.BytesIO()
        torch.save(saved_model(job, parameters), buffer)
        write_atomic(out / "model.pt", buffer.getvalue())
    lines = [
        json.dumps({"round": s.server_round, **s.metrics, "epsilon": s.epsilon}, sort_keys=True)
        for s in record.rounds
    ]
    write_atomic(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    report = build_report(record)
    if parameters is not None:
        write_atomic(out / "results.json", json.dumps(build_results(record, report), indent=2))
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    if record.audit is None:
        write_atomic(out / "report.html", render_html(report))
        return
    # The log records the outcome and every file so far; report.html is then rendered with the
    # compliance record read back from the log, logged in turn, and the final checkpoint closes it.
    log_outcome(record.audit, record)
    written = ["job.json", "model.pt", "metrics.jsonl", "results.json", "report.json"]
    log_artefacts(record.audit, out, [n for n in (*written, PUBLIC_KEY_FILE) if (out / n).exists()])
    write_atomic(out / "report.html", render_html(report, logged_record(record.audit)))
    log_artefacts(record.audit, out, ["report.html"])
    record.audit.checkpoint(final=True)


def plan_from_run_config(context: Context) -> RunPlan:
    """`flwr run .`: the plan from `[tool.flwr.app.config]` and `--run-config` overrides;
    `silofed run`: the plan from the submitted job and the deployment directory."""
    config = context.run_config
    if str(config.get("deployment", "")):
        return deployment_plan(config)
    data_dir = Path(str(config.get("data-dir", "")))
    schemas = [UnitConfig.load(p) for p in sorted(data_dir.glob(f"*/{UNIT_CONFIG_FILE}"))]
    if not str(config.get("data-dir", "")) or not schemas:
        raise ConfigurationError(
            f"run config 'data-dir' ({str(data_dir)!r}) holds no silos; pass "
            "--run-config \"data-dir='DIR'\" (write silos with `silofed data synth`)"
        )
    job = Job.parse(
        {k: config[k] for k in ("task", "rounds", "epsilon", "delta") if k in config},
        source="run config",
    )
    job = resolve_job(job, schemas)
    run_id = new_run_id()
    return RunPlan(
        run_id=run_id,
        job=job,
        expected_units=len(schemas),
        mode="simulation",
        out=Path(str(config.get("out", "")) or f"runs/{run_id}"),
        started_at=datetime.now(UTC),
        max_customers=declared_sizes(schemas),
    )


def deployment_plan(config) -> RunPlan:
    """The plan of a job submitted with `silofed run`: the job as JSON, the deployment directory
    on the coordinator's machine, and the run directory to write."""
    directory = DeploymentDirectory(Path(str(config["deployment"])))
    deployment = directory.load()
    if not deployment.units:
        raise ConfigurationError(
            f"{directory.config_file}: no BU is enrolled; enrol them with `silofed deploy enrol`"
        )
    try:
        data = json.loads(str(config.get("job", "")))
    except json.JSONDecodeError as err:
        raise ConfigurationError(
            f"the submitted job is not JSON ({err}); submit jobs with `silofed run JOB.toml`"
        ) from None
    schemas = directory.schemas(deployment)
    job = resolve_job(
        check_deployable(Job.parse(data, source="the submitted job")),  # refuses a seed
        schemas,
    )
    resume = str(config.get("resume", ""))
    checkpoint = load_checkpoint(Path(resume)) if resume else None
    if checkpoint is not None:
        # the interrupted run's own job (its feature windows included), id and start time
        job = check_deployable(checkpoint.job)
    return RunPlan(
        run_id=(
            checkpoint.run_id
            if checkpoint is not None
            else str(config.get("run-id", "")) or new_run_id()
        ),
        job=job,
        expected_units=len(deployment.units),
        mode="deployment",
        out=Path(str(config["out"])),
        started_at=checkpoint.started_at if checkpoint is not None else datetime.now(UTC),
        resume=checkpoint is not None,
        enrolled=tuple(sorted(deployment.units)),
        connect_timeout=deployment.timeouts.connect,
        round_timeout=deployment.timeouts.round,
        node_units=node_units(directory),
        max_customers=declared_sizes(schemas),
        audit_key=directory.audit_key,
        on_round=_log_round,
    )


def _log_round(summary) -> None:
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(summary.metrics.items()))
    spent = max(summary.epsilon.values(), default=0.0)
    log(
        INFO, "%s round %d done %s epsilon_max=%.4g", PROGRESS, summary.server_round, metrics, spent
    )


def make_server_app(plan_for: Callable[[Context], RunPlan] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if plan_for is not None:
            run_federation(grid, context, plan_for(context))
            return
        try:
            plan = plan_from_run_config(context)
        except SilofedError as err:
            log(ERROR, "%s failed: %s", PROGRESS, err)
            raise
        final = plan.out
        # a resumed run goes on in the interrupted run's partial directory
        staging = Path(str(context.run_config["resume"])) if plan.resume else staging_dir(final)
        log(INFO, "%s run %s started: %s", PROGRESS, plan.run_id, final)
        try:
            run_federation(grid, context, replace(plan, out=staging))
            publish(staging, final, overwrite=False)
        except SilofedError as err:
            log(ERROR, "%s failed: %s", PROGRESS, err)
            if plan.mode == "deployment" and (staging / "report.json").exists():
                publish(staging, final, overwrite=False)  # the failed run's record
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        except BaseException:
            # Interrupted, not failed (the SuperLink went away, the process was stopped): a run
            # with a checkpoint stays resumable (`silofed run --resume`), anything else goes.
            if (staging / CHECKPOINT_FILE).exists():
                log(
                    ERROR, "%s interrupted; resume it with silofed run --resume %s", PROGRESS, final
                )
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        log(INFO, "%s run %s finished: %s", PROGRESS, plan.run_id, final)

    return app


app = make_server_app()
