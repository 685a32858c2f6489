"""C2SP signed notes, tlog checkpoints and cosignatures: the formats, signing and verifying.

Signed note (https://c2sp.org/signed-note): a UTF-8 text that ends in a newline, a blank
line, then one or more signature lines, each "— <key name> <base64(key id ‖ signature)>\\n"
(an em dash U+2014 and a space first). No ASCII control character but the newline may
appear anywhere. Key names are non-empty, without Unicode spaces or "+". The key id is
the first 4 bytes of SHA-256(key name ‖ 0x0A ‖ type ‖ public key), and a verifier key
("vkey") is written "<name>+<8 hex digits of the key id>+<base64(type ‖ public key)>".
Verifiers ignore signatures by keys they do not know (name and id both must match) and
reject a note whose known-key signature does not verify.

Signature types used here:

- 0x01, Ed25519 (RFC 8032) over the note text; public key 32 bytes. The HSM's key.
- 0x04, tlog-cosignature/v1 (https://c2sp.org/tlog-cosignature): a witness's Ed25519 key
  signs "cosignature/v1\\ntime <unix seconds>\\n" followed by the checkpoint body; the
  signature field is the 8-byte big-endian timestamp followed by the 64-byte signature.
- 0xff, "other algorithms", used here for ML-DSA-65 (FIPS 204). The signed-note spec
  recommends a longer identifier after 0xff; ours is the DER encoding of the ML-DSA-65
  object identifier 2.16.840.1.101.3.4.3.18 (`06 09 60 86 48 01 65 03 04 03 12`), so
  the key's encoding is 0xff ‖ OID ‖ 1,952-byte public key, everywhere the generic rule
  uses "type ‖ public key":

      key id = SHA-256(name ‖ 0x0A ‖ 0xff ‖ OID ‖ public key)[:4]
      vkey   = <name>+<hex key id>+<base64(0xff ‖ OID ‖ public key)>
      signature = ML-DSA-65.Sign(private key, note text, context = empty), pure ML-DSA
                  (not HashML-DSA), 3,309 bytes, randomised (verify, never compare)

  A generic vkey parser that hashes the decoded key material (as Go's sumdb/note does)
  therefore finds the same key id.

Checkpoint (https://c2sp.org/tlog-checkpoint): the note text "<origin>\\n<tree size in
decimal, no leading zeros>\\n<base64 of the 32-byte RFC 6962 root>\\n" and optional
non-empty extension lines.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey

from pipeline.errors import PipelineError

__all__ = [
    "COSIGNATURE_V1",
    "ED25519",
    "MLDSA65",
    "MLDSA65_OID",
    "Checkpoint",
    "CosignatureSigner",
    "Ed25519Signer",
    "NoteError",
    "NoteSignature",
    "Signer",
    "Verifier",
    "add_signatures",
    "cosignature_time",
    "key_id",
    "make_signatures",
    "open_note",
    "parse_note",
    "sign_note",
]

ED25519 = 0x01
COSIGNATURE_V1 = 0x04
MLDSA65 = 0xFF
MLDSA65_OID = bytes.fromhex("0609608648016503040312")  # 2.16.840.1.101.3.4.3.18, DER
MAX_SIGNATURES = 100  # the spec asks for at least 16; Go's sumdb/note stops at 100
HASH_SIZE = 32
ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
MLDSA65_KEY_SIZE = 1952
COSIGNATURE_SIZE = 8 + ED25519_SIGNATURE_SIZE
MAX_TIMESTAMP = 2**63 - 1

_KEY_SIZES = {
    ED25519: ED25519_KEY_SIZE,
    COSIGNATURE_V1: ED25519_KEY_SIZE,
    MLDSA65: MLDSA65_KEY_SIZE,
}
_TYPE_NAMES = {ED25519: "Ed25519", COSIGNATURE_V1: "cosignature/v1", MLDSA65: "ML-DSA-65"}
_SIG_PREFIX = "— ".encode()
_SIZE = re.compile(r"0|[1-9][0-9]*")
_HEX_ID = re.compile(r"[0-9a-fA-F]{8}")


class NoteError(PipelineError, ValueError):
    """A malformed note, checkpoint, vkey or signature, or one that does not verify.

    The message says what is wrong and where; `key` names the key ("name+id") when the
    problem is one key's signature.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class Signer(Protocol):
    """Anything that signs notes: a software key, an HSM key, a witness."""

    @property
    def name(self) -> str: ...
    @property
    def key_id(self) -> bytes: ...
    @property
    def sig_type(self) -> int: ...
    @property
    def public_key(self) -> bytes: ...
    def sign(self, message: bytes) -> bytes:
        """The raw signature of `message` (what follows the key id in the line)."""
        ...


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """SHA-256(name ‖ 0x0A ‖ type ‖ public key encoding)[:4], as signed-note recommends."""
    _check_name(name, "key name")
    material = _key_material(sig_type, public_key)
    return hashlib.sha256(name.encode() + b"\n" + material).digest()[:4]


