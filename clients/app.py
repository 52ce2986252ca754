"""The Flower ClientApp of a business unit.

Flower's legacy `NumPyClient` (the only client kind Flower 1.41's SecAgg+ works with): every round
is a `fit` call whose instruction says whether to train or to evaluate. The BU re-reads its
`bu.toml` and its silo every round and re-applies consent (as of the job's start, with revocations
since then taking effect at once), records which customers the run used (lineage, as HMAC digests
in its home), calibrates its own noise from the
public plan, and keeps its accountant history in the node's state so that the epsilon it reports is
cumulative over the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.client import ClientApp, NumPyClient

from clients.mods import secure_aggregation_mod
from clients.pipeline import PreparedUnit, UnitKeys, prepare_unit
from clients.silo import load_silo
from clients.training import entropy_generator, local_plan, train_dp_sgd
from federation.evaluation import EVALUATION_RANGE, ScoreSummary
from federation.models import build_model, predict_proba, set_parameters
from federation.wire import UNIT_KEY, DroppedColumn, Instruction, Phase, Refusal, UnitReport
from privacy.accounting import DpSgdEvent, calibrate_noise_multiplier, dp_sgd_epsilon
from privacy.errors import ConfigurationError, RefusedByUnit, RunFailed
from privacy.home import UnitHome
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig

STATE_KEY = "silofed.dp_sgd"


@dataclass(frozen=True)
class Node:
    """This node's BU configuration, its home (None: the one `bu.toml` names), and whether it is a
    simulated BU (seeds allowed) or a real one."""

    bu_config: Path
    home: Path | None
    simulated: bool


class DpSgdState:
    """The node's DP-SGD state for one run, kept in `context.state` between rounds."""

    def __init__(self, context: Context, run_id: str) -> None:
        self._context = context
        record = context.state.config_records.get(STATE_KEY)
        if record is None or record["run_id"] != run_id:
            record = ConfigRecord({"run_id": run_id, "noise_multiplier": 0.0})
            record["nm"], record["q"], record["steps"] = [], [], []
        self._record = record

    @property
    def noise_multiplier(self) -> float | None:
        value = float(self._record["noise_multiplier"])
        return value if value > 0 else None

    @property
    def history(self) -> tuple[DpSgdEvent, ...]:
        r = self._record
        return tuple(
            DpSgdEvent(nm, q, s) for nm, q, s in zip(r["nm"], r["q"], r["steps"], strict=True)
        )

    def save(self, noise_multiplier: float, history: Sequence[DpSgdEvent]) -> None:
        self._record["noise_multiplier"] = noise_multiplier
        self._record["nm"] = [e.noise_multiplier for e in history]
        self._record["q"] = [e.sample_rate for e in history]
        self._record["steps"] = [e.steps for e in history]
        self._context.state.config_records[STATE_KEY] = self._record


def check_secure_range(arrays: list[np.ndarray], bound: float, *, what: str) -> None:
    """SecAgg+ clips to its public range without telling anyone; a BU refuses to send a vector
    that would be clipped, since the sum would then be silently wrong."""
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if not largest <= bound:
        raise RunFailed(
            f"{what} reach {largest:.4g}, outside the secure aggregation range +-{bound:g}; "
            "raise the job's secure_aggregation.clipping_range (a public parameter)"
        )


