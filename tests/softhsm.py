"""Throw-away SoftHSM2 tokens for tests.

SoftHSM reads the file named by SOFTHSM2_CONF (which names its token directory) at
C_Initialize, and python-pkcs11 loads a module once per process. So a test process uses
one token directory, made by `softhsm()`, holding as many tokens as its tests make with
`SoftHsm.token()`; SOFTHSM2_CONF points at it while the context lasts. SoftHSM lists the
tokens it found at C_Initialize: `pipeline.audit.keys` re-initialises the module when a
token label is not found, so tokens made after the module was loaded are found too.

Without SoftHSM (the module or `softhsm2-util` missing) the tests that use it are
skipped, unless PIPELINE_TESTS_REQUIRE_SOFTHSM is set (CI sets it): then they fail.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
REQUIRE = "PIPELINE_TESTS_REQUIRE_SOFTHSM"


def require_softhsm() -> str:
    """The path of `softhsm2-util`; skips the test (fails it under REQUIRE) without SoftHSM."""
    util = shutil.which("softhsm2-util")
    missing = [
        what
        for what, there in ((MODULE, os.path.exists(MODULE)), ("softhsm2-util", util))
        if not there
    ]
    if missing or util is None:
        reason = f"SoftHSM2 is not installed ({', '.join(missing)} missing: apt install softhsm2)"
        if os.environ.get(REQUIRE):
            pytest.fail(f"{reason}, and {REQUIRE} is set")
        pytest.skip(reason)
    return util


@dataclass(frozen=True)
class Token:
    """One initialised token: its label, PINs and the directory SoftHSM keeps it in."""

    module: str
    label: str
    pin: str
    so_pin: str
    directory: Path


class SoftHsm:
    """A SoftHSM2 token directory and its configuration file, for one test process."""

    def __init__(self, root: Path, util: str) -> None:
        self.root = root
        self.util = util
        self.tokens = root / "tokens"
        self.tokens.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )

    def token(self, label: str | None = None) -> Token:
        """A new, initialised token with a fresh label and PINs."""
        label = label or f"test-{secrets.token_hex(4)}"
        pin, so_pin = secrets.token_hex(6), secrets.token_hex(6)
        before = set(self.tokens.iterdir())
        command = [self.util, "--init-token", "--free", "--label", label]
        subprocess.run(
            [*command, "--pin", pin, "--so-pin", so_pin],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            timeout=30,
        )
        (directory,) = set(self.tokens.iterdir()) - before
        return Token(MODULE, label, pin, so_pin, directory)

    @contextmanager
    def unplugged(self, token: Token) -> Iterator[None]:
        """The token's directory moved out of SoftHSM's sight, and back at the end.

        In-process SoftHSM then fails every call on the token (its objects are gone from
        the file store: sessions get CKR_OBJECT_HANDLE_INVALID, new ones
        CKR_GENERAL_ERROR) and keeps failing after the directory is back, until the
        module is re-initialised: what a client sees of an HSM that went away and came
        back (rebooted, unplugged, its network link down).
        """
        away = self.root / f"away-{token.directory.name}"
        token.directory.rename(away)
        try:
            yield
        finally:
            away.rename(token.directory)


@contextmanager
def softhsm(root: Path) -> Iterator[SoftHsm]:
    """A SoftHSM2 token directory under `root`, SOFTHSM2_CONF set for this process."""
    util = require_softhsm()
    hsm = SoftHsm(root, util)
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    try:
        yield hsm
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous
