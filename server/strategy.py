"""`FederatedRounds`: the strategy wrapper that makes every silofed exchange a Flower train round.

It wraps the model-averaging strategy (FedAvg by default) and adds what silofed needs around it:
the typed instruction in every message, evaluation exchanges that sum the BUs' score statistics,
refusals kept apart from updates, and a BU failure that fails the run instead of being averaged
away. Training itself is delegated unchanged to the wrapped strategy.

Every exchange is a train message because Flower 1.41's SecAgg+ only covers those, so that
evaluation (and later queries) can be securely summed the same way.
"""

from __future__ import annotations

import re

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from federation.evaluation import SCORE_BINS, ScoreSummary
from federation.models import initial_parameters
from federation.wire import Instruction, Phase, UnitReport, refusal_of
from privacy.errors import RefusedByUnit, RunFailed
from server.run import RunRecord


class FederatedRounds(Strategy):
    def __init__(self, inner: Strategy, record: RunRecord) -> None:
        self.inner = inner
        self.record = record
        self.phase = Phase.TRAIN
        self.completed: dict[Phase, int] = {Phase.TRAIN: 0, Phase.EVALUATE: 0}

    def __repr__(self) -> str:
        return f"FederatedRounds({self.inner!r})"

    @property
    def _plan(self):
        return self.record.plan

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        job = self._plan.job
        return ndarrays_to_parameters(initial_parameters(job.task, job.feature_spec.dim))

    def _instruction(self, server_round: int) -> dict:
        return Instruction(
            phase=self.phase,
            server_round=server_round,
            run_id=self._plan.run_id,
            started_at=self._plan.started_at,
            job=self._plan.job,
            seed=self._plan.seed,
            units=self._plan.expected_units,
        ).to_config()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        config = self._instruction(server_round)
        if self.phase is Phase.TRAIN:
            pairs = self.inner.configure_fit(server_round, parameters, client_manager)
            return [
                (proxy, FitIns(ins.parameters, {**ins.config, **config})) for proxy, ins in pairs
            ]
        # every BU is asked; one that refused the job refuses again and is kept apart below
        expected = self._plan.expected_units
        proxies = client_manager.sample(num_clients=expected, min_num_clients=expected)
        return [(proxy, FitIns(parameters, config)) for proxy in proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        if failures:
            # Flower's SecAgg+ workflow lists a dropout twice; one line per distinct failure.
            reasons = list(dict.fromkeys(_describe(f) for f in failures))
            if not self._plan.job.secure_aggregation.enabled:
                raise RunFailed(
                    f"round {server_round} ({self.phase}): {len(reasons)} BU(s) failed: "
                    + "; ".join(reasons)
                )
            # Under SecAgg+ the workflow already checked that enough BUs survived for the
            # threshold (or halted, which fails the run); the sum is over the survivors.
            for reason in reasons:
                self.record.dropouts.append(
                    {"round": server_round, "phase": str(self.phase), "reason": reason}
                )
        answered = []
        for proxy, res in results:
            refusal = refusal_of(res.metrics)
            if refusal is not None:
                self.record.refused[refusal.unit] = refusal.reason
            else:
                answered.append((proxy, res))
        if not answered:
            raise RefusedByUnit(
                "every BU refused the job: "
                + "; ".join(f"{u}: {r}" for u, r in sorted(self.record.refused.items()))
            )
        if self.phase is Phase.EVALUATE:
            self.record.record_evaluation(server_round, self._summed(answered).metrics())
            self.completed[Phase.EVALUATE] = server_round
            return None, {}
        self.record.record_training([UnitReport.from_metrics(r.metrics) for _, r in answered])
        parameters, metrics = self.inner.aggregate_fit(server_round, answered, [])
        if parameters is None:
            raise RunFailed(f"round {server_round}: the aggregation produced no model")
        self.completed[Phase.TRAIN] = server_round
        return parameters, metrics

    def _summed(self, answered: list[tuple[ClientProxy, FitRes]]) -> ScoreSummary:
        if self._plan.job.secure_aggregation.enabled:
            # SecAgg+ hands every result the same secure mean (weights 1): times the number of
            # BUs it is the sum. Counts were integers on the grid; round them back exactly.
            (mean,) = parameters_to_ndarrays(answered[0][1].parameters)
            total = mean * len(answered)
            total[: 2 * SCORE_BINS] = np.round(total[: 2 * SCORE_BINS])
            return ScoreSummary.from_arrays([total])
        summaries = [
            ScoreSummary.from_arrays(parameters_to_ndarrays(r.parameters)) for _, r in answered
        ]
        return sum(summaries[1:], summaries[0])

    # Evaluation travels as train rounds (see the module docstring); Flower's evaluate path is unused.
    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _describe(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """The BU's own error message, without the transport's traceback around it."""
    if isinstance(failure, BaseException):
        text = str(failure)
        messages = re.findall(r"Message: (.*?)(?:\\n|\n|'>|$)", text)
        text = messages[-1] if messages else text
    else:
        proxy, res = failure
        text = f"node {proxy.node_id}: {res.status.message}"
    return text if len(text) <= 600 else text[:600] + " ..."