class BusinessUnitClient(NumPyClient):
    def __init__(self, node: Node, context: Context) -> None:
        self.node = node
        self.context = context

    def get_parameters(self, config):
        raise RunFailed("silofed's coordinator initialises the model; it never asks a BU for one")

    def fit(self, parameters, config):
        instruction = Instruction.from_config(config)
        if instruction.seed is not None and not self.node.simulated:
            raise ConfigurationError(
                "a seed was sent to a deployed BU; seeds exist only in simulation, and a BU in "
                "production draws its noise from the operating system's entropy"
            )
        job = instruction.job
        config = UnitConfig.load(self.node.bu_config)
        home = UnitHome.of(config, self.node.home)
        try:
            keyring = home.keyring() if config.source.encrypted else None
            silo = load_silo(config, keyring=keyring)
            with home.registry() as registry:
                prepared = prepare_unit(
                    silo,
                    job,
                    registry=registry,
                    keys=UnitKeys(home.pseudonym_key(), home.linkage_key()),
                    as_of=job.consent_as_of or instruction.started_at,
                    now=datetime.now(UTC),
                )
            if len(prepared.train.labels) == 0:
                raise RefusedByUnit(
                    f"unit '{config.unit}' has no eligible customer for purpose '{job.purpose}' "
                    f"(excluded: {prepared.excluded}); it takes no part in this run"
                )
            if instruction.phase is Phase.EVALUATE:
                return self._evaluate(prepared, parameters, instruction)
            reply = self._train(prepared, parameters, instruction)
            with home.lineage() as lineage:
                used = np.concatenate([prepared.train.customer_ids, prepared.test.customer_ids])
                lineage.record_digests(
                    instruction.run_id, used, purpose=job.purpose, now=datetime.now(UTC)
                )
            return reply
        except RefusedByUnit as refusal:
            if job.secure_aggregation.enabled:
                # Under SecAgg+ a reply without the masked vector would break the protocol for
                # everyone; the BU drops out instead, and SecAgg+ recovers from the dropout.
                raise
            return [], 0, Refusal(unit=config.unit, reason=str(refusal)).to_metrics()

    def _evaluate(self, prepared: PreparedUnit, parameters, instruction: Instruction):
        job = instruction.job
        model = build_model(job.task, job.feature_spec.dim)
        set_parameters(model, parameters)
        scores = predict_proba(model, prepared.test.features)
        summary = ScoreSummary.of(scores, prepared.test.labels)
        if job.secure_aggregation.enabled:
            # Counts travel exactly on SecAgg+'s integer grid (see server.secure_aggregation);
            # the weight is 1 so that the secure mean times the number of BUs is the sum.
            check_secure_range(summary.to_arrays(), EVALUATION_RANGE, what="evaluation counts")
            return summary.to_arrays(), 1, {UNIT_KEY: prepared.unit}
        return summary.to_arrays(), len(prepared.test.labels), {UNIT_KEY: prepared.unit}

    def _train(self, prepared: PreparedUnit, parameters, instruction: Instruction):
        job = instruction.job
        records = len(prepared.train.labels)
        plan = local_plan(records, job.training)
        state = DpSgdState(self.context, instruction.run_id)
        noise_multiplier = state.noise_multiplier or calibrate_noise_multiplier(
            job.epsilon, job.delta, plan.sample_rate, plan.steps_per_round * job.rounds
        )
        planned = DpSgdEvent(noise_multiplier, plan.sample_rate, plan.steps_per_round)
        would_reach = dp_sgd_epsilon([*state.history, planned], job.delta)
        if would_reach > job.epsilon:
            # e.g. fewer consented customers than when the noise was calibrated: a higher sample
            # rate. The round is not trained; nothing is released.
            raise RefusedByUnit(
                f"unit '{prepared.unit}': round {instruction.server_round} would bring its epsilon "
                f"to {would_reach:.4f}, above the job's {job.epsilon}; the round is not taken"
            )
        seed = None
        if instruction.seed is not None:  # simulation: reproducible, distinct per BU and round
            seed = int(
                np.random.SeedSequence(
                    [instruction.seed, instruction.server_round, *prepared.unit.encode()]
                ).generate_state(1)[0]
            )
        update = train_dp_sgd(
            build_model(job.task, job.feature_spec.dim),
            parameters,
            prepared.train.features,
            prepared.train.labels,
            job.training,
            noise_multiplier,
            state.history,
            entropy_generator(seed),
        )
        state.save(noise_multiplier, update.history)
        report = UnitReport(
            unit=prepared.unit,
            purpose=prepared.purpose,
            encrypted_at_rest=prepared.encrypted_at_rest,
            quality=prepared.quality,
            records_used=records,
            records_test=len(prepared.test.labels),
            excluded=prepared.excluded,
            columns_used=list(prepared.columns_used),
            columns_dropped=[
                DroppedColumn(column=d.column, reason=d.reason) for d in prepared.columns_dropped
            ],
            epsilon=dp_sgd_epsilon(update.history, job.delta),
            noise_multiplier=noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=sum(e.steps for e in update.history),
        )
        if job.secure_aggregation.enabled:
            check_secure_range(
                update.parameters, job.secure_aggregation.clipping_range, what="model parameters"
            )
            return update.parameters, 1, report.to_metrics()  # uniform FedAvg weights under SecAgg+
        return update.parameters, records, report.to_metrics()


def resolve_node(context: Context, nodes: Sequence[Node] | None) -> Node:
    """Deployment: the node config names the BU's `bu-config` (and optionally `home`). Simulation:
    virtual node `partition-id` serves the i-th BU, given by the simulation runner or listed from
    the run config's `data-dir` (homes under `homes-dir`, prepared on first use)."""
    if "bu-config" in context.node_config:
        home = context.node_config.get("home")
        return Node(
            Path(str(context.node_config["bu-config"])), Path(str(home)) if home else None, False
        )
    if "partition-id" not in context.node_config:
        raise ConfigurationError(
            "this node has neither a 'bu-config' entry in its node config nor a simulation "
            "partition; start it with `silofed deploy node` or through `silofed simulate`"
        )
    index = int(context.node_config["partition-id"])
    if nodes is None:
        nodes = _nodes_from_run_config(context)
    if index >= len(nodes):
        raise ConfigurationError(f"simulation node {index} has no BU (only {len(nodes)} found)")
    return nodes[index]


def _nodes_from_run_config(context: Context) -> list[Node]:
    from clients.steward import prepare_simulated_home

    data_dir = str(context.run_config.get("data-dir", ""))
    if not data_dir:
        raise ConfigurationError(
            "run config 'data-dir' is empty: pass --run-config \"data-dir='SILOS'\" to flwr run"
        )
    homes_dir = Path(str(context.run_config.get("homes-dir", "")) or Path(data_dir) / ".homes")
    nodes = []
    for bu_config in sorted(Path(data_dir).glob(f"*/{UNIT_CONFIG_FILE}")):
        config = UnitConfig.load(bu_config)
        home = homes_dir / config.unit
        prepare_simulated_home(config, home)
        nodes.append(Node(bu_config, home, True))
    return nodes


def make_client_app(nodes: Sequence[Node] | None = None) -> ClientApp:
    """The ClientApp; `nodes` lists the simulated BUs (in node order) when the simulation runner
    knows them, otherwise each node is resolved from the node or run config."""

    def client_fn(context: Context):
        torch.set_num_threads(1)  # one core per virtual node; 2-core machines thrash otherwise
        return BusinessUnitClient(resolve_node(context, nodes), context).to_client()

    return ClientApp(client_fn=client_fn, mods=[secure_aggregation_mod])


app = make_client_app()
