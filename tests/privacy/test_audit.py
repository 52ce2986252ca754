"""The audit log's tamper evidence: every kind of edit is found at its first bad sequence number,
an untouched log verifies, and a killed writer reads as incomplete, not tampered."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.audit import (
    HEAD_SUFFIX,
    AuditLog,
    Status,
    canonical,
    entry_hash,
    load_or_create_signing_key,
    verify,
)
from privacy.errors import ConfigurationError

KEY = Ed25519PrivateKey.generate()


def _complete_log(path: Path, entries: int = 12, every: int = 5) -> AuditLog:
    log = AuditLog(path, actor="coordinator", key=KEY, checkpoint_every=every)
    for i in range(entries):
        log.append("round.finished", {"round": i + 1, "epsilon": {"ecommerce": 0.25 * (i + 1)}})
    log.checkpoint(final=True)
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _write(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_an_untouched_log_verifies_and_checkpoints_are_periodic(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)
    result = verify(path, KEY.public_key())
    assert result.status is Status.COMPLETE and result.ok
    entries = [json.loads(line) for line in _lines(path)]
    assert [e["seq"] for e in entries] == list(range(len(entries)))
    # opened, 12 appends with a checkpoint after every 5th, and the final one
    assert [e["seq"] for e in entries if e["event"] == "checkpoint"] == [5, 11, 15]
    assert entries[-1]["data"] == {"final": True}
    assert all(e["prev"] == p["hash"] for p, e in itertools.pairwise(entries))
    head = json.loads((tmp_path / ("audit.jsonl" + HEAD_SUFFIX)).read_bytes())
    assert head == entries[-1]


def _flip_byte(lines: list[bytes]) -> list[bytes]:
    line = bytearray(lines[7])
    at = line.index(b'"round":') + len(b'"round":')
    line[at] = ord("9") if line[at] != ord("9") else ord("8")
    return [*lines[:7], bytes(line), *lines[8:]]


def _inject_newline(lines: list[bytes]) -> list[bytes]:
    line = lines[7].replace(b'"event":"round.finished"', b'"event":"round.\nfinished"')
    return [*lines[:7], *line.split(b"\n"), *lines[8:]]


def _insert(lines: list[bytes]) -> list[bytes]:
    forged = json.loads(lines[6])
    forged["data"] = {"round": 99}
    forged["hash"] = entry_hash(forged)
    return [*lines[:7], canonical(forged), *lines[7:]]


@pytest.mark.parametrize(
    ("edit", "first_bad"),
    [
        (_flip_byte, 7),
        (lambda lines: [*lines[:7], *lines[8:]], 7),  # deleted entry
        (lambda lines: [*lines[:7], lines[8], lines[7], *lines[9:]], 7),  # reordered
        (_insert, 7),
        (_inject_newline, 7),
        (lambda lines: lines[:-3], 13),  # truncated tail of a completed run
    ],
    ids=["byte-flip", "deleted", "reordered", "inserted", "newline-injection", "truncated"],
)
def test_every_edit_is_found_at_its_first_bad_sequence_number(
    tmp_path: Path, edit, first_bad: int
) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)
    _write(path, edit(_lines(path)))
    result = verify(path, KEY.public_key())
    assert result.status is Status.TAMPERED
    assert result.first_bad == first_bad, result.message
    assert f"tampered at sequence {first_bad}" in result.message


def test_a_log_re_signed_with_another_key_is_tampered_at_its_first_checkpoint(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    forger = Ed25519PrivateKey.generate()
    log = AuditLog(path, actor="coordinator", key=forger, checkpoint_every=5)
    for i in range(6):
        log.append("round.finished", {"round": i + 1})
    log.checkpoint(final=True)
    result = verify(path, KEY.public_key())
    assert (result.status, result.first_bad) == (Status.TAMPERED, 5)
    assert "signature" in result.reason


def test_a_killed_run_reads_as_incomplete_and_a_torn_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, actor="bu:ecommerce", key=KEY, checkpoint_every=5)
    for i in range(7):
        log.append("round.finished", {"round": i + 1})
    killed = verify(path, KEY.public_key())
    assert (killed.status, killed.entries) == (Status.INCOMPLETE, 9)  # with one checkpoint
    assert "verified up to sequence 8" in killed.message
    with open(path, "ab") as handle:  # the crash came in the middle of a write
        handle.write(b'{"actor":"bu:ecommerce","data":{"rou')
    torn = verify(path, KEY.public_key())
    assert (torn.status, torn.torn_tail) == (Status.INCOMPLETE, True)
    assert "torn" in torn.message
    with pytest.raises(ConfigurationError, match="torn line"):
        AuditLog(path, actor="bu:ecommerce", key=KEY)


def test_a_log_resumes_where_it_ends_and_refuses_to_grow_a_tampered_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)
    resumed = AuditLog(path, actor="coordinator", key=KEY)
    resumed.append("run.started", {"run": "r2"})
    resumed.checkpoint(final=True)
    assert verify(path, KEY.public_key()).status is Status.COMPLETE
    _write(path, _flip_byte(_lines(path)))
    before = path.read_bytes()
    with pytest.raises(ConfigurationError, match="does not verify"):
        AuditLog(path, actor="coordinator", key=KEY)
    assert path.read_bytes() == before


def _counting_entry_hashes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the entries whose hash `privacy.audit` computes (each one an entry verified)."""
    import privacy.audit

    calls = [0]
    real = privacy.audit.entry_hash

    def counted(entry):
        calls[0] += 1
        return real(entry)

    monkeypatch.setattr(privacy.audit, "entry_hash", counted)
    return calls


