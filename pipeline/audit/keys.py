"""The audit log's two signing keys: Ed25519 in an HSM (PKCS#11) and ML-DSA-65 in a file.

The HSM key is an Ed25519 key pair made in the token (`generate_hsm_key`): the private
key is sensitive, not extractable and may only sign, so it never leaves the HSM. Keys are
found by CKA_ID, which is the UTF-8 of the key label (labels are not unique in PKCS#11;
`generate_hsm_key` refuses a label or id the token already holds). `HsmSigner` keeps one
session open and signs with `CKM_EDDSA`; any PKCS#11 error closes the session and raises
`SigningUnavailable`, and the next call re-initialises the module (C_Finalize and
C_Initialize, which is what makes a module see a token that went away and came back) and
opens a new session. A refused PIN is not presented again in this process (HSMs lock the
user after a few wrong PINs): signing stays unavailable until a restart with the right PIN.

PINs come from the caller: the settings read them from a file or the environment, never
from a settings file. No message here contains a PIN.

One PKCS#11 module is loaded once per process (python-pkcs11 keeps it), so everything
here that uses a module shares one `_Module`: a lock (sessions are not used by two
threads at once), the login (PKCS#11 logs in the application, not a session: all its
sessions on the token share one login) and a generation that counts re-initialisations
(every session of the module ends with one, so each signer reopens its own).

The ML-DSA-65 key is a PEM file, "PRIVATE KEY" (PKCS#8 with the 32-byte seed, the form
of RFC 9881 that `cryptography` and OpenSSL 3.5 write), of mode 0600 or stricter;
`MldsaSigner` refuses a file that group or others may read.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import threading
from typing import TYPE_CHECKING, ClassVar

import pkcs11
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.types import Object, Session, SignMixin, Token

from pipeline.errors import PipelineError

from .note import ED25519, MLDSA65, key_id

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

__all__ = ["HsmSigner", "MldsaSigner", "SigningUnavailable", "generate_hsm_key"]

ED25519_PARAMS = bytes.fromhex("06032b6570")  # CKA_EC_PARAMS: the DER OID 1.3.101.112
_PIN_ERRORS = (
    pkcs11.PinIncorrect,
    pkcs11.PinInvalid,
    pkcs11.PinLenRange,
    pkcs11.PinLocked,
    pkcs11.PinExpired,
    pkcs11.UserPinNotInitialized,
)
_KEY_FILE_LIMIT = 64 * 1024


class SigningUnavailable(PipelineError):
    """A key cannot sign now; the message says why and what to do.

    `retry` is False when trying again cannot help until the configuration changes (a PIN
    the token refused, a key that may leave the HSM).
    """

    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class _Module:
    """A PKCS#11 module loaded in this process, shared by every signer and key generation."""

    _all: ClassVar[dict[str, _Module]] = {}
    _all_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.generation = 0
        self.needs_reinit = False
        self._lib: Pkcs11Lib | None = None
        self._logins: dict[str, tuple[int, str]] = {}  # token label -> (generation, PIN)
        self._refused_pins: dict[str, tuple[bytes, str]] = {}  # label -> (SHA-256, message)

    @classmethod
    def get(cls, path: str) -> _Module:
        """The module at `path`, loaded lazily (by the first call that needs it)."""
        with cls._all_lock:
            return cls._all.setdefault(path, cls(path))

    def lib(self) -> Pkcs11Lib:
        """The loaded, initialised library."""
        if self._lib is None:
            try:
                self._lib = pkcs11.lib(self.path)
            except pkcs11.PKCS11Error as exc:
                raise SigningUnavailable(
                    f"the PKCS#11 module {self.path} cannot be loaded ({_describe(exc)}): "
                    "install the HSM's PKCS#11 library or correct the module path"
                ) from exc
        return self._lib

    def prepare(self) -> None:
        """Re-initialise the module if a call failed since the last time."""
        if self.needs_reinit:
            self.reinitialize()

    def reinitialize(self) -> None:
        """C_Finalize then C_Initialize: tokens are scanned anew, every session ends."""
        lib = self.lib()
        self.generation += 1
        self._logins.clear()
        self.needs_reinit = True  # until C_Initialize succeeds
        with contextlib.suppress(pkcs11.PKCS11Error):
            lib.finalize()
        try:
            lib.initialize()
        except pkcs11.PKCS11Error as exc:
            raise SigningUnavailable(
                f"the PKCS#11 module {self.path} does not initialise ({_describe(exc)})"
            ) from exc
        self.needs_reinit = False

    def token(self, label: str) -> Token:
        """The token labelled `label`; the module is re-initialised once if it is not seen
        (SoftHSM and others list the tokens they found at C_Initialize)."""
        for attempt in range(2):
            try:
                return self.lib().get_token(token_label=label)
            except pkcs11.NoSuchToken:
                if attempt == 0:
                    self.reinitialize()
            except pkcs11.MultipleTokensReturned as exc:
                raise SigningUnavailable(
                    f"several tokens are labelled {label!r} in {self.path}: relabel all but one",
                    retry=False,
                ) from exc
        seen = sorted(token.label for token in self.lib().get_tokens())
        raise SigningUnavailable(
            f"no token labelled {label!r} in {self.path} (tokens seen: {seen}): check the "
            "token label setting and that the HSM is connected"
        )

    def login(self, token: Token, pin: str) -> None:
        """Log this application in to `token` once; its sessions share the login."""
        done = self._logins.get(token.label)
        if done is not None and done[0] == self.generation:
            if not hmac.compare_digest(done[1].encode(), pin.encode()):
                raise SigningUnavailable(
                    f"token {token.label!r} is logged in with another PIN in this process",
                    retry=False,
                )
            return
        digest = hashlib.sha256(pin.encode()).digest()
        refused = self._refused_pins.get(token.label)
        if refused is not None and refused[0] == digest:
            raise SigningUnavailable(refused[1], retry=False)
        try:
            # The session stays open: it holds the login for the other sessions.
            token.open(user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:
            pass  # logged in by other code in this process: the login is shared
        except _PIN_ERRORS as exc:
            message = (
                f"token {token.label!r} refused the PIN ({_describe(exc)}): correct the PIN "
                "(file or environment variable) and restart; this PIN is not tried again in "
                "this process, since HSMs lock the user after a few wrong PINs"
            )
            self._refused_pins[token.label] = (digest, message)
            raise SigningUnavailable(message, retry=False) from exc
        self._logins[token.label] = (self.generation, pin)


class HsmSigner:
    """Signs notes with the HSM's Ed25519 key (type 0x01) through PKCS#11 `CKM_EDDSA`.

    The constructor connects to read the public key, so a missing module, token or key or
    a wrong PIN fails at startup with `SigningUnavailable`. `pin` comes from the caller,
    read from a file or the environment, never from a settings file.
    """

    sig_type = ED25519

    def __init__(self, *, name: str, module: str, token: str, pin: str, key_label: str) -> None:
        if not pin:
            raise ValueError("HsmSigner: the PIN is empty: pass the PIN read from its file")
        if not key_label:
            raise ValueError("HsmSigner: the key label is empty")
        self.name = name
        self._module = _Module.get(module)
        self._token, self._pin, self._label = token, pin, key_label
        self._session: Session | None = None
        self._key: SignMixin | None = None
        self._generation = -1
        self._refused: SigningUnavailable | None = None
        with self._module.lock:
            self.public_key = self._connect()
        self.key_id = key_id(name, self.sig_type, self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of `message` made in the HSM."""
        with self._module.lock:
            if self._refused is not None:
                raise SigningUnavailable(str(self._refused), retry=False)
            try:
                key = self._current_key()
                signature = bytes(key.sign(message, mechanism=Mechanism.EDDSA))
            except pkcs11.PKCS11Error as exc:
                self._fail()
                raise SigningUnavailable(
                    f"the HSM did not sign with {self._where()} ({_describe(exc)}): the "
                    "session is closed; the next signature re-initialises the module and "
                    "tries again"
                ) from exc
            except SigningUnavailable as exc:
                self._fail()
                if not exc.retry:
                    self._refused = exc
                raise
        if len(signature) != 64:
            raise SigningUnavailable(
                f"the HSM returned {len(signature)} bytes for an Ed25519 signature, not 64"
            )
        return signature

    def close(self) -> None:
        """End the signer's session (the module and its login stay for other signers)."""
        with self._module.lock:
            self._drop()

    def _current_key(self) -> SignMixin:
        if self._key is not None and self._generation == self._module.generation:
            return self._key
        self._drop()
        public_key = self._connect()
        if public_key != self.public_key:
            raise SigningUnavailable(
                f"{self._where()} is not the key this signer started with: restart to sign "
                "with the new key (its key id differs)",
                retry=False,
            )
        assert self._key is not None
        return self._key

    def _connect(self) -> bytes:
        """Open a session on the token, find the key pair; the 32-byte public key."""
        module = self._module
        try:
            module.prepare()
            token = module.token(self._token)
            module.login(token, self._pin)
            session = token.open()
        except pkcs11.PKCS11Error as exc:
            module.needs_reinit = True
            raise SigningUnavailable(
                f"no session on token {self._token!r} of {module.path} ({_describe(exc)}): "
                "check that the HSM is connected"
            ) from exc
        except SigningUnavailable:
            module.needs_reinit = True
            raise
        try:
            private = _only(session, ObjectClass.PRIVATE_KEY, self._label, self._where())
            public = _only(session, ObjectClass.PUBLIC_KEY, self._label, self._where())
            if not isinstance(private, SignMixin):
                raise SigningUnavailable(f"the private {self._where()} may not sign", retry=False)
            _check_private(private, self._where())
            public_key = _public_key(public, self._where())
        except BaseException:
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()
            raise
        self._session, self._key, self._generation = session, private, module.generation
        return public_key

    def _fail(self) -> None:
        self._drop()
        self._module.needs_reinit = True

    def _drop(self) -> None:
        session, self._session, self._key = self._session, None, None
        # A session of an earlier generation ended with C_Finalize; its handle may now
        # name another signer's session, so it is not closed.
        if session is not None and self._generation == self._module.generation:
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()

    def _where(self) -> str:
        return f"key {self._label!r} on token {self._token!r}"


def generate_hsm_key(*, module: str, token: str, pin: str, key_label: str) -> bytes:
    """Make the Ed25519 key pair in the token; its 32-byte public key.

    The private key is a token object, private, sensitive, not extractable and may only
    sign; CKA_ID is the UTF-8 of `key_label`. Refuses (ValueError) when the token holds
    an object with that label or id already.
    """
    if not key_label:
        raise ValueError("generate_hsm_key: the key label is empty")
    shared = _Module.get(module)
    cka_id = key_label.encode()
    where = f"key {key_label!r} on token {token!r}"
    with shared.lock:
        try:
            shared.prepare()
            found = shared.token(token)
            shared.login(found, pin)
            with found.open(rw=True) as session:
                for search in ({Attribute.ID: cka_id}, {Attribute.LABEL: key_label}):
                    if next(iter(session.get_objects(search)), None) is not None:
                        raise ValueError(
                            f"token {token!r} already holds an object with the label or id "
                            f"{key_label!r}: refusing to make another key; pick another "
                            "label or delete the old key on purpose"
                        )
                public, _private = session.generate_keypair(
                    KeyType.EC_EDWARDS,
                    id=cka_id,
                    label=key_label,
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template={Attribute.EC_PARAMS: ED25519_PARAMS},
                    private_template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                    },
                )
                return _public_key(public, where)
        except pkcs11.PKCS11Error as exc:
            shared.needs_reinit = True
            raise SigningUnavailable(f"the HSM did not make {where} ({_describe(exc)})") from exc


def _only(session: Session, kind: ObjectClass, label: str, where: str) -> Object:
    """The one Ed25519 key of class `kind` whose CKA_ID is the label's UTF-8."""
    search = {
        Attribute.CLASS: kind,
        Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
        Attribute.ID: label.encode(),
    }
    found = list(session.get_objects(search))
    what = "private" if kind == ObjectClass.PRIVATE_KEY else "public"
    if not found:
        raise SigningUnavailable(
            f"no Ed25519 {what} key with CKA_ID {label!r} ({where}): make it with "
            "generate_hsm_key, or correct the key label setting"
        )
    if len(found) > 1:
        raise SigningUnavailable(
            f"{len(found)} Ed25519 {what} keys have CKA_ID {label!r} ({where}): keep one",
            retry=False,
        )
    return found[0]


def _check_private(key: Object, where: str) -> None:
    """Refuse a private key that could leave the HSM."""
    if not key[Attribute.SENSITIVE] or key[Attribute.EXTRACTABLE]:
        raise SigningUnavailable(
            f"the private {where} is extractable or not sensitive: refusing to sign with a "
            "key that may leave the HSM; make a new one with generate_hsm_key",
            retry=False,
        )


def _public_key(key: Object, where: str) -> bytes:
    """The 32 raw bytes of an Ed25519 CKA_EC_POINT.

    PKCS#11 3.0 wraps the point in a DER OCTET STRING (04 20 ...); some modules give the
    32 bytes bare, which is taken too.
    """
    point = bytes(key[Attribute.EC_POINT])
    if len(point) == 34 and point[:2] == b"\x04\x20":
        return point[2:]
    if len(point) == 32:
        return point
    raise SigningUnavailable(f"the public {where} has a {len(point)}-byte CKA_EC_POINT")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class MldsaSigner:
    """Signs notes with the ML-DSA-65 key in a file (type 0xff; see `note` for the scheme)."""

    sig_type = MLDSA65

    def __init__(self, *, name: str, path: str) -> None:
        self._key = _read_mldsa_key(path)
        self.name = name
        self.public_key = self._key.public_key().public_bytes_raw()
        self.key_id = key_id(name, self.sig_type, self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The ML-DSA-65 signature of `message`, empty context (randomised: 3,309 bytes)."""
        return self._key.sign(message)

    @staticmethod
    def generate(path: str) -> bytes:
        """Write a new key to `path` (mode 0600, never over an existing file); its public key.

        The PEM is written to a new 0600 file beside `path` (O_CREAT|O_EXCL), synced, then
        linked to `path`, which fails if `path` exists: `path` never holds half a key.
        """
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists: refusing to overwrite a signing key")
        key = MLDSA65PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        directory = os.path.dirname(os.path.abspath(path))
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(pem)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(temporary, path)
            except FileExistsError:
                raise FileExistsError(
                    f"{path} exists: refusing to overwrite a signing key"
                ) from None
        finally:
            os.unlink(temporary)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key.public_key().public_bytes_raw()


def _read_mldsa_key(path: str) -> MLDSA65PrivateKey:
    """The key in `path`, refused unless only its owner may read the file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"ML-DSA-65 key file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"ML-DSA-65 key file {path} is not a regular file")
        if mode & 0o077:
            raise ValueError(
                f"ML-DSA-65 key file {path} has mode {stat.S_IMODE(mode):04o}: group or others "
                f"may read it; run `chmod 600 {path}` (and consider the key exposed)"
            )
        data = file.read(_KEY_FILE_LIMIT + 1)
    if len(data) > _KEY_FILE_LIMIT:
        raise ValueError(f"ML-DSA-65 key file {path} is too large to be a key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(
            f"ML-DSA-65 key file {path} is not an unencrypted PEM private key ({exc})"
        ) from exc
    if not isinstance(key, MLDSA65PrivateKey):
        raise ValueError(f"ML-DSA-65 key file {path} holds a {type(key).__name__}")
    return key
