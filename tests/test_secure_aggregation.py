"""Flower SecAgg+ in silofed: the public ranges, the client's refusals, the server's sums, and one
end-to-end run through the Simulation Engine (5 BUs) checked against the plaintext aggregate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from clients.app import BusinessUnitClient, Node, check_secure_range
from clients.mods import secure_aggregation_mod
from federation.evaluation import ScoreSummary
from federation.features import resolve_feature_spec
from federation.job import Job, SecureAggregation
from federation.models import initial_parameters
from federation.secagg import shares_and_threshold, statistics_range
from federation.wire import UNIT_KEY, Instruction, Phase
from privacy.errors import ConfigurationError, RunFailed
from server.run import RunPlan, RunRecord
from server.secure_aggregation import secure_workflows
from server.strategy import FederatedRounds
from simulations.synthetic import unit_schema
from tests.server.test_strategy import Proxy

SECURE = SecureAggregation(enabled=True)


def _job(**update) -> Job:
    return Job(
        rounds=1,
        secure_aggregation=SECURE,
        evaluation={"mode": "exact"},
        features=resolve_feature_spec("churn", [unit_schema("x")]),
    ).model_copy(update=update)


def test_shares_and_threshold_follow_the_number_of_units() -> None:
    assert [shares_and_threshold(n) for n in (3, 4, 5, 10)] == [(3, 2), (4, 3), (5, 4), (10, 7)]
    with pytest.raises(ConfigurationError, match="at least 3 BUs"):
        shares_and_threshold(2)


def test_ranges_that_would_wrap_around_the_modulus_are_refused() -> None:
    workflows = secure_workflows(5, SECURE)
    assert workflows[Phase.TRAIN].clipping_range == 32.0
    # statistics releases share one workflow: step 1 over [-2^24, 2^24] for 5 BUs
    assert workflows[Phase.EVALUATE].quantization_range == 2**25
    assert workflows[Phase.QUERY] is workflows[Phase.SEGMENTS] is workflows[Phase.EVALUATE]
    assert [statistics_range(n) for n in (3, 127, 128, 5000)] == [2**24, 2**24, 2**23, 2**18]
    with pytest.raises(ConfigurationError, match="overflow"):
        secure_workflows(5000, SECURE)


def test_a_unit_refuses_to_send_a_vector_secagg_would_clip() -> None:
    check_secure_range([np.array([31.9, -32.0])], 32.0, what="model parameters")
    with pytest.raises(RunFailed, match="outside the secure aggregation range"):
        check_secure_range([np.array([0.0, 32.5])], 32.0, what="model parameters")
    with pytest.raises(RunFailed):
        check_secure_range([np.array([np.nan])], 32.0, what="model parameters")


def test_a_unit_never_answers_a_secure_job_in_plaintext() -> None:
    instruction = Instruction(
        phase=Phase.TRAIN,
        server_round=1,
        run_id="r",
        started_at=datetime(2026, 6, 1, tzinfo=UTC),
        job=_job(),
    )
    metadata = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    msg = Message(
        metadata=metadata,
        content=RecordDict({"fitins.config": ConfigRecord(instruction.to_config())}),
    )
    called = []
    with pytest.raises(ConfigurationError, match="does not send its update unmasked"):
        context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
        secure_aggregation_mod(msg, context, lambda m, c: called.append(m))
    assert called == []  # the client was never asked to compute


def test_secure_evaluation_sums_are_the_plaintext_sums(tmp_path: Path) -> None:
    plan = RunPlan("r", _job(), 3, "simulation", tmp_path, datetime(2026, 6, 1, tzinfo=UTC), 0)
    rng = np.random.default_rng(1)
    parts = [ScoreSummary.of(rng.random(50), rng.random(50) < 0.3) for _ in range(3)]
    plain = sum(parts[1:], parts[0])
    # What SecAgg+ hands the strategy: every result carries the secure mean, up to quantisation.
    mean = plain.to_arrays()[0] / 3 + rng.uniform(-0.4, 0.4, size=2002) / 3
    replies = [
        (
            Proxy(i),
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters([mean]), 1, {UNIT_KEY: f"u{i}"}),
        )
        for i in range(3)
    ]
    record = RunRecord(plan)
    strategy = FederatedRounds(None, record)
    strategy.phase = Phase.EVALUATE
    strategy.aggregate_fit(1, replies, [])
    secure = record.rounds[0].metrics
    assert secure["auc"] == plain.metrics()["auc"]  # counts exact
    assert secure["test_customers"] == 150
    assert secure["log_loss"] == pytest.approx(plain.metrics()["log_loss"], abs=0.4 / 150)


@pytest.mark.flower
def test_secure_aggregation_end_to_end_equals_the_plaintext_aggregate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "federation.cli",
            "simulate",
            "--units",
            "5",
            "--rounds",
            "1",
            "--customers",
            "300",
            "--seed",
            "9",
            "--secure-aggregation",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["federation"]["secure_aggregation"] is True
    assert report["federation"]["strategy"] == "FedAvg (uniform weights under SecAgg+)"
    # The same round in process, without SecAgg+: each BU's update from the same seed, averaged.
    job = Job.model_validate_json((out / "job.json").read_text())
    instruction = Instruction(
        phase=Phase.TRAIN,
        server_round=1,
        run_id="replay",
        started_at=datetime.now(UTC),
        job=job.model_copy(update={"secure_aggregation": SecureAggregation()}),
        seed=9,
    ).to_config()
    updates = []
    for bu_config in sorted((out / "simulation" / "silos").glob("*/bu.toml")):
        node = Node(bu_config, out / "simulation" / "homes" / bu_config.parent.name, True)
        params, _, _ = BusinessUnitClient(node).fit(
            initial_parameters(job.task, job.feature_spec.dim), instruction
        )
        updates.append(params)
    plaintext = [np.mean([u[i] for u in updates], axis=0) for i in range(len(updates[0]))]
    secure = [
        t.numpy() for t in torch.load(out / "model.pt", weights_only=True)["state_dict"].values()
    ]
    step = 2 * job.secure_aggregation.clipping_range / job.secure_aggregation.quantization_range
    for a, b in zip(secure, plaintext, strict=True):
        np.testing.assert_allclose(a, b, atol=2 * step, rtol=0)
