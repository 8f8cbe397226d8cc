"""Reading instruction data (hub ids, local files, `save_to_disk` folders, or a list of them) into one clean table."""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets
import pandas as pd

from qlora_lit.assets import resolve_asset
from qlora_lit.errors import ConfigError, not_found_message

FIELDS = ("instruction", "input", "output")
REQUIRED_COLUMNS = ("instruction", "output")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAPPING_HINT = "map other names with data.columns, e.g. {instruction: question, output: answer}"


def load_sources(
    paths: str | Sequence[str], columns: Mapping[str, str] | None = None, encoding: str = "utf-8"
) -> pd.DataFrame:
    """All rows of all sources, concatenated, as instruction/input/output columns (other columns are dropped).

    Args:
        paths: one source or several (see `load_table`).
        columns: our field name -> the source's column name, e.g. {"instruction": "question", "output": "answer"}.
        encoding: text encoding of CSV and JSON files.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    return pd.concat(
        [select_columns(load_table(path, encoding), columns, repr(path)) for path in paths], ignore_index=True
    )


def load_table(path: str, encoding: str = "utf-8") -> pd.DataFrame:
    """Load every row of `path`: a local file (.jsonl, .json, .csv, .parquet), a folder, or a hub dataset id."""
    local = Path(resolve_asset(path)).expanduser()
    if local.is_dir():
        try:
            return _from_dataset(datasets.load_from_disk(str(local)))
        except FileNotFoundError as err:
            raise ConfigError(f"{str(local)!r} is a folder but not one written by datasets' save_to_disk") from err
    if local.suffix.lower() in FILE_SUFFIXES:  # data.JSONL as well as data.jsonl
        if not local.is_file():
            raise ConfigError(f"data file {str(local)!r} does not exist")
        table = read_file(local, encoding)
        if table.empty:
            raise ConfigError(f"data file {str(local)!r} has no rows")
        return table
    if local.exists() or path.startswith((".", "/", "~")):
        raise ConfigError(f"cannot read {path!r}: expected one of {list(FILE_SUFFIXES)}, a folder or a hub id")
    try:
        return _from_dataset(datasets.load_dataset(path))
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise ConfigError(not_found_message("dataset", path, err)) from err


def _from_dataset(dataset: datasets.Dataset | datasets.DatasetDict) -> pd.DataFrame:
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return dataset.to_pandas()


def read_file(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """One local file as a table; broken lines and wrong encodings are reported with the file and line."""
    if path.stat().st_size == 0:
        raise ConfigError(f"data file {str(path)!r} is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    text = read_text(path, encoding)
    if not text.strip():
        raise ConfigError(f"data file {str(path)!r} is empty (only blank space)")
    if suffix == ".csv":
        try:
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        except pd.errors.ParserError as err:
            raise ConfigError(f"data file {str(path)!r} is not valid CSV: {err}") from err
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": several top-level values, i.e. JSON lines in a .json file
                raise ConfigError(f"{str(path)!r}, line {err.lineno}: not valid JSON ({err.msg})") from err
        else:
            return _records([rows] if isinstance(rows, dict) else rows, path)
    return _records(_json_lines(text, path), path)


def read_text(path: Path, encoding: str) -> str:
    """The file's text; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = "utf-8-sig"
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(encoding_message(path, encoding, err)) from err


def encoding_message(path: Path, encoding: str, err: UnicodeDecodeError) -> str:
    try:
        path.read_bytes().decode("cp949")
        guess = " It reads as CP949 (EUC-KR), the encoding of Korean Excel exports."
    except UnicodeDecodeError:
        guess = ""
    return (
        f"data file {str(path)!r} is not {encoding.removesuffix('-sig')} text: byte {err.object[err.start]:#04x} at "
        f"offset {err.start} does not decode.{guess} Set the file's encoding with `data.encoding` (e.g. "
        f"--data.encoding cp949), or convert the file to UTF-8: iconv -f cp949 -t utf-8 {path.name} > utf8_{path.name}"
    )


def _json_lines(text: str, path: Path) -> list:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside strings
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{str(path)!r}, line {number}: not valid JSON ({err.msg}): {line[:80]!r}") from err
    return rows


def _records(rows: object, path: Path) -> pd.DataFrame:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"{str(path)!r}: expected JSON objects ({{...}}), as a list or one per line")
    return pd.DataFrame.from_records(rows)


def check_columns(columns: Mapping[str, str] | None) -> None:
    """Validate a `data.columns` mapping: keys are our field names, values the source's column names."""
    for field, name in (columns or {}).items():
        if field not in FIELDS:
            raise ConfigError(f"data.columns maps {field!r}, which is not one of {list(FIELDS)}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"data.columns.{field} must be a column name, got {name!r}")


def select_columns(table: pd.DataFrame, columns: Mapping[str, str] | None = None, source: str = "data") -> pd.DataFrame:
    """instruction/input/output as text, taken from the source's columns named by `columns`; other columns dropped.

    A missing `input` is blank; a missing `instruction` or `output` (or any column named in `columns`) is an error.
    """
    check_columns(columns)
    names = {field: field for field in FIELDS} | dict(columns or {})
    needed = [names[field] for field in FIELDS if field in REQUIRED_COLUMNS or field in (columns or {})]
    missing = [name for name in needed if name not in table.columns]
    if missing:
        raise ConfigError(f"{source} has no column {missing}; its columns are {list(table.columns)} ({MAPPING_HINT})")
    return pd.DataFrame({field: _as_text(table, names[field]) for field in FIELDS})


def clean_table(table: pd.DataFrame, columns: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep instruction/input/output as text, drop rows with an empty instruction or output, then exact duplicates.

    Returns the clean table and counts of what was dropped, so nothing disappears unreported.
    """
    text = select_columns(table, columns)
    non_empty = (text["instruction"].str.strip() != "") & (text["output"].str.strip() != "")
    kept = text[non_empty]
    deduplicated = kept.drop_duplicates(keep="first", ignore_index=True)
    stats = {
        "rows_read": len(table),
        "empty_dropped": int((~non_empty).sum()),
        "duplicates_dropped": len(kept) - len(deduplicated),
        "rows_kept": len(deduplicated),
    }
    if deduplicated.empty:
        raise ConfigError(
            f"no usable rows left after cleaning: of {len(table)} rows read, {stats['empty_dropped']} have an empty "
            f"instruction or output and {stats['duplicates_dropped']} are duplicates"
        )
    return deduplicated, stats


def _as_text(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table.columns:
        return pd.Series([""] * len(table), index=table.index, dtype=str)
    return table[column].fillna("").astype(str)


def source_fingerprint(path: str) -> list:
    """What identifies a source for caching: its name and, for local files and folders, their sizes and times."""
    local = Path(resolve_asset(path)).expanduser()
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    return [path] + [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]
