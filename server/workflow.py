"""The round workflow of a silofed run, on Flower's legacy workflow machinery.

Like Flower's `DefaultWorkflow`, but each round is one or more exchanges through the same fit
workflow (`default_fit_workflow`, or `SecAggPlusWorkflow` when secure aggregation is on), as
`federation.exchanges.phases` lists them: train then evaluate, a query, or a k-means iteration. After each exchange it checks that the strategy really aggregated: Flower's
SecAgg+ workflow only logs "halted" and returns, and Flower then exits 0; silofed fails the run.
"""

from __future__ import annotations

import timeit

from flwr.app import ConfigRecord
from flwr.common import parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.server.typing import Workflow
from flwr.server import LegacyContext
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid

from federation.exchanges import phases
from federation.wire import Phase
from privacy.errors import RunFailed
from server.strategy import FederatedRounds


class RoundsWorkflow:
    def __init__(self, workflows: dict[Phase, Workflow] | None = None) -> None:
        """`workflows`: the fit workflow of each phase (default: Flower's plain fit workflow)."""
        self.workflows = workflows or dict.fromkeys(Phase, default_fit_workflow)

    def __call__(self, grid: Grid, context: LegacyContext) -> list:
        """Run every round; return the final global parameters as numpy arrays."""
        strategy = context.strategy
        if not isinstance(strategy, FederatedRounds):
            raise TypeError(f"RoundsWorkflow needs a FederatedRounds strategy, got {strategy!r}")
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        try:
            registered.wait()
            parameters = strategy.initialize_parameters(context.client_manager)
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                parameters, keep_input=True
            )
            config = ConfigRecord({Key.START_TIME: timeit.default_timer()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = config
            for server_round in range(1, context.config.num_rounds + 1):
                config[Key.CURRENT_ROUND] = server_round
                for phase in phases(strategy.record.plan.job, server_round):
                    strategy.phase = phase
                    self.workflows[phase](grid, context)
                    if strategy.completed[phase] != server_round:
                        raise RunFailed(
                            f"round {server_round}: the {phase} exchange did not complete "
                            "(too few BUs answered, or secure aggregation halted); see the log above"
                        )
            final = compat.arrayrecord_to_parameters(
                context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
            return parameters_to_ndarrays(final)
        finally:
            stop.set()
            thread.join()
