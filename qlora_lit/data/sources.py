"""Reading instruction data (hub id, local file or `save_to_disk` folder) into a clean pandas table."""

from __future__ import annotations

from pathlib import Path

import datasets
import pandas as pd

from qlora_lit.assets import resolve_asset
from qlora_lit.errors import ConfigError, not_found_message

REQUIRED_COLUMNS = ("instruction", "output")
FILE_READERS = {
    ".jsonl": lambda path: pd.read_json(path, lines=True, dtype=False),
    ".json": lambda path: pd.read_json(path, dtype=False),
    ".csv": lambda path: pd.read_csv(path, dtype=str, keep_default_na=False),
    ".parquet": pd.read_parquet,
}


def load_table(path: str) -> pd.DataFrame:
    """Load every row of `path`: a local file (.jsonl, .json, .csv, .parquet), a folder, or a hub dataset id."""
    local = Path(resolve_asset(path)).expanduser()
    if local.is_dir():
        try:
            return _from_dataset(datasets.load_from_disk(str(local)))
        except FileNotFoundError as err:
            raise ConfigError(f"{str(local)!r} is a folder but not one written by datasets' save_to_disk") from err
    if local.suffix in FILE_READERS:
        if not local.is_file():
            raise ConfigError(f"data file {str(local)!r} does not exist")
        return FILE_READERS[local.suffix](local)
    if local.exists() or path.startswith((".", "/", "~")):
        raise ConfigError(f"cannot read {path!r}: expected one of {sorted(FILE_READERS)}, a folder or a hub id")
    try:
        return _from_dataset(datasets.load_dataset(path))
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise ConfigError(not_found_message("dataset", path, err)) from err


def _from_dataset(dataset: datasets.Dataset | datasets.DatasetDict) -> pd.DataFrame:
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    return dataset.to_pandas()


def clean_table(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """Keep instruction/input/output as text, drop rows with an empty instruction or output, then exact duplicates.

    Returns the clean table and counts of what was dropped, so nothing disappears unreported.
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ConfigError(f"data has no column {missing}; its columns are {list(table.columns)}")
    text = pd.DataFrame({column: _as_text(table, column) for column in ("instruction", "input", "output")})
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
        raise ConfigError(f"no usable rows: {stats}")
    return deduplicated, stats


def _as_text(table: pd.DataFrame, column: str) -> pd.Series:
    if column not in table.columns:
        return pd.Series([""] * len(table), index=table.index, dtype=str)
    return table[column].fillna("").astype(str)
