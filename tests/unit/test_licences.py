"""Every package installed for the pipeline carries a licence on the project's list."""

from __future__ import annotations

from pipeline.ops.licences import ALLOWED, VENDORED, Licence, dependency_licences, vendored_licences

FIRST_PARTY = {"dashboard"}
"""Folders of the API's static files that are the project's own (the live dashboard)."""


def test_every_dependency_has_an_allowed_licence() -> None:
    found = dependency_licences()
    names = {entry.name for entry in found}
    assert {"event-pipeline", "ultralytics-opencv-headless", "psycopg", "ray"} <= names
    assert {"npm:swagger-ui-dist", "npm:redoc"} <= names  # served by the API's /docs, /redoc
    refused = [entry for entry in found if not entry.identifiers() <= ALLOWED]
    assert refused == [], "licences not on the project's list (pipeline/ops/licences.py)"


def test_expressions_are_read_into_their_licences() -> None:
    torch = Licence("torch", "2", "Apache-2.0 AND Apache-2.0 WITH LLVM-exception AND MIT")
    assert torch.identifiers() == {"Apache-2.0", "Apache-2.0 WITH LLVM-exception", "MIT"}
    assert Licence("orjson", "3", "MPL-2.0 AND (Apache-2.0 OR MIT)").identifiers() <= ALLOWED
    assert not Licence("x", "1", "unknown: Commercial").identifiers() <= ALLOWED
    assert not Licence("y", "1", "GPL-2.0-only").identifiers() <= ALLOWED


def test_each_vendored_package_carries_its_licence_text() -> None:
    found = vendored_licences()
    assert {entry.name for entry in found} == {"npm:swagger-ui-dist", "npm:redoc"}
    assert all(entry.identifiers() <= ALLOWED for entry in found)
    for folder in VENDORED.iterdir():
        if folder.is_dir() and folder.name not in FIRST_PARTY:
            assert (folder / "LICENSE").read_text().strip(), folder
