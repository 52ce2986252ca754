"""The round workflow of a silofed run, on Flower's legacy workflow machinery.

Like Flower's `DefaultWorkflow`, but each round is one or more exchanges through the same fit
workflow (`default_fit_workflow`, or `SecAggPlusWorkflow` when secure aggregation is on), as
`federation.exchanges.phases` lists them: train then evaluate, a query, or a k-means iteration. After each exchange it checks that the strategy really aggregated: Flower's
SecAgg+ workflow only logs "halted" and returns, and Flower then exits 0; silofed fails the run.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message
from flwr.common import parameters_to_ndarrays
from flwr.common.constant import ErrorCode
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
from server.checkpoint import save_checkpoint, starting_point
from server.strategy import FederatedRounds

NODE_POLL_SECONDS = 1.0


class DeadlineGrid:
    """A grid whose every exchange has a deadline, and whose failed replies name their node.

    Flower's legacy fit workflow waits for replies without a timeout, and a node that went away
    is only reported once the SuperLink stops hearing its heartbeat; a node that hangs would
    stall the run for ever. Here a reply missing at the deadline becomes an error reply from its
    node, and every error reply says which node it is from, so the strategy can name the BU.
    """

    def __init__(self, grid: Grid, timeout: float | None) -> None:
        """`timeout`: seconds for an exchange's replies (None: no deadline, only the naming)."""
        self._grid = grid
        self.timeout = timeout

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = list(messages)
        limits = [t for t in (timeout, self.timeout) if t is not None]
        deadline = min(limits) if limits else None
        replies = list(self._grid.send_and_receive(sent, timeout=deadline))
        # The grid stamps each sent message with its id; the SuperLink's own error replies (a
        # node that stopped sending heartbeats) come from the SuperLink, not from the node, so
        # a reply is matched to what was sent by that id, else by its node.
        pending = list(sent)
        named = []
        for reply in replies:
            original = _original(pending, reply)
            if original is None:
                named.append(reply)
                continue
            pending.remove(original)
            if reply.has_error():
                node = original.metadata.dst_node_id
                reply = Message(
                    Error(reply.error.code, f"node {node}: {reply.error.reason}"),
                    reply_to=original,
                )
            named.append(reply)
        within = f" within {deadline:g} s" if deadline is not None else ""
        silent = [
            Message(
                Error(
                    ErrorCode.NODE_UNAVAILABLE,
                    f"node {message.metadata.dst_node_id}: no reply{within}",
                ),
                reply_to=message,
            )
            for message in pending
        ]
        return named + silent


def _original(pending: list[Message], reply: Message) -> Message | None:
    wanted = reply.metadata.reply_to_message_id
    for message in pending:
        if wanted and message.metadata.message_id == wanted:
            return message
    for message in pending:
        if message.metadata.dst_node_id == reply.metadata.src_node_id:
            return message
    return None


def await_nodes(grid: Grid, expected: int, timeout: float) -> None:
    """Wait until `expected` nodes are connected, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= expected:
            return
        if time.monotonic() >= deadline:
            raise RunFailed(
                f"{connected} of {expected} BU nodes connected within {timeout:g} s; every "
                "enrolled BU must run `silofed deploy node` (see `silofed deploy status`)"
            )
        time.sleep(NODE_POLL_SECONDS)


class RoundsWorkflow:
    def __init__(
        self,
        workflows: dict[Phase, Workflow] | None = None,
        *,
        connect_timeout: float | None = None,
    ) -> None:
        """`workflows`: the fit workflow of each phase (default: Flower's plain fit workflow).
        `connect_timeout`: how long every exchange waits for all expected nodes to be connected
        (None: Flower's own wait, a day)."""
        self.workflows = workflows or dict.fromkeys(Phase, default_fit_workflow)
        self.connect_timeout = connect_timeout

    def __call__(self, grid: Grid, context: LegacyContext) -> list:
        """Run every round; return the final global parameters as numpy arrays."""
        strategy = context.strategy
        if not isinstance(strategy, FederatedRounds):
            raise TypeError(f"RoundsWorkflow needs a FederatedRounds strategy, got {strategy!r}")
        thread, stop, registered = start_update_client_manager_thread(grid, context.client_manager)
        try:
            registered.wait()
            plan = strategy.record.plan
            parameters, first = starting_point(strategy, context.client_manager)
            context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
                parameters, keep_input=True
            )
            config = ConfigRecord({Key.START_TIME: timeit.default_timer()})
            context.state.config_records[MAIN_CONFIGS_RECORD] = config
            for server_round in range(first, context.config.num_rounds + 1):
                config[Key.CURRENT_ROUND] = server_round
                for phase in phases(strategy.record.plan.job, server_round):
                    strategy.phase = phase
                    if self.connect_timeout is not None:
                        await_nodes(grid, strategy.record.plan.expected_units, self.connect_timeout)
                    self.workflows[phase](grid, context)
                    if strategy.completed[phase] != server_round:
                        raise RunFailed(
                            f"round {server_round}: the {phase} exchange did not complete "
                            "(too few BUs answered, or secure aggregation halted); see the log above"
                        )
                if plan.checkpoints:
                    current = compat.arrayrecord_to_parameters(
                        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
                    )
                    save_checkpoint(strategy, server_round, parameters_to_ndarrays(current))
            final = compat.arrayrecord_to_parameters(
                context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
            return parameters_to_ndarrays(final)
        finally:
            stop.set()
            thread.join()