def _key_material(sig_type: int, public_key: bytes) -> bytes:
    """The bytes a vkey carries after the name and id: type ‖ public key (‖ OID for 0xff)."""
    if sig_type == MLDSA65:
        return bytes([MLDSA65]) + MLDSA65_OID + public_key
    if not 0 <= sig_type <= 0xFF:
        raise NoteError(f"signature type {sig_type} is not a byte")
    return bytes([sig_type]) + public_key


@dataclass(frozen=True)
class Verifier:
    """A public key that checks one key's signatures: Ed25519, cosignature/v1 or ML-DSA-65."""

    name: str
    key_id: bytes
    sig_type: int
    public_key: bytes

    def __post_init__(self) -> None:
        _check_name(self.name, "key name")
        if self.sig_type not in _KEY_SIZES:
            raise NoteError(
                f"key {self.name}: signature type 0x{self.sig_type:02x} is not supported "
                "(0x01 Ed25519, 0x04 cosignature/v1, 0xff ML-DSA-65 are)"
            )
        size = _KEY_SIZES[self.sig_type]
        if len(self.public_key) != size:
            raise NoteError(
                f"key {self.name}: a {_TYPE_NAMES[self.sig_type]} public key has {size} bytes, "
                f"not {len(self.public_key)}"
            )
        want = key_id(self.name, self.sig_type, self.public_key)
        if self.key_id != want:
            raise NoteError(
                f"key {self.name}: key id {self.key_id.hex()} does not match the name and key "
                f"(they give {want.hex()})"
            )

    @property
    def ident(self) -> str:
        """The key as messages name it: "<name>+<hex key id>"."""
        return f"{self.name}+{self.key_id.hex()}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        """The verifier a vkey "<name>+<hex id>+<base64(type ‖ key)>" describes."""
        parts = vkey.strip().split("+", 2)  # the base64 may itself contain "+"
        if len(parts) != 3:
            raise NoteError(f"vkey {vkey!r}: want <name>+<hex key id>+<base64 key>")
        name, hex_id, encoded = parts
        if not _HEX_ID.fullmatch(hex_id):
            raise NoteError(f"vkey {vkey!r}: the key id {hex_id!r} is not 8 hex digits")
        material = _b64decode(encoded, f"vkey {name}")
        if not material:
            raise NoteError(f"vkey {name}: no key material")
        sig_type, public_key = material[0], material[1:]
        if sig_type == MLDSA65:
            if not public_key.startswith(MLDSA65_OID):
                raise NoteError(
                    f"vkey {name}: a 0xff key here must be ML-DSA-65 (the OID "
                    f"{MLDSA65_OID.hex()} after 0xff)"
                )
            public_key = public_key[len(MLDSA65_OID) :]
        return cls(name, bytes.fromhex(hex_id), sig_type, public_key)

    @classmethod
    def for_signer(cls, signer: Signer) -> Verifier:
        """The verifier of a signer's public key."""
        return cls(signer.name, signer.key_id, signer.sig_type, signer.public_key)

    def vkey(self) -> str:
        """The vkey text to publish: "<name>+<hex key id>+<base64(type ‖ key)>"."""
        material = _key_material(self.sig_type, self.public_key)
        return f"{self.ident}+{base64.b64encode(material).decode()}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether `signature` (what follows the key id) is this key's over `message`."""
        if self.sig_type == MLDSA65:
            try:
                MLDSA65PublicKey.from_public_bytes(self.public_key).verify(signature, message)
            except (InvalidSignature, ValueError):
                return False
            return True
        if self.sig_type == COSIGNATURE_V1:
            if len(signature) != COSIGNATURE_SIZE:
                return False
            timestamp = int.from_bytes(signature[:8], "big")
            if timestamp > MAX_TIMESTAMP:
                return False
            message, signature = _cosigned_message(timestamp, message), signature[8:]
        if len(signature) != ED25519_SIGNATURE_SIZE:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note: key name, key id and the raw signature."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        _check_name(self.name, "key name")
        if len(self.key_id) != 4:
            raise NoteError(
                f"signature by {self.name}: a key id has 4 bytes, not {len(self.key_id)}"
            )
        if not self.signature:
            raise NoteError(f"signature by {self.name}: empty")

    @property
    def ident(self) -> str:
        """The key as messages name it: "<name>+<hex key id>"."""
        return f"{self.name}+{self.key_id.hex()}"

    def line(self) -> bytes:
        """The signature line, newline included."""
        encoded = base64.b64encode(self.key_id + self.signature)
        return _SIG_PREFIX + self.name.encode() + b" " + encoded + b"\n"


