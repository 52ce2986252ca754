"""Local DP-SGD: the accountant's history survives rounds, and epsilon is Opacus's own."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clients.app
from clients.app import RACY_WINDOW_NS, BusinessUnitClient, Node, _content_digest, _FileIdentity
from clients.steward import prepare_simulated_home
from clients.training import (
    GaussianStep,
    entropy_generator,
    has_closed_form,
    local_plan,
    output_gradients,
    poisson_batches,
    private_linear_gradient,
    train_dp_sgd,
)
from federation.features import resolve_feature_spec
from federation.job import Job, Training
from federation.models import build_model, initial_parameters, set_parameters
from federation.tasks import adapter
from federation.wire import Instruction, Phase, UnitReport, refusal_of
from privacy.accounting import DpSgdEvent, dp_sgd_epsilon
from privacy.home import UnitHome
from privacy.unit_config import UnitConfig
from simulations.synthetic import unit_schema


def _data(n: int = 300, d: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, d)).astype(np.float32)
    y = (x[:, 0] + 0.2 * rng.standard_normal(n) > 0.5).astype(np.float32)
    return x, y


def test_local_plan_derives_the_sample_rate_from_size_and_public_batch_size() -> None:
    plan = local_plan(1000, Training(expected_batch_size=256, local_epochs=2))
    assert (plan.sample_rate, plan.steps_per_round) == (0.25, 8)
    assert local_plan(10, Training(expected_batch_size=256)).sample_rate == 1.0


def test_history_accumulates_across_rounds_and_matches_opacus() -> None:
    x, y = _data()
    training = Training(expected_batch_size=32, local_epochs=1)
    model = build_model(Job().task, 4)
    params = initial_parameters(Job().task, 4)
    first = train_dp_sgd(model, params, x, y, training, 1.3, (), entropy_generator(1))
    second = train_dp_sgd(
        build_model(Job().task, 4),
        first.parameters,
        x,
        y,
        training,
        1.3,
        first.history,
        entropy_generator(2),
    )
    q = 1 / 10  # ceil(300 / 32) = 10 batches
    assert first.steps == second.steps == 10
    assert first.history == (DpSgdEvent(1.3, q, 10),)
    assert second.history == (DpSgdEvent(1.3, q, 20),)  # Opacus merges equal consecutive steps
    one, two = dp_sgd_epsilon(first.history, 1e-5), dp_sgd_epsilon(second.history, 1e-5)
    assert two > one > 0
    reference = RDPAccountant()
    for _ in range(20):
        reference.step(noise_multiplier=1.3, sample_rate=q)
    assert two == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)


def test_training_with_a_simulation_seed_is_reproducible_and_moves_the_model() -> None:
    x, y = _data()
    training = Training(expected_batch_size=32)
    params = initial_parameters(Job().task, 4)
    runs = [
        train_dp_sgd(
            build_model(Job().task, 4), params, x, y, training, 1.0, (), entropy_generator(5)
        )
        for _ in range(2)
    ]
    for a, b in zip(runs[0].parameters, runs[1].parameters, strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.abs(runs[0].parameters[0]).sum() > 0


def _instruction(phase: Phase, server_round: int, job: Job, seed: int | None = 3) -> dict:
    return Instruction(
        phase=phase,
        server_round=server_round,
        run_id="run-1",
        started_at=datetime(2026, 6, 1, tzinfo=UTC),
        job=job,
        seed=seed,
    ).to_config()


def _node(silos: Path, tmp_path: Path) -> Node:
    """The ecommerce BU with a fresh home holding its consent export."""
    bu_config = silos / "ecommerce" / "bu.toml"
    home = prepare_simulated_home(UnitConfig.load(bu_config), tmp_path / "home")
    return Node(bu_config=bu_config, home=home.directory, simulated=True)


def test_client_reports_cumulative_epsilon_over_rounds_kept_in_its_ledger(
    small_silos: Path, tmp_path: Path
) -> None:
    """Flower re-creates the client every round (here: even its context); the BU's ledger in its
    home keeps the run's history."""
    job = Job(
        rounds=2,
        epsilon=2.0,
        evaluation={"mode": "exact"},  # training alone spends the job's epsilon
        features=resolve_feature_spec("churn", [unit_schema("x")]),
    )
    node = _node(small_silos, tmp_path)
    params = initial_parameters(job.task, job.feature_spec.dim)
    reports = []
    for server_round in (1, 2):
        client = BusinessUnitClient(node)  # a fresh client, as Flower does
        params, _n, metrics = client.fit(params, _instruction(Phase.TRAIN, server_round, job))
        reports.append(UnitReport.from_metrics(metrics))
    first, second = reports
    assert second.steps == 2 * first.steps
    assert first.noise_multiplier == second.noise_multiplier
    assert first.epsilon < second.epsilon <= job.epsilon
    assert second.epsilon >= 0.9 * job.epsilon  # calibrated for the whole run, not one round
    expected = dp_sgd_epsilon(
        [DpSgdEvent(second.noise_multiplier, second.sample_rate, second.steps)], job.delta
    )
    assert second.epsilon == pytest.approx(expected, rel=1e-12)  # Opacus's own figure
    with UnitHome(node.home, UnitConfig.load(node.bu_config)).ledger() as ledger:
        step = DpSgdEvent(second.noise_multiplier, second.sample_rate, first.steps)
        assert [e.event for e in ledger.entries(run_id="run-1")] == [step, step]
        assert ledger.entries(run_id="run-2") == []  # another run starts from nothing
    assert second.epsilon_total == second.epsilon  # the only run on this purpose so far


