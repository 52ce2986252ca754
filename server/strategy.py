"""`FederatedRounds`: the strategy wrapper that makes every silofed exchange a Flower train round.

It wraps the model-averaging strategy (FedAvg by default) and adds what silofed needs around it:
the typed instruction in every message, statistics exchanges (evaluation, queries, k-means
iterations) whose integer vectors it sums and turns into answers with error bars, and refusals
kept apart from updates. Every reply is validated before it is combined (`server.aggregation`): a
malformed, non-finite or overweight reply, or a BU that did not answer, is rejected with its reason
in the audit log and the report, and the exchange goes on with the valid replies if they make the
job's quorum, else the run stops. Replies are combined in a fixed order, by BU. Training itself is
delegated to the wrapped strategy (FedAvg, or a robust rule).

Every exchange is a train message because Flower 1.41's SecAgg+ only covers those, so that
evaluation, queries and k-means are securely summed the same way as model updates.
"""

from __future__ import annotations

import contextlib
import re

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from federation.evaluation import (
    SCORE_BINS,
    ScoreSummary,
    dp_binary_metrics,
    dp_regression_metrics,
)
from federation.exchanges import phases, release_layout, release_multiplier
from federation.job import JobKind
from federation.models import initial_parameters
from federation.queries import query_answers
from federation.ranges import windows_from_histograms
from federation.secagg import shares_and_threshold
from federation.segments import initial_centroids, update_centroids
from federation.tasks import adapter
from federation.wire import (
    EXCHANGE_KEY,
    UNIT_KEY,
    Instruction,
    Phase,
    UnitReport,
    exchange_tag,
    refusal_of,
    unit_of,
)
from privacy.errors import RefusedByUnit, RunFailed
from privacy.mechanisms import Placement
from privacy.samplers import SecureSource, SeededSource
from server.aggregation import (
    check_update,
    check_vector,
    quorum,
)
from server.run import RunRecord

NPY_HEADER = 1024  # bytes: numpy's .npy header of one array, with room to spare


def no_fit_metrics(_metrics: list) -> dict:
    """The inner strategy's aggregation of reply metrics: none. `FederatedRounds` reads every
    BU's report from the replies itself; this only tells Flower's FedAvg that nothing is lost
    (without it, it warns in every round)."""
    return {}


