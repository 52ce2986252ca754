"""The real data sets of the utility and query benchmarks, split into BU silos the way an analyst
would split them (`silofed data split`), and each BU's data after silofed's own client pipeline.

Every baseline reads the BUs' data through `clients.pipeline` (consent, the minors rule,
minimisation, public feature scaling, the keyed-hash held-out split), so that the centralised, the
local-only, the plain federated and the DP models all train on the same customers and features and
are scored on the same held-out customers. The silos and the BU homes live in a temporary
directory; the data sets are read in place from `bench.record.DATA`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.record import DATA
from clients.pipeline import PreparedTables, PreparedUnit, UnitKeys, prepare_tables, prepare_unit
from clients.silo import Silo, load_silo
from clients.steward import prepare_simulated_home
from federation.exchanges import job_columns, resolve_job
from federation.job import Job, Task
from privacy.registry import ConsentRegistry
from privacy.unit_config import UnitConfig
from simulations.split import SplitRequest, SplitResult, split_table

FULL_SEEDS = (1, 2, 3)
QUICK_SEEDS = (1,)


def seeds(quick: bool) -> tuple[int, ...]:
    """The simulation seeds of a benchmark run: three in the full run, one with --quick."""
    return QUICK_SEEDS if quick else FULL_SEEDS


@dataclass(frozen=True)
class DataSet:
    """A real data set, how it is split into BUs, and the model task its label binds to."""

    name: str
    title: str
    split: SplitRequest  # `out` is set when the silos are written
    task: Task
    split_by: str  # the split, in words, for the benchmark's table

    def write_silos(self, directory: Path) -> tuple[SplitResult, list[Path]]:
        """Split the data set into BU silos under `directory`; the result and each BU's
        `bu.toml`, in unit order."""
        result = split_table(replace(self.split, out=directory), now=datetime.now(UTC))
        return result, [directory / unit.name / "bu.toml" for unit in result.units]


BANK = DataSet(
    name="bank",
    title="UCI Bank Marketing",
    split=SplitRequest(
        table=DATA / "bank_marketing" / "bank-full.csv",
        by="job",
        out=Path(),
        label="y",
        positive="yes",
        drop=("duration",),  # known only after the call: it leaks the answer
        sep=";",
    ),
    task=Task.RESPONSE,
    split_by="job (label y = yes, `duration` dropped)",
)
SHOPPERS = DataSet(
    name="shoppers",
    title="UCI Online Shoppers Purchasing Intention",
    split=SplitRequest(
        table=DATA / "online_shoppers" / "online_shoppers_intention.csv",
        by="Region",
        out=Path(),
        label="Revenue",
        positive="TRUE",
    ),
    task=Task.RESPONSE,
    split_by="Region (label Revenue = TRUE)",
)
CHURN = DataSet(
    name="churn",
    title="UCI Iranian Churn",
    split=SplitRequest(
        table=DATA / "iranian_churn" / "Customer_Churn.csv",
        by="Age Group",
        out=Path(),
        label="Churn",
        positive="1",
    ),
    task=Task.CHURN,
    split_by="Age Group (label Churn = 1)",
)
CDNOW = DataSet(
    name="cdnow",
    title="CDNOW purchases",
    split=SplitRequest(
        table=DATA / "cdnow" / "CDNOW_master.txt",
        by="acquisition_month",
        out=Path(),
        id="customer_id",
        transactions=True,
        timestamp="date",
        amount="dollar_value",
    ),
    task=Task.LTV,
    split_by="acquisition month (customers' first purchase)",
)


def resolved_job(job: Job, bu_configs: list[Path]) -> Job:
    """`job` made concrete from the BUs' declared schemas, as the coordinator does."""
    return resolve_job(job, [UnitConfig.load(p) for p in bu_configs])


@contextmanager
def _unit_inputs(bu_config: Path, homes: Path) -> Iterator[tuple[Silo, ConsentRegistry, UnitKeys]]:
    config = UnitConfig.load(bu_config)
    home = prepare_simulated_home(config, homes / config.unit)
    with home.registry() as registry:
        yield load_silo(config), registry, UnitKeys(home.pseudonym_key(), home.linkage_key())


def prepared_units(job: Job, bu_configs: list[Path], homes: Path) -> list[PreparedUnit]:
    """Each BU's train and test features for the resolved model `job`, through the pipeline the
    BU runs (consent as of now: the split granted it a moment ago)."""
    units = []
    for bu_config in bu_configs:
        with _unit_inputs(bu_config, homes) as (silo, registry, keys):
            units.append(
                prepare_unit(silo, job, registry=registry, keys=keys, as_of=datetime.now(UTC))
            )
    return units


def prepared_tables(job: Job, bu_configs: list[Path], homes: Path) -> list[PreparedTables]:
    """Each BU's tables as the resolved query `job` reads them: consented, minimised,
    pseudonymised."""
    tables = []
    for bu_config in bu_configs:
        with _unit_inputs(bu_config, homes) as (silo, registry, keys):
            tables.append(
                prepare_tables(
                    silo,
                    job,
                    columns=job_columns(job),
                    registry=registry,
                    keys=keys,
                    as_of=datetime.now(UTC),
                )
            )
    return tables


def spread(values: list[float]) -> dict[str, float | list[float]]:
    """Mean, minimum and maximum of one figure over the seeds, and the values themselves."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "min": float(array.min()),
        "max": float(array.max()),
        "runs": [float(v) for v in array],
    }
