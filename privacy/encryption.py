"""Encryption at rest of BU silo files, consent exports and model artefacts (GDPR Art. 32(1)(a)).

Envelope encryption with AES-GCM (NIST SP 800-38D), through pyca/cryptography's `AESGCM`:

- a key-encryption key (KEK) lives in the BU's key ring (`KeyRing`), one file per key, readable by
  the BU's service account only;
- every file gets a fresh random 256-bit data key (DK); the payload is encrypted under the DK, and the
  DK is wrapped (encrypted) under the active KEK. Only the wrapped DK is ever stored;
- nonces are random 96-bit values (SP 800-38D §8.2.2). A DK encrypts exactly one message, so the
  per-key invocation limit of §8.3 is no concern for payloads; a KEK wraps one 32-byte DK per file,
  far below that limit for any realistic number of files;
- the associated data binds the file's base name, the BU and the purpose to both the payload and the
  wrapped DK (and the KEK's id to the wrap). None of them is stored: the reader supplies them, so a
  file renamed, moved to another BU or read for another purpose does not decrypt.

On-disk format::

    b"SILOFED-ENC\\x01" | header length (4 bytes, big-endian) | header | ciphertext and 16-byte tag

where the header is canonical JSON (sorted keys, no whitespace) of
{"kid", "nonce", "wrap_nonce", "wrapped_key"}, the last three base64.

Key rotation re-wraps each file's DK under a new KEK without touching the payload (`rewrap`,
`rotate_files`); retiring the old KEK then destroys it. Every decryption failure, whatever its cause,
raises the one opaque `DecryptionError`, as Fernet's `InvalidToken` does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.atomic import fsync_directory, write_atomic
from privacy.errors import ConfigurationError, SilofedError

MAGIC = b"SILOFED-ENC\x01"
ENCRYPTED_SUFFIX = ".enc"

_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_LENGTH_BYTES = 4
# A real header is about 200 bytes; anything much larger is not one of ours.
_MAX_HEADER_BYTES = 4096
_HEADER_FIELDS = frozenset({"kid", "nonce", "wrap_nonce", "wrapped_key"})
_KID = re.compile(r"[0-9a-f]{16}")
_KEY_FILE = re.compile(r"kek-(?P<kid>.*)\.key")
_ACTIVE_FILE = "active-kid"
_PRIVATE_MASK = stat.S_IRWXG | stat.S_IRWXO


class DecryptionError(SilofedError):
    """A file or blob could not be decrypted. Deliberately says nothing about why: a wrong key, a
    wrong file name, unit or purpose, a retired key and a tampered byte all look the same."""

    def __init__(self) -> None:
        super().__init__("decryption failed")


class KeyRing:
    """The key-encryption keys of one BU, and which of them wraps new data keys.

    Stored in a directory (mode 0700) holding one `kek-<kid>.key` file per key (mode 0600, base64)
    and an `active-kid` file naming the active key. `from_environment` gives a fixed, single-key ring
    for deployments that inject the key as a secret instead.
    """

    __slots__ = ("_active", "_directory", "_keys", "_source")

    def __init__(
        self, keys: dict[str, bytes], active: str, *, directory: Path | None, source: str
    ) -> None:
        self._keys = dict(keys)
        self._active = active
        self._directory = directory
        self._source = source

    @classmethod
    def create(cls, directory: Path) -> KeyRing:
        """Create a key ring with one fresh active key in `directory` (made 0700)."""
        directory = Path(directory)
        if directory.exists() and (
            (directory / _ACTIVE_FILE).exists() or any(directory.glob("kek-*.key"))
        ):
            raise ConfigurationError(
                f"key directory {directory} already holds a key ring; open it with "
                f"KeyRing.open, or choose an empty directory"
            )
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask; be explicit
        ring = cls({}, "", directory=directory, source=str(directory))
        ring.rotate()
        return ring

    @classmethod
    def open(cls, directory: Path) -> KeyRing:
        """Load the key ring in `directory`, refusing key files others could read."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigurationError(
                f"key directory {directory} does not exist; create a key ring there with "
                f"KeyRing.create, or point the BU's configuration at its key directory"
            )
        keys: dict[str, bytes] = {}
        for path in sorted(directory.glob("kek-*.key")):
            match = _KEY_FILE.fullmatch(path.name)
            if match is None or not _KID.fullmatch(match["kid"]):
                raise ConfigurationError(
                    f"{path} is not named kek-<16 hex digits>.key; move it out of {directory}"
                )
            check_private_key_file(path)
            keys[match["kid"]] = read_key_file(path)
        active_path = directory / _ACTIVE_FILE
        if not active_path.is_file():
            raise ConfigurationError(
                f"key directory {directory} has no {_ACTIVE_FILE} file; it is not a key ring "
                f"made by KeyRing.create"
            )
        active = active_path.read_text(encoding="ascii", errors="replace").strip()
        if active not in keys:
            raise ConfigurationError(
                f"{active_path} names key {active!r}, but {directory} holds no kek-{active}.key; "
                f"restore that key file from the BU's key backup"
            )
        return cls(keys, active, directory=directory, source=str(directory))

    @classmethod
    def from_environment(cls, var_name: str) -> KeyRing:
        """A single active key given as base64 in the environment variable `var_name`; its id is
        the first 16 hex digits of its SHA-256, so the same key always gets the same id."""
        value = os.environ.get(var_name, "").strip()
        if not value:
            raise ConfigurationError(
                f"environment variable {var_name} is not set; set it to a base64-encoded "
                f"256-bit key (e.g. from `openssl rand -base64 32`)"
            )
        key = decode_key(value)
        if key is None:
            raise ConfigurationError(
                f"environment variable {var_name} does not hold a base64-encoded 256-bit key; "
                f"set it to the output of `openssl rand -base64 32`"
            )
        kid = hashlib.sha256(key).hexdigest()[:16]
        return cls({kid: key}, kid, directory=None, source=f"${var_name}")

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def rotate(self) -> str:
        """Create a new key, make it the active one and return its id. Older keys still unwrap the
        files they wrapped until they are retired."""
        directory = self._writable_directory("rotate")
        kid = secrets.token_hex(8)
        while kid in self._keys:
            kid = secrets.token_hex(8)
        key = AESGCM.generate_key(bit_length=256)
        path = directory / f"kek-{kid}.key"
        # O_EXCL with mode 0600: the key file never exists with wider permissions, and an existing
        # file is never overwritten.
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(base64.b64encode(key) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        # The key must be durable before anything can be wrapped under it.
        fsync_directory(directory)
        write_atomic(directory / _ACTIVE_FILE, f"{kid}\n".encode("ascii"))
        self._keys[kid] = key
        self._active = kid
        return kid

    def retire(self, kid: str) -> None:
        """Destroy the key `kid`: delete its file, so that nothing wrapped under it decrypts again."""
        directory = self._writable_directory("retire a key of")
        if kid == self._active:
            raise ConfigurationError(
                f"refusing to retire {kid}, the active key of {directory}; rotate first "
                f"(rotate_files re-wraps the files and then retires the old key)"
            )
        if kid not in self._keys:
            raise ConfigurationError(f"key ring {directory} holds no key {kid!r}")
        (directory / f"kek-{kid}.key").unlink()
        fsync_directory(directory)
        del self._keys[kid]

    def __repr__(self) -> str:
        return f"KeyRing({self._source!r}, active={self._active!r}, kids={sorted(self._keys)})"

    def _wrapping_key(self, kid: str) -> bytes | None:
        return self._keys.get(kid)

    def _writable_directory(self, action: str) -> Path:
        if self._directory is None:
            raise ConfigurationError(
                f"cannot {action} the key ring from {self._source}: its single key is managed "
                f"outside silofed; use a key directory (KeyRing.create) to rotate keys"
            )
        return self._directory


@dataclass(frozen=True)
class _Envelope:
    kid: str
    wrap_nonce: bytes
    wrapped_key: bytes
    nonce: bytes
    ciphertext: bytes


def encrypt_bytes(
    plaintext: bytes, *, keyring: KeyRing, file_name: str, unit: str, purpose: str
) -> bytes:
    """Encrypt `plaintext` under a fresh data key wrapped by the key ring's active key, bound to
    the file's base name, the unit and the purpose."""
    _check_binding(file_name, unit, purpose)
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = AESGCM(data_key).encrypt(
        nonce, plaintext, _payload_context(file_name, unit, purpose)
    )
    kid = keyring.active_kid
    wrap_nonce, wrapped_key = _wrap(data_key, keyring, kid, file_name, unit, purpose)
    return _serialise(_Envelope(kid, wrap_nonce, wrapped_key, nonce, ciphertext))


def decrypt_bytes(
    blob: bytes, *, keyring: KeyRing, file_name: str, unit: str, purpose: str
) -> bytes:
    """Decrypt what `encrypt_bytes` produced for the same file name, unit and purpose, or raise
    `DecryptionError`."""
    envelope = _parse(blob)
    data_key = _unwrap(envelope, keyring, file_name, unit, purpose)
    try:
        return AESGCM(data_key).decrypt(
            envelope.nonce, envelope.ciphertext, _payload_context(file_name, unit, purpose)
        )
    except (InvalidTag, ValueError):
        raise DecryptionError from None


def write_encrypted(
    path: Path, plaintext: bytes, *, keyring: KeyRing, unit: str, purpose: str
) -> None:
    """Encrypt `plaintext` into `path`, atomically; the bound file name is `path`'s base name
    without a trailing `.enc`."""
    path = Path(path)
    blob = encrypt_bytes(
        plaintext, keyring=keyring, file_name=bound_file_name(path), unit=unit, purpose=purpose
    )
    write_atomic(path, blob)


def read_encrypted(path: Path, *, keyring: KeyRing, unit: str, purpose: str) -> bytes:
    """Decrypt the file `path` written by `write_encrypted`, or raise `DecryptionError`."""
    path = Path(path)
    return decrypt_bytes(
        path.read_bytes(),
        keyring=keyring,
        file_name=bound_file_name(path),
        unit=unit,
        purpose=purpose,
    )


def is_encrypted(path: Path) -> bool:
    """True if `path` starts with the silofed encryption magic (it may still fail to decrypt)."""
    with Path(path).open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def rewrap(path: Path, *, keyring: KeyRing, unit: str, purpose: str) -> None:
    """Re-wrap the data key of the file `path` under the key ring's active key, atomically. The
    payload is not re-encrypted: the bytes after the header stay identical."""
    path = Path(path)
    file_name = bound_file_name(path)
    envelope = _parse(path.read_bytes())
    data_key = _unwrap(envelope, keyring, file_name, unit, purpose)
    kid = keyring.active_kid
    wrap_nonce, wrapped_key = _wrap(data_key, keyring, kid, file_name, unit, purpose)
    rewrapped = _Envelope(kid, wrap_nonce, wrapped_key, envelope.nonce, envelope.ciphertext)
    write_atomic(path, _serialise(rewrapped))


def rotate_files(keyring: KeyRing, files: Sequence[tuple[Path, str, str]]) -> str:
    """Rotate the key ring for `files`, given as (path, unit, purpose): make a new active key,
    re-wrap every file under it, then retire the previously active key. Returns the new key's id.

    Every file is checked to unwrap before anything changes, so a file that would be lost with the
    old key stops the rotation instead. Keys other than the previously active one are kept.
    """
    files = list(files)
    for path, unit, purpose in files:
        _unwrap(
            _parse(Path(path).read_bytes()), keyring, bound_file_name(Path(path)), unit, purpose
        )
    old_kid = keyring.active_kid
    new_kid = keyring.rotate()
    for path, unit, purpose in files:
        rewrap(path, keyring=keyring, unit=unit, purpose=purpose)
    keyring.retire(old_kid)
    return new_kid


def bound_file_name(path: Path) -> str:
    """The file name an encrypted file is bound to: its base name without a trailing `.enc`."""
    return Path(path).name.removesuffix(ENCRYPTED_SUFFIX)


def _check_binding(file_name: str, unit: str, purpose: str) -> None:
    for label, value in (("file_name", file_name), ("unit", unit), ("purpose", purpose)):
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{label} must be a non-empty string, got {value!r}")
    if PurePath(file_name).name != file_name or "/" in file_name or "\\" in file_name:
        raise ConfigurationError(
            f"file_name must be a base name such as 'customers.parquet', got {file_name!r}"
        )


def _canonical(fields: dict[str, str]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")


def _payload_context(file_name: str, unit: str, purpose: str) -> bytes:
    return _canonical(
        {"context": "silofed payload", "file": file_name, "unit": unit, "purpose": purpose}
    )


def _wrap_context(file_name: str, unit: str, purpose: str, kid: str) -> bytes:
    return _canonical(
        {
            "context": "silofed data key",
            "file": file_name,
            "unit": unit,
            "purpose": purpose,
            "kid": kid,
        }
    )


def _wrap(
    data_key: bytes, keyring: KeyRing, kid: str, file_name: str, unit: str, purpose: str
) -> tuple[bytes, bytes]:
    wrapping_key = keyring._wrapping_key(kid)
    if wrapping_key is None:  # the active key is always held; a broken invariant, not bad input
        raise ConfigurationError(f"key ring {keyring!r} does not hold its active key {kid}")
    wrap_nonce = os.urandom(_NONCE_BYTES)
    wrapped_key = AESGCM(wrapping_key).encrypt(
        wrap_nonce, data_key, _wrap_context(file_name, unit, purpose, kid)
    )
    return wrap_nonce, wrapped_key


def _unwrap(
    envelope: _Envelope, keyring: KeyRing, file_name: str, unit: str, purpose: str
) -> bytes:
    wrapping_key = keyring._wrapping_key(envelope.kid)
    if wrapping_key is None:
        raise DecryptionError from None
    try:
        data_key = AESGCM(wrapping_key).decrypt(
            envelope.wrap_nonce,
            envelope.wrapped_key,
            _wrap_context(file_name, unit, purpose, envelope.kid),
        )
    except (InvalidTag, ValueError):
        raise DecryptionError from None
    if len(data_key) != _KEY_BYTES:
        raise DecryptionError from None
    return data_key


def _header(envelope: _Envelope) -> bytes:
    return _canonical(
        {
            "kid": envelope.kid,
            "nonce": base64.b64encode(envelope.nonce).decode("ascii"),
            "wrap_nonce": base64.b64encode(envelope.wrap_nonce).decode("ascii"),
            "wrapped_key": base64.b64encode(envelope.wrapped_key).decode("ascii"),
        }
    )


def _serialise(envelope: _Envelope) -> bytes:
    header = _header(envelope)
    return MAGIC + len(header).to_bytes(_HEADER_LENGTH_BYTES, "big") + header + envelope.ciphertext


def _parse(blob: bytes) -> _Envelope:
    """Split a blob into its parts, or raise `DecryptionError`. The header must be byte for byte
    the canonical encoding of what it parses to, so that no header byte can change unnoticed."""
    start = len(MAGIC) + _HEADER_LENGTH_BYTES
    if len(blob) < start or blob[: len(MAGIC)] != MAGIC:
        raise DecryptionError from None
    length = int.from_bytes(blob[len(MAGIC) : start], "big")
    if length > _MAX_HEADER_BYTES or len(blob) < start + length + _TAG_BYTES:
        raise DecryptionError from None
    raw_header = blob[start : start + length]
    try:
        header = json.loads(raw_header)
    except ValueError:
        raise DecryptionError from None
    if (
        not isinstance(header, dict)
        or set(header) != _HEADER_FIELDS
        or not all(isinstance(value, str) for value in header.values())
        or not _KID.fullmatch(header["kid"])
    ):
        raise DecryptionError from None
    try:
        envelope = _Envelope(
            kid=header["kid"],
            wrap_nonce=base64.b64decode(header["wrap_nonce"], validate=True),
            wrapped_key=base64.b64decode(header["wrapped_key"], validate=True),
            nonce=base64.b64decode(header["nonce"], validate=True),
            ciphertext=blob[start + length :],
        )
    except (binascii.Error, ValueError):
        raise DecryptionError from None
    if (
        len(envelope.nonce) != _NONCE_BYTES
        or len(envelope.wrap_nonce) != _NONCE_BYTES
        or len(envelope.wrapped_key) != _KEY_BYTES + _TAG_BYTES
        or _header(envelope) != raw_header
    ):
        raise DecryptionError from None
    return envelope


def decode_key(text: str) -> bytes | None:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == _KEY_BYTES else None


def read_key_file(path: Path) -> bytes:
    key = decode_key(path.read_text(encoding="ascii", errors="replace").strip())
    if key is None:
        raise ConfigurationError(
            f"key file {path} does not hold a base64-encoded 256-bit key; restore it from the "
            f"BU's key backup"
        )
    return key


def check_private_key_file(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & _PRIVATE_MASK:
        raise ConfigurationError(
            f"key file {path} is accessible by group or others (mode {mode:04o}); restrict it "
            f"with `chmod 600 {path}` and consider the key exposed if others could read it"
        )
