"""A federation driven in process: the real BU clients and the real coordinator strategy, the
rounds and exchanges of `federation.exchanges`, and no Flower transport or Ray. The tests run whole
jobs (queries, k-means, DP evaluation) with it in seconds, and the benchmarks (`bench/`) measure
utility with it: the clients and the strategy are the ones a Flower simulation runs; only the
transport is left out. The Flower path itself is covered by a few end-to-end simulations."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from clients.app import BusinessUnitClient, Node
from clients.steward import prepare_simulated_home
from federation.exchanges import exchange_rounds, phases, resolve_job
from federation.job import Job
from federation.wire import Phase
from privacy.errors import ConfigurationError, SilofedError
from privacy.unit_config import UnitConfig
from server.aggregation import declared_sizes
from server.app import coordinator_strategy, write_run_directory
from server.audit_trail import open_run_log
from server.checkpoint import load_checkpoint, save_checkpoint, starting_point
from server.run import RunPlan, RunRecord
from simulations.faults import Fault, active, check_faults, misbehave_before, tampered_by

ReplyCallback = Callable[[int, Phase, str, list[np.ndarray], int], None]


class Proxy(ClientProxy):
    """A BU's place in Flower's client manager, without transport: fit is called directly."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


@dataclass
class InProcessRun:
    record: RunRecord
    parameters: list[np.ndarray]
    nodes: list[Node]
    job: Job  # resolved, with the feature windows of the ranges exchange when it had one


def run_in_process(
    job: Job,
    bu_configs: list[Path],
    homes: Path,
    *,
    seed: int | None = 0,
    out: Path | None = None,
    faults: Sequence[Fault] = (),
    round_timeout: float | None = None,
    on_reply: ReplyCallback | None = None,
    resume: bool = False,
) -> InProcessRun:
    """Run `job` over the BUs of `bu_configs` (homes under `homes`); write the run directory to
    `out` when given. `faults` act as in a simulation; a reply that takes longer than
    `round_timeout` seconds is dropped as missing, as the coordinator's deadline drops it.
    `on_reply(round, phase, unit, arrays, weight)` sees every reply as the coordinator receives it.
    With `out`, the coordinator checkpoints there after each round, and `resume` goes on from the
    checkpoint in `out` (the BUs' homes must be the same)."""
    configs = [UnitConfig.load(p) for p in bu_configs]
    job = resolve_job(job, configs)
    check_faults(faults, job)
    nodes = [
        Node(p, prepare_simulated_home(c, homes / c.unit).directory, True)
        for p, c in zip(bu_configs, configs, strict=True)
    ]
    if resume and out is None:
        raise ConfigurationError("resuming needs the run directory (out) holding the checkpoint")
    checkpoint = load_checkpoint(out) if resume else None
    plan = RunPlan(
        run_id="inprocess-run",
        job=job,
        expected_units=len(nodes),
        mode="simulation",
        out=out or homes / "run",
        started_at=checkpoint.started_at if checkpoint is not None else datetime.now(UTC),
        checkpoints=out is not None,
        resume=resume,
        seed=seed,
        max_customers=declared_sizes(configs),
        round_timeout=round_timeout,
    )
    record = RunRecord(plan)
    if out is not None:
        record.audit = open_run_log(plan)
    strategy = coordinator_strategy(record)
    manager = SimpleClientManager()
    proxies = [Proxy(i) for i in range(len(nodes))]
    for proxy in proxies:
        manager.register(proxy)
    clients = {
        proxy.node_id: (config.unit, BusinessUnitClient(node))
        for proxy, node, config in zip(proxies, nodes, configs, strict=True)
    }
    parameters, first = starting_point(strategy, manager, checkpoint)
    try:
        for server_round in range(first, exchange_rounds(job) + 1):
            for phase in phases(record.plan.job, server_round):
                strategy.phase = phase
                results, failures = [], []
                for proxy, ins in strategy.configure_fit(server_round, parameters, manager):
                    unit, client = clients[proxy.node_id]
                    try:
                        res = _reply(client, ins, faults, unit, server_round, phase, round_timeout)
                    except Exception as err:  # what Flower's grid turns into an error reply
                        failures.append(RuntimeError(f"node {proxy.node_id}: {err}"))
                        continue
                    if on_reply is not None:
                        on_reply(
                            server_round,
                            phase,
                            unit,
                            parameters_to_ndarrays(res.parameters),
                            res.num_examples,
                        )
                    results.append((proxy, res))
                updated, _ = strategy.aggregate_fit(server_round, results, failures)
                if updated is not None:
                    parameters = updated
            if plan.checkpoints:
                save_checkpoint(strategy, server_round, parameters_to_ndarrays(parameters))
    except SilofedError as err:
        record.error = str(err)
        raise
    final = parameters_to_ndarrays(parameters)
    if out is not None:
        write_run_directory(record, final)
    return InProcessRun(record=record, parameters=final, nodes=nodes, job=record.plan.job)


def _reply(
    client: BusinessUnitClient,
    ins,
    faults: Sequence[Fault],
    unit: str,
    server_round: int,
    phase: Phase,
    round_timeout: float | None,
) -> FitRes:
    """One BU's reply to `ins`, with its faults; a crash, or a reply past the deadline, raises."""
    acting = active(faults, unit, server_round, phase)
    started = time.monotonic()
    misbehave_before(acting, round_timeout)
    sent = parameters_to_ndarrays(ins.parameters)
    arrays, examples, metrics = client.fit(sent, ins.config)
    if round_timeout is not None and time.monotonic() - started > round_timeout:
        raise TimeoutError(f"no reply within {round_timeout:g} s")
    arrays, examples = tampered_by(acting, sent, arrays, examples)
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), examples, metrics)
