"""`FederatedRounds`, driven in process with hand-made replies: delegation to the wrapped
strategy, evaluation sums, refusals and failures."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg, Strategy

from federation.evaluation import ScoreSummary
from federation.features import resolve_feature_spec
from federation.job import Job
from federation.wire import (
    EXCHANGE_KEY,
    UNIT_KEY,
    DroppedColumn,
    Instruction,
    Phase,
    Refusal,
    UnitReport,
    exchange_tag,
)
from privacy.errors import RefusedByUnit, RunFailed
from server.audit_trail import open_run_log
from server.report import build_report, render_html
from server.run import RunPlan, RunRecord
from server.strategy import FederatedRounds
from simulations.inprocess import Proxy
from simulations.synthetic import unit_schema
from tests.report_contract import assert_report_contract


class SumPlusOne(Strategy):
    """Test double: aggregates by summing and adding one, so its use is visible in the result."""

    def __init__(self) -> None:
        self.calls = 0

    def aggregate_fit(self, server_round, results, failures):
        self.calls += 1
        arrays = [parameters_to_ndarrays(r.parameters) for _, r in results]
        return ndarrays_to_parameters(
            [sum(a[i] for a in arrays) + 1 for i in range(len(arrays[0]))]
        ), {}

    def configure_fit(self, server_round, parameters, client_manager):
        return []

    initialize_parameters = configure_evaluate = aggregate_evaluate = evaluate = None


def _record(
    tmp_path: Path, units: int = 2, evaluation: str = "exact", quorum: float = 0.5
) -> RunRecord:
    job = Job(
        rounds=1,
        evaluation={"mode": evaluation},
        aggregation={"quorum": quorum},
        features=resolve_feature_spec("churn", [unit_schema("x")]),
    )
    plan = RunPlan(
        run_id="r1",
        job=job,
        expected_units=units,
        mode="simulation",
        out=tmp_path,
        started_at=datetime(2026, 6, 1, tzinfo=UTC),
        seed=0,
        auc_ceiling=0.9,
    )
    return RunRecord(plan)


def _report(unit: str, records: int, epsilon: float = 1.0) -> UnitReport:
    return UnitReport(
        unit=unit,
        records_used=records,
        records_test=10,
        excluded={"no_consent": 3, "revoked": 1},
        columns_used=["customers.age"],
        columns_dropped=[DroppedColumn(column="customers.religion", reason="special_category")],
        epsilon=epsilon,
        noise_multiplier=1.1,
        sample_rate=0.1,
        steps=10,
    )


def _rounds(inner: Strategy, record: RunRecord, sent: int = 2) -> FederatedRounds:
    """The wrapper, having sent a model of `sent` float64 parameters (replies are checked
    against what was sent)."""
    strategy = FederatedRounds(inner, record)
    manager = SimpleClientManager()
    for node in range(record.plan.expected_units):
        manager.register(Proxy(node))
    strategy.configure_fit(1, ndarrays_to_parameters([np.zeros(sent)]), manager)
    return strategy


def _answers(server_round: int = 1, phase: Phase = Phase.TRAIN) -> dict[str, str]:
    """The exchange a reply of run r1 names, as every BU's reply does."""
    return {EXCHANGE_KEY: exchange_tag("r1", server_round, phase)}


def _train_reply(
    node: int, arrays: list[np.ndarray], report: UnitReport, server_round: int = 1
) -> tuple[ClientProxy, FitRes]:
    return Proxy(node), FitRes(
        Status(Code.OK, ""),
        ndarrays_to_parameters(arrays),
        report.records_used,
        {**report.to_metrics(), **_answers(server_round)},
    )


def test_training_is_delegated_to_the_wrapped_strategy(tmp_path: Path) -> None:
    inner = SumPlusOne()
    strategy = _rounds(inner, _record(tmp_path))
    replies = [
        _train_reply(1, [np.array([1.0, 2.0])], _report("a", 10)),
        _train_reply(2, [np.array([3.0, 4.0])], _report("b", 30)),
    ]
    parameters, _ = strategy.aggregate_fit(1, replies, [])
    assert inner.calls == 1
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], [5.0, 7.0])


def test_fedavg_training_rounds_weight_by_records_used(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    replies = [
        _train_reply(1, [np.array([1.0, 2.0])], _report("a", 10)),
        _train_reply(2, [np.array([3.0, 4.0])], _report("b", 30)),
    ]
    parameters, _ = strategy.aggregate_fit(1, replies, [])
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], [2.5, 3.5])
    assert record.units == ["a", "b"]
    assert strategy.completed[Phase.TRAIN] == 1


