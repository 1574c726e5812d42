"""Small jobs for tests and benchmarks: text shards and a TOML job spec.

Every language of `pairs` reads `corpus/<lang>/*.txt` beside the spec, the layout
`write_shards` writes, so a caller states only the tables that matter to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_shards(folder: Path, shards: Sequence[Sequence[str]], name: str = "part-{}.txt") -> None:
    """One text file per shard, one sentence a line; `name` is formatted with the number."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, lines in enumerate(shards):
        text = "".join(line + "\n" for line in lines)
        (folder / name.format(number)).write_text(text, encoding="utf-8")


def toml_value(value: Any) -> str:
    """A TOML value for a string, number, bool, list or table of them.

    JSON writes strings, numbers, booleans and arrays as TOML reads them;
    tables become inline tables.
    """
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def write_spec(
    path: Path,
    pairs: Sequence[str],
    tables: Mapping[str, Mapping[str, Any]],
    extra: str = "",
) -> Path:
    """Write a job spec: `pairs`, a [languages.<lang>] table per language, `tables`,
    then `extra` (raw TOML, for what a test spells out itself)."""
    langs = dict.fromkeys(lang for pair in pairs for lang in pair.split("-"))
    lines = [f"pairs = {toml_value(list(pairs))}"]
    languages = {f"languages.{lang}": {"shards": [f"corpus/{lang}/*.txt"]} for lang in langs}
    for name, table in {**languages, **tables}.items():
        lines += ["", f"[{name}]", *(f"{key} = {toml_value(v)}" for key, v in table.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path
