"""The coordinator's checkpoint after each round, and resuming a run from it.

After every round the coordinator writes, into the run directory it is assembling, the global model
(`checkpoint.npz`, plain float arrays, read back without pickle) and everything else it needs to go
on (`checkpoint.json`): the round, the job as the run resolved it (feature windows included), what
the record holds so far (round summaries, the BUs' reports, refusals, rejected replies), the state
of its own seeded noise source in simulation, and the head of its audit log. Both files are written
to a temporary name and renamed, the arrays first, and the JSON names the arrays' digest, so a crash
at any point leaves the previous checkpoint or the new one, never a mix.

A resumed run (`silofed simulate --resume RUN_DIR`, or the deployment runner's `resume`) starts at
the round after the checkpoint, with the same run id and start time. The BUs answer a round they
already answered by replaying their stored reply (`clients.app`), so their ledgers record each
(run, round, exchange) once and the final model is the one an uninterrupted run ends with.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters

from federation.job import Job
from federation.wire import Phase, UnitReport
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError
from privacy.samplers import SeededSource
from server.run import RoundSummary

CHECKPOINT_FILE = "checkpoint.json"
ARRAYS_FILE = "checkpoint.npz"


@dataclass(frozen=True)
class Checkpoint:
    server_round: int  # the last round completed
    run_id: str
    started_at: datetime
    job: Job
    parameters: list[np.ndarray]
    state: dict  # the record's and the strategy's state (see `save_checkpoint`)
    audit_head: dict | None  # the coordinator's audit log when the checkpoint was taken


def save_checkpoint(strategy, server_round: int, parameters: list[np.ndarray]) -> None:
    """Checkpoint `strategy` (a `server.strategy.FederatedRounds`) after `server_round`, with the
    global `parameters` after it, into the run's directory."""
    record = strategy.record
    plan = record.plan
    buffer = io.BytesIO()
    np.savez(buffer, *parameters)
    arrays = buffer.getvalue()
    write_atomic(plan.out / ARRAYS_FILE, arrays)
    state = {
        "rounds": [
            {"server_round": s.server_round, "metrics": s.metrics, "epsilon": s.epsilon}
            for s in record.rounds
        ],
        "unit_reports": {u: r.model_dump(mode="json") for u, r in record.unit_reports.items()},
        "refused": record.refused,
        "dropouts": record.dropouts,
        "rejected": record.rejected,
        "evaluation": record.evaluation,
        "results": record.results,
        "pending_epsilon": record._pending_epsilon,
        "completed": {str(phase): r for phase, r in strategy.completed.items()},
        "sources": [_source_state(s) for s in _sources(strategy)],
    }
    document = {
        "server_round": server_round,
        "run_id": plan.run_id,
        "started_at": plan.started_at.isoformat(),
        "job": plan.job.model_dump(mode="json"),
        "arrays_sha256": hashlib.sha256(arrays).hexdigest(),
        "state": state,
        "audit_head": (
            {"seq": record.audit.seq, "hash": record.audit.prev}
            if record.audit is not None
            else None
        ),
    }
    write_atomic(plan.out / CHECKPOINT_FILE, json.dumps(document, indent=1))
    if record.audit is not None:
        record.audit.append("round.checkpointed", {"round": server_round})


