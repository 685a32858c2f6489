"""Reading the sites file: YAML to `SitesFile`, every problem named by file, line and field.

The YAML is composed into nodes first (PyYAML keeps each node's line), then constructed
and validated with pydantic. Each validation error's location is walked down the nodes
to the deepest key that exists, so a problem reads
`sites.yaml:14: sites.hq.zones.lobby.criticality: must be one of low, medium, high, critical`
(a missing field is reported at the line of the mapping that lacks it). Duplicate keys,
which YAML loaders otherwise resolve silently to the last, are refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from pipeline.errors import ConfigError

from .sites import SiteMap, SitesFile

__all__ = ["EXAMPLE_SITES", "Problem", "SitesFileError", "load_sites", "parse_sites"]

EXAMPLE_SITES = Path(__file__).with_name("sites.example.yaml")
"""The demo's sites file, whose rules the simulator's traffic triggers now and then."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the sites file: where (file, line, field) and what."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class SitesFileError(ConfigError):
    """The sites file cannot be used; `problems` lists each thing wrong, in file order."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: (p.line, p.field)))
        super().__init__("PIPELINE_SITES_FILE", "\n".join(str(p) for p in self.problems))

    def __str__(self) -> str:
        return self.problem


def load_sites(path: str | Path) -> SiteMap:
    """Read and validate the sites file at `path`; `SitesFileError` says what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SitesFileError([Problem(str(path), 0, "", f"cannot read: {exc}")]) from exc
    return parse_sites(text, str(path))


def parse_sites(text: str, file: str = "<sites>") -> SiteMap:
    """Validate sites-file `text`; `file` is the name problems are reported under."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise SitesFileError([Problem(file, line, "", f"not valid YAML: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise SitesFileError([Problem(file, 0, "", f"not valid YAML: {exc}")]) from exc
    if root is None:
        raise SitesFileError([Problem(file, 1, "", "the file is empty")])
    problems = [Problem(file, line, field, msg) for line, field, msg in _duplicate_keys(root)]
    if problems:
        raise SitesFileError(problems)
    data = yaml.SafeLoader(text).construct_document(root)
    try:
        model = SitesFile.model_validate(data)
    except ValidationError as exc:
        raise SitesFileError([_problem(file, root, e) for e in exc.errors()]) from None
    problems = []
    for loc, message in model.references():
        field, line = _locate(root, loc)
        problems.append(Problem(file, line, field, message))
    if problems:
        raise SitesFileError(problems)
    return SiteMap(model)


def _duplicate_keys(node: yaml.Node, path: str = "") -> list[tuple[int, str, str]]:
    found: list[tuple[int, str, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            here = _join(path, name)
            if name in seen:
                found.append((key.start_mark.line + 1, here, "duplicate key"))
            seen.add(name)
            found += _duplicate_keys(value, here)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, _join(path, i))
    return found


def _join(path: str, part: str | int) -> str:
    if isinstance(part, int):
        return f"{path}[{part}]"
    return f"{path}.{part}" if path else part


def _locate(root: yaml.Node, loc: Sequence[str | int]) -> tuple[str, int]:
    """The dotted field of `loc` and the line of the deepest node of it that exists.

    Parts of a pydantic location that are not in the file (`[key]`) are
    skipped; parts below a missing key are named but keep the line of the last found.
    """
    node: yaml.Node | None = root
    line = root.start_mark.line + 1
    path = ""
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    node, line = value, key.start_mark.line + 1
                    break
            else:
                if part.startswith("["):
                    continue
                node = None
            path = _join(path, part)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            path = _join(path, part)
        elif node is None and not (isinstance(part, str) and part.startswith("[")):
            path = _join(path, part)
    return path, line


_TAGS = ("correlate", "single", "count")
"""Rule types (the `type` of a rule)."""

_BOUNDS = {
    "greater_than": "must be more than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "too_short": "must have at least {min_length} entries",
    "too_long": "must have at most {max_length} entries",
}
_QUOTED = re.compile(r"'([^']*)'")


def _problem(file: str, root: yaml.Node, error: ErrorDetails) -> Problem:
    loc = list(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if loc[:1] == ["rules"] and len(loc) > 2 and loc[2] in _TAGS:
        del loc[2]  # the rule's type, which pydantic names in the location of its errors
    if kind == "union_tag_invalid":
        loc.append("type")
        message = f"must be one of {', '.join(_QUOTED.findall(str(ctx.get('expected_tags'))))}"
    elif kind == "union_tag_not_found":
        loc.append("type")
        message = f"required (one of {', '.join(_TAGS)})"
    elif kind == "missing":
        message = "required"
    elif kind == "extra_forbidden":
        message = "unknown field"
    elif kind in ("enum", "literal_error"):
        expected = str(ctx.get("expected", ""))
        message = f"must be one of {', '.join(_QUOTED.findall(expected)) or expected}"
    elif kind == "too_short" and ctx.get("min_length") == 1:
        message = "must not be empty"
    elif kind in _BOUNDS:
        message = _BOUNDS[kind].format(**ctx)
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    elif kind == "string_pattern_mismatch" and str(ctx.get("pattern", "")).startswith("^[A-Za-z"):
        message = "a name of letters, digits, '.', '_' and '-', starting with a letter or digit"
        if "/" in str(ctx.get("pattern")):
            message = "a zone as site/zone"
    else:
        message = error["msg"][:1].lower() + error["msg"][1:]
    field, line = _locate(root, loc)
    return Problem(file, line, field, message)
