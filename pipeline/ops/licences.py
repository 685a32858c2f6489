"""`pipeline licences`: the licence of every package the pipeline installs (its own included).

The dependency closure of `event-pipeline` as installed (its `detection` extra where it is
installed, other extras left out),
each with the licence its metadata declares, read as SPDX identifiers where it gives
them (`License-Expression`), else from its classifiers or `License` field, and the npm
packages whose files the API serves (`pipeline/api/static/`, `npm:<name>`). Images ship
this report (`/opt/pipeline/licences.json`); a test fails when a dependency's licence is
not one of `ALLOWED`.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import Requirement

__all__ = [
    "ALLOWED",
    "RUNTIME_EXTRAS",
    "VENDORED",
    "Licence",
    "dependency_licences",
    "vendored_licences",
]

RUNTIME_EXTRAS = ("detection",)
"""Extras of the root package whose packages are listed where they are installed: an
image built with one ships them (the inference image, deploy/Dockerfile.gpu)."""

VENDORED = Path(__file__).parents[1] / "api" / "static"
"""Files of npm packages the API serves, a folder per package with its `package.json`."""

ALLOWED = frozenset(
    {
        "0BSD",
        "AGPL-3.0-only",  # Ultralytics: it governs any image or distribution that ships it
        "AGPL-3.0-or-later",
        "Apache-2.0",
        "Apache-2.0 WITH LLVM-exception",
        "BSD-2-Clause",
        "BSD-3-Clause",
        "BSL-1.0",
        "CC0-1.0",
        "LGPL-3.0-only",  # psycopg, used as a library
        "LicenseRef-NVIDIA-Proprietary",  # CUDA libraries of the GPU build of PyTorch
        "MIT",
        "MIT-0",
        "MIT-CMU",
        "MPL-2.0",
        "PSF-2.0",
        "Unlicense",
        "Zlib",
    }
)
"""Licences the project accepts in its dependencies (SPDX identifiers)."""

# What metadata says instead of an SPDX identifier, and the identifier it means.
_NAMES = {
    "apache software license": "Apache-2.0",
    "apache 2.0": "Apache-2.0",
    "apache-2.0": "Apache-2.0",
    "bsd license": "BSD-3-Clause",
    "bsd": "BSD-3-Clause",
    "3-clause bsd license": "BSD-3-Clause",
    "bsd-3-clause": "BSD-3-Clause",
    "mit license": "MIT",
    "mit": "MIT",
    "mozilla public license 2.0 (mpl 2.0)": "MPL-2.0",
    "python software foundation license": "PSF-2.0",
    "gnu affero general public license v3 or later (agplv3+)": "AGPL-3.0-or-later",
    "gnu affero general public license v3": "AGPL-3.0-only",
    "nvidia proprietary software": "LicenseRef-NVIDIA-Proprietary",
    "other/proprietary license": "LicenseRef-NVIDIA-Proprietary",
}


_UNDECLARED = {
    # A meta-package of NVIDIA's CUDA libraries (their EULA), declaring no licence itself.
    "cuda-toolkit": "LicenseRef-NVIDIA-Proprietary",
}


@dataclass(frozen=True)
class Licence:
    """One installed package and its licence."""

    name: str
    version: str
    licence: str
    """SPDX expression (`AND`/`OR`/`WITH` of identifiers), or `unknown: <what it says>`."""

    def identifiers(self) -> set[str]:
        """The licences the expression names (`WITH` exceptions kept with theirs)."""
        cleaned = self.licence.replace("(", " ").replace(")", " ")
        parts = re.split(r"\s+(?:AND|OR)\s+", cleaned.strip())
        return {" ".join(part.split()) for part in parts if part.strip()}

    def as_json(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return asdict(self)


def _licence(dist: metadata.Distribution) -> str:
    meta = dist.metadata
    expression = meta["License-Expression"]
    if expression:
        return str(expression)
    classifiers = [
        c.split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::") and c.split("::")[-1].strip() != "OSI Approved"
    ]
    field = str(meta["License"] or "").strip()
    said = classifiers or ([field.splitlines()[0]] if field else [])
    known = [_NAMES.get(s.lower()) for s in said]
    if said and all(known):
        return " AND ".join(sorted({k for k in known if k}))
    if not said and dist.metadata["Name"].lower() in _UNDECLARED:
        return _UNDECLARED[dist.metadata["Name"].lower()]
    return f"unknown: {'; '.join(said) or 'nothing declared'}"


def dependency_licences(root: str = "event-pipeline") -> list[Licence]:
    """The licence of `root` and of every package it needs, as installed, by name."""
    found: dict[str, metadata.Distribution] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a dependency of another platform or Python
        found[key] = dist
        extras = ["", *RUNTIME_EXTRAS] if name == root else [""]
        for line in dist.requires or []:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(requirement.name)  # an extra's package not installed is skipped
    listed = [Licence(key, found[key].version, _licence(found[key])) for key in sorted(found)]
    return listed + (vendored_licences() if "event-pipeline" in found else [])


def vendored_licences(directory: Path = VENDORED) -> list[Licence]:
    """The npm packages vendored under `directory` (`npm:<name>`), as their `package.json`
    declares them."""
    found = []
    for manifest in sorted(directory.glob("*/package.json")):
        package = json.loads(manifest.read_text())
        licence = package.get("license") or "unknown: nothing declared"
        found.append(Licence(f"npm:{package['name']}", package["version"], licence))
    return found
