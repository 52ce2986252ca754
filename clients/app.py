"""The Flower ClientApp of a business unit.

Flower's legacy `NumPyClient` (the only client kind Flower 1.41's SecAgg+ works with): every round
is a `fit` call whose instruction says whether to train or to evaluate. The BU follows its
`bu.toml` every round and prepares its silo (consent as of the job's start, with revocations since
then taking effect at once; minimisation; features); a round whose inputs are byte for byte those of
an earlier round of the job, in the same process, reuses that preparation. Files are read again
only when their identity (inode, size, times) changed, or was taken in the same tick as their last
write (`RACY_WINDOW_NS`), rather than hashed every exchange (~30 ms at 10,000 customers). It
records which customers the run used (lineage, as HMAC digests in its home), checks the job
against its own privacy policy and budget before reading any data, calibrates its own noise once
per run from the public plan, and records every round's release in its persistent ledger, from
which the epsilon it reports is composed: cumulative over the run (never per round), over the
purpose, and over the BU as a whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Generic, NamedTuple, TypeVar

import numpy as np
import pandas as pd
import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.clientapp.typing import Mod

from clients.budget import admit, check_round_not_answered, run_history, training_history
from clients.features import FeatureMatrix, compute_features
from clients.mods import secure_aggregation_mod
from clients.pipeline import (
    PreparedTables,
    PreparedUnit,
    UnitKeys,
    check_spec_fits_schema,
    features_of,
    prepare_tables,
)
from clients.prepared import discard_prepared, load_prepared, save_prepared
from clients.queries import query_vector
from clients.replies import store_reply, stored_reply
from clients.segments import segment_vector
from clients.silo import load_silo, table_file
from clients.steward import import_consent
from clients.training import (
    conditional_round,
    entropy_generator,
    local_plan,
    train_clipped_update,
    train_dp_sgd,
)
from federation.evaluation import RegressionSummary, ScoreHistogram, ScoreSummary
from federation.exchanges import (
    RANGES_ROUND,
    evaluation_round,
    is_last_exchange,
    job_columns,
    planned_evaluation,
    planned_ranges,
    release_layout,
    release_multiplier,
)
from federation.job import Job, JobKind, NoisePlacement
from federation.models import set_parameters
from federation.ranges import apply_ranges, histogram_vector
from federation.secagg import grid_scale, shares_and_threshold, statistics_range
from federation.tasks import adapter
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
from privacy.accounting import (
    ALL,
    HOLDOUT,
    TRAIN,
    DistributedPlan,
    DpSgdEvent,
    calibrate_noise_multiplier,
    central_noise_multiplier,
    central_noise_std,
    distributed_plan,
    partitioned_epsilon,
)
from privacy.atomic import write_atomic
from privacy.errors import ConfigurationError, RefusedByUnit, RunFailed
from privacy.home import UnitHome
from privacy.ledger import GaussianEvent, PrivacyEvent, PrivacyLedger
from privacy.mechanisms import Placement, gaussian_event_of
from privacy.registry import ConsentRegistry
from privacy.samplers import SecureSource, SeededSource, discrete_gaussian
from privacy.unit_config import UNIT_CONFIG_FILE, UnitConfig

STATE_KEY = "silofed.dp_sgd"
REGISTRY_FILE = "consent.sqlite"  # in the BU's home: the file `UnitHome.registry()` opens


@dataclass(frozen=True)
class Node:
    """This node's BU configuration, its home (None: the one `bu.toml` names), and whether it is a
    simulated BU (seeds allowed) or a real one."""

    bu_config: Path
    home: Path | None
    simulated: bool
    # simulation: the consent export beside the silo, which the BU's steward would import; the
    # node imports it into its home at its first exchange (again only if the export changed)
    consent_export: Path | None = None


@dataclass(frozen=True)
class _PreparedData:
    """A BU's prepared data for one job, kept in the node's process between the job's rounds:
    the tables reduced to the customers' pseudonymised keys (all later exchanges read of them),
    the features, and the first consent event recorded after the preparation. Consent is evaluated
    as of the job's start, and a revocation counts once its time has come: the data stays valid
    until that event's time, whatever else is unchanged."""

    tables: PreparedTables
    packed: FeatureMatrix  # customer ids as ASCII bytes when they are (hex pseudonyms: 1/4)
    next_consent_event: pd.Timestamp | None  # naive UTC, as the registry stores it

    @classmethod
    def of(
        cls, tables: PreparedTables, matrix: FeatureMatrix, next_event: pd.Timestamp | None
    ) -> _PreparedData:
        ids = matrix.customer_ids
        if ids.dtype.kind == "U":
            with contextlib.suppress(UnicodeEncodeError):  # not ASCII: kept as they are
                matrix = replace(matrix, customer_ids=np.char.encode(ids, "ascii"))
        return cls(_customers_only(tables), matrix, next_event)

    @property
    def matrix(self) -> FeatureMatrix:
        """The features as `compute_features` gave them (ids as str again)."""
        ids = self.packed.customer_ids
        if ids.dtype.kind != "S":
            return self.packed
        return replace(self.packed, customer_ids=ids.astype(str))

    def holds_at(self, now: datetime) -> bool:
        if self.next_consent_event is None:
            return True
        return pd.Timestamp(now).tz_convert(None) < self.next_consent_event


