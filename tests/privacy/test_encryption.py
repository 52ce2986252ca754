"""Encryption at rest (privacy/encryption.py): AES-GCM envelope encryption bound to file name, unit
and purpose; one opaque error whatever fails; key rotation that re-wraps without re-encrypting; no
plaintext data key on disk; key files private."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy import encryption
from privacy.encryption import (
    MAGIC,
    DecryptionError,
    KeyRing,
    decrypt_bytes,
    encrypt_bytes,
    is_encrypted,
    read_encrypted,
    rewrap,
    rotate_files,
    write_encrypted,
)
from privacy.errors import ConfigurationError, SilofedError

UNIT = "retail"
PURPOSE = "churn_model"
PLAINTEXT = b"customer_id,recency,frequency,monetary\n" + b"c-000117,12,4,310.50\n" * 50
KEY_VAR = "SILOFED_KEK_RETAIL"


@pytest.fixture
def keyring(tmp_path: Path) -> KeyRing:
    return KeyRing.create(tmp_path / "keys")


def header_and_ciphertext(blob: bytes) -> tuple[dict[str, str], bytes, int]:
    """Parse the documented layout: magic, 4-byte big-endian header length, JSON header,
    ciphertext. Returns the header, the ciphertext and the header's offset."""
    assert blob.startswith(MAGIC)
    start = len(MAGIC) + 4
    length = int.from_bytes(blob[len(MAGIC) : start], "big")
    return json.loads(blob[start : start + length]), blob[start + length :], start


def flipped(blob: bytes, position: int) -> bytes:
    return blob[:position] + bytes([blob[position] ^ 0x01]) + blob[position + 1 :]


def assert_opaque(error: pytest.ExceptionInfo[DecryptionError]) -> None:
    assert type(error.value) is DecryptionError
    assert str(error.value) == "decryption failed"
    assert error.value.__cause__ is None
    assert error.value.__suppress_context__ is True


def key_file_contents(directory: Path) -> set[bytes]:
    return {base64.b64decode(path.read_bytes()) for path in directory.glob("kek-*.key")}


# Round trips


def test_bytes_round_trip_returns_the_plaintext(keyring: KeyRing) -> None:
    blob = encrypt_bytes(
        PLAINTEXT, keyring=keyring, file_name="customers.parquet", unit=UNIT, purpose=PURPOSE
    )
    assert PLAINTEXT not in blob
    assert (
        decrypt_bytes(
            blob, keyring=keyring, file_name="customers.parquet", unit=UNIT, purpose=PURPOSE
        )
        == PLAINTEXT
    )


def test_empty_plaintext_round_trips(keyring: KeyRing) -> None:
    blob = encrypt_bytes(b"", keyring=keyring, file_name="empty.csv", unit=UNIT, purpose=PURPOSE)
    assert (
        decrypt_bytes(blob, keyring=keyring, file_name="empty.csv", unit=UNIT, purpose=PURPOSE)
        == b""
    )


