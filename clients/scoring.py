"""Scoring inside a BU (`silofed score`): a run's model applied to the BU's own customers.

The same pipeline as in the run (the run's purpose, consent as of now, minimisation, pseudonyms,
the saved feature spec, the run's hold-out split), so that the scores of the held-out customers are
exactly the scores the BU's evaluation summed in the run. The output stays in the BU: one row per
consented customer with the customer's pseudonym (the BU's own key, so only the BU can link it back),
the score (or, for a segments run, the segment) and whether the customer was held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from clients.pipeline import PreparedUnit, UnitKeys, prepare_unit
from clients.silo import load_silo
from federation.job import JobKind
from federation.saved import SavedRun, load_run_model
from federation.segments import assign
from federation.tasks import adapter
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError
from privacy.home import UnitHome
from privacy.unit_config import UnitConfig


@dataclass(frozen=True)
class ScoreResult:
    out: Path
    customers: int
    held_out: int
    excluded: dict[str, int]
    column: str  # "score", "prediction" or "segment"


def score_unit(
    run: Path,
    bu_config: Path,
    out: Path,
    *,
    home: Path | None = None,
    now: datetime | None = None,
) -> ScoreResult:
    saved = load_run_model(run)
    config = UnitConfig.load(bu_config)
    unit_home = UnitHome.of(config, home)
    now = now or datetime.now(UTC)
    silo = load_silo(config, keyring=unit_home.keyring() if config.source.encrypted else None)
    job = saved.job.model_copy(update={"features": saved.spec})
    with unit_home.registry() as registry:
        prepared = prepare_unit(
            silo,
            job,
            registry=registry,
            keys=UnitKeys(unit_home.pseudonym_key(), unit_home.linkage_key()),
            as_of=now,
            now=now,
        )
    frame, column = scores_of(saved, prepared)
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise ConfigurationError(f"--out {out}: write scores to a .csv or a .parquet file")
    if out.suffix == ".csv":
        write_atomic(out, frame.to_csv(index=False))
    else:
        write_atomic(out, frame.to_parquet(index=False))
    return ScoreResult(
        out=out,
        customers=len(frame),
        held_out=int(frame["held_out"].sum()),
        excluded=dict(prepared.excluded),
        column=column,
    )


def scores_of(saved: SavedRun, prepared: PreparedUnit) -> tuple[pd.DataFrame, str]:
    """One row per customer (training customers first, then held-out ones): pseudonym, the score
    or segment, and the hold-out flag."""
    parts = ((prepared.train, False), (prepared.test, True))
    ids = np.concatenate([m.customer_ids for m, _ in parts])
    features = np.concatenate([m.features for m, _ in parts])
    held_out = np.concatenate([np.full(len(m.customer_ids), flag) for m, flag in parts])
    if saved.job.kind is JobKind.SEGMENTS:
        assert saved.centroids is not None
        values, column = assign(features.astype(np.float64), saved.centroids), "segment"
    else:
        assert saved.model is not None
        task = adapter(saved.job.task, saved.spec)
        values = task.predict(saved.model, features)
        column = "prediction" if task.kind == "regression" else "score"
    return pd.DataFrame({"customer": ids, column: values, "held_out": held_out}), column