def test_a_writer_opening_a_log_again_verifies_only_what_was_appended_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)  # 16 entries
    hashed = _counting_entry_hashes(monkeypatch)
    AuditLog(path, actor="coordinator", key=KEY)
    assert hashed[0] == 16 + 1  # every entry, and the signed head
    other = AuditLog(path, actor="coordinator", key=KEY)  # another process appends meanwhile
    other.append("run.started", {"run": "r2"})
    other.checkpoint(final=True)
    hashed[0] = 0
    again = AuditLog(path, actor="coordinator", key=KEY)
    assert hashed[0] == 2 + 1  # the two new entries, and the head
    assert (again.seq, again.prev) == (18, json.loads(_lines(path)[-1])["hash"])
    assert verify(path, KEY.public_key()).status is Status.COMPLETE


def test_a_writer_remembers_the_logs_it_opened_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import privacy.audit

    monkeypatch.setattr(privacy.audit, "VERIFIED_KEPT", 2)
    paths = [tmp_path / f"audit-{i}.jsonl" for i in range(3)]
    for path in paths:
        _complete_log(path)  # 16 entries each
    hashed = _counting_entry_hashes(monkeypatch)
    for path in paths:
        AuditLog(path, actor="coordinator", key=KEY)
    hashed[0] = 0
    AuditLog(paths[2], actor="coordinator", key=KEY)
    AuditLog(paths[1], actor="coordinator", key=KEY)
    assert hashed[0] == 2  # remembered: the signed heads only
    AuditLog(paths[0], actor="coordinator", key=KEY)
    assert hashed[0] == 2 + 17  # forgotten, the oldest: verified in full


@pytest.mark.parametrize(
    "edit",
    [_flip_byte, lambda lines: [*lines[:7], *lines[8:]], lambda lines: lines[:-3]],
    ids=["byte-flip", "deleted", "truncated"],
)
def test_a_log_edited_after_a_writer_verified_it_is_refused_on_the_next_open(
    tmp_path: Path, edit
) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)
    AuditLog(path, actor="coordinator", key=KEY)  # verified, and remembered
    _write(path, edit(_lines(path)))  # in place: the same file, as an editor would leave it
    with pytest.raises(ConfigurationError, match="does not verify"):
        AuditLog(path, actor="coordinator", key=KEY)
    assert verify(path, KEY.public_key()).status is Status.TAMPERED


def test_a_log_replaced_after_a_writer_verified_it_is_verified_in_full(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)
    AuditLog(path, actor="coordinator", key=KEY)
    forged = tmp_path / "forged.jsonl"
    _write(forged, _flip_byte(_lines(path)))
    forged.replace(path)
    with pytest.raises(ConfigurationError, match="tampered at sequence 7"):
        AuditLog(path, actor="coordinator", key=KEY)


def test_a_forged_head_is_itself_evidence(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _complete_log(path)
    head = tmp_path / ("audit.jsonl" + HEAD_SUFFIX)
    forged = json.loads(head.read_bytes())
    forged["seq"] = 3
    head.write_bytes(canonical(forged))
    result = verify(path, KEY.public_key())
    assert (result.status, result.first_bad) == (Status.TAMPERED, 3)


def test_the_signing_key_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.key"
    key = load_or_create_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_signing_key(path).public_key() == key.public_key()
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        load_or_create_signing_key(path)