def test_a_deployed_client_refuses_a_seed(small_silos: Path, tmp_path: Path) -> None:
    job = Job(features=resolve_feature_spec("churn", [unit_schema("x")]))
    client = BusinessUnitClient(replace(_node(small_silos, tmp_path), simulated=False))
    params = initial_parameters(job.task, job.feature_spec.dim)
    with pytest.raises(Exception, match="seeds exist only in simulation"):
        client.fit(params, _instruction(Phase.TRAIN, 1, job, seed=3))


def test_a_round_that_would_exceed_the_target_is_refused_before_training(
    small_silos: Path, tmp_path: Path
) -> None:
    job = Job(rounds=1, epsilon=1.0, features=resolve_feature_spec("churn", [unit_schema("x")]))
    node = _node(small_silos, tmp_path)
    params = initial_parameters(job.task, job.feature_spec.dim)
    trained, _, metrics = BusinessUnitClient(node).fit(params, _instruction(Phase.TRAIN, 1, job))
    spent = UnitReport.from_metrics(metrics).epsilon
    # The plan was one round; a second round would overspend, so the BU refuses and takes no step.
    again, n, metrics = BusinessUnitClient(node).fit(trained, _instruction(Phase.TRAIN, 2, job))
    assert (again, n) == ([], 0)
    assert "above the job's 1.0" in refusal_of(metrics).reason
    with UnitHome(node.home, UnitConfig.load(node.bu_config)).ledger() as ledger:
        assert ledger.epsilon(job.delta, run_id="run-1") == spent  # nothing recorded for round 2