def test_evaluation_rounds_sum_the_units_statistics(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = FederatedRounds(FedAvg(), record)
    strategy.phase = Phase.EVALUATE
    rng = np.random.default_rng(0)
    scores = rng.random(400)
    labels = rng.random(400) < scores
    parts = [
        ScoreSummary.of(scores[:150], labels[:150]),
        ScoreSummary.of(scores[150:], labels[150:]),
    ]
    replies = [
        (
            Proxy(i),
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters(p.to_arrays()),
                p.count,
                {UNIT_KEY: f"u{i}", **_answers(1, Phase.EVALUATE)},
            ),
        )
        for i, p in enumerate(parts)
    ]
    parameters, _ = strategy.aggregate_fit(1, replies, [])
    assert parameters is None  # the global model is not touched by an evaluation exchange
    assert record.rounds[0].metrics == pytest.approx(
        ScoreSummary.of(scores, labels).metrics(), rel=1e-12
    )


def test_a_failed_unit_is_rejected_with_its_message_and_the_round_goes_on(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    failure = Exception(
        "Error(code=2, reason='... Message: silo.csv: column age, row 3: not a number\\n')"
    )
    parameters, _ = strategy.aggregate_fit(
        1, [_train_reply(1, [np.full(2, 3.0)], _report("a", 5))], [failure]
    )
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], [3.0, 3.0])
    assert record.rejected == [
        {
            "unit": "unidentified",
            "round": 1,
            "phase": "train",
            "reason": "no reply: silo.csv: column age, row 3: not a number",
        }
    ]


def test_below_the_quorum_the_run_fails_naming_each_lost_reply(tmp_path: Path) -> None:
    strategy = _rounds(FedAvg(), _record(tmp_path, quorum=1.0))
    failure = Exception(
        "Error(code=2, reason='... Message: silo.csv: column age, row 3: not a number\\n')"
    )
    with pytest.raises(
        RunFailed,
        match=r"1 valid replies of 2 BUs, below the quorum of 2 .*"
        r"unidentified: no reply: silo.csv: column age, row 3: not a number",
    ):
        strategy.aggregate_fit(1, [_train_reply(1, [np.ones(2)], _report("a", 5))], [failure])


def test_refusals_are_kept_apart_and_all_refusing_is_exit_code_3(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    refusal = (
        Proxy(2),
        FitRes(
            Status(Code.OK, ""),
            Parameters([], ""),
            0,
            Refusal(unit="b", reason="no consent").to_metrics(),
        ),
    )
    parameters, _ = strategy.aggregate_fit(
        1, [_train_reply(1, [np.ones(2)], _report("a", 5)), refusal], []
    )
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], np.ones(2))
    assert record.refused == {"b": "no consent"}
    with pytest.raises(RefusedByUnit) as raised:
        FederatedRounds(FedAvg(), _record(tmp_path)).aggregate_fit(1, [refusal], [])
    assert raised.value.exit_code == 3


