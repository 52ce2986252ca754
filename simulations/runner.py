"""The local simulation runner behind `silofed simulate`.

It prepares the simulated company (synthetic silos, or the analyst's own with `--data`), checks every
silo against its schema before anything starts, resolves the job's public features from the declared
schemas, and runs the ServerApp and one ClientApp per BU on Flower's Simulation Engine (Ray). The run
directory is assembled under a staging name and published only when the run completed; a failed run
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from clients.app import Node, make_client_app
from clients.budget import would_admit
from clients.silo import check_silo
from clients.steward import consent_export, encrypt_silo
from federation.exchanges import exchange_rounds, resolve_job, taking_part
from federation.job import Job, JobKind, Task
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError, RefusedByUnit, RunFailed, SilofedError
from privacy.home import UnitHome
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig
from server.aggregation import declared_sizes
from server.app import make_server_app
from server.artefacts import check_target, new_run_id, publish, staging_dir
from server.checkpoint import CHECKPOINT_FILE, Checkpoint, find_interrupted, load_checkpoint
from server.run import RoundCallback, RunPlan
from simulations.faults import Fault, check_faults, fault_mod
from simulations.split import display_names, read_privacy_unit
from simulations.synthetic import read_ceiling, synthesize

WORKSPACE = "simulation"
SIMULATION_FILE = "simulation.json"  # in the partial run directory: how to resume it
CONNECT_TIMEOUT = 300.0  # seconds for the virtual BU nodes to be up (Ray starts in about 18 s)


@dataclass(frozen=True)
class SimulationSettings:
    out: Path
    units: int | None = None  # default 5 when generating; must match --data when both are given
    customers: int = 3000
    data: Path | None = None
    seed: int | None = 0
    homes: Path | None = None  # persistent BU homes; default: fresh ones in the run's workspace
    encrypt_at_rest: bool = False
    faults: tuple[str, ...] = ()  # KIND:BU:ROUND, see simulations.faults
    # seconds each exchange waits for the BUs' replies: room for 100 BUs preparing 10,000
    # customers each on 2 cores in the first round, and a bound on a BU that hangs
    round_timeout: float = 1800.0
    workers: int | None = (
        None  # Ray workers (one core each); default: one per core, at most one per BU
    )
    overwrite: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class SimulationResult:
    out: Path
    report: dict


def silo_configs(data: Path) -> list[Path]:
    """The `bu.toml` of every BU under `data` (one directory per BU)."""
    configs = sorted(Path(data).glob(f"*/{UNIT_CONFIG_FILE}"))
    if not configs:
        raise ConfigurationError(
            f"--data {data}: no BU found (a BU is a directory with a {UNIT_CONFIG_FILE}); "
            "write some with `silofed data synth --out DIR`"
        )
    return configs


def simulate(
    settings: SimulationSettings, job: Job, on_round: RoundCallback | None = None
) -> SimulationResult:
    out = Path(settings.out)
    check_target(out, overwrite=settings.overwrite)
    staging = staging_dir(out)
    try:
        return _simulate_in(staging, settings, job, on_round, None)
    except SilofedError:
        shutil.rmtree(staging, ignore_errors=True)  # a failed run leaves nothing
        raise
    except BaseException:
        # Interrupted (Ctrl-C, a crash outside silofed): a run with a checkpoint stays
        # resumable with `silofed simulate --resume`; anything else goes.
        if not (staging / CHECKPOINT_FILE).exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def resume(run_dir: Path, on_round: RoundCallback | None = None) -> SimulationResult:
    """Go on with a simulation that was killed: `run_dir` is its --out (or the partial directory
    beside it). It resumes after the last round its coordinator checkpointed, with the same silos,
    BU homes, seed, job, run id and start time; if it fails again, the partial directory stays
    for another try."""
    staging = resumable(Path(run_dir))
    path = staging / SIMULATION_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        settings = SimulationSettings(
            **{
                **saved["settings"],
                **{k: Path(v) for k, v in saved["settings"].items() if k in _PATHS and v},
                "faults": tuple(saved["settings"]["faults"]),
            }
        )
        job = Job.model_validate(saved["job"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigurationError(
            f"{path}: the interrupted run's settings are unreadable ({err})"
        ) from None
    return _simulate_in(staging, settings, job, on_round, load_checkpoint(staging))


def resumable(run_dir: Path) -> Path:
    """The partial directory of the killed simulation whose --out is `run_dir`."""
    partial = find_interrupted(run_dir)
    if not (partial / SIMULATION_FILE).exists():
        raise ConfigurationError(
            f"--resume {run_dir}: {partial.name} is not a simulation's (no {SIMULATION_FILE}); "
            "a deployment run resumes with `silofed run --resume`"
        )
    return partial


def _simulate_in(
    staging: Path,
    settings: SimulationSettings,
    job: Job,
    on_round: RoundCallback | None,
    checkpoint: Checkpoint | None,
) -> SimulationResult:
    out = Path(settings.out)
    workspace = staging / WORKSPACE
    if settings.data is not None:
        if settings.encrypt_at_rest:
            raise ConfigurationError(
                "--encrypt-at-rest encrypts generated silos; to encrypt your own, run "
                "`silofed keys encrypt --bu-config BU.toml` on each, then pass --data"
            )
        silos_root = Path(settings.data)
        configs = silo_configs(silos_root)
        if settings.units is not None and settings.units != len(configs):
            raise ConfigurationError(
                f"--units {settings.units} disagrees with --data {silos_root}, which holds "
                f"{len(configs)} BUs; drop --units or point --data elsewhere"
            )
    elif checkpoint is not None:
        silos_root = workspace / "silos"  # the interrupted run's own
        configs = silo_configs(silos_root)
    else:
        silos_root = workspace / "silos"
        synthesize(
            silos_root,
            units=settings.units or 5,
            customers=settings.customers,
            seed=settings.seed if settings.seed is not None else 0,
        )
        configs = silo_configs(silos_root)
    homes_root = Path(settings.homes) if settings.homes is not None else workspace / "homes"
    # The job is made concrete from the declared schemas before any BU reads data: an
    # undeclared purpose, a column the purpose forbids, a missing bound or domain stop here.
    declared = {c: UnitConfig.load(c) for c in configs}
    chosen = {c.unit for c in taking_part(job, list(declared.values()))}
    configs = [path for path, config in declared.items() if config.unit in chosen]
    job = resolve_job(job, [declared[c] for c in configs])
    nodes = []
    units = []
    refusals = {}
    for bu_config in configs:
        config = UnitConfig.load(bu_config)
        # The home's consent registry is filled by the BU's own node, from the export beside
        # its silo, at its first exchange (`Node.consent_export`): on the Simulation Engine's
        # workers, in parallel, rather than one BU after another here.
        home = UnitHome(homes_root / config.unit, config)
        # Each BU's own decision, before any of its data is read (it decides again in the run).
        if (reason := would_admit(config, home, job)) is not None:
            refusals[config.unit] = reason
        if settings.encrypt_at_rest and not config.source.encrypted:
            encrypt_silo(bu_config, home)
            config = UnitConfig.load(bu_config)
        # Check every silo now, with the reader and checks the BUs use, so that a malformed
        # silo stops the run before the Simulation Engine starts and names the file, column
        # and row.
        check_silo(config, keyring=home.keyring() if config.source.encrypted else None)
        nodes.append(
            Node(
                bu_config=bu_config,
                home=home.directory,
                simulated=True,
                consent_export=consent_export(config.source.directory),
            )
        )
        units.append(config)
    if len(refusals) == len(configs) and checkpoint is None:
        raise RefusedByUnit("every BU refuses the job: " + "; ".join(refusals.values()))
    plan = RunPlan(
        run_id=new_run_id() if checkpoint is None else checkpoint.run_id,
        job=job,
        expected_units=len(nodes),
        mode="simulation",
        out=staging,
        started_at=datetime.now(UTC) if checkpoint is None else checkpoint.started_at,
        seed=settings.seed,
        auc_ceiling=(
            read_ceiling(silos_root, job.evaluation, task=job.task)
            if job.kind is JobKind.MODEL and job.task is not Task.LTV
            else None
        ),
        privacy_unit=read_privacy_unit(silos_root),
        display_names=display_names(silos_root),
        on_round=on_round,
        enrolled=tuple(sorted(u.unit for u in units)),
        max_customers=declared_sizes(units),
        round_timeout=settings.round_timeout,
        connect_timeout=CONNECT_TIMEOUT,
        resume=checkpoint is not None,
    )
    if checkpoint is None:
        _save_settings(staging, settings, job)
    names = [u.unit for u in units]
    faults = [Fault.parse(text, names) for text in settings.faults]
    check_faults(faults, job)
    deadline = settings.round_timeout
    if job.secure_aggregation.enabled:
        deadline = min(deadline, job.secure_aggregation.timeout)  # each SecAgg+ stage's
    mods = [fault_mod(faults, names, deadline=deadline)] if faults else []
    _run_engine(plan, nodes, mods=mods, verbose=settings.verbose, workers=settings.workers)
    report_path = staging / "report.json"
    if not report_path.exists():
        raise RunFailed("the simulation ended without a report; see the Flower log above")
    report = json.loads(report_path.read_text())
    if report["federation"]["rounds_completed"] != exchange_rounds(job):
        raise RunFailed(
            f"only {report['federation']['rounds_completed']} of {job.rounds} rounds completed"
        )
    (staging / SIMULATION_FILE).unlink()  # complete (and its checkpoint gone): nothing to resume
    publish(staging, out, overwrite=settings.overwrite)
    return SimulationResult(out=out, report=report)


_PATHS = ("out", "data", "homes")  # the settings that are paths


def _save_settings(staging: Path, settings: SimulationSettings, job: Job) -> None:
    """What `resume` needs to rebuild the run: the settings (paths made absolute, so that it may
    resume from another directory) and the job as given."""
    saved = {
        **asdict(settings),
        **{k: str(Path(getattr(settings, k)).resolve()) for k in _PATHS if getattr(settings, k)},
        "faults": list(settings.faults),
    }
    document = {"settings": saved, "job": job.model_dump(mode="json")}
    write_atomic(staging / SIMULATION_FILE, json.dumps(document, indent=1))


def _waiting_nodes_poller(original: Callable[..., None]) -> Callable[..., None]:
    """Flower's `vce_api.add_messages_to_queue` (the Simulation Engine's thread that hands each
    virtual node its instructions), asking the link state only for the nodes that have an
    instruction waiting. Flower's own loop asks for every node every 0.1 s, and each question
    scans every stored message (with a clock read and a federation check per message): at 100
    BUs, about a quarter of a core for the whole run, taken from the two cores the BUs train on.
    The same messages reach the same queue through the same `get_message_ins`; only a node
    without a waiting instruction is not asked. A link state other than Flower 1.41's in-memory
    one is left to Flower's own loop (`original`)."""

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
        store = getattr(state, "message_ins_store", None)
        if not isinstance(store, dict) or not hasattr(state, "lock"):
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            with state.lock:
                waiting = {
                    message.metadata.dst_node_id
                    for message in store.values()
                    if message.metadata.delivered_at == ""
                }
            for node_id in nodes_mapping:
                if node_id in waiting:
                    for message in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(message)
            f_stop.wait(0.1)

    return add_messages_to_queue


@contextlib.contextmanager
def _engine_polling() -> Iterator[None]:
    """Flower's Simulation Engine with `_waiting_nodes_poller` as its instruction poller, for as
    long as the context lasts."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = _waiting_nodes_poller(original)
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original


def _run_engine(
    plan: RunPlan, nodes: list[Node], *, mods: list, verbose: bool, workers: int | None = None
) -> None:
    from flwr.simulation import run_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.WARNING)
    cores = workers or max(1, min(len(nodes), os.cpu_count() or 1))
    try:
        with _engine_polling():
            run_simulation(
                server_app=make_server_app(lambda _context: plan),
                client_app=make_client_app(nodes, mods=mods),
                num_supernodes=len(nodes),
                backend_config={
                    # one core and one torch thread per virtual BU: more thrashes a 2-core machine
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {
                        "num_cpus": cores,
                        "logging_level": "ERROR" if not verbose else "INFO",
                        "log_to_driver": verbose,
                    },
                },
            )
    except RuntimeError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, Exception) and cause is not err:
            raise cause from None
        raise
