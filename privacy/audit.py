"""A tamper-evident audit log: JSON lines, each chained to the one before by its SHA-256, with
checkpoints signed with Ed25519.

One log per run on the coordinator and one per BU (in its home). Every entry holds its sequence
number, the time, the actor, the event type, the event's data (counts, column names, epsilon,
hashes: never a customer id or a raw value), the hash of the previous entry and its own hash.
A checkpoint entry adds a signature over itself, and so over the whole chain before it; the last
one of a run is marked final. The file is only ever appended to, one canonical JSON line per
entry (sorted keys, ASCII, no spaces), so a line's bytes are exactly what its hash covers and a
newline inside a value cannot start a new line.

Beside the log, `<log>.head` holds the latest signed checkpoint. A log shorter than its head says
was truncated; a log that simply stops after its last checkpoint belongs to a process that was
killed. `verify` tells the three outcomes apart:

- intact and complete: every line chains, every checkpoint verifies, the last entry is a final
  checkpoint;
- intact but incomplete: everything present verifies, but no final checkpoint follows (entries
  verified up to sequence N; a torn last line, from a crash during a write, is reported);
- tampered at sequence N: the first entry that does not chain, hash, parse or verify, or the
  first entry missing below the signed head.

A writer verifies the log before it appends to it, and refuses a tampered or torn one. A process
that opens the same log again checks what it verified before by the SHA-256 of those bytes and
verifies only the entries appended since, so that opening a BU's log does not cost more with every
run the BU ever took part in.

Ed25519 keys come from `cryptography`; the verifier is given the public key it trusts (the BU's
own, or the coordinator's from the deployment), never the one a log names about itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from privacy.atomic import fsync_directory, write_atomic
from privacy.errors import ConfigurationError

GENESIS = "0" * 64  # the `prev` of the first entry
CHECKPOINT = "checkpoint"
HEAD_SUFFIX = ".head"
DEFAULT_CHECKPOINT_EVERY = 50  # entries between periodic checkpoints


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def entry_hash(entry: dict[str, Any]) -> str:
    """The SHA-256 of the entry's canonical form without its `hash` and `signature`."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