PREPARED_KEPT = 256  # BUs whose prepared data one process keeps (~2.5 MB per 10,000 customers)
_PREPARED: OrderedDict[str, _PreparedData] = OrderedDict()


def _keep(fingerprint: str, data: _PreparedData) -> None:
    # prepared anew (a consent event came due): its lineage is recorded anew as well
    _LINEAGE_RECORDED.difference_update({d for d in _LINEAGE_RECORDED if d[0] == fingerprint})
    _PREPARED[fingerprint] = data
    _PREPARED.move_to_end(fingerprint)
    while len(_PREPARED) > PREPARED_KEPT:
        _PREPARED.popitem(last=False)


def _inputs_fingerprint(
    node: Node,
    unit: UnitConfig,
    home: UnitHome,
    job: Job,
    keys: UnitKeys,
    as_of: datetime,
    *,
    now_ns: int,
) -> str | None:
    """A digest of everything the prepared data depends on: the contents of `bu.toml`, of every
    silo file and of the consent registry (events, erasure tombstones, its write-ahead log), the
    BU's keys, the job and the consent time. None when the silo cannot be fingerprinted from files
    (a SQL source, or an encrypted one whose key ring may change): such a BU prepares every round.
    Each file's contents enter through `_content_digest`, re-read only when the file changed."""
    if unit.source.kind == "sql" or unit.source.encrypted:
        return None
    registry = home.directory / REGISTRY_FILE
    files = [
        node.bu_config,
        *(table_file(unit, table) for table in unit.tables),
        registry,
        registry.with_name(registry.name + "-wal"),
    ]
    digest = hashlib.blake2b(digest_size=32)
    parts = [
        *(part for path in files for part in (str(path).encode(), _content_digest(path, now_ns))),
        keys.pseudonym,
        keys.linkage or b"",
        job.model_dump_json().encode(),
        as_of.isoformat().encode(),
    ]
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class _FileIdentity(NamedTuple):
    """A file and its last change: a file replaced (device, inode), or written since (size,
    modification time, status-change time, which `os.utime` cannot set back), has another
    identity, unless the write fell in the tick its identity was taken (see `RACY_WINDOW_NS`)."""

    device: int
    inode: int
    size: int
    modified_ns: int
    changed_ns: int


def _file_identity(path: Path) -> _FileIdentity | None:
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return _FileIdentity(
        status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns
    )


# A file modified within this long of the moment its identity was taken may change again without
# changing its identity: timestamps have a granularity (1 ns on ext4, 1 s on HFS+, 2 s on FAT),
# and a write in the same tick as the check leaves size and times as they were (git's "racily
# clean" entries). What was derived from a file inside that window is derived anew next time.
RACY_WINDOW_NS = 2_000_000_000
Derived = TypeVar("Derived")


