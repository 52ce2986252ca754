"""A BU's stored replies: what it released in each exchange of a run, kept to be replayed.

When a coordinator resumes a run after a crash, it asks again for the round it was in, and some BUs
may already have answered it. Computing again would release a second, differently noised answer
(in production, where noise comes from the OS's entropy) and spend the privacy budget twice; a
refusal would lose the BU for the round. Instead the BU replays the reply it sent: the same DP
output, released again, costs nothing more, and its ledger keeps one event per (run, round,
exchange).

The reply is stored after the ledger has recorded its release, so a crash between the two leaves a
recorded release without a stored reply: the BU then refuses to answer that exchange again (its
ledger shows it answered), which errs towards spending less, never more. Arrays are plain numbers
(`np.load` with `allow_pickle=False`); the instruction's digest binds a reply to its exchange.

What is stored is what the BU sent: a DP release under local noise, but under the central and
distributed placements the clipped update before the coordinator's noise (or with only this BU's
share of it), as sensitive as the silo it came from. It stays in the BU's home, never in a run
directory, and a run's replies are deleted once untouched for `RETENTION_SECONDS` (a resume comes
within hours of the crash, not weeks).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np

from federation.wire import Instruction
from privacy.atomic import write_atomic

REPLIES_DIR = "replies"
RETENTION_SECONDS = 7 * 24 * 3600


def _paths(home: Path, instruction: Instruction) -> tuple[Path, Path]:
    run = hashlib.sha256(instruction.run_id.encode()).hexdigest()[:24]
    stem = f"{instruction.server_round:06d}-{instruction.phase}"
    directory = home / REPLIES_DIR / run
    return directory / f"{stem}.npz", directory / f"{stem}.json"


def _digest(instruction: Instruction) -> str:
    """What makes two instructions the same exchange: run, round, phase and the job."""
    text = json.dumps(
        [
            instruction.run_id,
            instruction.server_round,
            str(instruction.phase),
            instruction.job.model_dump(mode="json"),
        ],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def store_reply(home: Path, instruction: Instruction, reply: tuple) -> None:
    """Keep `reply` (arrays, weight, metrics) for a replay of this exchange."""
    arrays, weight, metrics = reply
    npz, meta = _paths(home, instruction)
    npz.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    data = buffer.getvalue()
    write_atomic(npz, data)
    document = {
        "instruction": _digest(instruction),
        "arrays_sha256": hashlib.sha256(data).hexdigest(),
        "weight": int(weight),
        "metrics": metrics,
    }
    write_atomic(meta, json.dumps(document))  # last: the reply exists once this does
    prune(home, now=time.time())


def prune(home: Path, *, now: float) -> list[Path]:
    """Delete the stored replies of every run untouched for `RETENTION_SECONDS`; the runs'
    directories removed."""
    removed = []
    for run in sorted((home / REPLIES_DIR).glob("*")):
        files = [f for f in run.iterdir() if f.is_file()] if run.is_dir() else []
        if run.is_dir() and all(now - f.stat().st_mtime > RETENTION_SECONDS for f in files):
            shutil.rmtree(run, ignore_errors=True)
            removed.append(run)
    return removed


def stored_reply(home: Path, instruction: Instruction) -> tuple | None:
    """The reply this BU sent to the same exchange before, or None."""
    npz, meta = _paths(home, instruction)
    if not meta.exists():
        return None
    document = json.loads(meta.read_text(encoding="utf-8"))
    data = npz.read_bytes()
    if (
        document["instruction"] != _digest(instruction)
        or hashlib.sha256(data).hexdigest() != document["arrays_sha256"]
    ):
        return None  # another job under the same run id and round: not this exchange's reply
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        arrays = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    return arrays, document["weight"], document["metrics"]
