"""What a BU's data steward does to the BU's own data and state, outside any run.

Preparing a home (consent import, keys), encrypting the silo at rest and rotating its keys, and the
data subjects' requests: erasure (GDPR Art. 17; PIPL Art. 47) and access (GDPR Art. 15; PIPL
Art. 45). Every change is written atomically; the `silofed` command calls these functions.
"""

from __future__ import annotations

import io
import tomllib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import tomli_w

from clients.prepared import discard_prepared
from clients.silo import SILO_PURPOSE, read_table, read_tables, table_file
from privacy.atomic import write_atomic
from privacy.encryption import ENCRYPTED_SUFFIX, read_encrypted, rotate_files, write_encrypted
from privacy.errors import ConfigurationError
from privacy.home import UnitHome
from privacy.registry import ImportResult
from privacy.unit_config import UnitConfig

CONSENT_EXPORT_STEM = "consent"


def consent_export(directory: Path) -> Path | None:
    """A consent export beside the silo's tables (`consent.parquet` or `consent.csv`), if any."""
    for suffix in (".parquet", ".csv"):
        if (candidate := Path(directory) / f"{CONSENT_EXPORT_STEM}{suffix}").exists():
            return candidate
    return None


def import_consent(home: UnitHome, path: Path) -> ImportResult:
    with home.registry() as registry:
        return registry.import_file(path, tombstone_key=home.pseudonym_key())


def prepare_simulated_home(config: UnitConfig, directory: Path) -> UnitHome:
    """Simulation: a BU home ready for a run, its registry holding the silo's consent export
    (importing again changes nothing) and its keys created."""
    home = UnitHome(directory, config)
    export = consent_export(config.source.directory)
    if export is not None:
        import_consent(home, export)
    return home


def _write_table(path: Path, frame: pd.DataFrame, home: UnitHome, config: UnitConfig) -> None:
    encrypted = path.suffix == ENCRYPTED_SUFFIX
    kind = Path(path.stem).suffix if encrypted else path.suffix
    buffer = io.BytesIO()
    if kind == ".parquet":
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    if encrypted:
        write_encrypted(
            path, buffer.getvalue(), keyring=home.keyring(), unit=config.unit, purpose=SILO_PURPOSE
        )
    else:
        write_atomic(path, buffer.getvalue())


def _set_encrypted_flag(bu_config: Path) -> None:
    data = tomllib.loads(bu_config.read_text(encoding="utf-8"))
    data.setdefault("source", {})["encrypted"] = True
    write_atomic(bu_config, tomli_w.dumps(data))


def encrypt_silo(bu_config: Path, home: UnitHome) -> list[Path]:
    """Encrypt every table file of the silo in place (`<file>.enc`, a fresh data key per file under
    the BU's key ring, created if needed), remove the plaintext, and mark the silo encrypted in its
    `bu.toml`. Returns the encrypted files."""
    config = UnitConfig.load(bu_config)
    if config.source.kind == "sql":
        raise ConfigurationError(
            f'{bu_config}: the silo is a SQL database ([source] kind = "sql"); silofed encrypts '
            "the files it reads, and encryption at rest of a database is the database's business"
        )
    if config.source.encrypted:
        raise ConfigurationError(
            f"{bu_config}: the silo is already encrypted ([source] encrypted = true)"
        )
    keyring = home.keyring(create=True)
    written = []
    for table in config.tables:
        plain = table_file(config, table)
        target = plain.with_name(plain.name + ENCRYPTED_SUFFIX)
        write_encrypted(
            target, plain.read_bytes(), keyring=keyring, unit=config.unit, purpose=SILO_PURPOSE
        )
        written.append(target)
    _set_encrypted_flag(bu_config)
    for target in written:
        Path(str(target)[: -len(ENCRYPTED_SUFFIX)]).unlink()
    return written


def encrypt_file(config: UnitConfig, home: UnitHome, path: Path, *, purpose: str) -> Path:
    """Encrypt any file the BU keeps (a consent export, a model artefact) as `<file>.enc` under
    the BU's key ring, bound to its name, the BU and `purpose`; the plaintext is removed."""
    target = path.with_name(path.name + ENCRYPTED_SUFFIX)
    write_encrypted(
        target,
        path.read_bytes(),
        keyring=home.keyring(create=True),
        unit=config.unit,
        purpose=purpose,
    )
    path.unlink()
    return target


def decrypt_file(config: UnitConfig, home: UnitHome, path: Path, *, purpose: str) -> bytes:
    """The plaintext of a file encrypted with `encrypt_file` (kept in memory, never written)."""
    return read_encrypted(path, keyring=home.keyring(), unit=config.unit, purpose=purpose)


