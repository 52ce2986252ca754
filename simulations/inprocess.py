"""A federation driven in process: the real BU clients and the real coordinator strategy, the
rounds and exchanges of `federation.exchanges`, and no Flower transport or Ray. The tests run whole
jobs (queries, k-means, DP evaluation) with it in seconds, and the benchmarks (`bench/`) measure
utility with it: the clients and the strategy are the ones a Flower simulation runs; only the
transport is left out. The Flower path itself is covered by a few end-to-end simulations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from clients.app import BusinessUnitClient, Node
from clients.steward import prepare_simulated_home
from federation.exchanges import exchange_rounds, phases, resolve_job
from federation.job import Job
from privacy.unit_config import UnitConfig
from server.app import write_run_directory
from server.audit_trail import open_run_log
from server.run import RunPlan, RunRecord
from server.strategy import FederatedRounds, no_fit_metrics


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
) -> InProcessRun:
    """Run `job` over the BUs of `bu_configs` (homes under `homes`); write the run directory to
    `out` when given."""
    configs = [UnitConfig.load(p) for p in bu_configs]
    job = resolve_job(job, configs)
    nodes = [
        Node(p, prepare_simulated_home(c, homes / c.unit).directory, True)
        for p, c in zip(bu_configs, configs, strict=True)
    ]
    plan = RunPlan(
        run_id="inprocess-run",
        job=job,
        expected_units=len(nodes),
        mode="simulation",
        out=out or homes / "run",
        started_at=datetime.now(UTC),
        seed=seed,
    )
    record = RunRecord(plan)
    if out is not None:
        record.audit = open_run_log(plan)
    units = len(nodes)
    strategy = FederatedRounds(
        FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=units,
            min_available_clients=units,
            fit_metrics_aggregation_fn=no_fit_metrics,
        ),
        record,
    )
    manager = SimpleClientManager()
    proxies = [Proxy(i) for i in range(units)]
    for proxy in proxies:
        manager.register(proxy)
    clients = {
        proxy.node_id: BusinessUnitClient(node) for proxy, node in zip(proxies, nodes, strict=True)
    }
    parameters = strategy.initialize_parameters(manager)
    for server_round in range(1, exchange_rounds(job) + 1):
        for phase in phases(job, server_round):
            strategy.phase = phase
            results = []
            for proxy, ins in strategy.configure_fit(server_round, parameters, manager):
                arrays, examples, metrics = clients[proxy.node_id].fit(
                    parameters_to_ndarrays(ins.parameters), ins.config
                )
                results.append(
                    (
                        proxy,
                        FitRes(
                            Status(Code.OK, ""), ndarrays_to_parameters(arrays), examples, metrics
                        ),
                    )
                )
            updated, _ = strategy.aggregate_fit(server_round, results, [])
            if updated is not None:
                parameters = updated
    final = parameters_to_ndarrays(parameters)
    if out is not None:
        write_run_directory(record, final)
    return InProcessRun(record=record, parameters=final, nodes=nodes, job=record.plan.job)