def test_under_central_noise_a_unit_sends_a_clipped_update_and_records_a_gaussian(
    small_silos: Path, tmp_path: Path
) -> None:
    from federation.job import NoisePlacement, SecureAggregation
    from privacy.accounting import central_noise_multiplier
    from privacy.ledger import GaussianEvent

    job = Job(
        rounds=4,
        epsilon=2.0,
        noise=NoisePlacement.CENTRAL,
        secure_aggregation=SecureAggregation(enabled=True),
        features=resolve_feature_spec("churn", [unit_schema("x")]),
    )
    node = _node(small_silos, tmp_path)
    update, weight, metrics = BusinessUnitClient(node).fit(
        initial_parameters(job.task, job.feature_spec.dim), _instruction(Phase.TRAIN, 1, job)
    )
    norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update)))
    assert weight == 1 and norm <= job.training.clip_norm * (1 + 1e-6)
    report = UnitReport.from_metrics(metrics)
    from federation.exchanges import planned_evaluation, planned_ranges

    z = central_noise_multiplier(
        2.0, job.delta, 4, spent=planned_ranges(job), holdout=planned_evaluation(job)
    )
    assert (report.noise_multiplier, report.sample_rate, report.steps) == (z, 1.0, 1)
    with UnitHome(node.home, UnitConfig.load(node.bu_config)).ledger() as ledger:
        (entry,) = ledger.entries(run_id="run-1")
    assert entry.event == GaussianEvent(sigma=2 * z * job.training.clip_norm, sensitivity=2.0)


def test_zero_gradients_through_local_dp_sgd_carry_exactly_the_configured_noise() -> None:
    """Local placement: with every per-customer gradient zero, one DP-SGD step moves each of
    100,000 parameters by Gaussian noise of std sigma x C / expected batch size."""
    dim, batch, sigma, clip = 100_000, 64, 1.7, 0.8
    features = np.zeros((batch, dim), dtype=np.float32)
    labels = np.full(batch, 0.5, dtype=np.float32)  # BCE gradient at logit 0 is exactly zero
    training = Training(
        expected_batch_size=batch, local_epochs=1, learning_rate=1.0, momentum=0.0, clip_norm=clip
    )
    model = build_model(Job().task, dim)
    update = train_dp_sgd(
        model,
        initial_parameters(Job().task, dim),
        features,
        labels,
        training,
        sigma,
        (),
        entropy_generator(3),
    )
    assert update.steps == 1 and update.history == (DpSgdEvent(sigma, 1.0, 1),)
    weights = update.parameters[0].ravel().astype(np.float64)
    expected = sigma * clip / batch
    assert abs(weights.std() / expected - 1) < 0.03
    assert abs(weights.mean()) < 5 * expected / np.sqrt(dim)


# --- the closed form for a linear model against Opacus's hooks and DPOptimizer -------------------


def _linear_batch(n: int = 40, d: int = 6, seed: int = 0):
    """A linear model away from zero and a batch whose customers' gradients straddle the clip
    norm: features up to 3, so that some gradients are clipped and some are not."""
    rng = np.random.default_rng(seed)
    layer = nn.Linear(d, 1)
    set_parameters(layer, [rng.normal(size=(1, d)).astype(np.float32), np.array([0.3], np.float32)])
    x = torch.as_tensor((3 * rng.random((n, d)) ** 4).astype(np.float32))
    y = torch.as_tensor((rng.random(n) < 0.5).astype(np.float32))
    return layer, x, y