def rotate_silo_key(config: UnitConfig, home: UnitHome) -> str:
    """Rotate the BU's key-encryption key: re-wrap every encrypted file's data key under a new key
    (the data is not re-encrypted), then destroy the old key. Returns the new key's id."""
    if not config.source.encrypted:
        raise ConfigurationError(
            f"unit '{config.unit}': the silo is not encrypted; nothing to rotate"
        )
    files = [(table_file(config, t), config.unit, SILO_PURPOSE) for t in config.tables]
    keyring = home.keyring()
    old = keyring.active_kid
    new = rotate_files(keyring, files)
    _record(
        home,
        "key.rotated",
        {"key": "silo key-encryption key", "old": old, "new": new, "files": len(files)},
    )
    return new


@dataclass(frozen=True)
class Erasure:
    unit: str
    rows_removed: dict[str, int]
    consent_events_removed: int
    runs_that_used_the_customer: list[str]


def erase_customer(
    config: UnitConfig, home: UnitHome, customer_id: str, *, now: datetime
) -> Erasure:
    """Remove the customer from every table of the silo (encrypted or not), from the consent
    registry and from a consent export beside the silo, leave a tombstone so that no later import
    brings them back, and list the runs whose models were trained with their data.

    silofed only reads a SQL silo: there the steward deletes the customer's rows in the database
    first; until the queries return none of them, nothing is erased and the error says so."""
    if config.source.kind == "sql":
        rows_removed = _no_rows_left_in_database(config, customer_id)
    else:
        rows_removed = _remove_rows(config, home, customer_id)
    export = consent_export(config.source.directory)
    if export is not None:
        events = read_table(export)
        keep = events["customer_id"].astype(str) != str(customer_id)
        if not keep.all():
            _write_table(export, events[keep], home, config)
    key = home.pseudonym_key()
    with home.registry() as registry:
        removed = registry.erase(customer_id, tombstone_key=key, now=now)
    discard_prepared(home.directory)  # it may hold the customer's features
    with home.lineage() as lineage:
        runs = lineage.runs_using(customer_id, key=key)
    # The log says that an erasure happened and what it removed; never whom (GDPR Art. 17 and
    # 5(2): the record proves the request was carried out without keeping the id it erased).
    _record(
        home,
        "customer.erased",
        {
            "rows_removed": rows_removed,
            "consent_events_removed": removed,
            "runs_that_used_the_customer": runs,
        },
    )
    return Erasure(config.unit, rows_removed, removed, runs)


def _record(home: UnitHome, event: str, data: dict) -> None:
    """A steward's action in the BU's own audit log, closed by a final signed checkpoint."""
    log = home.audit_log()
    log.append(event, data)
    log.checkpoint(final=True)


def _remove_rows(config: UnitConfig, home: UnitHome, customer_id: str) -> dict[str, int]:
    keyring = home.keyring() if config.source.encrypted else None
    rows_removed = {}
    for table, spec in config.tables.items():
        path = table_file(config, table)
        frame = read_table(path, keyring=keyring, unit=config.unit)
        keep = frame[spec.key].astype(str) != str(customer_id)
        rows_removed[table] = int((~keep).sum())
        if rows_removed[table]:
            _write_table(path, frame[keep], home, config)
    return rows_removed


def _no_rows_left_in_database(config: UnitConfig, customer_id: str) -> dict[str, int]:
    """Zero rows removed per table, once the steward has deleted the customer's rows."""
    remaining = {
        table: int((frame[config.tables[table].key].astype(str) == str(customer_id)).sum())
        for table, frame in read_tables(config).items()
    }
    if any(remaining.values()):
        raise ConfigurationError(
            f"unit '{config.unit}': the customer still has rows in the SQL silo "
            f"({', '.join(f'{t}: {n}' for t, n in remaining.items() if n)}), which silofed only "
            "reads; delete them in the database, then erase again to remove the consent records "
            "and leave the tombstone"
        )
    return dict.fromkeys(config.tables, 0)


def access_report(config: UnitConfig, home: UnitHome, customer_id: str) -> dict:
    """Everything the BU holds about one customer, as JSON-ready data."""
    keyring = home.keyring() if config.source.encrypted else None
    tables = {}
    for table, frame in read_tables(config, keyring=keyring).items():
        rows = frame[frame[config.tables[table].key].astype(str) == str(customer_id)]
        tables[table] = (
            rows.astype(object).where(rows.notna(), None).astype(str).to_dict(orient="records")
        )
    key = home.pseudonym_key()
    with home.registry() as registry:
        events = registry.export_events(customer_id)
        erased = registry.is_erased(customer_id, tombstone_key=key)
    with home.lineage() as lineage:
        runs = lineage.runs_using(customer_id, key=key)
    return {
        "unit": config.unit,
        "customer_id": customer_id,
        "erased": erased,
        "tables": tables,
        "consent_events": events,
        "runs_that_used_the_customer": runs,
        "purposes_declared": sorted(config.purposes),
    }