def public_key_text(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_public_key(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except ValueError as err:
        raise ConfigurationError(f"not an Ed25519 audit public key ({err})") from None


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The audit signing key at `path` (raw 32 bytes, mode 0600), created on first use."""
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigurationError(
                f"{path}: the audit key is readable by others (mode {mode:04o}); run "
                f"`chmod 600 {path}` and rotate it if anyone else may have read it"
            )
        return Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(raw)
    return key


class AuditLog:
    """Appends entries to one log file; resumes an existing log where it ends."""

    def __init__(
        self,
        path: Path,
        *,
        actor: str,
        key: Ed25519PrivateKey,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    ) -> None:
        self.path = Path(path)
        self.actor = actor
        self.key = key
        self.checkpoint_every = checkpoint_every
        self.seq, self.prev = 0, GENESIS
        self._since_checkpoint = 0
        if self.path.exists() and self.path.stat().st_size:
            result = _verify_on_open(self.path, key.public_key())
            if result.status is Status.TAMPERED:
                raise ConfigurationError(
                    f"{self.path}: the audit log does not verify ({result.message}); it is "
                    "kept as evidence and nothing is appended to it"
                )
            if result.torn_tail:
                raise ConfigurationError(
                    f"{self.path}: the audit log ends in a torn line (a crash during a write); "
                    "keep it as evidence and start a new log"
                )
            self.seq, self.prev = result.entries, result.last_hash
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.append("log.opened", {"public_key": public_key_text(key.public_key())})

    def append(self, event: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
        if event == CHECKPOINT:
            raise ValueError("checkpoints are written by checkpoint()")
        entry = self._write(event, data or {})
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint()
        return entry

    def checkpoint(self, *, final: bool = False) -> dict[str, Any]:
        """A signed checkpoint over the chain so far; `final` closes the run's record."""
        entry = self._write(CHECKPOINT, {"final": final}, sign=True)
        write_atomic(self.path.with_name(self.path.name + HEAD_SUFFIX), canonical(entry))
        self._since_checkpoint = 0
        return entry

    def _write(self, event: str, data: dict[str, Any], *, sign: bool = False) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "seq": self.seq,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "actor": self.actor,
            "event": event,
            "data": data,
            "prev": self.prev,
        }
        entry["hash"] = entry_hash(entry)
        if sign:
            entry["signature"] = base64.b64encode(
                self.key.sign(bytes.fromhex(entry["hash"]))
            ).decode()
        line = canonical(entry) + b"\n"
        new = not self.path.exists()
        with open(self.path, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if new:
            fsync_directory(self.path.parent)
        self.seq += 1
        self.prev = entry["hash"]
        return entry


class Status(StrEnum):
    COMPLETE = "intact and complete"
    INCOMPLETE = "intact but incomplete"
    TAMPERED = "tampered"


@dataclass(frozen=True)
class Verification:
    status: Status
    entries: int  # entries that verified (sequence numbers 0 .. entries - 1)
    last_hash: str
    first_bad: int | None = None  # the sequence number where tampering was found
    reason: str = ""
    torn_tail: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.COMPLETE

    @property
    def message(self) -> str:
        if self.status is Status.TAMPERED:
            return f"tampered at sequence {self.first_bad}: {self.reason}"
        if self.status is Status.INCOMPLETE:
            torn = "; the last line is torn (a crash during a write)" if self.torn_tail else ""
            last = self.entries - 1
            return f"intact but incomplete: no final signed checkpoint, verified up to sequence {last}{torn}"
        return f"intact and complete: {self.entries} entries, the last a final signed checkpoint"


def verify(path: Path, public_key: Ed25519PublicKey) -> Verification:
    """Check the chain, every hash and every signature of the log at `path` against the trusted
    `public_key`, and the log against its signed head."""
    return _verified(Path(path).read_bytes(), Path(path), public_key, None)


@dataclass(frozen=True)
class _Prefix:
    """The first `length` bytes of a log, whose SHA-256 is `digest`, verified entry by entry
    (`entries` complete entries, the last with hash `last_hash`, a final checkpoint or not)."""

    length: int
    digest: bytes
    entries: int
    last_hash: str
    final: bool


# A writer's memo of what it verified, per log file (path, device, inode): opening a log again
# checks the hash of that prefix and verifies only the entries after it. Without it, every
# exchange of a BU verified its whole log again, a cost growing with every run it ever took part
# in (about 0.1 ms per entry). The logs a process opened last are remembered (a BU's node serves
# one home; a simulation worker or a coordinator, a few hundred).
_VERIFIED: dict[tuple[str, int, int], _Prefix] = {}
VERIFIED_KEPT = 1024


def _verify_on_open(path: Path, public_key: Ed25519PublicKey) -> Verification:
    """`verify`, for a writer about to append: what this process verified before is checked
    by the SHA-256 of its bytes (any change to them, in place or by truncation, fails the check
    and the whole log is verified again); the entries after it, and the signed head, are
    verified in full. Same outcomes as `verify` whenever the log changed only by appends."""
    status = path.stat()
    key = (str(path.resolve()), status.st_dev, status.st_ino)
    data = path.read_bytes()
    prefix = _VERIFIED.pop(key, None)
    digest = hashlib.sha256()
    if prefix is not None:
        digest.update(memoryview(data)[: prefix.length])
        if len(data) < prefix.length or digest.digest() != prefix.digest:
            prefix, digest = None, hashlib.sha256()
    result = _verified(data, path, public_key, prefix)
    if result.status is not Status.TAMPERED and not result.torn_tail:
        # every line complete: the whole file is verified
        digest.update(memoryview(data)[prefix.length if prefix is not None else 0 :])
        complete = result.status is Status.COMPLETE
        _VERIFIED[key] = _Prefix(
            len(data), digest.digest(), result.entries, result.last_hash, complete
        )
        while len(_VERIFIED) > VERIFIED_KEPT:  # the least recently opened first
            del _VERIFIED[next(iter(_VERIFIED))]
    return result


def _verified(
    data: bytes, path: Path, public_key: Ed25519PublicKey, prefix: _Prefix | None
) -> Verification:
    """`verify` of the log `data` read from `path`; the entries of `prefix`, when given, are
    taken as verified (the caller checked their bytes)."""
    lines = data.split(b"\n")
    torn = bool(lines) and lines[-1] != b""  # a complete log ends with a newline
    body, tail = (lines[:-1], lines[-1]) if torn else (lines[:-1], b"")
    prev, last, final = GENESIS, None, False
    start = 0
    if prefix is not None:
        start, prev, final = prefix.entries, prefix.last_hash, prefix.final
        last = {"hash": prefix.last_hash} if prefix.entries else None

    def tampered(seq: int, reason: str) -> Verification:
        return Verification(Status.TAMPERED, seq, prev, first_bad=seq, reason=reason)

    for seq in range(start, len(body)):
        line = body[seq]
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return tampered(seq, "the line is not a JSON entry")
        if not isinstance(entry, dict) or canonical(entry) != line:
            return tampered(seq, "the line is not in canonical form (edited)")
        if entry.get("seq") != seq:
            return tampered(seq, f"sequence number {entry.get('seq')!r} where {seq} belongs")
        if entry.get("prev") != prev:
            return tampered(
                seq, "it does not chain to the entry before (removed, moved or inserted)"
            )
        if entry.get("hash") != entry_hash(entry):
            return tampered(seq, "its hash does not match its content")
        if entry.get("event") == CHECKPOINT:
            try:
                signature = base64.b64decode(str(entry.get("signature", "")), validate=True)
                public_key.verify(signature, bytes.fromhex(entry["hash"]))
            except (InvalidSignature, ValueError):
                return tampered(
                    seq, "the checkpoint's signature does not verify with the trusted key"
                )
        elif "signature" in entry:
            return tampered(seq, "a signature on an entry that is not a checkpoint")
        prev, last = entry["hash"], entry
        final = entry.get("event") == CHECKPOINT and bool(entry.get("data", {}).get("final"))
    count = len(body)
    head = _head(path, public_key)
    if head is not None:
        head_seq, head_hash = head
        if head_hash is None:
            return Verification(
                Status.TAMPERED,
                count,
                prev,
                first_bad=head_seq,
                reason="the signed head beside the log does not verify with the trusted key",
            )
        if head_seq >= count:
            return Verification(
                Status.TAMPERED,
                count,
                prev,
                first_bad=count,
                reason=f"the signed head names sequence {head_seq}, but the log ends before it "
                "(truncated)",
            )
        if _hash_at(body, head_seq) != head_hash:
            return Verification(
                Status.TAMPERED,
                head_seq,
                prev,
                first_bad=head_seq,
                reason="the entry at the signed head's sequence is not the one it signed",
            )
    if torn and tail:
        return Verification(Status.INCOMPLETE, count, prev, torn_tail=True)
    if last is not None and final:
        return Verification(Status.COMPLETE, count, prev)
    return Verification(Status.INCOMPLETE, count, prev)


def _hash_at(body: list[bytes], seq: int) -> str | None:
    return json.loads(body[seq]).get("hash")


def _head(path: Path, public_key: Ed25519PublicKey) -> tuple[int, str | None] | None:
    """The latest signed checkpoint from `<log>.head`: (seq, hash), (seq, None) when it does not
    verify, None when there is no head."""
    head_file = path.with_name(path.name + HEAD_SUFFIX)
    if not head_file.exists():
        return None
    try:
        entry = json.loads(head_file.read_bytes())
        seq = int(entry["seq"])
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        return 0, None
    try:
        signature = base64.b64decode(str(entry["signature"]), validate=True)
        public_key.verify(signature, bytes.fromhex(entry["hash"]))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return seq, None
    if entry["hash"] != entry_hash(entry):
        return seq, None
    return seq, str(entry["hash"])


def read_entries(path: Path, count: int) -> list[dict[str, Any]]:
    """The first `count` entries of a log (those `verify` vouched for)."""
    lines = Path(path).read_bytes().split(b"\n")[:count]
    return [json.loads(line) for line in lines]


def verify_home(home: Path) -> Verification:
    """A BU's own audit log, checked against the public half of the BU's audit key."""
    log_file, key_file = Path(home) / "audit.jsonl", Path(home) / "keys" / "audit.key"
    if not log_file.exists() or not key_file.exists():
        raise ConfigurationError(
            f"{home}: no audit.jsonl and keys/audit.key; give a BU home that has taken part in a run"
        )
    return verify(log_file, load_or_create_signing_key(key_file).public_key())
