"""The signing keys for real: Ed25519 in SoftHSM2 through PKCS#11, ML-DSA-65 in a file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from pipeline.audit.keys import HsmSigner, MldsaSigner, SigningUnavailable, generate_hsm_key
from pipeline.audit.note import Checkpoint, Verifier, open_note, sign_note
from tests.softhsm import SoftHsm, Token, softhsm

pytestmark = pytest.mark.timeout(120)

NAME = "audit.example/log"
BODY = Checkpoint("audit.example/log", 42, hashlib.sha256(b"root").digest()).body()


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    with softhsm(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


def _signer(token: Token, *, pin: str | None = None, label: str = "audit-key") -> HsmSigner:
    return HsmSigner(
        name=NAME, module=token.module, token=token.label, pin=pin or token.pin, key_label=label
    )


def _keygen(token: Token, label: str = "audit-key") -> bytes:
    return generate_hsm_key(module=token.module, token=token.label, pin=token.pin, key_label=label)


def test_a_note_signed_in_the_hsm_verifies_with_the_public_key_alone(hsm: SoftHsm) -> None:
    token = hsm.token()
    public_key = _keygen(token)
    signer = _signer(token)
    try:
        assert signer.public_key == public_key and len(public_key) == 32
        note = sign_note(BODY, [signer])

        # Read and checked by hand, with `cryptography`: the line, the key id, the signature.
        text, _, line = note.rpartition(b"\n\n")
        assert text + b"\n" == BODY
        prefix, name, encoded = line.decode().rstrip("\n").split(" ")
        assert (prefix, name) == ("\N{EM DASH}", NAME)
        raw = base64.b64decode(encoded)
        assert raw[:4] == hashlib.sha256(NAME.encode() + b"\n\x01" + public_key).digest()[:4]
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw[4:], BODY)

        # And through the note module, from the published vkey text only.
        vkey = Verifier.for_signer(signer).vkey()
        opened, signatures = open_note(note, [Verifier.parse(vkey)], require=[NAME])
        assert opened == BODY and [s.key_id for s in signatures] == [signer.key_id]
    finally:
        signer.close()


def test_the_hsm_and_the_ml_dsa_key_sign_one_checkpoint(hsm: SoftHsm, tmp_path: Path) -> None:
    token = hsm.token()
    _keygen(token)
    MldsaSigner.generate(str(tmp_path / "mldsa.pem"))
    hsm_signer = _signer(token)
    mldsa = MldsaSigner(name=f"{NAME}/ml-dsa-65", path=str(tmp_path / "mldsa.pem"))
    vkeys = [Verifier.for_signer(signer).vkey() for signer in (hsm_signer, mldsa)]
    note = sign_note(BODY, [hsm_signer, mldsa])
    hsm_signer.close()
    text, signatures = open_note(
        note, [Verifier.parse(v) for v in vkeys], require=[NAME, f"{NAME}/ml-dsa-65"]
    )
    assert Checkpoint.parse(text).size == 42 and len(signatures) == 2


_INSPECT = """
import json, sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
lib = pkcs11.lib(sys.argv[1])
session = lib.get_token(token_label=sys.argv[2]).open(rw=True, user_pin=sys.argv[3])
key = session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS, id=sys.argv[4].encode())
out = {a.name: bool(key[a]) for a in (Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE,
    Attribute.ALWAYS_SENSITIVE, Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE,
    Attribute.SIGN, Attribute.DECRYPT, Attribute.UNWRAP, Attribute.DERIVE)}
for name, attempt in (("read VALUE", lambda: key[Attribute.VALUE]),
                      ("set EXTRACTABLE", lambda: key.__setitem__(Attribute.EXTRACTABLE, True)),
                      ("set SENSITIVE", lambda: key.__setitem__(Attribute.SENSITIVE, False))):
    try:
        attempt()
        out[name] = "allowed"
    except pkcs11.PKCS11Error as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""


