"""Signed notes, checkpoints and cosignatures (C2SP), against published vectors and by hand."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PublicKey
from hypothesis import given
from hypothesis import strategies as st

from pipeline.audit.keys import MldsaSigner
from pipeline.audit.note import (
    Checkpoint,
    CosignatureSigner,
    Ed25519Signer,
    NoteError,
    NoteSignature,
    Signer,
    Verifier,
    add_signatures,
    cosignature_time,
    key_id,
    make_signatures,
    open_note,
    parse_note,
    sign_note,
)

# golang.org/x/mod/sumdb/note's documented example (package doc and note_test.go).
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    b"If you think cryptography is the answer to your problem,\n"
    b"then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT
    + (
        "\n\N{EM DASH} PeterNeumann "
        "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
    ).encode()
)

# A tree head signed by sum.golang.org with its published key (transparency-dev/formats,
# log/note_test.go; the vkey is the one cmd/go carries).
SUMDB_VKEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
SUMDB_NOTE = (
    "go.sum database tree\n6476701\nmb8QLQIs0Z0yP5Cstq6guj87oXWeC9gEM8oVikmm9Wk=\n\n"
    "\N{EM DASH} sum.golang.org "
    "Az3grsLX85Gz+s1SiTbgkuqxgItqFq7gsMUEyVnrsa9LM7Us9S+1xbFIGu95949rj4nPRYfvimWEPWL+o3GeoWwOoAw=\n"
).encode()

# c2sp.org/tlog-checkpoint and c2sp.org/tlog-cosignature's example.
SPEC_BODY = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
SPEC_COSIGNATURE = (
    "jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dlrDJsX3b2oyin1nPZ"
    "qhf5nNo0xUe+mbIUBkBIfZ+qnA=="
)

ML_DSA_65_OID = bytes.fromhex("0609608648016503040312")  # 2.16.840.1.101.3.4.3.18
ROOT = hashlib.sha256(b"root").digest()
BODY = Checkpoint("audit.example/log", 7, ROOT).body()


@pytest.fixture(scope="module")
def mldsa(tmp_path_factory: pytest.TempPathFactory) -> MldsaSigner:
    path = tmp_path_factory.mktemp("mldsa") / "key.pem"
    MldsaSigner.generate(str(path))
    return MldsaSigner(name="audit.example/log/ml-dsa-65", path=str(path))


# Checkpoints.


def test_the_spec_checkpoint_is_read_and_written_byte_for_byte() -> None:
    checkpoint = Checkpoint.parse(SPEC_BODY)
    assert checkpoint.origin == "example.com/behind-the-sofa"
    assert checkpoint.size == 20852163
    assert checkpoint.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.extensions == ()
    assert checkpoint.body() == SPEC_BODY


def test_a_checkpoint_with_extension_lines_round_trips() -> None:
    checkpoint = Checkpoint("log.example/a b", 0, ROOT, ("ext one", "ext+two"))
    body = checkpoint.body()
    assert body.splitlines()[1:] == [b"0", base64.b64encode(ROOT), b"ext one", b"ext+two"]
    assert Checkpoint.parse(body) == checkpoint


_ORIGINS = st.text(st.characters(min_codepoint=0x20, exclude_categories=["Cs"]), min_size=1)


@given(
    origin=_ORIGINS,
    size=st.integers(0, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(_ORIGINS, max_size=3).map(tuple),
)
def test_any_checkpoint_round_trips(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    checkpoint = Checkpoint(origin, size, root, extensions)
    assert Checkpoint.parse(checkpoint.body()) == checkpoint


_GOOD_ROOT = base64.b64encode(ROOT).decode()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (f"log\n1\n{_GOOD_ROOT}", "does not end in a newline"),
        ("log\n1\n", "2 lines"),
        (f"\n1\n{_GOOD_ROOT}\n", "line 1 (origin): empty"),
        (f"log\n01\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\n-1\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\n+1\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\n 1\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\n1_000\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\n\N{FULLWIDTH DIGIT ONE}\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\nbananas\n{_GOOD_ROOT}\n", "line 2 (size)"),
        (f"log\n{2**64}\n{_GOOD_ROOT}\n", "does not fit in 64 bits"),
        (f"log\n{'9' * 5000}\n{_GOOD_ROOT}\n", "does not fit in 64 bits"),
        ("log\n1\nThisIsn'tBase64\n", "line 3 (root hash)"),
        (f"log\n1\n{_GOOD_ROOT.rstrip('=')}\n", "line 3 (root hash)"),
        ("log\n1\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2J=\n", "not canonical base64"),
        (f"log\n1\n{base64.b64encode(ROOT[:31]).decode()}\n", "31 bytes, not 32"),
        (f"log\n1\n{_GOOD_ROOT}\n\n", "line 4 (extension): empty"),
        (f"log\n1\n{_GOOD_ROOT}\next\n\n\n", "line 5 (extension): empty"),
        (f"log\tx\n1\n{_GOOD_ROOT}\n", "control character"),
    ],
)
def test_a_malformed_checkpoint_is_refused_saying_where(body: str, problem: str) -> None:
    with pytest.raises(NoteError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        Checkpoint.parse(body.encode())


def test_a_checkpoint_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(NoteError, match="not valid UTF-8 at byte 3"):
        Checkpoint.parse(b"log\xff\n1\n" + base64.b64encode(ROOT) + b"\n")


@pytest.mark.parametrize(
    ("origin", "size", "root", "extensions"),
    [
        ("", 1, ROOT, ()),
        ("a\nb", 1, ROOT, ()),
        ("log", -1, ROOT, ()),
        ("log", 2**64, ROOT, ()),
        ("log", 1, ROOT[:31], ()),
        ("log", 1, ROOT, ("",)),
        ("log", 1, ROOT, ("two\nlines",)),
        ("lone \ud800 surrogate", 1, ROOT, ()),
    ],
)
def test_an_impossible_checkpoint_cannot_be_made(
    origin: str, size: int, root: bytes, extensions: tuple[str, ...]
) -> None:
    with pytest.raises(NoteError):
        Checkpoint(origin, size, root, extensions)


# Key ids and vkeys.


def test_key_ids_are_the_c2sp_hash_computed_by_hand(mldsa: MldsaSigner) -> None:
    ed = Ed25519Signer.generate("a.example/key")
    assert ed.key_id == hashlib.sha256(b"a.example/key\n\x01" + ed.public_key).digest()[:4]
    cosigner = CosignatureSigner.generate("w.example/w1")
    assert (
        cosigner.key_id == hashlib.sha256(b"w.example/w1\n\x04" + cosigner.public_key).digest()[:4]
    )
    by_hand = hashlib.sha256(
        mldsa.name.encode() + b"\n\xff" + ML_DSA_65_OID + mldsa.public_key
    ).digest()[:4]
    assert mldsa.key_id == by_hand == key_id(mldsa.name, 0xFF, mldsa.public_key)


def test_the_go_example_vkey_is_read_and_written_back() -> None:
    verifier = Verifier.parse(GO_VKEY)
    assert (verifier.name, verifier.key_id.hex(), verifier.sig_type) == (
        "PeterNeumann",
        "c74f20a3",
        0x01,
    )
    assert verifier.vkey() == GO_VKEY
    assert Verifier.parse(SUMDB_VKEY).vkey() == SUMDB_VKEY  # its base64 holds "+" signs


def test_every_kind_of_vkey_round_trips(mldsa: MldsaSigner) -> None:
    for signer in (Ed25519Signer.generate("a"), CosignatureSigner.generate("w"), mldsa):
        verifier = Verifier.for_signer(signer)
        assert Verifier.parse(verifier.vkey()) == verifier


def test_the_ml_dsa_vkey_carries_the_type_the_oid_and_the_key(mldsa: MldsaSigner) -> None:
    name, hex_id, encoded = Verifier.for_signer(mldsa).vkey().split("+", 2)
    material = base64.b64decode(encoded)
    assert (name, hex_id) == (mldsa.name, mldsa.key_id.hex())
    assert material == b"\xff" + ML_DSA_65_OID + mldsa.public_key
    # A generic parser that hashes the vkey's key material (as Go's does) agrees.
    assert hashlib.sha256(name.encode() + b"\n" + material).digest()[:4].hex() == hex_id
    MLDSA65PublicKey.from_public_bytes(material[12:])


@pytest.mark.parametrize(
    ("vkey", "problem"),
    [
        ("PeterNeumann+c74f20a3", "want <name>"),
        ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
        ("PeterNeumann+c74f20+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8 hex digits"),
        ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T", "base64"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "a space"),
        ("rekor.sigstore.dev+12345678+AwEB", "0x03 is not supported"),
        ("x+12345678+Ag==", "0x02 is not supported"),
        ("x+12345678+/w==", "must be ML-DSA-65"),
        ("x+12345678+AQEB", "32 bytes, not 2"),
    ],
)
def test_a_bad_vkey_is_refused(vkey: str, problem: str) -> None:
    with pytest.raises(NoteError, match=problem):
        Verifier.parse(vkey)


# Published notes.


def test_the_go_example_note_verifies_and_is_reproduced() -> None:
    text, signatures = open_note(GO_NOTE, [Verifier.parse(GO_VKEY)], require=["PeterNeumann"])
    assert text == GO_TEXT and [s.ident for s in signatures] == ["PeterNeumann+c74f20a3"]
    seed = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert seed[0] == 0x01  # Ed25519
    signer = Ed25519Signer.from_seed("PeterNeumann", seed[1:])
    assert signer.key_id.hex() == "c74f20a3"
    assert sign_note(GO_TEXT, [signer]) == GO_NOTE  # Ed25519 is deterministic


def test_a_checkpoint_signed_by_sum_golang_org_verifies() -> None:
    text, _ = open_note(SUMDB_NOTE, [Verifier.parse(SUMDB_VKEY)], require=["sum.golang.org"])
    checkpoint = Checkpoint.parse(text)
    assert (checkpoint.origin, checkpoint.size) == ("go.sum database tree", 6476701)
    tampered = SUMDB_NOTE.replace(b"6476701", b"6476702")
    with pytest.raises(NoteError, match=r"signature by sum\.golang\.org\+033de0ae does not"):
        open_note(tampered, [Verifier.parse(SUMDB_VKEY)])


# Signing and opening.


def _flip_signature(note: bytes, index: int) -> bytes:
    """The note with one bit of its index-th signature flipped."""
    text, signatures = parse_note(note)
    victim = signatures[index]
    signature = bytearray(victim.signature)
    signature[len(signature) // 2] ^= 0x01
    signatures[index] = NoteSignature(victim.name, victim.key_id, bytes(signature))
    return text + b"\n" + b"".join(s.line() for s in signatures)


def test_a_note_signed_twice_verifies_with_the_vkeys_alone(mldsa: MldsaSigner) -> None:
    ed = Ed25519Signer.generate("audit.example/log")
    note = sign_note(BODY, [ed, mldsa])
    verifiers = [Verifier.parse(Verifier.for_signer(s).vkey()) for s in (ed, mldsa)]
    text, signatures = open_note(note, verifiers, require=[ed.name, mldsa.name])
    assert text == BODY
    assert [(s.name, s.key_id) for s in signatures] == [
        (ed.name, ed.key_id),
        (mldsa.name, mldsa.key_id),
    ]
    assert len(signatures[1].signature) == 3309
    # ML-DSA signatures are randomised: a second note differs but verifies just the same.
    assert open_note(sign_note(BODY, [mldsa]), verifiers)[0] == BODY


def test_a_flipped_bit_fails_the_note_and_names_the_key(mldsa: MldsaSigner) -> None:
    ed = Ed25519Signer.generate("audit.example/log")
    verifiers = [Verifier.for_signer(ed), Verifier.for_signer(mldsa)]
    note = sign_note(BODY, [ed, mldsa])
    with pytest.raises(NoteError, match="does not verify") as in_text:
        open_note(note.replace(b"\n7\n", b"\n6\n"), verifiers)
    assert in_text.value.key == Verifier.for_signer(ed).ident
    signers: list[Signer] = [ed, mldsa]
    for index, signer in enumerate(signers):
        with pytest.raises(NoteError, match="does not verify") as in_signature:
            open_note(_flip_signature(note, index), verifiers)
        assert in_signature.value.key == f"{signer.name}+{signer.key_id.hex()}"


def test_signatures_by_unknown_keys_are_ignored() -> None:
    known, stranger = Ed25519Signer.generate("known"), Ed25519Signer.generate("stranger")
    namesake = Ed25519Signer.generate("known")  # same name, another key: another id
    note = sign_note(BODY, [stranger, namesake, known])
    _, signatures = open_note(note, [Verifier.for_signer(known)])
    assert [s.key_id for s in signatures] == [known.key_id]
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_note(sign_note(BODY, [stranger]), [Verifier.for_signer(known)])


def test_required_keys_must_have_signed() -> None:
    log, witness = Ed25519Signer.generate("log"), CosignatureSigner.generate("witness")
    verifiers = [Verifier.for_signer(log), Verifier.for_signer(witness)]
    note = sign_note(BODY, [log])
    assert open_note(note, verifiers, require=["log"])[0] == BODY
    assert open_note(note, verifiers, require=[f"log+{log.key_id.hex()}"])[0] == BODY
    with pytest.raises(NoteError, match="no valid signature by required key witness") as missing:
        open_note(note, verifiers, require=["witness"])
    assert missing.value.key == "witness"
    with pytest.raises(NoteError, match="required key other is not among the verifiers"):
        open_note(note, verifiers, require=["other"])
    with pytest.raises(NoteError, match="required key log\\+00000000 is not among"):
        open_note(note, verifiers, require=["log+00000000"])


@pytest.mark.parametrize(
    ("note", "problem"),
    [
        (b"text\n", "no blank line"),
        (b"text\n\n", "no signature lines"),
        (GO_NOTE[:-1], "does not end in a newline"),
        (GO_NOTE.replace("\N{EM DASH}".encode(), b"-"), "em dash"),
        (GO_NOTE.replace("\N{EM DASH} ".encode(), "\N{EM DASH}".encode()), "em dash"),
        (GO_NOTE.replace(b"PeterNeumann ", b"PeterNeumann"), "no space"),
        (GO_NOTE.replace(b"PeterNeumann ", b"Peter+Neumann "), "or a '\\+'"),
        (GO_NOTE.replace(b"x08go", b"x08g!"), "not standard base64"),
        (GO_NOTE.replace(b"AM=\n", b"AM= \n"), "not standard base64"),
        (b"text\n\n\xe2\x80\x94 k AAAAAA==\n", "want a 4-byte key id and a signature"),
        (b"te\x01xt\n" + GO_NOTE, "control character"),
        (b"\xc3(\n" + GO_NOTE, "not valid UTF-8"),
        (b"t\n\n" + b"".join(GO_NOTE.split(b"\n\n")[1] for _ in range(101)), "101 signatures"),
    ],
)
def test_a_malformed_note_is_refused_saying_where(note: bytes, problem: str) -> None:
    with pytest.raises(NoteError, match=problem):
        parse_note(note)


_TEXTS = st.text(st.characters(exclude_categories=["Cs", "Cc"]) | st.just("\n"), max_size=200).map(
    lambda text: (text + "\n").encode()
)
_SIGNER = Ed25519Signer.generate("property.example/key")


@given(text=_TEXTS)
def test_any_text_round_trips_through_a_signed_note(text: bytes) -> None:
    note = sign_note(text, [_SIGNER])
    assert open_note(note, [Verifier.for_signer(_SIGNER)])[0] == text


@given(note=st.binary(max_size=300) | _TEXTS.map(lambda text: text + GO_NOTE))
def test_parsing_any_bytes_gives_a_note_or_a_note_error(note: bytes) -> None:
    try:
        text, signatures = parse_note(note)
    except NoteError:
        return
    assert text.endswith(b"\n") and signatures


def test_a_note_text_keeps_its_blank_lines() -> None:
    text = b"one\n\ntwo\n\n"
    signer = Ed25519Signer.generate("k")
    assert open_note(sign_note(text, [signer]), [Verifier.for_signer(signer)])[0] == text


def test_signing_refuses_what_cannot_make_a_note() -> None:
    signer = Ed25519Signer.generate("k")
    with pytest.raises(NoteError, match="does not end in a newline"):
        sign_note(b"no newline", [signer])
    with pytest.raises(NoteError, match="at least one signer"):
        sign_note(BODY, [])
    with pytest.raises(NoteError, match="given twice"):
        sign_note(BODY, [signer, signer])
    with pytest.raises(NoteError, match="control character"):
        sign_note(b"bell\x07\n", [signer])


def test_a_signer_whose_key_id_does_not_match_its_key_is_refused() -> None:
    class Liar:
        name, sig_type = "k", 0x01
        public_key = Ed25519Signer.generate("k").public_key
        key_id = b"\x00\x00\x00\x00"

        def sign(self, message: bytes) -> bytes:
            raise AssertionError("not reached")

    with pytest.raises(NoteError, match="does not match its key"):
        sign_note(BODY, [Liar()])


# Cosignatures.


def test_a_cosignature_is_the_time_and_an_ed25519_signature_of_the_spec_message() -> None:
    private = Ed25519PrivateKey.generate()
    witness = CosignatureSigner("witness.example.com/w1", private, clock=lambda: 1679315147.9)
    signature = witness.sign(SPEC_BODY)
    assert len(signature) == 72 and signature[:8] == (1679315147).to_bytes(8, "big")
    assert cosignature_time(signature) == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + SPEC_BODY  # the layout the spec shows
    private.public_key().verify(signature[8:], message)
    verifier = Verifier.parse(Verifier.for_signer(witness).vkey())
    assert verifier.sig_type == 0x04 and verifier.verify(SPEC_BODY, signature)
    # The time is signed: another time does not verify.
    assert not verifier.verify(SPEC_BODY, (1679315148).to_bytes(8, "big") + signature[8:])
    # Nor does a plain Ed25519 verifier of the same key and name accept it.
    plain = Verifier(
        "witness.example.com/w1", key_id(witness.name, 1, witness.public_key), 1, witness.public_key
    )
    assert not plain.verify(SPEC_BODY, signature)


def test_witnesses_cosign_a_signed_checkpoint() -> None:
    log = Ed25519Signer.generate("example.com/behind-the-sofa")
    keys = [Ed25519PrivateKey.generate() for _ in range(2)]
    witnesses = [
        CosignatureSigner(f"witness.example/w{i}", key, clock=lambda: 1_700_000_000)
        for i, key in enumerate(keys)
    ]
    note = sign_note(SPEC_BODY, [log])
    text, _ = open_note(note, [Verifier.for_signer(log)])
    cosigned = add_signatures(note, make_signatures(text, witnesses))
    everyone: list[Signer] = [log, *witnesses]
    verifiers = [Verifier.for_signer(s) for s in everyone]
    _, verified = open_note(cosigned, verifiers, require=[s.name for s in everyone])
    assert [s.name for s in verified] == [log.name, witnesses[0].name, witnesses[1].name]
    # The same cosignature again adds nothing; a later one by the same witness is added.
    assert add_signatures(cosigned, make_signatures(text, witnesses[:1])) == cosigned
    later = CosignatureSigner(witnesses[0].name, keys[0], clock=lambda: 1_700_000_060)
    recosigned = add_signatures(cosigned, make_signatures(text, [later]))
    _, verified = open_note(recosigned, verifiers)
    assert [cosignature_time(s.signature) for s in verified[1:]] == [
        1_700_000_000,
        1_700_000_000,
        1_700_000_060,
    ]


def test_published_cosignature_times_are_read() -> None:
    # transparency-dev/formats note/note_cosigv1_test.go: a cosignature of 1727964367.
    go = base64.b64decode(
        "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFiEBYJXORmnFBOBA=="
    )
    assert cosignature_time(go[4:]) == 1727964367
    # c2sp.org/tlog-cosignature's example line: the time of its example message.
    _, (line,) = parse_note(
        SPEC_BODY + f"\n\N{EM DASH} witness.example.com/w1 {SPEC_COSIGNATURE}\n".encode()
    )
    assert cosignature_time(line.signature) == 1679315147
    # The same tests' plain Ed25519 signature is no cosignature.
    plain = base64.b64decode(
        "eQjRQm6eSKzFoiYalgwCPXu2y3ijtg68is9M46JKxuZB+dRfTmeQeDBoXnvxZx2ugnkyV+MUMLXpWs1hPb/W/4xkNQY="
    )
    with pytest.raises(NoteError, match="72 bytes"):
        cosignature_time(plain[4:])
    with pytest.raises(NoteError, match="exceeds"):
        cosignature_time(b"\xff" * 72)


def test_a_witness_refuses_to_cosign_what_is_not_a_checkpoint() -> None:
    witness = CosignatureSigner.generate("w")
    with pytest.raises(NoteError, match="checkpoint"):
        sign_note(b"hello\n", [witness])


def test_an_ed25519_signature_verifies_with_cryptography_directly() -> None:
    signer = Ed25519Signer.generate("k")
    _, (signature,) = parse_note(sign_note(BODY, [signer]))
    Ed25519PublicKey.from_public_bytes(signer.public_key).verify(signature.signature, BODY)


def test_note_signature_lines_are_checked() -> None:
    with pytest.raises(NoteError, match="4 bytes"):
        NoteSignature("k", b"\x00", b"sig")
    with pytest.raises(NoteError, match="empty"):
        NoteSignature("k", b"\x00" * 4, b"")
