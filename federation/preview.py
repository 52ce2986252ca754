"""`silofed preview`: what a job will cost and how accurate its answers will be, before it runs.

Everything here follows from the public job and the BUs' declared schemas: no data is read, no
ledger is opened, nothing is spent. The noise of every release is known in advance (its multiplier
comes from the job's epsilon and delta, its sensitivity from declared bounds and contribution
limits), so the expected error of every answer is too; only what depends on the data (a mean's
denominator, DP-SGD's sampling rate, which follows each BU's number of customers) is stated for an
assumed size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from federation.exchanges import (
    exchange_rounds,
    phases,
    release_layout,
    release_multiplier,
    resolve_job,
    taking_part,
    uses_ranges,
)
from federation.job import Job, JobKind
from federation.queries import preview_answers
from federation.secagg import shares_and_threshold
from federation.wire import Phase
from privacy.mechanisms import NoiseInSum, Placement, unit_sigma
from privacy.schema import SiloSchema


@dataclass(frozen=True)
class ReleasePreview:
    phase: str
    rounds: int  # how many times this release is made
    multiplier: float | None  # z (None: exact)
    parts: list[dict]  # name, sensitivity, sigma per BU, std and 95% half-width in the sum


@dataclass(frozen=True)
class Preview:
    job: Job  # resolved
    units: list[str]
    cost: list[dict]  # per BU: purpose, epsilon, delta
    releases: list[ReleasePreview] = field(default_factory=list)
    answers: list[dict] = field(default_factory=list)  # a query's expected error per answer
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "kind": self.job.kind.value,
            "purpose": self.job.purpose,
            "units": self.units,
            "cost": self.cost,
            "releases": [r.__dict__ for r in self.releases],
            "answers": self.answers,
            "notes": self.notes,
        }


def preview(job: Job, configs: Sequence[SiloSchema]) -> Preview:
    chosen = taking_part(job, configs)
    job = resolve_job(job, chosen)
    units = [c.unit for c in chosen]
    placement = Placement(job.noise.value)
    secure = job.secure_aggregation
    threshold = shares_and_threshold(len(units))[1] if secure.enabled else 1
    releases: list[ReleasePreview] = []
    noise_by_phase: dict[Phase, dict[str, NoiseInSum]] = {}
    counted: dict[tuple[Phase, int], tuple[int, int]] = {}  # (phase, size) -> (first round, times)
    for server_round in range(1, exchange_rounds(job) + 1):
        for phase in phases(job, server_round):
            layout = release_layout(job, phase, server_round)
            if layout is not None:
                first, times = counted.get((phase, layout.size), (server_round, 0))
                counted[(phase, layout.size)] = (first, times + 1)
    for (phase, _), (first, times) in counted.items():
        layout = release_layout(job, phase, first)
        assert layout is not None
        z = release_multiplier(job, phase)
        noise = layout.noise_in_sum(
            z, placement, contributors=len(units), threshold=threshold, colluding=secure.colluding
        )
        noise_by_phase[phase] = noise
        sigmas = layout.sigmas(z) if z is not None else [0.0] * len(layout.parts)
        releases.append(
            ReleasePreview(
                phase=phase.value,
                rounds=times,
                multiplier=z,
                parts=[
                    {
                        "part": part.name,
                        "size": part.size,
                        "sensitivity": part.sensitivity,
                        "sigma_per_unit": (
                            unit_sigma(
                                sigma, placement, threshold=threshold, colluding=secure.colluding
                            )
                            if z is not None
                            else 0.0
                        ),
                        "std_in_sum": noise[part.name].std,
                        "half_width_95": noise[part.name].quantile(0.95),
                    }
                    for part, sigma in zip(layout.parts, sigmas, strict=True)
                ],
            )
        )
    notes = []
    answers: list[dict] = []
    if job.kind is JobKind.QUERY:
        answers = preview_answers(job.query_spec, noise_by_phase[Phase.QUERY])
    if job.kind is JobKind.MODEL:
        notes.append(
            "training: each BU calibrates its DP-SGD noise multiplier from its own number of "
            "customers (its sampling rate), inside the BU; "
            + (
                f"the DP evaluation after the last round spends epsilon {job.evaluation_epsilon:g} "
                "of the job's, and training is calibrated for the rest"
                if job.evaluation.mode == "dp"
                else "evaluation is exact (not DP): for development on synthetic data only"
            )
        )
        if uses_ranges(job):
            notes.append(
                "feature ranges: before the first training round each BU releases noisy "
                "histograms of its scalar features over its training customers (the `ranges` "
                f"release above, a share of {job.training.ranges_share:g} of one release at the "
                "job's epsilon); every BU then rescales each feature to the window read off "
                "their sum, and its DP-SGD is calibrated for what remains"
            )
    cost = [
        {"unit": unit, "purpose": job.purpose, "epsilon": job.epsilon, "delta": job.delta}
        for unit in units
    ]
    return Preview(job=job, units=units, cost=cost, releases=releases, answers=answers, notes=notes)