def test_every_train_message_carries_the_typed_instruction(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = FederatedRounds(FedAvg(min_fit_clients=2, min_available_clients=2), record)
    manager = SimpleClientManager()
    for node in (1, 2):
        manager.register(Proxy(node))
    pairs = strategy.configure_fit(3, ndarrays_to_parameters([np.zeros(2)]), manager)
    assert len(pairs) == 2
    for _, ins in pairs:
        instruction = Instruction.from_config(ins.config)
        assert (instruction.phase, instruction.server_round, instruction.run_id) == (
            Phase.TRAIN,
            3,
            "r1",
        )
        assert instruction.job == record.plan.job and instruction.seed == 0


def test_report_from_a_record_holds_the_contract_and_renders(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    strategy.aggregate_fit(1, [_train_reply(1, [np.ones(2)], _report("a", 5, 0.5))], [])
    strategy.phase = Phase.EVALUATE
    summary = ScoreSummary.of(np.array([0.2, 0.8, 0.6]), np.array([0, 1, 0]))
    strategy.aggregate_fit(
        1,
        [
            (
                Proxy(1),
                FitRes(
                    Status(Code.OK, ""),
                    ndarrays_to_parameters(summary.to_arrays()),
                    3,
                    {UNIT_KEY: "a", **_answers(1, Phase.EVALUATE)},
                ),
            )
        ],
        [],
    )
    record.audit = open_run_log(record.plan)  # a real run opens its log when it starts
    report = build_report(record)
    assert_report_contract(report)
    assert report["model"]["metrics"]["auc"] == 1.0
    assert report["privacy"]["per_unit"][0]["epsilon"] == 0.5
    html = render_html(report)
    assert html.count("<svg") == 2  # AUC and epsilon charts, inline
    for external in ("<script", "<link", 'src="http', 'href="http', "url(http"):
        assert external not in html  # self-contained: nothing is fetched when it is opened


def test_a_dropped_node_is_named_by_its_bu_in_the_error_and_the_record(tmp_path: Path) -> None:
    from dataclasses import replace

    record = _record(tmp_path, quorum=1.0)
    record.plan = replace(record.plan, node_units={7: "retail"}, enrolled=("ecommerce", "retail"))
    strategy = _rounds(FedAvg(), record)
    failure = Exception("Error(code=5, reason='node 7: no reply within 30 s')")
    with pytest.raises(RunFailed, match=r"retail: no reply: node 7: no reply within 30 s"):
        strategy.aggregate_fit(
            2, [_train_reply(3, [np.ones(2)], _report("ecommerce", 5), 2)], [failure]
        )
    assert record.dropouts == [
        {
            "round": 2,
            "phase": "train",
            "unit": "retail",
            "node": 7,
            "reason": "node 7: no reply within 30 s",
        }
    ]


def test_a_node_never_heard_from_is_named_when_it_is_the_only_silent_bu(tmp_path: Path) -> None:
    from dataclasses import replace

    record = _record(tmp_path, quorum=1.0)
    record.plan = replace(record.plan, enrolled=("ecommerce", "retail"))
    strategy = _rounds(FedAvg(), record)
    failure = Exception("Error(code=5, reason='node 9: Error: Node Unavailable')")
    with pytest.raises(RunFailed, match="retail: no reply: node 9"):
        strategy.aggregate_fit(
            1, [_train_reply(3, [np.ones(2)], _report("ecommerce", 5))], [failure]
        )
    assert [d["unit"] for d in record.dropouts] == ["retail"]


def test_a_reply_larger_than_the_exchange_needs_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.strategy as strategy_module

    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    read = []
    real = strategy_module.parameters_to_ndarrays
    monkeypatch.setattr(
        strategy_module, "parameters_to_ndarrays", lambda p: read.append(p) or real(p)
    )
    huge = _train_reply(2, [np.zeros(1_000_000)], _report("b", 5))
    parameters, _ = strategy.aggregate_fit(
        1, [_train_reply(1, [np.full(2, 2.0)], _report("a", 5)), huge], []
    )
    np.testing.assert_array_equal(real(parameters)[0], [2.0, 2.0])
    assert huge[1].parameters not in read  # never deserialised
    (entry,) = record.rejected
    assert entry["reason"].startswith("8000128 bytes of arrays where the exchange needs at most")


def test_an_unreadable_reply_is_rejected_not_fatal(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    garbled = (
        Proxy(2),
        FitRes(Status(Code.OK, ""), Parameters([], ""), 0, {Refusal.KEY: "{not json"}),
    )
    strategy.aggregate_fit(1, [_train_reply(1, [np.ones(2)], _report("a", 5)), garbled], [])
    (entry,) = record.rejected
    assert entry["unit"] == "node 2" and entry["reason"].startswith("unreadable reply: ")


@pytest.mark.parametrize(
    ("arrays", "weight", "reason"),
    [
        ([np.ones(2), np.ones(1)], 5, "2 arrays where the model has 1"),
        ([np.ones(3)], 5, "array 0 has shape (3,), the model's is (2,)"),
        ([np.ones(2, dtype=np.float32)], 5, "array 0 has dtype float32, the model's is float64"),
        ([np.array([np.inf, np.nan])], 5, "array 0 holds 2 non-finite values"),
        (
            [np.ones(2)],
            -3,
            "weight -3 is outside 1..1000000000, the most a BU without a declared max_customers "
            "may claim",
        ),
        ([np.ones(2)], True, "weight True is not a whole number of customers"),
        ([np.ones(2)], 4, "weight 4 differs from the 5 training customers it reports"),
    ],
)
def test_each_malformed_update_is_named(tmp_path, arrays, weight, reason) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    bad = (
        Proxy(2),
        FitRes(
            Status(Code.OK, ""),
            ndarrays_to_parameters(arrays),
            weight,
            {**_report("b", 5).to_metrics(), **_answers()},
        ),
    )
    strategy.aggregate_fit(1, [_train_reply(1, [np.ones(2)], _report("a", 5)), bad], [])
    assert [(e["unit"], e["reason"]) for e in record.rejected] == [("b", reason)]
    assert record.unit_reports["b"].records_used == 5  # what it spent still counts


def test_a_declared_size_bounds_the_weight(tmp_path: Path) -> None:
    from dataclasses import replace

    record = _record(tmp_path)
    record.plan = replace(record.plan, max_customers={"b": 100})
    strategy = _rounds(FedAvg(), record)
    strategy.aggregate_fit(
        1,
        [
            _train_reply(1, [np.ones(2)], _report("a", 5000)),
            _train_reply(2, [np.ones(2)], _report("b", 5000)),
        ],
        [],
    )
    assert [(e["unit"], e["reason"]) for e in record.rejected] == [
        ("b", "weight 5000 is outside 1..100, the BU's declared size")
    ]


def test_a_late_reply_to_an_earlier_round_and_a_second_reply_are_rejected(tmp_path: Path) -> None:
    record = _record(tmp_path)
    strategy = _rounds(FedAvg(), record)
    parameters, _ = strategy.aggregate_fit(
        2,
        [
            _train_reply(1, [np.ones(2)], _report("a", 5), 2),
            _train_reply(2, [np.ones(2)], _report("b", 5), 1),  # answers round 1
            _train_reply(1, [np.full(2, 9.0)], _report("a", 5), 2),  # a again
        ],
        [],
    )
    assert [(e["unit"], e["reason"]) for e in record.rejected] == [
        ("b", "a reply to another exchange ('r1/1/train', not 'r1/2/train'): late or replayed"),
        ("a", "a second reply to this exchange"),
    ]
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], np.ones(2))  # a's first