class _KeptByFile(Generic[Derived]):
    """Values derived from files (a digest, a parsed configuration), each kept while its file
    keeps the identity it had when the value was derived, and only if the file was already older
    than `RACY_WINDOW_NS` then: any later write changes the identity."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._entries: OrderedDict[Path, tuple[_FileIdentity, Derived]] = OrderedDict()

    def get(self, path: Path, identity: _FileIdentity) -> Derived | None:
        kept = self._entries.get(path)
        if kept is None or kept[0] != identity:
            return None
        self._entries.move_to_end(path)
        return kept[1]

    def put(self, path: Path, identity: _FileIdentity, value: Derived, *, now_ns: int) -> None:
        """Keep `value`, derived from `path` after its `identity` was taken (a write during the
        derivation changes the identity, or falls in the racy window); `now_ns` was read before
        the identity, so that the window is never shorter than it says."""
        self._entries.pop(path, None)
        if now_ns - identity.modified_ns > RACY_WINDOW_NS:
            self._entries[path] = (identity, value)
            while len(self._entries) > self.most:
                self._entries.popitem(last=False)


_CONTENT_DIGESTS = _KeptByFile[bytes](most=4096)  # files; an entry is a path, identity, 32 bytes
_UNIT_CONFIGS = _KeptByFile[UnitConfig](most=PREPARED_KEPT)


def _content_digest(path: Path, now_ns: int) -> bytes:
    """A digest of the file's bytes (a marker when it is absent), read again only when the file
    changed (`_KeptByFile`)."""
    identity = _file_identity(path)
    if identity is None:
        return b"\0absent"
    digest = _CONTENT_DIGESTS.get(path, identity)
    if digest is None:
        try:
            digest = hashlib.blake2b(path.read_bytes(), digest_size=32).digest()
        except FileNotFoundError:  # removed since its identity was taken
            return b"\0absent"
        _CONTENT_DIGESTS.put(path, identity, digest, now_ns=now_ns)
    return digest


def _unit_config(path: Path, now_ns: int) -> UnitConfig:
    """`UnitConfig.load(path)`, parsed and validated again only when the file changed
    (`_KeptByFile`): the BU still follows every edit of its `bu.toml` from the next exchange on."""
    # The file's contents and the directory its relative paths are taken from make the config.
    where = path.parent.resolve() / path.name
    identity = _file_identity(where)
    unit = _UNIT_CONFIGS.get(where, identity) if identity is not None else None
    if unit is None:
        unit = UnitConfig.load(path)  # a missing or invalid file: its error, naming the file
        if identity is not None:
            _UNIT_CONFIGS.put(where, identity, unit, now_ns=now_ns)
    return unit


CONSENT_IMPORTED = "consent-imported"  # in a simulated BU's home: the digest of its import


def _import_simulated_consent(home: UnitHome, export: Path) -> None:
    """A simulated BU's steward work, done by its node: the consent export imported into the
    home's registry, once per content of the export (the marker holds its digest; importing again
    would change nothing, at the cost of a full read)."""
    digest = _content_digest(export, time.time_ns()).hex()
    marker = home.directory / CONSENT_IMPORTED
    with contextlib.suppress(FileNotFoundError):
        if marker.read_text(encoding="ascii") == digest:
            return
    import_consent(home, export)
    write_atomic(marker, digest)


def _next_consent_event(
    registry: ConsentRegistry, purpose: str, now: datetime
) -> pd.Timestamp | None:
    """The time of the first event of `purpose` recorded for after `now` (naive UTC), if any."""
    times = registry.events(purpose)["timestamp"]
    later = times[times > pd.Timestamp(now).tz_convert(None)]
    return later.min() if len(later) else None


LINEAGE_FILE = "lineage.sqlite"  # in the BU's home: the file `UnitHome.lineage()` opens
# (fingerprint, run id, lineage file's device and inode) of the lineage this process recorded
_LINEAGE_RECORDED: set[tuple[str, str, tuple[int, int] | None]] = set()


def _lineage_file(path: Path) -> tuple[int, int] | None:
    """Which file the lineage is: its device and inode. Not its size or times, which the BU's
    other processes change with each run they record (the lineage only grows); a lineage file
    deleted or replaced is another file."""
    identity = _file_identity(path)
    return None if identity is None else (identity.device, identity.inode)


def _record_lineage(
    home: UnitHome, instruction: Instruction, tables: PreparedTables, fingerprint: str | None
) -> None:
    """Record in the BU's lineage which customers the run used. The lineage only grows (a row
    per run and customer digest, inserted or ignored), so recording again the very customers this
    process recorded for the run, into the same file, changes nothing, and is skipped."""
    path = home.directory / LINEAGE_FILE
    done = (fingerprint, instruction.run_id, _lineage_file(path)) if fingerprint else None
    if done is not None and done in _LINEAGE_RECORDED:
        return
    with home.lineage() as lineage:
        used = tables.tables["customers"][tables.customer_key].astype(str).to_numpy()
        lineage.record_digests(
            instruction.run_id, used, purpose=instruction.job.purpose, now=datetime.now(UTC)
        )
    if fingerprint is not None:
        _LINEAGE_RECORDED.add((fingerprint, instruction.run_id, _lineage_file(path)))


def _customers_only(tables: PreparedTables) -> PreparedTables:
    customers = tables.tables["customers"][[tables.customer_key]]
    return replace(tables, tables={"customers": customers})


def _declared_scale(job: Job) -> Job:
    """`job` without the feature windows of its ranges exchange, if it has any."""
    if job.features is None or not job.features.ranges:
        return job
    return job.model_copy(update={"features": job.features.model_copy(update={"ranges": {}})})


def _in_windows(matrix: FeatureMatrix, job: Job) -> FeatureMatrix:
    """The features on the declared scale, rescaled to the job's feature windows (if any)."""
    if job.features is None or not job.features.ranges:
        return matrix
    return replace(matrix, features=apply_ranges(matrix.features, job.features))