class FederatedRounds(Strategy):
    def __init__(self, inner: Strategy, record: RunRecord) -> None:
        self.inner = inner
        self.record = record
        self.phase = Phase.TRAIN
        self.completed: dict[Phase, int] = dict.fromkeys(Phase, 0)
        self._current: list[np.ndarray] = []
        # node id -> BU: from the deployment's registrations and every reply, to name a dropout
        self.node_units: dict[int, str] = dict(record.plan.node_units)
        seed = record.plan.seed
        # The coordinator's own noise (central placement): OS entropy, or the simulation seed.
        self._source = SecureSource() if seed is None else SeededSource(seed + 1)

    def __repr__(self) -> str:
        return f"FederatedRounds({self.inner!r})"

    @property
    def _plan(self):
        return self.record.plan

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        job = self._plan.job
        if job.kind is JobKind.SEGMENTS:
            return ndarrays_to_parameters(
                [initial_centroids(job.segments_spec, job.feature_spec.dim)]
            )
        if job.kind is JobKind.QUERY:
            return ndarrays_to_parameters([np.zeros(1)])  # a query sends no parameters
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
        self._current = parameters_to_ndarrays(parameters)
        if self.phase is Phase.TRAIN:
            pairs = [
                (proxy, FitIns(ins.parameters, {**ins.config, **config}))
                for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager)
            ]
        else:
            # every BU is asked; one that refused the job refuses again and is kept apart below
            expected = self._plan.expected_units
            proxies = client_manager.sample(num_clients=expected, min_num_clients=expected)
            pairs = [(proxy, FitIns(parameters, config)) for proxy in proxies]
        if self.record.audit is not None:
            self.record.audit.append(
                "exchange.started",
                {"round": server_round, "phase": str(self.phase), "units_asked": len(pairs)},
            )
        return pairs

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict]:
        answered = []
        for proxy, res in results:
            try:
                refusal = refusal_of(res.metrics)
            except RunFailed as err:
                unit = self.node_units.get(proxy.node_id) or f"node {proxy.node_id}"
                self._reject(server_round, unit, f"unreadable reply: {err}")
                continue
            if refusal is not None:
                self.record.refused[refusal.unit] = refusal.reason
                self.node_units[proxy.node_id] = refusal.unit
            else:
                answered.append((proxy, res))
                with contextlib.suppress(RunFailed):  # an unreadable report is rejected below
                    self.node_units[proxy.node_id] = unit_of(res.metrics)
        if failures:
            # Flower's SecAgg+ workflow lists a dropout twice; one entry per distinct failure.
            dropouts = list(
                {
                    (d["unit"], d["reason"]): d
                    for d in (self._dropout(server_round, f) for f in failures)
                }.values()
            )
            self.record.dropouts.extend(dropouts)
            for dropout in dropouts:
                self._reject(server_round, dropout["unit"], f"no reply: {dropout['reason']}")
            # Under SecAgg+ the workflow already checked that enough BUs survived for the
            # threshold (or halted, which fails the run); the sum is over the survivors.
        if not self._plan.job.secure_aggregation.enabled:
            # Each reply on its own; under SecAgg+ the coordinator sees only the sum.
            answered = [
                (proxy, res) for proxy, res in answered if self._valid(server_round, proxy, res)
            ]
            answered = self._first_per_unit(server_round, answered)
        if not answered and not failures and self.record.refused:
            raise RefusedByUnit(
                "every BU refused the job: "
                + "; ".join(f"{u}: {r}" for u, r in sorted(self.record.refused.items()))
            )
        self._check_quorum(server_round, len(answered))
        # A fixed order, by BU, whatever the order of arrival: the same replies give the same
        # aggregate to the last bit.
        answered.sort(key=lambda pair: self.node_units.get(pair[0].node_id, ""))
        job = self._plan.job
        if self.record.audit is not None:
            self.record.audit.append(
                "exchange.aggregated",
                {
                    "round": server_round,
                    "phase": str(self.phase),
                    "units": sorted(
                        unit_of(r.metrics)
                        for _, r in answered
                        if UNIT_KEY in r.metrics or UnitReport.KEY in r.metrics
                    ),
                    "refused": sorted(self.record.refused),
                    "dropped": sorted(
                        d["unit"] or "unidentified"
                        for d in self.record.dropouts
                        if d["round"] == server_round
                    ),
                    "secure_aggregation": job.secure_aggregation.enabled,
                },
            )
        last_of_round = self.phase is phases(job, server_round)[-1]
        if self.phase is Phase.TRAIN:
            self.record.record_training([UnitReport.from_metrics(r.metrics) for _, r in answered])
            parameters, metrics = self.inner.aggregate_fit(server_round, answered, [])
            if parameters is None:
                raise RunFailed(f"round {server_round}: the aggregation produced no model")
        elif self.phase is Phase.EVALUATE and release_layout(job, self.phase) is None:
            self.record.record_metrics(self._summed(answered).metrics())
            parameters, metrics = None, {}
        else:
            parameters, metrics = self._release(server_round, answered), {}
        self.completed[self.phase] = server_round
        if last_of_round:
            self.record.finish_round(server_round)
        return parameters, metrics

    def _valid(self, server_round: int, proxy: ClientProxy, res: FitRes) -> bool:
        """Whether a reply may be combined; a rejected one is recorded with its reason."""
        unit = self.node_units.get(proxy.node_id)
        expected = exchange_tag(self._plan.run_id, server_round, self.phase)
        answers = res.metrics.get(EXCHANGE_KEY)
        if answers != expected:
            self._reject(
                server_round,
                unit or f"node {proxy.node_id}",
                f"a reply to another exchange ({answers!r}, not {expected!r}): late or replayed",
            )
            return False
        try:
            reason = self._oversized(res.parameters, server_round)
            if reason is None:
                reason = self._problem(parameters_to_ndarrays(res.parameters), res, server_round)
        except (RunFailed, ValueError, TypeError) as err:
            reason = f"unreadable reply: {err}"
        if reason is None:
            return True
        self._reject(server_round, unit or f"node {proxy.node_id}", reason)
        if self.phase is Phase.TRAIN:
            # its release happened and its ledger holds it: the report keeps what it spent
            with contextlib.suppress(RunFailed):
                self.record.record_spent(UnitReport.from_metrics(res.metrics))
        return False

    def _first_per_unit(
        self, server_round: int, answered: list[tuple[ClientProxy, FitRes]]
    ) -> list[tuple[ClientProxy, FitRes]]:
        """One reply per BU: a second one for the same exchange is rejected, never counted twice."""
        seen: set[str] = set()
        kept = []
        for proxy, res in answered:
            unit = self.node_units.get(proxy.node_id, f"node {proxy.node_id}")
            if unit in seen:
                self._reject(server_round, unit, "a second reply to this exchange")
                continue
            seen.add(unit)
            kept.append((proxy, res))
        return kept

    def _oversized(self, parameters: Parameters, server_round: int) -> str | None:
        """Refuse a reply larger than the exchange can need before it is deserialised: the
        arrays sent (training) or one vector of 8-byte values (a release), plus headers."""
        layout = release_layout(self._plan.job, self.phase, server_round)
        if self.phase is Phase.TRAIN:
            limit = sum(a.nbytes for a in self._current) + NPY_HEADER * len(self._current)
        elif layout is not None:
            limit = 8 * layout.size + NPY_HEADER
        else:
            return None  # the exact evaluation's summaries (development only)
        size = sum(len(t) for t in parameters.tensors)
        if size > 2 * limit:  # room for a float64 reply, which the dtype check names
            return f"{size} bytes of arrays where the exchange needs at most {limit}"
        return None

    def _problem(self, arrays: list[np.ndarray], res: FitRes, server_round: int) -> str | None:
        job = self._plan.job
        if self.phase is Phase.TRAIN:
            report = UnitReport.from_metrics(res.metrics)
            return check_update(
                arrays,
                self._current,
                res.num_examples,
                max_weight=self._plan.max_customers.get(report.unit),
                records_used=report.records_used,
            )
        layout = release_layout(job, self.phase, server_round)
        if layout is None:  # the exact evaluation's score summaries (development only)
            if not all(np.all(np.isfinite(a)) for a in arrays):
                return "non-finite values in the score summary"
            return None
        return check_vector(arrays, layout.size)

    def _reject(self, server_round: int, unit: str | None, reason: str) -> None:
        entry = {
            "unit": unit or "unidentified",
            "round": server_round,
            "phase": str(self.phase),
            "reason": reason,
        }
        self.record.rejected.append(entry)
        if self.record.audit is not None:
            self.record.audit.append("reply.rejected", entry)

    def _check_quorum(self, server_round: int, valid: int) -> None:
        """An exchange goes on with enough valid replies; otherwise the run stops before any
        further exchange, so that no BU spends budget on a round that cannot complete."""
        taking_part = self._plan.expected_units - len(self.record.refused)
        needed = quorum(self._plan.job.aggregation, taking_part)
        if valid >= needed:
            return
        lost = [e for e in self.record.rejected if e["round"] == server_round]
        raise RunFailed(
            f"round {server_round} ({self.phase}): {valid} valid replies of {taking_part} BUs, "
            f"below the quorum of {needed} (aggregation.quorum {self._plan.job.aggregation.quorum}"
            f", rule '{self._plan.job.aggregation.rule}'); "
            + "; ".join(f"{e['unit']}: {e['reason']}" for e in lost)
        )

    def _release(
        self, server_round: int, answered: list[tuple[ClientProxy, FitRes]]
    ) -> Parameters | None:
        """Sum the BUs' integer vectors, add the coordinator's noise under the central placement,
        and turn the sum into answers with the noise it carries."""
        job, phase = self._plan.job, self.phase
        layout = release_layout(job, phase, server_round)
        z = release_multiplier(job, phase)
        assert layout is not None
        total = self._integer_total(answered, layout.size)
        placement = Placement(job.noise.value)
        if z is not None and placement is Placement.CENTRAL:
            total = layout.central_noise(total, z, self._source)
        secure = job.secure_aggregation
        threshold = shares_and_threshold(self._plan.expected_units)[1] if secure.enabled else 1
        noise = layout.noise_in_sum(
            z,
            placement,
            contributors=len(answered),
            threshold=threshold,
            colluding=secure.colluding,
        )
        reports = [UnitReport.from_metrics(r.metrics) for _, r in answered]
        if phase is Phase.RANGES:
            spec = job.feature_spec
            customers = sum(r.records_used for r in reports)  # disclosed with every reply
            windows = windows_from_histograms(total, spec, noise["histograms"].std, customers)
            self.record.record_ranges(reports, windows)
            return None
        if phase is Phase.EVALUATE:
            task = adapter(job.task, job.feature_spec)
            if task.kind == "regression":
                evaluation = dp_regression_metrics(
                    total, noise, upper=task.upper_of(job.feature_spec)
                )
            else:
                evaluation = dp_binary_metrics(total, noise, job.evaluation.bins)
            self.record.record_evaluation_release(reports, evaluation)
            return None
        self.record.record_release(reports)
        if phase is Phase.QUERY:
            self.record.results = query_answers(job.query_spec, total, noise).to_json()
            return None
        update = update_centroids(total, noise, self._current[0], job.segments_spec)
        self.record.results = update.to_json(job.feature_spec.output_names, job.feature_spec)
        self.record.record_metrics({"segments_nonempty": float(np.sum(update.sizes > 0))})
        return ndarrays_to_parameters([update.centroids])

    def _integer_total(self, answered: list[tuple[ClientProxy, FitRes]], size: int) -> np.ndarray:
        vectors = [parameters_to_ndarrays(r.parameters) for _, r in answered]
        if any(len(v) != 1 or v[0].shape != (size,) for v in vectors):
            raise RunFailed(
                f"a BU's {self.phase} reply is not one vector of {size} values; the BUs and the "
                "coordinator disagree on the job"
            )
        if self._plan.job.secure_aggregation.enabled:
            # SecAgg+ hands every result the same secure mean (weights 1): times the number of
            # BUs it is the sum of integers on the grid.
            total = vectors[0][0] * len(answered)
        else:
            total = np.sum([v[0] for v in vectors], axis=0)
        rounded = np.rint(total)
        if not np.all(np.isfinite(total)) or np.max(np.abs(total - rounded), initial=0) > 1e-6:
            raise RunFailed(f"the {self.phase} replies are not integers on the release grid")
        return rounded.astype(np.int64)

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

    def _dropout(
        self, server_round: int, failure: tuple[ClientProxy, FitRes] | BaseException
    ) -> dict:
        """The report's entry for a failed reply, naming the BU when its node is known: from an
        earlier reply of that node, or as the only enrolled BU that has not answered yet."""
        if isinstance(failure, BaseException):
            found = _NODE.search(str(failure))
            node = int(found.group(1)) if found else None
        else:
            node = failure[0].node_id
        unit = self.node_units.get(node) if node is not None else None
        if unit is None:
            silent = sorted(set(self._plan.enrolled) - set(self.node_units.values()))
            unit = silent[0] if len(silent) == 1 else None
        return {
            "round": server_round,
            "phase": str(self.phase),
            "unit": unit,
            "node": node,
            "reason": _describe(failure),
        }


_NODE = re.compile(r"node (\d+)")


def _describe(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    """The BU's own error message, without the transport's traceback around it."""
    if isinstance(failure, BaseException):
        text = str(failure)
        messages = re.findall(r"Message: (.*?)(?:\\n|\n|'>|$)", text)
        if messages:
            text = messages[-1]
        elif reason := re.fullmatch(r"Error\(code=\d+, reason='(.*)'\)", text, re.DOTALL):
            text = reason.group(1)  # an error reply: its reason, without the repr around it
    else:
        proxy, res = failure
        text = f"node {proxy.node_id}: {res.status.message}"
    return text if len(text) <= 600 else text[:600] + " ..."
