"""The exchanges of a job, and the statistics releases among them.

A job runs as rounds of exchanges, each a Flower train message (the only kind SecAgg+ covers):

- `model`: the first round opens with the `ranges` exchange (every BU's noisy histograms of its
  scalar features, `federation.ranges`; skipped when `training.ranges_share` is 0 or the model has
  no scalar feature), recorded in the ledger as round `RANGES_ROUND`; every round trains (DP-SGD or
  clipped updates, on the features rescaled to the DP windows); the evaluation of the global model follows
  the last round (`evaluation.mode = "dp"`: one discrete Gaussian release of score histograms over the
  held-out customers, spending `evaluation.epsilon`) or every round (`"exact"`: exact histograms, not
  DP, for development on synthetic data only).
- `query`: one round, one release: the query's integer vector.
- `segments`: one round per k-means iteration, one release each: per-cluster sums and counts.

Both sides derive, from the public job alone, which exchanges a round holds, the layout of each
release and its noise multiplier z, so the BU knows what noise to add and the coordinator what noise
the sum carries. Nothing here reads data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from federation.evaluation import regression_layout, score_layout
from federation.job import Job, JobKind, QueryRecipe
from federation.queries import resolve_query
from federation.ranges import ranges_layout
from federation.release import ReleaseLayout
from federation.segments import segment_feature_spec, segments_layout
from federation.tasks import adapter
from federation.wire import Phase
from privacy.accounting import DpSgdEvent
from privacy.errors import ConfigurationError
from privacy.mechanisms import noise_multiplier
from privacy.schema import SiloSchema


def resolve_job(job: Job, configs: Sequence[SiloSchema]) -> Job:
    """The job made concrete from the BUs' declared schemas (public metadata, never data): the
    model's or the segmentation's features, or the query (recipes expanded), checked against every
    taking part BU's declared purposes, columns, bounds and domains before any BU reads data."""
    if not configs:
        raise ConfigurationError("no BU schema to resolve the job against")
    for config in configs:
        if job.purpose not in config.purposes:
            raise ConfigurationError(
                f"unit '{config.unit}' does not declare the purpose '{job.purpose}' in its "
                f"bu.toml ([purposes.{job.purpose}]); its steward must declare it, or leave the "
                "BU out of the job"
            )
    if job.kind is JobKind.QUERY:
        section = job.query
        spec = resolve_query(
            section.model_dump() if isinstance(section, QueryRecipe) else section, configs
        )
        spec.check_against(configs)
        return job.model_copy(update={"query": spec})
    if job.kind is JobKind.SEGMENTS:
        spec = segment_feature_spec(configs, job.segments_spec)
        return job.model_copy(update={"features": spec})
    return job.model_copy(update={"features": adapter(job.task).feature_spec(configs, job.purpose)})


def taking_part(job: Job, configs: Sequence[SiloSchema]) -> list[SiloSchema]:
    """The BUs a job names (a query's `units`), or all of them; an unknown name is an error."""
    names = job.query.units if job.kind is JobKind.QUERY and job.query is not None else ()
    if not names:
        return list(configs)
    known = {c.unit: c for c in configs}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ConfigurationError(
            f"query.units names {unknown}, which are not among the BUs {sorted(known)}"
        )
    return [known[n] for n in names]


def job_columns(job: Job) -> tuple[str, ...]:
    """The silo columns (qualified) the job's exchanges read: its purpose must allow them."""
    if job.kind is JobKind.QUERY:
        return job.query_spec.columns
    return job.feature_spec.columns


def exchange_rounds(job: Job) -> int:
    """The number of rounds the coordinator runs for `job`."""
    if job.kind is JobKind.QUERY:
        return 1
    if job.kind is JobKind.SEGMENTS:
        return job.segments_spec.iterations
    return job.rounds


RANGES_ROUND = 0  # the ledger round of the ranges exchange: before the first training round


def uses_ranges(job: Job) -> bool:
    """Whether a model job opens with the ranges exchange: a share of the budget is given to it
    and the model has scalar features. The answer depends on the public job alone, never on
    whether the windows are known yet, so both sides account for the release in every round."""
    return (
        job.kind is JobKind.MODEL
        and job.training.ranges_share > 0
        and bool(job.feature_spec.scalar_outputs)
    )