def _opacus_gradient(layer, criterion, x, y, rows, clip, noise_multiplier, seed):
    """Opacus's clipped, noised gradient for the batch `rows` of (x, y), as training took it
    before the closed form: hooks on the model, `DPOptimizer.pre_step` (which also steps the
    accountant); returns the gradients and the accountant's history."""
    dataset = TensorDataset(x, y)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, _ = engine.make_private(
        module=layer,
        optimizer=torch.optim.SGD(layer.parameters(), lr=0.0),
        data_loader=DataLoader(dataset, batch_size=len(dataset)),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    outputs = model(x[rows]).squeeze(-1)
    (criterion(outputs, y[rows]).sum() / max(len(rows), 1)).backward()
    assert optimizer.pre_step() and optimizer.expected_batch_size == len(dataset)
    gradients = [p.grad.detach().clone() for p in layer.parameters()]
    model.cleanup()
    return gradients, engine.accountant.history


_OPACUS_WARNINGS = (
    "ignore:.*[Ss]ecure RNG",  # as in `train_dp_sgd`
    "ignore:.*[Ff]ull backward hook",
)


@pytest.mark.filterwarnings(*_OPACUS_WARNINGS)
@pytest.mark.parametrize("rows", ["all", "some", "none"])
@pytest.mark.parametrize("task", ["churn", "ltv"])
def test_the_closed_form_gives_opacus_clipped_and_noised_gradient(rows: str, task: str) -> None:
    layer, x, y = _linear_batch()
    criterion = adapter(task).loss()
    selected = {"all": list(range(40)), "some": list(range(0, 40, 3)), "none": []}[rows]
    index = torch.as_tensor(selected, dtype=torch.long)
    step = GaussianStep(clip_norm=0.5, noise_multiplier=1.3, expected_batch_size=40)
    generator = torch.Generator().manual_seed(11)
    ours = private_linear_gradient(layer, criterion, x[index], y[index], step, generator)
    theirs, history = _opacus_gradient(layer, criterion, x, y, index, 0.5, 1.3, seed=11)
    assert history == [(1.3, 1.0, 1)]
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def _plain_gradient(layer, criterion, x, y) -> torch.Tensor:
    """The batch's summed gradient without privacy, flattened over the parameters."""
    loss = criterion(layer(x).squeeze(-1), y).sum()
    return torch.cat([g.ravel() for g in torch.autograd.grad(loss, list(layer.parameters()))])


def test_the_equivalence_batch_has_customers_on_both_sides_of_the_clip_norm() -> None:
    layer, x, y = _linear_batch()
    criterion = adapter("churn").loss()
    norms = [
        float(_plain_gradient(layer, criterion, x[i : i + 1], y[i : i + 1]).norm())
        for i in range(40)
    ]
    assert min(norms) < 0.5 < max(norms)


def test_one_customer_changes_the_noiseless_gradient_by_at_most_the_clip_norm() -> None:
    layer, x, y = _linear_batch(n=30)
    criterion = adapter("churn").loss()
    step = GaussianStep(clip_norm=0.5, noise_multiplier=0.0, expected_batch_size=1)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    full = torch.cat(
        [g.ravel() for g in private_linear_gradient(layer, criterion, x, y, step, generator)]
    )
    assert torch.equal(generator.get_state(), state)  # no noise drawn at noise multiplier 0
    changes = []
    for i in range(30):
        keep = torch.as_tensor([j for j in range(30) if j != i])
        without = private_linear_gradient(layer, criterion, x[keep], y[keep], step, generator)
        changes.append(float((full - torch.cat([g.ravel() for g in without])).norm()))
    assert max(changes) <= 0.5 * (1 + 1e-5)
    assert max(changes) == pytest.approx(0.5, rel=1e-5)  # clipped customers move it by C


def test_a_customer_below_the_clip_norm_contributes_its_plain_gradient() -> None:
    layer, x, y = _linear_batch(n=1)
    criterion = adapter("churn").loss()
    step = GaussianStep(clip_norm=100.0, noise_multiplier=0.0, expected_batch_size=1)
    ours = private_linear_gradient(layer, criterion, x, y, step, torch.Generator())
    torch.testing.assert_close(
        torch.cat([g.ravel() for g in ours]), _plain_gradient(layer, criterion, x, y)
    )


def test_an_empty_batch_gives_the_noise_alone() -> None:
    layer, x, y = _linear_batch()
    step = GaussianStep(clip_norm=0.7, noise_multiplier=1.1, expected_batch_size=25)
    empty = torch.as_tensor([], dtype=torch.long)
    weight, bias = private_linear_gradient(
        layer, adapter("churn").loss(), x[empty], y[empty], step, torch.Generator().manual_seed(4)
    )
    replay = torch.Generator().manual_seed(4)
    torch.testing.assert_close(weight, torch.normal(0.0, 0.77, size=(1, 6), generator=replay) / 25)
    torch.testing.assert_close(bias, torch.normal(0.0, 0.77, size=(1,), generator=replay) / 25)


def test_a_loss_averaged_over_the_batch_is_refused() -> None:
    layer, x, y = _linear_batch()
    step = GaussianStep(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=40)
    with pytest.raises(ValueError, match='reduction="none"'):
        private_linear_gradient(layer, nn.BCEWithLogitsLoss(), x, y, step, torch.Generator())


@pytest.mark.parametrize("task", ["churn", "ltv"])
@pytest.mark.parametrize("n", [0, 1, 40])
def test_the_output_gradients_are_autograds_bit_for_bit(task: str, n: int) -> None:
    layer, x, y = _linear_batch()
    if task == "ltv":  # labels anywhere in [0, 1], as the LTV task scales them
        y = torch.as_tensor(np.random.default_rng(5).random(40).astype(np.float32))
    with torch.no_grad():
        outputs = layer(x[:n])
    criterion = adapter(task).loss()
    closed = output_gradients(criterion, outputs, y[:n])
    leaf = outputs.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(criterion(leaf.squeeze(-1), y[:n]).sum(), leaf)
    assert closed.shape == expected.shape == (n, 1)
    assert torch.equal(closed, expected)


def test_a_weighted_loss_takes_its_gradients_from_autograd() -> None:
    layer, x, y = _linear_batch()
    with torch.no_grad():
        outputs = layer(x)
    weighted = nn.BCEWithLogitsLoss(reduction="none", pos_weight=torch.tensor(3.0))
    leaf = outputs.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(weighted(leaf.squeeze(-1), y).sum(), leaf)
    gradients = output_gradients(weighted, outputs, y)
    torch.testing.assert_close(gradients, expected, rtol=0, atol=0)
    unweighted = output_gradients(adapter("churn").loss(), outputs, y)
    assert not torch.allclose(gradients, unweighted)  # the weight was not dropped


def test_poisson_batches_are_opacus_samplers_draws() -> None:
    x, y = _data(n=50)
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    loaders = [
        DPDataLoader.from_data_loader(
            DataLoader(dataset, batch_size=20), generator=torch.Generator().manual_seed(8)
        )
        for _ in range(2)
    ]
    drawn = list(poisson_batches(loaders[0]))
    theirs = list(loaders[1].batch_sampler)
    assert len(drawn) == len(theirs) == 3  # 1 / sample rate steps, as Opacus's sampler takes
    for (features, labels), indices in zip(drawn, theirs, strict=True):
        assert torch.equal(features, dataset.tensors[0][indices])
        assert torch.equal(labels, dataset.tensors[1][indices])
    states = [loader.batch_sampler.generator.get_state() for loader in loaders]
    assert torch.equal(*states)  # the same draws: the noise that follows is the same too


def test_poisson_batches_refuse_a_loader_that_does_not_sample_by_poisson() -> None:
    x, y = _data(n=10)
    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=5)
    with pytest.raises(TypeError, match="Poisson"):
        next(poisson_batches(loader))


