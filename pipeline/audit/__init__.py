"""The audit trail: a Merkle log over every stored event, signed checkpoints, proofs.

- `merkle`: RFC 9162 hashing, the right edge of a growing tree, proofs and their checks.
- `note`: C2SP signed notes, tlog checkpoints and cosignatures.
- `keys`: the signing keys (Ed25519 in an HSM through PKCS#11, ML-DSA-65 in a file).
- `log`: the follower that appends a leaf per stored event and makes checkpoints.
- `verify`: recomputing the log from the events themselves, live or from an export.
"""