def phases(job: Job, server_round: int) -> tuple[Phase, ...]:
    """The exchanges of round `server_round`, in order."""
    if job.kind is JobKind.QUERY:
        return (Phase.QUERY,)
    if job.kind is JobKind.SEGMENTS:
        return (Phase.SEGMENTS,)
    opening = (Phase.RANGES,) if server_round == 1 and uses_ranges(job) else ()
    if job.evaluation.mode == "exact" or server_round == job.rounds:
        return (*opening, Phase.TRAIN, Phase.EVALUATE)
    return (*opening, Phase.TRAIN)


def is_last_exchange(job: Job, phase: Phase, server_round: int) -> bool:
    return server_round == exchange_rounds(job) and phase is phases(job, server_round)[-1]


def evaluation_round(job: Job) -> int:
    """The ledger round under which a model job's DP evaluation is recorded: the exchange after
    the last training round (training rounds are 1..rounds)."""
    return job.rounds + 1


def release_layout(job: Job, phase: Phase, server_round: int = 1) -> ReleaseLayout | None:
    """The layout of the release of `phase` in `server_round`; None for training and for the
    exact evaluation of a binary task (which uses the exact `ScoreSummary`). A segments job's
    first round may carry more centroids than k (the public seeding cells)."""
    if phase is Phase.QUERY:
        return job.query_spec.layout()
    if phase is Phase.RANGES:
        return ranges_layout(job.feature_spec)
    if phase is Phase.SEGMENTS:
        spec = job.segments_spec
        clusters = spec.round_clusters[0] if server_round == 1 else spec.k
        return segments_layout(spec, job.feature_spec.dim, clusters=clusters)
    if phase is Phase.EVALUATE:
        task = adapter(job.task, job.feature_spec)
        if task.kind == "regression":
            return regression_layout(task.upper_of(job.feature_spec))
        if job.evaluation.mode == "dp":
            return score_layout(job.evaluation.bins)
    return None


def release_multiplier(job: Job, phase: Phase) -> float | None:
    """z of the release of `phase` (unit sensitivity; each part's noise is z x its sensitivity x
    sqrt(parts)); None when the release is exact."""
    if phase is Phase.QUERY:
        return noise_multiplier(job.epsilon, job.delta)
    if phase is Phase.RANGES:
        return ranges_multiplier(job)
    if phase is Phase.SEGMENTS:
        return noise_multiplier(job.epsilon, job.delta, releases=job.segments_spec.iterations)
    if phase is Phase.EVALUATE and job.evaluation.mode == "dp":
        return noise_multiplier(job.evaluation_epsilon, job.delta)
    return None


def ranges_multiplier(job: Job) -> float:
    """z of the ranges release: z(epsilon) / sqrt(share), where z(epsilon) is the multiplier of
    one Gaussian release at the job's epsilon. Its RDP curve is `training.ranges_share` times that
    release's, at every order: a fixed share of the run's budget, whatever epsilon is (a share of
    epsilon itself could not be certified for small epsilon at small delta)."""
    return noise_multiplier(job.epsilon, job.delta) / math.sqrt(job.training.ranges_share)


def planned_ranges(job: Job) -> tuple[DpSgdEvent, ...]:
    """The ranges release a model job makes before training, as the accountant composes it: on
    the training customers, so that training is calibrated after it (`spent`)."""
    if not uses_ranges(job):
        return ()
    return (DpSgdEvent(ranges_multiplier(job), 1.0, 1),)


def planned_evaluation(job: Job) -> tuple[DpSgdEvent, ...]:
    """The DP evaluation a model job will release on its held-out customers after training, as
    the accountant composes it. Training is calibrated with it in parallel (disjoint customers):
    the run's RDP curve is the larger of the two sides' at each order, and stays within the job's
    epsilon."""
    if job.kind is not JobKind.MODEL or job.evaluation.mode != "dp":
        return ()
    z = release_multiplier(job, Phase.EVALUATE)
    assert z is not None
    return (DpSgdEvent(z, 1.0, 1),)