def find_interrupted(run_dir: Path) -> Path:
    """The partial directory (`.NAME.partial-*` beside `run_dir`) of an interrupted run whose run
    directory was to be `run_dir`, holding a checkpoint; the newest when there are several."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).exists():
        return run_dir  # the partial directory itself
    if (run_dir / "report.json").exists():
        raise ConfigurationError(f"--resume {run_dir}: that run finished; nothing to resume")
    partial = sorted(
        (p for p in run_dir.parent.glob(f".{run_dir.name}.partial-*") if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    if not partial:
        raise ConfigurationError(
            f"--resume {run_dir}: no interrupted run with that run directory (a run can be "
            "resumed once it has checkpointed a round; one that failed cleanly left nothing)"
        )
    if not (partial[-1] / CHECKPOINT_FILE).exists():
        raise ConfigurationError(
            f"--resume {run_dir}: the interrupted run ({partial[-1].name}) stopped before its "
            "first round was checkpointed; start it again"
        )
    return partial[-1]


def discard_checkpoint(directory: Path) -> None:
    """A finished run (completed or failed) has nothing to resume, and its directory holds only
    the artefacts its audit log lists."""
    for name in (CHECKPOINT_FILE, ARRAYS_FILE):
        (Path(directory) / name).unlink(missing_ok=True)


def load_checkpoint(directory: Path) -> Checkpoint:
    """The checkpoint in a run directory; a missing or inconsistent one is a ConfigurationError
    naming the file."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise ConfigurationError(
            f"{path}: no checkpoint; a run can be resumed once it has completed a round"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        arrays = (path.parent / ARRAYS_FILE).read_bytes()
        if hashlib.sha256(arrays).hexdigest() != document["arrays_sha256"]:
            raise ValueError(f"{ARRAYS_FILE} is not the one the checkpoint names")
        with np.load(io.BytesIO(arrays), allow_pickle=False) as stored:
            parameters = [stored[f"arr_{i}"] for i in range(len(stored.files))]
        return Checkpoint(
            server_round=int(document["server_round"]),
            run_id=str(document["run_id"]),
            started_at=datetime.fromisoformat(document["started_at"]),
            job=Job.model_validate(document["job"]),
            parameters=parameters,
            state=document["state"],
            audit_head=document["audit_head"],
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigurationError(f"{path}: the checkpoint cannot be read ({err})") from None


def starting_point(
    strategy, client_manager, checkpoint: Checkpoint | None = None
) -> tuple[Parameters, int]:
    """Where a run starts: the initial parameters and round 1, or, when its plan resumes, the
    parameters and the round after its checkpoint (`checkpoint`, when already read), with the
    strategy and its record restored."""
    plan = strategy.record.plan
    if not plan.resume:
        return strategy.initialize_parameters(client_manager), 1
    checkpoint = checkpoint or load_checkpoint(plan.out)
    restore(strategy, checkpoint)
    return ndarrays_to_parameters(checkpoint.parameters), checkpoint.server_round + 1


def restore(strategy, checkpoint: Checkpoint) -> None:
    """Put `strategy` and its record back where the checkpoint left them. (Which node is which
    BU is not restored: a restarted coordinator's nodes may have new ids, and every reply names
    its BU.)"""
    record = strategy.record
    state = checkpoint.state
    record.plan = replace(record.plan, job=checkpoint.job)
    record.rounds = [RoundSummary(**s) for s in state["rounds"]]
    record.unit_reports = {
        u: UnitReport.model_validate(r) for u, r in state["unit_reports"].items()
    }
    record.refused = dict(state["refused"])
    record.dropouts = list(state["dropouts"])
    record.rejected = list(state["rejected"])
    record.evaluation = state["evaluation"]
    record.results = state["results"]
    record._pending_epsilon = dict(state["pending_epsilon"])
    strategy.completed.update({Phase(p): r for p, r in state["completed"].items()})
    for source, saved in zip(_sources(strategy), state["sources"], strict=True):
        if saved is not None:
            source.set_state(saved)
    if record.audit is not None:
        head = checkpoint.audit_head
        if head is not None and record.audit.seq < head["seq"]:
            raise ConfigurationError(
                f"{record.audit.path}: the audit log holds {record.audit.seq} entries, fewer than "
                f"the {head['seq']} it held at the checkpoint of round {checkpoint.server_round}; "
                "it was cut short, and the run cannot go on with it"
            )
        record.audit.append("run.resumed", {"after_round": checkpoint.server_round})


def _sources(strategy) -> list:
    """The coordinator's noise sources, in a fixed order: its own, then the central noise's."""
    sources = [strategy._source]
    inner = getattr(strategy.inner, "source", None)
    if inner is not None:
        sources.append(inner)
    return sources


def _source_state(source) -> list | None:
    """A seeded source's state, as JSON; None for the OS's entropy, which has none to keep."""
    if isinstance(source, SeededSource):
        return source.state()
    return None
