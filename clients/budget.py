"""The BU's privacy decisions before it touches any data, and its bookkeeping after each release.

Before reading data, the BU checks the job against its own policy (`[privacy]` in `bu.toml`: the
largest epsilon and delta per run it accepts) and reserves the job's epsilon in its persistent
ledger, atomically and conservatively (spent + reserved + requested <= budget, per purpose and for the
BU as a whole). A refusal names the BU and is made before any file is opened. After each training
round the BU records the round's DP-SGD event; a round is answered once, and replaying it counts
nothing twice. The reservation is released when the run's last exchange is answered.
"""

from __future__ import annotations

from datetime import datetime

from federation.job import Job
from privacy.accounting import TRAIN, DpSgdEvent
from privacy.errors import RefusedByUnit, RunFailed
from privacy.home import UnitHome
from privacy.ledger import GaussianEvent, PrivacyLedger
from privacy.unit_config import UnitConfig


class PolicyRefusal(RefusedByUnit):
    """The job asks for a weaker guarantee than the BU's policy accepts."""


def check_policy(config: UnitConfig, job: Job) -> None:
    policy = config.privacy
    if policy.max_epsilon_per_run is not None and job.epsilon > policy.max_epsilon_per_run:
        raise PolicyRefusal(
            f"unit '{config.unit}' accepts at most epsilon {policy.max_epsilon_per_run} per run "
            f"([privacy] max_epsilon_per_run); the job asks for {job.epsilon}. Ask for less noise "
            "budget, not more."
        )
    if job.delta > policy.max_delta:
        raise PolicyRefusal(
            f"unit '{config.unit}' accepts at most delta {policy.max_delta:g} ([privacy] "
            f"max_delta); the job asks for {job.delta:g}."
        )


def sync_budgets(ledger: PrivacyLedger, config: UnitConfig, *, now: datetime) -> None:
    """The budgets of `bu.toml` into the ledger (which keeps every change on record)."""
    wanted = {None: config.privacy.budget, **config.privacy.purpose_budgets}
    for purpose, epsilon in wanted.items():
        if epsilon is not None and ledger.budget(purpose) != epsilon:
            ledger.set_budget(purpose, epsilon, now=now)


def admit(config: UnitConfig, home: UnitHome, job: Job, run_id: str, *, now: datetime) -> None:
    """Accept the job for this run or refuse it, before any data is read."""
    check_policy(config, job)
    with home.ledger() as ledger:
        sync_budgets(ledger, config, now=now)
        ledger.reserve(run_id, job.purpose, job.epsilon, delta=job.delta, now=now)


def would_admit(config: UnitConfig, home: UnitHome, job: Job) -> str | None:
    """The reason this BU would refuse `job`, without reserving anything; None if it would not."""
    try:
        check_policy(config, job)
    except PolicyRefusal as refusal:
        return str(refusal)
    with home.ledger() as ledger:
        sync_budgets(ledger, config, now=datetime.now().astimezone())
        if not ledger.supports(job.purpose, job.epsilon, delta=job.delta):
            return (
                f"unit '{config.unit}': the job's epsilon {job.epsilon} for '{job.purpose}' would "
                "exceed its privacy budget"
            )
    return None


def run_history(
    ledger: PrivacyLedger, run_id: str, purpose: str, *, part: str | None = None
) -> tuple[DpSgdEvent, ...]:
    """The run's releases so far (those touching `part` only, when given), each as the DP-SGD
    event the accountant composes."""
    return tuple(
        e.event.as_dp_sgd() if isinstance(e.event, GaussianEvent) else e.event
        for e in ledger.entries(run_id=run_id, purpose=purpose)
        if part is None or e.part == part
    )


def training_history(ledger: PrivacyLedger, run_id: str, purpose: str) -> tuple[DpSgdEvent, ...]:
    """The run's training rounds so far (ledger rounds from 1 on; the ranges release is round 0,
    a DP evaluation is recorded on the held-out part), each as a DP-SGD event."""
    return tuple(
        e.event.as_dp_sgd() if isinstance(e.event, GaussianEvent) else e.event
        for e in ledger.entries(run_id=run_id, purpose=purpose)
        if e.part == TRAIN and e.round >= 1
    )


def check_round_not_answered(
    ledger: PrivacyLedger, run_id: str, purpose: str, server_round: int
) -> None:
    if any(e.round == server_round for e in ledger.entries(run_id=run_id, purpose=purpose)):
        raise RunFailed(
            f"round {server_round} of run '{run_id}' was already answered; a BU releases each "
            "round once (a repeated round would spend its privacy twice)"
        )