def test_the_private_key_cannot_leave_the_hsm(hsm: SoftHsm) -> None:
    token = hsm.token()
    _keygen(token)
    # Asked by a process of its own (its own C_Initialize and login), as any other
    # PKCS#11 client of the token would.
    run = subprocess.run(
        [sys.executable, "-c", _INSPECT, token.module, token.label, token.pin, "audit-key"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SOFTHSM2_CONF": str(hsm.conf)},
        check=True,
    )
    found = json.loads(run.stdout)
    assert found == {
        "TOKEN": True,
        "PRIVATE": True,
        "SENSITIVE": True,
        "ALWAYS_SENSITIVE": True,
        "EXTRACTABLE": False,
        "NEVER_EXTRACTABLE": True,
        "SIGN": True,
        "DECRYPT": False,
        "UNWRAP": False,
        "DERIVE": False,
        "read VALUE": "AttributeSensitive",
        "set EXTRACTABLE": "AttributeReadOnly",
        "set SENSITIVE": "AttributeReadOnly",
    }


def test_a_second_key_with_the_same_label_is_refused(hsm: SoftHsm) -> None:
    token = hsm.token()
    _keygen(token)
    with pytest.raises(ValueError, match="already holds an object with the label or id"):
        _keygen(token)


def test_a_wrong_pin_is_said_and_not_presented_again(hsm: SoftHsm) -> None:
    token = hsm.token()
    with pytest.raises(SigningUnavailable, match="refused the PIN") as refused:
        _signer(token, pin="000000")
    assert refused.value.retry is False and "000000" not in str(refused.value)
    with pytest.raises(SigningUnavailable, match="not tried again"):
        _signer(token, pin="000000")
    _keygen(token)  # the right PIN still logs in
    _signer(token).close()


def test_a_missing_token_or_key_is_said(hsm: SoftHsm) -> None:
    token = hsm.token()
    with pytest.raises(SigningUnavailable, match="no token labelled 'no-such-token'"):
        HsmSigner(name=NAME, module=token.module, token="no-such-token", pin="1", key_label="k")
    with pytest.raises(SigningUnavailable, match="no Ed25519 private key with CKA_ID 'absent'"):
        _signer(token, label="absent")


def test_a_missing_module_is_said() -> None:
    with pytest.raises(SigningUnavailable, match=r"/nowhere/libpkcs11\.so cannot be loaded"):
        HsmSigner(name=NAME, module="/nowhere/libpkcs11.so", token="t", pin="1", key_label="k")


def test_signing_stops_while_the_hsm_is_gone_and_resumes_when_it_is_back(hsm: SoftHsm) -> None:
    token, bystander_token = hsm.token(), hsm.token()
    _keygen(token)
    _keygen(bystander_token)
    signer, bystander = _signer(token), _signer(bystander_token)
    verifier = Verifier.for_signer(signer)
    try:
        assert verifier.verify(BODY, signer.sign(BODY))
        with hsm.unplugged(token):
            # The open session fails first; then the re-initialised module no longer
            # lists the token.
            with pytest.raises(SigningUnavailable, match="did not sign"):
                signer.sign(BODY)
            with pytest.raises(SigningUnavailable, match="no token labelled"):
                signer.sign(BODY)
            with pytest.raises(SigningUnavailable):  # sign_note lets it through as is
                sign_note(BODY, [signer])
        signature = signer.sign(BODY)
        assert verifier.verify(BODY, signature)
        # The re-initialisations ended the other signer's session: it opens a new one.
        assert Verifier.for_signer(bystander).verify(BODY, bystander.sign(BODY))
    finally:
        signer.close()
        bystander.close()


def test_the_ml_dsa_key_file_is_made_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "mldsa.pem"
    old_umask = os.umask(0)
    try:
        public_key = MldsaSigner.generate(str(path))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(public_key) == 1952
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert [p.name for p in tmp_path.iterdir()] == ["mldsa.pem"]  # no temporary file left

    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        MldsaSigner.generate(str(path))
    assert path.read_bytes() == before

    signer = MldsaSigner(name=f"{NAME}/ml-dsa-65", path=str(path))
    assert signer.public_key == public_key
    assert Verifier.for_signer(signer).verify(BODY, signer.sign(BODY))


def test_a_key_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mldsa.pem"
    MldsaSigner.generate(str(path))
    path.chmod(0o644)
    with pytest.raises(ValueError, match=rf"{path} has mode 0644.*`chmod 600 {path}`"):
        MldsaSigner(name="k", path=str(path))
    path.chmod(0o640)
    with pytest.raises(ValueError, match="group or others may read it"):
        MldsaSigner(name="k", path=str(path))
    path.chmod(0o400)
    MldsaSigner(name="k", path=str(path))


def test_a_key_file_that_is_no_ml_dsa_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not-a-key.pem"
    path.write_text("hello\n")
    path.chmod(0o600)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        MldsaSigner(name="k", path=str(path))
    with pytest.raises(ValueError, match="No such file"):
        MldsaSigner(name="k", path=str(tmp_path / "absent.pem"))