def test_every_task_model_has_the_closed_form_and_other_models_use_opacus() -> None:
    assert all(has_closed_form(adapter(task).build_model(5)) for task in ("churn", "ltv"))
    assert not has_closed_form(nn.Sequential(nn.Linear(5, 1)))


def _trained_both_ways(x, y, training, noise_multiplier, seed):
    """`train_dp_sgd` on a task's linear model (closed form) and on the same layer wrapped in a
    Sequential (Opacus's hooks), from the same parameters and seed."""
    params = initial_parameters(Job().task, x.shape[1])
    closed = train_dp_sgd(
        build_model(Job().task, x.shape[1]),
        params,
        x,
        y,
        training,
        noise_multiplier,
        (),
        entropy_generator(seed),
    )
    wrapped = nn.Sequential(build_model(Job().task, x.shape[1]))
    hooks = train_dp_sgd(
        wrapped, params, x, y, training, noise_multiplier, (), entropy_generator(seed)
    )
    return closed, hooks


def test_local_dp_sgd_trains_as_opacus_hooks_do_step_for_step() -> None:
    x, y = _data()
    training = Training(expected_batch_size=32, local_epochs=2, clip_norm=0.3)
    closed, hooks = _trained_both_ways(x, y, training, 1.3, seed=1)
    assert closed.steps == hooks.steps == 20
    assert closed.history == hooks.history == (DpSgdEvent(1.3, 0.1, 20),)
    for a, b in zip(closed.parameters, hooks.parameters, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert np.abs(closed.parameters[0]).sum() > 0


def test_a_step_poisson_sampling_left_empty_is_still_noised_and_counted() -> None:
    x, y = _data(n=9)
    training = Training(expected_batch_size=8, local_epochs=1, momentum=0.0)  # q = 1/2, 2 steps
    seed = 121
    drawn = torch.rand(9, generator=entropy_generator(seed)) < 0.5  # the sampler's first draw
    assert not drawn.any()  # the first batch is empty
    closed, hooks = _trained_both_ways(x, y, training, 1.0, seed=seed)
    assert closed.steps == 2 and closed.history == (DpSgdEvent(1.0, 0.5, 2),)
    assert closed.history == hooks.history
    for a, b in zip(closed.parameters, hooks.parameters, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _counting_silo_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the silo loads of `clients.app` (each one the start of a full preparation)."""
    import clients.app

    loads: list[str] = []
    real = clients.app.load_silo

    def counted(config, **kwargs):
        loads.append(config.unit)
        return real(config, **kwargs)

    monkeypatch.setattr(clients.app, "load_silo", counted)
    return loads


def test_a_unit_prepares_its_silo_once_for_the_rounds_of_a_job(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = _counting_silo_loads(monkeypatch)
    job = Job(rounds=3, features=resolve_feature_spec("churn", [unit_schema("x")]))
    node = _node(small_silos, tmp_path)
    params = initial_parameters(job.task, job.feature_spec.dim)
    reports = []
    for server_round in (1, 2, 3):
        params, _n, metrics = BusinessUnitClient(node).fit(
            params, _instruction(Phase.TRAIN, server_round, job)
        )
        reports.append(UnitReport.from_metrics(metrics))
    assert loads == ["ecommerce"]
    assert len({(r.records_used, r.records_test, str(r.excluded)) for r in reports}) == 1
    with UnitHome(node.home, UnitConfig.load(node.bu_config)).lineage() as lineage:
        assert lineage.runs() == ["run-1"]


def test_the_ranges_exchange_and_training_share_one_preparation(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The BU answers the ranges exchange on the declared scale, then trains on the windows the
    next instruction carries, from the same prepared data; the release is round 0 of its ledger,
    on the training customers, and training is calibrated after it."""
    from federation.exchanges import RANGES_ROUND, planned_evaluation, planned_ranges
    from federation.ranges import RANGE_BINS, histogram_vector
    from privacy.accounting import calibrate_noise_multiplier
    from privacy.ledger import GaussianEvent

    loads = _counting_silo_loads(monkeypatch)
    job = Job(rounds=2, features=resolve_feature_spec("churn", [unit_schema("x")]))
    spec = job.feature_spec
    node = _node(small_silos, tmp_path)
    params = initial_parameters(job.task, spec.dim)
    (vector,), _n, metrics = BusinessUnitClient(node).fit(
        params, _instruction(Phase.RANGES, 1, job)
    )
    assert vector.shape == (len(spec.scalar_outputs) * RANGE_BINS,)
    records = UnitReport.from_metrics(metrics).records_used
    assert abs(vector.sum() - records * len(spec.scalar_outputs)) < 2000  # counts plus noise
    windows = {name: (0.0, 0.5) for name in spec.scalar_outputs}
    ranged = job.model_copy(update={"features": spec.model_copy(update={"ranges": windows})})
    _params, _n, metrics = BusinessUnitClient(node).fit(
        params, _instruction(Phase.TRAIN, 1, ranged)
    )
    report = UnitReport.from_metrics(metrics)
    assert loads == ["ecommerce"]  # one preparation for both exchanges
    assert report.releases == 1 and report.records_used == records
    with UnitHome(node.home, UnitConfig.load(node.bu_config)).ledger() as ledger:
        (ranges, trained) = ledger.entries(run_id="run-1")
    assert (ranges.round, ranges.part, trained.round, trained.part) == (
        RANGES_ROUND,
        "train",
        1,
        "train",
    )
    assert isinstance(ranges.event, GaussianEvent)
    expected = calibrate_noise_multiplier(
        job.epsilon,
        job.delta,
        report.sample_rate,
        trained.event.steps * job.rounds,
        spent=planned_ranges(job),
        holdout=planned_evaluation(job),
    )
    assert report.noise_multiplier == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="declared scale"):
        histogram_vector(np.zeros((1, spec.dim)), ranged.feature_spec)


def test_a_revocation_imported_between_rounds_reaches_the_next_round_of_a_unit(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pandas as pd

    loads = _counting_silo_loads(monkeypatch)
    job = Job(rounds=2, features=resolve_feature_spec("churn", [unit_schema("x")]))
    node = _node(small_silos, tmp_path)
    params = initial_parameters(job.task, job.feature_spec.dim)
    params, _n, metrics = BusinessUnitClient(node).fit(params, _instruction(Phase.TRAIN, 1, job))
    first = UnitReport.from_metrics(metrics)
    unit = UnitConfig.load(node.bu_config)
    home = UnitHome(node.home, unit)
    with home.registry() as registry:
        granted = registry.events("churn_model").query("granted")["customer_id"]
        revocation = pd.DataFrame(
            {
                "customer_id": [granted.iloc[0]],
                "purpose": ["churn_model"],
                "granted": [False],
                "timestamp": [pd.Timestamp("2026-06-01 10:00")],  # after the job's start
            }
        )
        registry.import_events(revocation, source="test", tombstone_key=home.pseudonym_key())
    _params, _n, metrics = BusinessUnitClient(node).fit(params, _instruction(Phase.TRAIN, 2, job))
    second = UnitReport.from_metrics(metrics)
    assert loads == ["ecommerce", "ecommerce"]  # the registry changed: prepared anew
    assert second.excluded["revoked"] == first.excluded["revoked"] + 1
    assert second.records_used + second.records_test == first.records_used + first.records_test - 1


def _aged(directory: Path, seconds: int = 3600) -> None:
    """Every file under `directory` last modified `seconds` ago: outside the racy window, so
    that their digests are kept and reused."""
    old = time.time_ns() - seconds * 1_000_000_000
    for path in directory.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(old, old))


def test_a_silo_file_edited_between_rounds_is_prepared_anew(
    small_silos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = _counting_silo_loads(monkeypatch)
    shutil.copytree(small_silos / "ecommerce", tmp_path / "silos" / "ecommerce")
    node = _node(tmp_path / "silos", tmp_path)
    _aged(tmp_path)  # the silo and the consent registry: digests kept from round 1 on
    job = Job(rounds=3, features=resolve_feature_spec("churn", [unit_schema("x")]))
    params = initial_parameters(job.task, job.feature_spec.dim)
    reports = []
    for server_round in (1, 2, 3):
        if server_round == 3:
            customers = tmp_path / "silos" / "ecommerce" / "customers.parquet"
            frame = pd.read_parquet(customers)
            frame.iloc[20:].to_parquet(customers)  # the steward deletes 20 customers
        params, _n, metrics = BusinessUnitClient(node).fit(
            params, _instruction(Phase.TRAIN, server_round, job)
        )
        reports.append(UnitReport.from_metrics(metrics))
    assert loads == ["ecommerce", "ecommerce"]  # round 2 reused round 1's preparation
    first, second, third = reports
    assert first.records_used + first.records_test == second.records_used + second.records_test
    assert third.records_used + third.records_test < first.records_used + first.records_test


def _coarse_identity(path: Path):
    """The identity a file system with 2-second timestamps and no separate status-change time
    (FAT) gives: a rewrite of the same size in the same tick leaves it unchanged."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    tick = status.st_mtime_ns // 2_000_000_000 * 2_000_000_000
    return _FileIdentity(status.st_dev, status.st_ino, status.st_size, tick, tick)


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = Path.read_bytes

    def counted(path: Path) -> bytes:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", counted)
    return reads


def test_a_same_size_rewrite_in_the_racy_window_is_detected_on_coarse_timestamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clients.app, "_file_identity", _coarse_identity)
    reads = _counting_reads(monkeypatch)
    path = tmp_path / "customers.csv"
    written = 1_700_000_000 * 1_000_000_000  # on a 2-second tick

    def write(text: bytes) -> bytes:
        path.write_bytes(text)
        os.utime(path, ns=(written, written))
        return hashlib.blake2b(text, digest_size=32).digest()

    first = write(b"id,spend\n1,10\n")
    assert _content_digest(path, now_ns=written + RACY_WINDOW_NS // 2) == first
    second = write(b"id,spend\n1,99\n")  # same size, same tick: the identity is unchanged
    assert _content_digest(path, now_ns=written + RACY_WINDOW_NS - 1) == second != first
    assert _content_digest(path, now_ns=written + RACY_WINDOW_NS + 1) == second  # now kept
    assert _content_digest(path, now_ns=written + 2 * RACY_WINDOW_NS) == second
    assert reads == [path, path, path]  # the last check trusted the identity taken outside


def test_a_rewrite_with_its_modification_time_set_back_is_detected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _counting_reads(monkeypatch)
    path = tmp_path / "customers.csv"
    path.write_bytes(b"id,spend\n1,10\n")
    _aged(tmp_path)
    old = path.stat().st_mtime_ns
    now = old + 3600 * 1_000_000_000
    assert _content_digest(path, now_ns=now) == _content_digest(path, now_ns=now)
    assert len(reads) == 1  # digested once, outside the racy window: kept
    path.write_bytes(b"id,spend\n1,99\n")
    os.utime(path, ns=(old, old))  # size and modification time as before; not the status change
    assert (
        _content_digest(path, now_ns=now)
        == hashlib.blake2b(b"id,spend\n1,99\n", digest_size=32).digest()
    )
    assert len(reads) == 2
    path.unlink()
    assert _content_digest(path, now_ns=now) == b"\0absent"


def test_a_policy_edited_in_bu_toml_between_rounds_applies_to_the_next_round(
    small_silos: Path, tmp_path: Path
) -> None:
    shutil.copytree(small_silos / "ecommerce", tmp_path / "silos" / "ecommerce")
    node = _node(tmp_path / "silos", tmp_path)
    _aged(tmp_path)  # bu.toml settled: its parsed configuration is kept after round 1
    job = Job(rounds=2, features=resolve_feature_spec("churn", [unit_schema("x")]))
    params = initial_parameters(job.task, job.feature_spec.dim)
    params, _n, metrics = BusinessUnitClient(node).fit(params, _instruction(Phase.TRAIN, 1, job))
    assert refusal_of(metrics) is None
    text = node.bu_config.read_text()
    assert "[privacy]\nmax_delta = 1e-05\n" in text
    node.bu_config.write_text(
        text.replace("[privacy]\n", f"[privacy]\nmax_epsilon_per_run = {job.epsilon / 2}\n")
    )
    _params, _n, metrics = BusinessUnitClient(node).fit(params, _instruction(Phase.TRAIN, 2, job))
    assert f"accepts at most epsilon {job.epsilon / 2} per run" in refusal_of(metrics).reason