def _split(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    sizes = np.cumsum([a.size for a in like])[:-1]
    return [part.reshape(a.shape) for part, a in zip(np.split(flat, sizes), like, strict=True)]


def check_secure_range(arrays: list[np.ndarray], bound: float, *, what: str) -> None:
    """SecAgg+ clips to its public range without telling anyone; a BU refuses to send a vector
    that would be clipped, since the sum would then be silently wrong."""
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if not largest <= bound:
        raise RunFailed(
            f"{what} reach {largest:.4g}, outside the secure aggregation range +-{bound:g}; "
            "raise the job's secure_aggregation.clipping_range (a public parameter)"
        )


class BusinessUnitClient(NumPyClient):
    """One BU's answers. All its state lives in its home (ledger, registry, lineage, keys), so a
    client re-created every round, as Flower does, loses nothing."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def get_parameters(self, config):
        raise RunFailed("silofed's coordinator initialises the model; it never asks a BU for one")

    def fit(self, parameters, config):
        instruction = Instruction.from_config(config)
        if instruction.seed is not None and not self.node.simulated:
            raise ConfigurationError(
                "a seed was sent to a deployed BU; seeds exist only in simulation, and a BU in "
                "production draws its noise from the operating system's entropy"
            )
        job = instruction.job
        unit = _unit_config(self.node.bu_config, time.time_ns())
        home = UnitHome.of(unit, self.node.home)
        if self.node.consent_export is not None:
            _import_simulated_consent(home, self.node.consent_export)
        replay = stored_reply(home.directory, instruction)
        if replay is not None:
            # A resumed run asks again for an exchange this BU answered: the same release again,
            # at no further cost, and no second ledger event.
            last = is_last_exchange(job, instruction.phase, instruction.server_round)
            _audit(home, "exchange.replayed", instruction, {}, final=last)
            return replay
        try:
            # Before any data is read: the BU's own policy and budget decide.
            admit(unit, home, job, instruction.run_id, now=datetime.now(UTC))
            tables, matrix, fingerprint = self._prepared(unit, home, job, instruction)
            if not len(tables.tables["customers"]):
                raise RefusedByUnit(
                    f"unit '{unit.unit}' has no eligible customer for purpose '{job.purpose}' "
                    f"(excluded: {tables.excluded}); it takes no part in this run"
                )
            phase = instruction.phase
            with home.ledger() as ledger:
                if phase is Phase.QUERY:
                    vector = query_vector(tables.tables, unit, job.query_spec)
                    reply = self._release(tables, vector, parameters, instruction, ledger)
                else:
                    assert matrix is not None  # every job but a query has features
                    prepared = features_of(tables, matrix)
                    if phase in (Phase.RANGES, Phase.TRAIN) and not len(prepared.train.labels):
                        raise RefusedByUnit(
                            f"unit '{unit.unit}' has no training customer for purpose "
                            f"'{job.purpose}'; it takes no part in this run"
                        )
                    if phase is Phase.RANGES:
                        if job.feature_spec.ranges:
                            raise RunFailed(
                                "the ranges exchange came with feature windows already set; the "
                                "histograms are taken on the declared scale, once per run"
                            )
                        # the training customers only: the release composes with training
                        vector = histogram_vector(prepared.train.features, job.feature_spec)
                        reply = self._release(
                            tables, vector, parameters, instruction, ledger, prepared=prepared
                        )
                    elif phase is Phase.TRAIN:
                        reply = self._train(prepared, parameters, instruction, ledger)
                    elif phase is Phase.SEGMENTS:
                        (centroids,) = parameters
                        vector = segment_vector(matrix.features, centroids, job.segments_spec)
                        reply = self._release(tables, vector, parameters, instruction, ledger)
                    elif job.evaluation.mode == "exact" and adapter(job.task).kind == "binary":
                        reply = self._evaluate_exact(prepared, parameters, instruction)
                    else:
                        vector = self._evaluation_vector(prepared, parameters, job)
                        reply = self._release(
                            tables, vector, parameters, instruction, ledger, prepared=prepared
                        )
                last = is_last_exchange(job, phase, instruction.server_round)
                if last:
                    ledger.release(instruction.run_id, job.purpose, now=datetime.now(UTC))
                    if fingerprint is not None:  # the job needs it no more
                        discard_prepared(home.directory, fingerprint)
            arrays, weight, metrics = reply
            tag = exchange_tag(instruction.run_id, instruction.server_round, phase)
            reply = arrays, weight, {**metrics, EXCHANGE_KEY: tag}
            # after the ledger holds the release (clients/replies.py says why in that order)
            store_reply(home.directory, instruction, reply)
            if phase in (Phase.TRAIN, Phase.QUERY) or (
                phase is Phase.SEGMENTS and instruction.server_round == 1
            ):
                _record_lineage(home, instruction, tables, fingerprint)
            _audit_exchange(home, instruction, reply, final=last)
            return reply
        except RefusedByUnit as refusal:
            _audit(home, "job.refused", instruction, {"reason": str(refusal)}, final=True)
            if job.secure_aggregation.enabled:
                # Under SecAgg+ a reply without the masked vector would break the protocol for
                # everyone; the BU drops out instead, and SecAgg+ recovers from the dropout.
                raise
            return [], 0, Refusal(unit=unit.unit, reason=str(refusal)).to_metrics()

    def _prepared(
        self, unit: UnitConfig, home: UnitHome, job: Job, instruction: Instruction
    ) -> tuple[PreparedTables, FeatureMatrix | None, str | None]:
        """The silo after consent, minimisation and pseudonymisation, the job's features (None
        for a query), and the fingerprint of the inputs (None when not kept). A model or segments
        job reads the same data every round: it is kept in this process and used again while its
        inputs are unchanged (see `_PreparedData`)."""
        keys = UnitKeys(home.pseudonym_key(), home.linkage_key())
        as_of = job.consent_as_of or instruction.started_at
        # The data is prepared on the declared scale and kept so: the feature windows the ranges
        # exchange finds are applied to it afterwards (they change the job, not the data).
        ranged, job = job, _declared_scale(job)
        fingerprint = (
            _inputs_fingerprint(self.node, unit, home, job, keys, as_of, now_ns=time.time_ns())
            if job.kind is not JobKind.QUERY
            else None
        )
        now = datetime.now(UTC)
        kept = _PREPARED.get(fingerprint) if fingerprint is not None else None
        if kept is None and fingerprint is not None:
            # another process serving this BU may have prepared it (clients/prepared.py)
            shared = load_prepared(home.directory, fingerprint)
            if shared is not None:
                kept = _PreparedData(*shared)
                _keep(fingerprint, kept)
        if kept is not None and kept.holds_at(now):
            _PREPARED.move_to_end(fingerprint)
            return kept.tables, _in_windows(kept.matrix, ranged), fingerprint
        keyring = home.keyring() if unit.source.encrypted else None
        silo = load_silo(unit, keyring=keyring)
        if job.kind is not JobKind.QUERY:
            check_spec_fits_schema(silo, job.feature_spec)
        with home.registry() as registry:
            tables = prepare_tables(
                silo,
                job,
                columns=job_columns(job),
                registry=registry,
                keys=keys,
                as_of=as_of,
                now=now,
            )
            next_event = (
                _next_consent_event(registry, job.purpose, now) if fingerprint is not None else None
            )
        if job.kind is JobKind.QUERY:
            return tables, None, None
        matrix = compute_features(tables.tables, job.feature_spec, customer_key=tables.customer_key)
        if fingerprint is not None:
            data = _PreparedData.of(tables, matrix, next_event)
            _keep(fingerprint, data)
            save_prepared(home.directory, fingerprint, data.tables, data.packed, next_event)
        return tables, _in_windows(matrix, ranged), fingerprint

    def _evaluation_vector(self, prepared: PreparedUnit, parameters, job) -> np.ndarray:
        task = adapter(job.task, job.feature_spec)
        model = task.build_model(job.feature_spec.dim)
        set_parameters(model, parameters)
        predictions = task.predict(model, prepared.test.features)
        if task.kind == "regression":
            return RegressionSummary.of(
                predictions,
                task.natural_labels(prepared.test.labels),
                upper=task.upper_of(job.feature_spec),
            ).to_vector()
        return ScoreHistogram.of(predictions, prepared.test.labels, job.evaluation.bins).to_vector()

    def _release(
        self,
        tables: PreparedTables,
        vector: np.ndarray,
        parameters,
        instruction: Instruction,
        ledger: PrivacyLedger,
        *,
        prepared: PreparedUnit | None = None,
    ):
        """A statistics release: the exact vector plus this BU's share of the noise, recorded in
        the ledger before it leaves (and refused if it would pass the job's epsilon)."""
        job, phase = instruction.job, instruction.phase
        layout = release_layout(job, phase, instruction.server_round)
        z = release_multiplier(job, phase)
        assert layout is not None
        ledger_round = {Phase.EVALUATE: evaluation_round(job), Phase.RANGES: RANGES_ROUND}.get(
            phase, instruction.server_round
        )
        check_round_not_answered(ledger, instruction.run_id, job.purpose, ledger_round)
        # The evaluation touches the held-out customers only: it composes in parallel with
        # training, which touches the others (privacy.accounting.partitioned_epsilon); the
        # ranges touch the training customers, before training.
        part = {Phase.EVALUATE: HOLDOUT, Phase.RANGES: TRAIN}.get(phase, ALL)
        released = gaussian_event_of(z) if z is not None else None
        if released is not None:
            would_reach = ledger.epsilon_after(
                job.delta,
                purpose=job.purpose,
                run_id=instruction.run_id,
                event=released,
                part=part,
            )
            if would_reach > job.epsilon * (1 + 1e-9):
                raise RefusedByUnit(
                    f"unit '{tables.unit}': the {phase} release of round "
                    f"{instruction.server_round} would bring its epsilon to {would_reach:.4f}, "
                    f"above the job's {job.epsilon}; nothing is released"
                )
        seed = self._seed(instruction, tables.unit)
        source = SecureSource() if seed is None else SeededSource(seed)
        secure = job.secure_aggregation
        threshold = shares_and_threshold(instruction.units)[1] if secure.enabled else 1
        noisy = layout.noisy(
            vector,
            z,
            Placement(job.noise.value),
            source,
            threshold=threshold,
            colluding=secure.colluding,
        )
        now = datetime.now(UTC)
        if released is not None:
            ledger.record(
                instruction.run_id, ledger_round, job.purpose, released, now=now, part=part
            )
        report = _unit_report(
            tables,
            ledger,
            job,
            instruction.run_id,
            records_used=(
                len(prepared.train.labels)
                if prepared is not None
                else len(tables.tables["customers"])
            ),
            records_test=len(prepared.test.labels) if prepared is not None else 0,
            # For an evaluation the coordinator keeps the training's DP-SGD figures and takes the
            # epsilon figures from here; a query or k-means run has releases only.
            noise_multiplier=z if z is not None else 1.0,
            sample_rate=1.0,
            steps=0,
            releases=_releases_so_far(ledger, instruction),
        )
        wire = [noisy.astype(np.float64)]
        if secure.enabled:
            # Integers travel exactly on SecAgg+'s statistics grid (see server.secure_aggregation);
            # the weight is 1 so that the secure mean times the number of BUs is the sum.
            check_secure_range(wire, statistics_range(instruction.units), what=f"{phase} values")
            return wire, 1, report.to_metrics()
        return wire, max(1, report.records_used), report.to_metrics()

    @staticmethod
    def _seed(instruction: Instruction, unit: str) -> int | None:
        """Simulation only: reproducible, distinct per BU, round and exchange."""
        if instruction.seed is None:
            return None
        return int(
            np.random.SeedSequence(
                [
                    instruction.seed,
                    instruction.server_round,
                    *str(instruction.phase).encode(),
                    0,
                    *unit.encode(),
                ]
            ).generate_state(1)[0]
        )

    def _evaluate_exact(self, prepared: PreparedUnit, parameters, instruction: Instruction):
        job = instruction.job
        task = adapter(job.task, job.feature_spec)
        model = task.build_model(job.feature_spec.dim)
        set_parameters(model, parameters)
        scores = task.predict(model, prepared.test.features)
        summary = ScoreSummary.of(scores, prepared.test.labels)
        if job.secure_aggregation.enabled:
            # Counts travel exactly on SecAgg+'s integer grid (see server.secure_aggregation);
            # the weight is 1 so that the secure mean times the number of BUs is the sum.
            check_secure_range(
                summary.to_arrays(), statistics_range(instruction.units), what="evaluation counts"
            )
            return summary.to_arrays(), 1, {UNIT_KEY: prepared.unit}
        return summary.to_arrays(), len(prepared.test.labels), {UNIT_KEY: prepared.unit}

    def _train(
        self, prepared: PreparedUnit, parameters, instruction: Instruction, ledger: PrivacyLedger
    ):
        job = instruction.job
        records = len(prepared.train.labels)
        plan = local_plan(records, job.training)
        check_round_not_answered(ledger, instruction.run_id, job.purpose, instruction.server_round)
        history = run_history(ledger, instruction.run_id, job.purpose, part=TRAIN)
        trained = training_history(ledger, instruction.run_id, job.purpose)
        # The DP evaluation after the last round touches the held-out customers only: training
        # is calibrated with it in parallel, so that the run as a whole stays within the target.
        # The ranges release before training touches the training customers: training is
        # calibrated after it, from the public plan (whether or not this BU answered it, so that
        # every BU's multiplier follows from the job alone).
        evaluation = planned_evaluation(job)
        ranges = planned_ranges(job)
        central = job.noise is NoisePlacement.CENTRAL
        distributed = job.noise is NoisePlacement.DISTRIBUTED
        if distributed:
            # Each BU adds a share of the noise, calibrated for SecAgg+'s threshold t (and the
            # stated number of colluding BUs): any sum SecAgg+ completes carries the full noise.
            shares_plan = self._distributed_plan(job, instruction)
            noise_multiplier = shares_plan.noise_multiplier
            planned = GaussianEvent(
                sigma=shares_plan.total_std / shares_plan.scale,
                sensitivity=shares_plan.sensitivity / shares_plan.scale,
            )
            sample_rate = 1.0
        elif central:
            # The coordinator adds noise of std z x 2C to the sum, every BU in every round: a
            # Gaussian mechanism per round, no sampling. z follows from the public job alone.
            clip = job.training.clip_norm
            noise_multiplier = central_noise_multiplier(
                job.epsilon, job.delta, job.rounds, spent=ranges, holdout=evaluation
            )
            planned: PrivacyEvent = GaussianEvent(
                sigma=central_noise_std(noise_multiplier, clip), sensitivity=2 * clip
            )
            sample_rate = 1.0
        else:
            # Calibrated once per run, from the public plan: the first round's multiplier is kept.
            noise_multiplier = (
                trained[0].noise_multiplier
                if trained
                else calibrate_noise_multiplier(
                    job.epsilon,
                    job.delta,
                    plan.sample_rate,
                    plan.steps_per_round * job.rounds,
                    spent=ranges,
                    holdout=evaluation,
                )
            )
            planned = DpSgdEvent(noise_multiplier, plan.sample_rate, plan.steps_per_round)
            sample_rate = plan.sample_rate
        as_step = planned.as_dp_sgd() if isinstance(planned, GaussianEvent) else planned
        would_reach = partitioned_epsilon(
            [{TRAIN: [*history, as_step], HOLDOUT: list(evaluation)}], job.delta
        )
        if would_reach > job.epsilon:
            # e.g. fewer consented customers than when the noise was calibrated: a higher sample
            # rate. The round is not trained; nothing is released.
            raise RefusedByUnit(
                f"unit '{prepared.unit}': round {instruction.server_round} would bring its epsilon "
                f"to {would_reach:.4f}, above the job's {job.epsilon}; the round is not taken"
            )
        seed = None
        if instruction.seed is not None:  # simulation: reproducible, distinct per BU and round
            seed = int(
                np.random.SeedSequence(
                    [instruction.seed, instruction.server_round, *prepared.unit.encode()]
                ).generate_state(1)[0]
            )
        task = adapter(job.task, job.feature_spec)
        model = task.build_model(job.feature_spec.dim)
        features, labels = prepared.train.features, prepared.train.labels
        if central or distributed:
            reply, _ = train_clipped_update(
                model,
                parameters,
                features,
                labels,
                job.training,
                entropy_generator(seed),
                loss=task.loss(),
            )
            if distributed:
                reply = self._with_noise_share(reply, shares_plan, seed)
            released: PrivacyEvent = planned
        else:
            update = train_dp_sgd(
                model,
                parameters,
                features,
                labels,
                job.training,
                noise_multiplier,
                history,
                entropy_generator(seed),
                loss=task.loss(),
            )
            reply = update.parameters
            released = DpSgdEvent(noise_multiplier, plan.sample_rate, update.steps)
        now = datetime.now(UTC)
        ledger.record(
            instruction.run_id, instruction.server_round, job.purpose, released, now=now, part=TRAIN
        )
        report = _unit_report(
            prepared,
            ledger,
            job,
            instruction.run_id,
            records_used=records,
            records_test=len(prepared.test.labels),
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=sum(e.steps for e in training_history(ledger, instruction.run_id, job.purpose)),
            releases=_releases_so_far(ledger, instruction),
        )
        if job.secure_aggregation.enabled:
            check_secure_range(
                reply, job.secure_aggregation.clipping_range, what="model parameters"
            )
            return reply, 1, report.to_metrics()  # uniform FedAvg weights under SecAgg+
        return reply, records, report.to_metrics()

    @staticmethod
    def _distributed_plan(job, instruction: Instruction) -> DistributedPlan:
        _, threshold = shares_and_threshold(instruction.units)
        return distributed_plan(
            job.epsilon,
            job.delta,
            job.rounds,
            clip_norm=job.training.clip_norm,
            dimension=sum(
                t.numel() for t in adapter(job.task).build_model(job.feature_spec.dim).parameters()
            ),
            scale=grid_scale(job.secure_aggregation),
            threshold=threshold,
            colluding=job.secure_aggregation.colluding,
            spent=planned_ranges(job),
            holdout=planned_evaluation(job),
        )

    @staticmethod
    def _with_noise_share(update: list[np.ndarray], plan: DistributedPlan, seed: int | None):
        """The clipped update on SecAgg+'s grid plus this BU's integer noise share, as values
        Flower's quantisation maps back to exactly these integers."""
        flat = np.concatenate([u.ravel().astype(np.float64) for u in update])
        rng = np.random.default_rng(seed)
        rounded = conditional_round(flat * plan.scale, plan.l2_bound, rng)
        source = SecureSource() if seed is None else SeededSource(seed)
        share = discrete_gaussian(plan.share_std, flat.size, source)
        on_grid = ((rounded + share).astype(np.float64) / plan.scale).astype(np.float32)
        return _split(on_grid, update)


def _audit(
    home: UnitHome, event: str, instruction: Instruction, data: dict, *, final: bool
) -> None:
    """One entry in the BU's own audit log, then a signed checkpoint (final at the run's end)."""
    log = home.audit_log()
    log.append(
        event,
        {
            "run_id": instruction.run_id,
            "round": instruction.server_round,
            "phase": str(instruction.phase),
            "purpose": instruction.job.purpose,
            **data,
        },
    )
    log.checkpoint(final=final)


def _audit_exchange(home: UnitHome, instruction: Instruction, reply, *, final: bool) -> None:
    """What the BU released in this exchange, from its own report: counts, columns, epsilon,
    secure aggregation; never an id or a value."""
    metrics = reply[2]
    data: dict = {"secure_aggregation": instruction.job.secure_aggregation.enabled}
    if UnitReport.KEY in metrics:
        data |= UnitReport.from_metrics(metrics).audit_summary()
    _audit(home, "exchange.answered", instruction, data, final=final)


def _releases_so_far(ledger: PrivacyLedger, instruction: Instruction) -> int:
    """The statistics releases of the run so far: one per round of a query or k-means job; the
    ranges and the DP evaluation of a model job (its ledger rounds outside the training rounds)."""
    job = instruction.job
    if job.kind is not JobKind.MODEL:
        return instruction.server_round
    rounds = {e.round for e in ledger.entries(run_id=instruction.run_id, purpose=job.purpose)}
    return len(rounds - set(range(1, job.rounds + 1)))


def _unit_report(
    source: PreparedTables | PreparedUnit, ledger: PrivacyLedger, job, run_id: str, **figures
) -> UnitReport:
    """What a BU reports with every reply: the facts about the data it used (disclosed metadata),
    its privacy figures from the ledger, and the exchange's own `figures` (records, noise)."""
    return UnitReport(
        unit=source.unit,
        purpose=source.purpose,
        encrypted_at_rest=source.encrypted_at_rest,
        legal_basis=source.legal_basis,
        jurisdictions=list(source.jurisdictions),
        quality=source.quality,
        excluded=source.excluded,
        columns_used=list(source.columns_used),
        columns_dropped=[
            DroppedColumn(column=d.column, reason=d.reason) for d in source.columns_dropped
        ],
        epsilon=ledger.epsilon(job.delta, purpose=job.purpose, run_id=run_id),
        epsilon_total=ledger.epsilon(job.delta, purpose=job.purpose),
        epsilon_unit_total=ledger.epsilon(job.delta),
        budget=ledger.budget(job.purpose),
        budget_unit=ledger.budget(None),
        **figures,
    )


def resolve_node(context: Context, nodes: Sequence[Node] | None) -> Node:
    """Deployment: the node config names the BU's `bu-config` (and optionally `home`). Simulation:
    virtual node `partition-id` serves the i-th BU, given by the simulation runner or listed from
    the run config's `data-dir` (homes under `homes-dir`, their consent imported at the BU's
    first exchange)."""
    if "bu-config" in context.node_config:
        home = context.node_config.get("home")
        return Node(
            Path(str(context.node_config["bu-config"])), Path(str(home)) if home else None, False
        )
    if "partition-id" not in context.node_config:
        raise ConfigurationError(
            "this node has neither a 'bu-config' entry in its node config nor a simulation "
            "partition; start it with `silofed deploy node` or through `silofed simulate`"
        )
    index = int(context.node_config["partition-id"])
    if nodes is None:
        nodes = _nodes_from_run_config(context)
    if index >= len(nodes):
        raise ConfigurationError(f"simulation node {index} has no BU (only {len(nodes)} found)")
    return nodes[index]


def _nodes_from_run_config(context: Context) -> list[Node]:
    from clients.steward import consent_export

    data_dir = str(context.run_config.get("data-dir", ""))
    if not data_dir:
        raise ConfigurationError(
            "run config 'data-dir' is empty: pass --run-config \"data-dir='SILOS'\" to flwr run"
        )
    homes_dir = Path(str(context.run_config.get("homes-dir", "")) or Path(data_dir) / ".homes")
    nodes = []
    for bu_config in sorted(Path(data_dir).glob(f"*/{UNIT_CONFIG_FILE}")):
        config = UnitConfig.load(bu_config)
        export = consent_export(config.source.directory)
        nodes.append(Node(bu_config, homes_dir / config.unit, True, consent_export=export))
    return nodes


def make_client_app(nodes: Sequence[Node] | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp; `nodes` lists the simulated BUs (in node order) when the simulation runner
    knows them, otherwise each node is resolved from the node or run config."""

    def client_fn(context: Context):
        torch.set_num_threads(1)  # one core per virtual node; 2-core machines thrash otherwise
        return BusinessUnitClient(resolve_node(context, nodes)).to_client()

    # Extra mods (simulated faults) see the message first, as a broken node would.
    return ClientApp(client_fn=client_fn, mods=[*mods, secure_aggregation_mod])


app = make_client_app()
