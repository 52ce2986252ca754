"""A BU's prepared data for a job, kept in its home for every process that serves the BU.

Preparing a BU (reading and checking its silo, consent, minimisation, pseudonymisation, features)
costs far more than one round of its training: about 0.5 s at 10,000 customers against 35 ms. A
node process keeps what it prepared (`clients.app`), but Flower's Simulation Engine hands each
message to whichever of its Ray workers is idle, so without a shared copy every worker prepares
every BU it happens to serve again. The first process to prepare writes the result here, under the
fingerprint of everything it was prepared from (`clients.app._inputs_fingerprint`: `bu.toml`, the
silo files, the consent registry, the keys, the job, the consent time); any process finding that
fingerprint reads it back (about 10 ms) instead of preparing.

What is kept: the customers' pseudonyms, the held-out split, the features and labels, and the
counts the BU reports. Only a silo in plaintext files is ever kept (an encrypted or SQL silo has
no fingerprint and prepares in each process), so nothing is at rest here that is not already at
rest in clear in the silo it came from. It stays in the BU's home, next to the keys that made the
pseudonyms, and goes:
- when the job's last exchange is answered (`discard_prepared` with the fingerprint);
- when another preparation is kept (one entry per BU: a changed silo, consent or job makes the
  old one stale);
- when a customer is erased (`silofed erase` removes the whole directory, since the entry may
  hold the customer's features);
- after `RETENTION_SECONDS` untouched (a run that was killed and never resumed).

An entry is written atomically, read without pickle, and bound to its fingerprint; an unreadable
or foreign one is deleted and the BU prepares anew.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from clients.features import FeatureMatrix
from clients.pipeline import PreparedTables
from privacy.atomic import write_atomic
from privacy.minimisation import ColumnDrop

PREPARED_DIR = "prepared"
RETENTION_SECONDS = 24 * 3600
_SUFFIX = ".npz"


def _entry(home: Path, fingerprint: str) -> Path:
    return home / PREPARED_DIR / f"{fingerprint}{_SUFFIX}"


def save_prepared(
    home: Path,
    fingerprint: str,
    tables: PreparedTables,
    matrix: FeatureMatrix,
    next_event: pd.Timestamp | None,
) -> bool:
    """Keep the prepared data of `fingerprint`, every other entry of the BU deleted. `tables`
    holds the customers' keys only (what later exchanges read); False if they cannot be kept
    exactly (a missing key, an index that is not whole numbers) and nothing was written."""
    customers = tables.tables["customers"]
    keys = customers[tables.customer_key]
    if list(tables.tables) != ["customers"] or list(customers.columns) != [tables.customer_key]:
        raise ValueError("only the customers' keys are kept; reduce the tables first")
    if keys.isna().any() or not pd.api.types.is_integer_dtype(customers.index):
        return False
    meta = {
        "fingerprint": fingerprint,
        "unit": tables.unit,
        "purpose": tables.purpose,
        "customer_key": tables.customer_key,
        "key_dtype": str(keys.dtype),
        "excluded": tables.excluded,
        "columns_used": list(tables.columns_used),
        "columns_dropped": [[d.column, d.reason] for d in tables.columns_dropped],
        "quality": tables.quality,
        "encrypted_at_rest": tables.encrypted_at_rest,
        "legal_basis": tables.legal_basis,
        "jurisdictions": list(tables.jurisdictions),
        "next_event": None if next_event is None else next_event.isoformat(),
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.array(json.dumps(meta)),
        keys=_packed(keys.to_numpy(dtype=str)),
        index=customers.index.to_numpy(dtype=np.int64),
        held_out=tables.held_out,
        ids=matrix.customer_ids,
        features=matrix.features,
        labels=matrix.labels,
    )
    path = _entry(home, fingerprint)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    for other in path.parent.glob(f"*{_SUFFIX}"):  # not another writer's temporary file
        if other != path:
            other.unlink(missing_ok=True)
    return True


def _packed(text: np.ndarray) -> np.ndarray:
    """ASCII text as bytes (a hex pseudonym: a quarter of its size as str), other text as is."""
    try:
        return np.char.encode(text, "ascii")
    except UnicodeEncodeError:
        return text


def load_prepared(
    home: Path, fingerprint: str
) -> tuple[PreparedTables, FeatureMatrix, pd.Timestamp | None] | None:
    """The prepared data kept under `fingerprint`, or None (never kept, expired, or unreadable:
    then deleted)."""
    path = _entry(home, fingerprint)
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if age > RETENTION_SECONDS:
        path.unlink(missing_ok=True)
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            meta = json.loads(str(stored["meta"]))
            arrays = {name: stored[name] for name in stored.files if name != "meta"}
        if meta["fingerprint"] != fingerprint:
            raise ValueError("the entry was written for other inputs")
        key = meta["customer_key"]
        customers = pd.DataFrame(
            {key: pd.Series(arrays["keys"].astype(str), dtype=meta["key_dtype"])}
        ).set_axis(pd.Index(arrays["index"]), axis=0)
        tables = PreparedTables(
            unit=meta["unit"],
            purpose=meta["purpose"],
            tables={"customers": customers},
            customer_key=key,
            held_out=arrays["held_out"],
            excluded={reason: int(n) for reason, n in meta["excluded"].items()},
            columns_used=tuple(meta["columns_used"]),
            columns_dropped=tuple(ColumnDrop(c, r) for c, r in meta["columns_dropped"]),
            quality=meta["quality"],
            encrypted_at_rest=bool(meta["encrypted_at_rest"]),
            legal_basis=meta["legal_basis"],
            jurisdictions=tuple(meta["jurisdictions"]),
        )
        matrix = FeatureMatrix(arrays["ids"], arrays["features"], arrays["labels"])
        next_event = None if meta["next_event"] is None else pd.Timestamp(meta["next_event"])
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)  # unreadable or foreign: the BU prepares anew
        return None
    return tables, matrix, next_event


def discard_prepared(home: Path, fingerprint: str | None = None) -> None:
    """Delete the entry of `fingerprint`, or every entry of the BU."""
    if fingerprint is not None:
        _entry(home, fingerprint).unlink(missing_ok=True)
        return
    with contextlib.suppress(FileNotFoundError):
        for path in (home / PREPARED_DIR).iterdir():
            path.unlink(missing_ok=True)