def test_file_round_trip_and_the_file_does_not_contain_the_plaintext(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "customers.parquet.enc"
    write_encrypted(path, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)

    stored = path.read_bytes()
    assert stored.startswith(MAGIC)
    assert PLAINTEXT not in stored
    assert b"c-000117" not in stored
    assert is_encrypted(path) is True
    assert read_encrypted(path, keyring=keyring, unit=UNIT, purpose=PURPOSE) == PLAINTEXT


def test_file_is_bound_to_its_name_without_the_enc_suffix(tmp_path: Path, keyring: KeyRing) -> None:
    path = tmp_path / "customers.parquet.enc"
    write_encrypted(path, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    assert (
        decrypt_bytes(
            path.read_bytes(),
            keyring=keyring,
            file_name="customers.parquet",
            unit=UNIT,
            purpose=PURPOSE,
        )
        == PLAINTEXT
    )


def test_header_holds_exactly_kid_nonces_and_wrapped_key(keyring: KeyRing) -> None:
    blob = encrypt_bytes(
        PLAINTEXT, keyring=keyring, file_name="customers.parquet", unit=UNIT, purpose=PURPOSE
    )
    header, ciphertext, _ = header_and_ciphertext(blob)
    assert sorted(header) == ["kid", "nonce", "wrap_nonce", "wrapped_key"]
    assert header["kid"] == keyring.active_kid
    assert len(base64.b64decode(header["nonce"])) == 12
    assert len(base64.b64decode(header["wrap_nonce"])) == 12
    assert len(base64.b64decode(header["wrapped_key"])) == 32 + 16
    assert len(ciphertext) == len(PLAINTEXT) + 16
    # Neither the file name, the unit nor the purpose is stored.
    for bound in (b"customers", UNIT.encode(), PURPOSE.encode()):
        assert bound not in blob


def test_overwriting_a_file_is_atomic_and_leaves_no_temporary_file(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "consent.csv.enc"
    write_encrypted(path, b"first", keyring=keyring, unit=UNIT, purpose=PURPOSE)
    write_encrypted(path, b"second", keyring=keyring, unit=UNIT, purpose=PURPOSE)
    assert read_encrypted(path, keyring=keyring, unit=UNIT, purpose=PURPOSE) == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consent.csv.enc", "keys"]


def test_plain_file_is_not_reported_as_encrypted(tmp_path: Path) -> None:
    plain = tmp_path / "customers.csv"
    plain.write_bytes(PLAINTEXT)
    assert is_encrypted(plain) is False


def test_encrypting_with_a_path_as_file_name_is_refused(keyring: KeyRing) -> None:
    with pytest.raises(ConfigurationError, match="base name"):
        encrypt_bytes(
            PLAINTEXT, keyring=keyring, file_name="silo/customers.csv", unit=UNIT, purpose=PURPOSE
        )


# One opaque error


def test_decryption_error_is_a_silofed_error_with_a_fixed_message() -> None:
    assert issubclass(DecryptionError, SilofedError)
    assert str(DecryptionError()) == "decryption failed"


@pytest.mark.parametrize(
    "part",
    ["magic", "header length", "kid", "wrap_nonce", "wrapped_key", "nonce", "ciphertext", "tag"],
)
def test_flipped_byte_in_any_part_raises_the_same_opaque_error(keyring: KeyRing, part: str) -> None:
    blob = encrypt_bytes(
        PLAINTEXT, keyring=keyring, file_name="customers.parquet", unit=UNIT, purpose=PURPOSE
    )
    header, ciphertext, start = header_and_ciphertext(blob)
    raw_header = blob[start : len(blob) - len(ciphertext)]

    def in_header(field: str) -> int:
        return start + raw_header.index(header[field].encode()) + 2

    position = {
        "magic": 3,
        "header length": len(MAGIC) + 3,
        "kid": in_header("kid"),
        "wrap_nonce": in_header("wrap_nonce"),
        "wrapped_key": in_header("wrapped_key"),
        "nonce": in_header("nonce"),
        "ciphertext": len(blob) - len(ciphertext) + 5,
        "tag": len(blob) - 1,
    }[part]

    with pytest.raises(DecryptionError) as error:
        decrypt_bytes(
            flipped(blob, position),
            keyring=keyring,
            file_name="customers.parquet",
            unit=UNIT,
            purpose=PURPOSE,
        )
    assert_opaque(error)


def test_every_single_byte_flip_and_every_truncation_is_refused_with_one_message(
    keyring: KeyRing,
) -> None:
    blob = encrypt_bytes(b"c-1,3", keyring=keyring, file_name="a.csv", unit=UNIT, purpose=PURPOSE)
    damaged = [flipped(blob, i) for i in range(len(blob))] + [blob[:n] for n in range(len(blob))]
    damaged += [blob + b"\x00", b"", b"not an encrypted file"]
    messages = set()
    for candidate in damaged:
        with pytest.raises(DecryptionError) as error:
            decrypt_bytes(candidate, keyring=keyring, file_name="a.csv", unit=UNIT, purpose=PURPOSE)
        assert_opaque(error)
        messages.add(str(error.value))
    assert messages == {"decryption failed"}


@pytest.mark.parametrize(
    "reencode",
    [
        lambda header: json.dumps(header, sort_keys=True),  # with spaces
        lambda header: json.dumps(dict(reversed(sorted(header.items()))), separators=(",", ":")),
        lambda header: json.dumps({**header, "extra": "1"}, sort_keys=True, separators=(",", ":")),
    ],
    ids=["whitespace", "key-order", "extra-field"],
)
def test_header_with_the_same_values_but_not_canonical_is_refused(
    keyring: KeyRing, reencode: Callable[[dict[str, str]], str]
) -> None:
    blob = encrypt_bytes(PLAINTEXT, keyring=keyring, file_name="c.csv", unit=UNIT, purpose=PURPOSE)
    header, ciphertext, _ = header_and_ciphertext(blob)
    other = reencode(header).encode()
    reassembled = MAGIC + len(other).to_bytes(4, "big") + other + ciphertext
    with pytest.raises(DecryptionError) as error:
        decrypt_bytes(reassembled, keyring=keyring, file_name="c.csv", unit=UNIT, purpose=PURPOSE)
    assert_opaque(error)


def test_file_renamed_to_another_silo_file_does_not_decrypt(
    tmp_path: Path, keyring: KeyRing
) -> None:
    original = tmp_path / "customers.parquet.enc"
    write_encrypted(original, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    swapped = original.rename(tmp_path / "transactions.parquet.enc")

    with pytest.raises(DecryptionError) as error:
        read_encrypted(swapped, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    assert_opaque(error)


@pytest.mark.parametrize(
    ("unit", "purpose"), [("ecommerce", PURPOSE), (UNIT, "response_model"), ("Retail", PURPOSE)]
)
def test_wrong_unit_or_purpose_does_not_decrypt(
    tmp_path: Path, keyring: KeyRing, unit: str, purpose: str
) -> None:
    path = tmp_path / "customers.parquet.enc"
    write_encrypted(path, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    with pytest.raises(DecryptionError) as error:
        read_encrypted(path, keyring=keyring, unit=unit, purpose=purpose)
    assert_opaque(error)


def test_header_of_one_file_grafted_onto_another_does_not_decrypt(keyring: KeyRing) -> None:
    first = encrypt_bytes(PLAINTEXT, keyring=keyring, file_name="m.pt", unit=UNIT, purpose=PURPOSE)
    second = encrypt_bytes(PLAINTEXT, keyring=keyring, file_name="m.pt", unit=UNIT, purpose=PURPOSE)
    _, first_ciphertext, _ = header_and_ciphertext(first)
    _, second_ciphertext, _ = header_and_ciphertext(second)
    grafted = first[: len(first) - len(first_ciphertext)] + second_ciphertext
    with pytest.raises(DecryptionError) as error:
        decrypt_bytes(grafted, keyring=keyring, file_name="m.pt", unit=UNIT, purpose=PURPOSE)
    assert_opaque(error)


def test_another_units_key_ring_does_not_decrypt(tmp_path: Path, keyring: KeyRing) -> None:
    other = KeyRing.create(tmp_path / "other-keys")
    blob = encrypt_bytes(PLAINTEXT, keyring=keyring, file_name="c.csv", unit=UNIT, purpose=PURPOSE)
    with pytest.raises(DecryptionError) as error:
        decrypt_bytes(blob, keyring=other, file_name="c.csv", unit=UNIT, purpose=PURPOSE)
    assert_opaque(error)


# Nonces


def test_no_nonce_repeats_over_a_hundred_thousand_encryptions(keyring: KeyRing) -> None:
    encryptions = 100_000
    started = time.perf_counter()
    nonces = set()
    for _ in range(encryptions):
        blob = encrypt_bytes(b"x", keyring=keyring, file_name="t.csv", unit=UNIT, purpose=PURPOSE)
        header, _, _ = header_and_ciphertext(blob)
        nonces.add(header["nonce"])
        nonces.add(header["wrap_nonce"])
    elapsed = time.perf_counter() - started

    assert len(nonces) == 2 * encryptions
    assert elapsed < 20.0


# Rotation


def test_rotate_files_rewraps_keeps_ciphertext_and_destroys_the_old_key(
    tmp_path: Path, keyring: KeyRing
) -> None:
    keys = tmp_path / "keys"
    silo = tmp_path / "silo"
    silo.mkdir()
    files = [
        (silo / "customers.parquet.enc", UNIT, PURPOSE),
        (silo / "consent.csv.enc", UNIT, "consent_export"),
        (silo / "model.pt", UNIT, "response_model"),
    ]
    contents = {}
    for path, unit, purpose in files:
        contents[path] = path.name.encode() + PLAINTEXT
        write_encrypted(path, contents[path], keyring=keyring, unit=unit, purpose=purpose)
    ciphertexts_before = {path: header_and_ciphertext(path.read_bytes())[1] for path, _, _ in files}

    # Keep a copy of the old key aside, as an attacker holding a stale backup would.
    old_kid = keyring.active_kid
    aside = tmp_path / "aside"
    aside.mkdir(mode=0o700)
    shutil.copy2(keys / f"kek-{old_kid}.key", aside / f"kek-{old_kid}.key")
    (aside / "active-kid").write_text(f"{old_kid}\n")

    new_kid = rotate_files(keyring, files)

    assert new_kid != old_kid
    assert keyring.active_kid == new_kid
    assert keyring.kids == frozenset({new_kid})
    assert not (keys / f"kek-{old_kid}.key").exists()
    assert sorted(p.name for p in keys.glob("kek-*.key")) == [f"kek-{new_kid}.key"]
    reopened = KeyRing.open(keys)
    stale = KeyRing.open(aside)
    for path, unit, purpose in files:
        header, ciphertext, _ = header_and_ciphertext(path.read_bytes())
        assert header["kid"] == new_kid
        assert ciphertext == ciphertexts_before[path]
        assert read_encrypted(path, keyring=keyring, unit=unit, purpose=purpose) == contents[path]
        assert read_encrypted(path, keyring=reopened, unit=unit, purpose=purpose) == contents[path]
        with pytest.raises(DecryptionError) as error:
            read_encrypted(path, keyring=stale, unit=unit, purpose=purpose)
        assert_opaque(error)


def test_rotate_files_changes_nothing_when_a_file_would_not_unwrap(
    tmp_path: Path, keyring: KeyRing
) -> None:
    good = tmp_path / "customers.parquet.enc"
    wrong = tmp_path / "consent.csv.enc"
    write_encrypted(good, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    write_encrypted(wrong, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    before = {path: path.read_bytes() for path in (good, wrong)}
    old_kid = keyring.active_kid

    with pytest.raises(DecryptionError):
        rotate_files(keyring, [(good, UNIT, PURPOSE), (wrong, UNIT, "response_model")])

    assert keyring.active_kid == old_kid
    assert keyring.kids == frozenset({old_kid})
    assert {path: path.read_bytes() for path in (good, wrong)} == before


def test_rewrap_moves_a_file_to_the_active_key_without_reencrypting(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "customers.parquet.enc"
    write_encrypted(path, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    old_header, old_ciphertext, _ = header_and_ciphertext(path.read_bytes())
    new_kid = keyring.rotate()

    rewrap(path, keyring=keyring, unit=UNIT, purpose=PURPOSE)

    header, ciphertext, _ = header_and_ciphertext(path.read_bytes())
    assert header["kid"] == new_kid
    assert header["nonce"] == old_header["nonce"]
    assert header["wrap_nonce"] != old_header["wrap_nonce"]
    assert ciphertext == old_ciphertext
    keyring.retire(old_header["kid"])
    assert read_encrypted(path, keyring=keyring, unit=UNIT, purpose=PURPOSE) == PLAINTEXT


def test_file_wrapped_under_a_retired_key_no_longer_decrypts(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "customers.parquet.enc"
    write_encrypted(path, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    old_kid = keyring.active_kid
    keyring.rotate()
    keyring.retire(old_kid)

    for ring in (keyring, KeyRing.open(tmp_path / "keys")):
        with pytest.raises(DecryptionError) as error:
            read_encrypted(path, keyring=ring, unit=UNIT, purpose=PURPOSE)
        assert_opaque(error)


# No plaintext data key on disk


def test_no_plaintext_data_key_is_ever_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    generated: list[bytes] = []

    class SpyAESGCM:
        """Stands in for AESGCM inside privacy.encryption and records every key it generates."""

        @staticmethod
        def generate_key(bit_length: int) -> bytes:
            key = AESGCM.generate_key(bit_length=bit_length)
            generated.append(key)
            return key

        def __new__(cls, key: bytes) -> AESGCM:  # type: ignore[misc]
            return AESGCM(key)

    monkeypatch.setattr(encryption, "AESGCM", SpyAESGCM)
    keys = tmp_path / "keys"
    ring = KeyRing.create(keys)
    key_encryption_keys = key_file_contents(keys)
    silo = tmp_path / "silo"
    silo.mkdir()
    files = [(silo / f"part-{i}.parquet.enc", UNIT, PURPOSE) for i in range(3)]
    for path, unit, purpose in files:
        write_encrypted(path, PLAINTEXT, keyring=ring, unit=unit, purpose=purpose)
    rotate_files(ring, files)
    key_encryption_keys |= key_file_contents(keys)
    (silo / "export.bin").write_bytes(
        encrypt_bytes(PLAINTEXT, keyring=ring, file_name="export.bin", unit=UNIT, purpose=PURPOSE)
    )

    data_keys = [key for key in generated if key not in key_encryption_keys]
    assert len(key_encryption_keys) == 2
    assert len(data_keys) == 4  # one per encryption, none for a re-wrap

    def encodings(key: bytes) -> list[bytes]:
        standard = base64.b64encode(key)
        urlsafe = base64.urlsafe_b64encode(key)
        return [
            key,
            standard,
            standard.rstrip(b"="),
            urlsafe,
            urlsafe.rstrip(b"="),
            key.hex().encode(),
        ]

    stored = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    assert len(stored) == 6  # the active key file, active-kid, three silo files, export.bin
    for key in data_keys:
        for encoded in encodings(key):
            assert not any(encoded in content for content in stored)
    # The scan would have found a key: the active key-encryption key is in its key file.
    (active_key,) = key_file_contents(keys)
    assert any(base64.b64encode(active_key) in content for content in stored)


# Key ring


def test_key_directory_is_0700_and_key_files_are_0600(tmp_path: Path, keyring: KeyRing) -> None:
    keys = tmp_path / "keys"
    keyring.rotate()
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    key_files = sorted(keys.glob("kek-*.key"))
    assert len(key_files) == 2
    for path in key_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (keys / "active-kid").read_text() == f"{keyring.active_kid}\n"


def test_key_ring_reopened_from_its_directory_decrypts_what_it_encrypted(
    tmp_path: Path, keyring: KeyRing
) -> None:
    path = tmp_path / "customers.parquet.enc"
    write_encrypted(path, PLAINTEXT, keyring=keyring, unit=UNIT, purpose=PURPOSE)
    reopened = KeyRing.open(tmp_path / "keys")
    assert reopened.active_kid == keyring.active_kid
    assert read_encrypted(path, keyring=reopened, unit=UNIT, purpose=PURPOSE) == PLAINTEXT


def test_open_refuses_a_key_file_others_can_read(tmp_path: Path, keyring: KeyRing) -> None:
    key_file = tmp_path / "keys" / f"kek-{keyring.active_kid}.key"
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError) as error:
        KeyRing.open(tmp_path / "keys")
    assert str(key_file) in str(error.value)
    assert "chmod 600" in str(error.value)


def test_open_names_a_missing_key_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-keys"
    with pytest.raises(ConfigurationError) as error:
        KeyRing.open(missing)
    assert str(missing) in str(error.value)
    assert "KeyRing.create" in str(error.value)


def test_create_refuses_a_directory_that_already_holds_a_key_ring(
    tmp_path: Path, keyring: KeyRing
) -> None:
    with pytest.raises(ConfigurationError, match="already holds a key ring"):
        KeyRing.create(tmp_path / "keys")
    assert KeyRing.open(tmp_path / "keys").kids == keyring.kids


def test_retiring_the_active_key_is_refused(tmp_path: Path, keyring: KeyRing) -> None:
    active = keyring.active_kid
    with pytest.raises(ConfigurationError, match="refusing to retire"):
        keyring.retire(active)
    assert (tmp_path / "keys" / f"kek-{active}.key").exists()
    assert keyring.kids == frozenset({active})


def test_retiring_an_unknown_key_is_refused(keyring: KeyRing) -> None:
    with pytest.raises(ConfigurationError, match="holds no key '0123456789abcdef'"):
        keyring.retire("0123456789abcdef")


def test_repr_does_not_show_key_material(tmp_path: Path, keyring: KeyRing) -> None:
    (key,) = key_file_contents(tmp_path / "keys")
    assert base64.b64encode(key).decode() not in repr(keyring)
    assert keyring.active_kid in repr(keyring)


def test_key_ring_from_environment_derives_a_stable_kid_and_decrypts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = bytes(range(32))
    monkeypatch.setenv(KEY_VAR, base64.b64encode(key).decode())
    ring = KeyRing.from_environment(KEY_VAR)
    assert ring.active_kid == hashlib.sha256(key).hexdigest()[:16]
    blob = encrypt_bytes(PLAINTEXT, keyring=ring, file_name="c.csv", unit=UNIT, purpose=PURPOSE)
    again = KeyRing.from_environment(KEY_VAR)
    assert again.active_kid == ring.active_kid
    assert (
        decrypt_bytes(blob, keyring=again, file_name="c.csv", unit=UNIT, purpose=PURPOSE)
        == PLAINTEXT
    )


@pytest.mark.parametrize(
    "value",
    [None, "", "not base64!", base64.b64encode(b"\x01" * 16).decode()],
    ids=["unset", "empty", "not-base64", "128-bit"],
)
def test_key_ring_from_environment_names_a_missing_or_invalid_variable(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(KEY_VAR, raising=False)
    else:
        monkeypatch.setenv(KEY_VAR, value)
    with pytest.raises(ConfigurationError) as error:
        KeyRing.from_environment(KEY_VAR)
    assert KEY_VAR in str(error.value)
    if value:
        assert value not in str(error.value)


def test_key_ring_from_environment_cannot_rotate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VAR, base64.b64encode(os.urandom(32)).decode())
    ring = KeyRing.from_environment(KEY_VAR)
    with pytest.raises(ConfigurationError, match=f"\\${KEY_VAR}"):
        ring.rotate()