@dataclass(frozen=True)
class Checkpoint:
    """A tlog checkpoint: the log's origin, its size and its RFC 6962 root hash."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "checkpoint origin")
        if isinstance(self.size, bool) or not 0 <= self.size < 2**64:
            raise NoteError(f"checkpoint size {self.size!r} is not an integer in [0, 2^64)")
        if len(self.root) != HASH_SIZE:
            raise NoteError(f"checkpoint root has {len(self.root)} bytes, not {HASH_SIZE}")
        for number, extension in enumerate(self.extensions, start=4):
            _check_line(extension, f"checkpoint line {number} (extension)")

    def body(self) -> bytes:
        """The note text: origin, size, base64 root and extension lines, each ending in \\n."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "".join(f"{line}\n" for line in (*lines, *self.extensions)).encode()

    @classmethod
    def parse(cls, body: bytes) -> Checkpoint:
        """The checkpoint a note text holds, read strictly per tlog-checkpoint."""
        text = _check_text(body, "checkpoint")
        if not text.endswith("\n"):
            raise NoteError("checkpoint: the text does not end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise NoteError(f"checkpoint: {len(lines)} lines, want origin, size and root hash")
        origin, size, root, *extensions = lines
        if not origin:
            raise NoteError("checkpoint line 1 (origin): empty")
        if not _SIZE.fullmatch(size):
            raise NoteError(
                f"checkpoint line 2 (size): {size!r} is not a decimal number without leading zeros"
            )
        for number, extension in enumerate(extensions, start=4):
            if not extension:
                raise NoteError(f"checkpoint line {number} (extension): empty")
        root_hash = _b64decode(root, "checkpoint line 3 (root hash)")
        if len(size) > 20 or int(size) >= 2**64:
            raise NoteError(f"checkpoint line 2 (size): {size} does not fit in 64 bits")
        return cls(origin, int(size), root_hash, tuple(extensions))


def make_signatures(text: bytes, signers: Sequence[Signer]) -> list[NoteSignature]:
    """Each signer's signature of `text`; what a signer raises (unavailable) passes through."""
    _check_note_text(text)
    seen: set[tuple[str, bytes]] = set()
    signatures = []
    for signer in signers:
        name, kid = signer.name, signer.key_id
        _check_name(name, "signer name")
        if kid != key_id(name, signer.sig_type, signer.public_key):
            raise NoteError(f"signer {name}: key id {kid.hex()} does not match its key")
        if (name, kid) in seen:
            raise NoteError(f"signer {name}+{kid.hex()} given twice")
        seen.add((name, kid))
        signature = signer.sign(text)
        if not isinstance(signature, bytes) or not signature:
            raise NoteError(f"signer {name}+{kid.hex()} returned no signature")
        signatures.append(NoteSignature(name, kid, signature))
    return signatures


def sign_note(text: bytes, signers: Sequence[Signer]) -> bytes:
    """The signed note: `text` (ending in a newline), a blank line, one line per signer."""
    if not signers:
        raise NoteError("a note needs at least one signer")
    if len(signers) > MAX_SIGNATURES:
        raise NoteError(f"{len(signers)} signers: at most {MAX_SIGNATURES} signatures a note")
    return _assemble(text, make_signatures(text, signers))


def parse_note(note: bytes) -> tuple[bytes, list[NoteSignature]]:
    """The text and signature lines of a note, read strictly; nothing is verified here."""
    _check_text(note, "note")
    split = note.rfind(b"\n\n")
    if split < 0:
        raise NoteError("note: no blank line before the signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block:
        raise NoteError("note: no signature lines after the blank line")
    if not block.endswith(b"\n"):
        raise NoteError("note: the last signature line does not end in a newline")
    lines = block[:-1].split(b"\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note: {len(lines)} signatures, at most {MAX_SIGNATURES} are read")
    return text, [_parse_signature_line(line, number) for number, line in enumerate(lines, 1)]


def _parse_signature_line(line: bytes, number: int) -> NoteSignature:
    where = f"note signature line {number}"
    if not line.startswith(_SIG_PREFIX):
        raise NoteError(f"{where}: does not start with an em dash (U+2014) and a space")
    name, space, encoded = line[len(_SIG_PREFIX) :].decode().partition(" ")
    if not space:
        raise NoteError(f"{where}: no space between the key name and the signature")
    try:
        _check_name(name, "key name")
    except NoteError as exc:
        raise NoteError(f"{where}: {exc}") from None
    raw = _b64decode(encoded, f"{where} ({name})")
    if len(raw) < 5:
        raise NoteError(f"{where} ({name}): {len(raw)} bytes, want a 4-byte key id and a signature")
    return NoteSignature(name, raw[:4], raw[4:])


def open_note(
    note: bytes, verifiers: Sequence[Verifier], *, require: Sequence[str] = ()
) -> tuple[bytes, list[NoteSignature]]:
    """The note's text and the signatures that verified, or NoteError.

    Signatures by keys not among `verifiers` are ignored (the spec requires it: key
    rotation, cosigners one does not follow). A signature by a known key that does not
    verify rejects the note, and so does a note without any verified signature. Each entry
    of `require` is a key name (some key of that name must have signed) or "name+hexid"
    (that very key must have signed).
    """
    known: dict[tuple[str, bytes], Verifier] = {}
    for each in verifiers:
        if known.setdefault((each.name, each.key_id), each) != each:
            raise NoteError(f"two different verifiers share the key {each.ident}")
    for wanted in require:
        if not any(_matches(wanted, v.name, v.key_id) for v in known.values()):
            raise NoteError(f"required key {wanted} is not among the verifiers", key=wanted)
    text, signatures = parse_note(note)
    verified: list[NoteSignature] = []
    for signature in signatures:
        verifier = known.get((signature.name, signature.key_id))
        if verifier is None or signature in verified:
            continue
        if not verifier.verify(text, signature.signature):
            raise NoteError(
                f"note: the signature by {verifier.ident} does not verify", key=verifier.ident
            )
        verified.append(signature)
    if not verified:
        found = ", ".join(s.ident for s in signatures)
        raise NoteError(f"note: no signature by a known key (signed by {found})")
    for wanted in require:
        if not any(_matches(wanted, s.name, s.key_id) for s in verified):
            raise NoteError(f"note: no valid signature by required key {wanted}", key=wanted)
    return text, verified


def add_signatures(note: bytes, lines: Sequence[NoteSignature]) -> bytes:
    """The note with `lines` (cosignatures) appended; lines it already has are not repeated."""
    text, signatures = parse_note(note)
    for line in lines:
        if line not in signatures:
            signatures.append(line)
    if len(signatures) > MAX_SIGNATURES:
        raise NoteError(f"note: {len(signatures)} signatures, at most {MAX_SIGNATURES}")
    return _assemble(text, signatures)


def _assemble(text: bytes, signatures: Sequence[NoteSignature]) -> bytes:
    return text + b"\n" + b"".join(signature.line() for signature in signatures)


def _matches(wanted: str, name: str, kid: bytes) -> bool:
    if "+" in wanted:
        return wanted.lower() == f"{name}+{kid.hex()}".lower()
    return wanted == name


class Ed25519Signer:
    """A software Ed25519 key (type 0x01): for witnesses' tests, tools and tests."""

    sig_type = ED25519

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.name = name
        self.public_key = private_key.public_key().public_bytes_raw()
        self.key_id = key_id(name, self.sig_type, self.public_key)

    @classmethod
    def generate(cls, name: str) -> Ed25519Signer:
        """A signer with a new random key."""
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Ed25519Signer:
        """A signer from a 32-byte RFC 8032 private key (seed)."""
        return cls(name, Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message`."""
        return self._private_key.sign(message)


class CosignatureSigner:
    """A witness's Ed25519 key making tlog-cosignature/v1 signatures (type 0x04)."""

    sig_type = COSIGNATURE_V1

    def __init__(
        self,
        name: str,
        private_key: Ed25519PrivateKey,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._private_key = private_key
        self._clock = clock
        self.name = name
        self.public_key = private_key.public_key().public_bytes_raw()
        self.key_id = key_id(name, self.sig_type, self.public_key)

    @classmethod
    def generate(cls, name: str, *, clock: Callable[[], float] = time.time) -> CosignatureSigner:
        """A cosigner with a new random key."""
        return cls(name, Ed25519PrivateKey.generate(), clock=clock)

    def sign(self, message: bytes) -> bytes:
        """Timestamp (8 bytes, big-endian) ‖ Ed25519 signature over the cosigned message.

        `message` is the checkpoint body; a malformed checkpoint is refused.
        """
        Checkpoint.parse(message)
        timestamp = int(self._clock())
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise NoteError(f"cosignature time {timestamp} is out of range")
        signature = self._private_key.sign(_cosigned_message(timestamp, message))
        return timestamp.to_bytes(8, "big") + signature


def cosignature_time(signature: bytes) -> int:
    """The Unix time (seconds) a cosignature/v1 signature (what follows the key id) states."""
    if len(signature) != COSIGNATURE_SIZE:
        raise NoteError(
            f"a cosignature/v1 signature has {COSIGNATURE_SIZE} bytes (8 time, 64 Ed25519), "
            f"not {len(signature)}"
        )
    timestamp = int.from_bytes(signature[:8], "big")
    if timestamp > MAX_TIMESTAMP:
        raise NoteError(f"cosignature time {timestamp} exceeds 2^63 - 1")
    return timestamp


def _cosigned_message(timestamp: int, body: bytes) -> bytes:
    return b"cosignature/v1\ntime %d\n" % timestamp + body


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise NoteError(f"{what} is empty")
    if "+" in name or any(c.isspace() or c < " " for c in name):
        raise NoteError(f"{what} {name!r} contains a space, a control character or a '+'")
    _check_unicode(name, what)


def _check_line(line: str, what: str) -> None:
    if not line:
        raise NoteError(f"{what}: empty")
    if any(c < " " for c in line):
        raise NoteError(f"{what} {line!r}: contains a newline or control character")
    _check_unicode(line, what)


def _check_unicode(text: str, what: str) -> None:
    """Refuse what UTF-8 cannot encode (lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise NoteError(f"{what} {text!r}: not encodable as UTF-8 at {exc.start}") from None


def _check_text(data: bytes, what: str) -> str:
    """`data` as text: valid UTF-8 without ASCII control characters other than newline."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError(f"{what}: not valid UTF-8 at byte {exc.start}") from None
    for index, char in enumerate(text):
        if char < " " and char != "\n":
            line = text.count("\n", 0, index) + 1
            raise NoteError(f"{what}: control character {char!r} on line {line}")
    return text


def _check_note_text(text: bytes) -> None:
    _check_text(text, "note text")
    if not text.endswith(b"\n"):
        raise NoteError("note text: does not end in a newline")


def _b64decode(encoded: str, where: str) -> bytes:
    """Standard, padded, canonical base64 (RFC 4648 section 4) or NoteError."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError(f"{where}: {encoded[:40]!r} is not standard base64") from None
    if base64.b64encode(raw).decode() != encoded:
        raise NoteError(f"{where}: {encoded[:40]!r} is not canonical base64")
    return raw
