"""Reading training data (hub ids, local files, `save_to_disk` folders, or a list of them) into clean conversations:
each source's rows read as a table, turned into conversations (data/conversations.py: `messages`, ShareGPT
`conversations` or KoAlpaca rows), then empty rows, bad rows and duplicates dropped and counted."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import datasets
import pandas as pd
from lightning.pytorch.utilities import rank_zero_warn

from qlora_lit.assets import resolve_asset
from qlora_lit.data.conversations import (
    BadRow,
    Conversation,
    assistant_turns,
    conversation_column,
    parse_messages,
    row_labels,
    row_messages,
    with_system,
)
from qlora_lit.data.json_text import DuplicateKey, parse_json
from qlora_lit.errors import ConfigError, not_found_message

FIELDS = ("instruction", "input", "output", "system")
"""The columns of KoAlpaca-shaped rows (`system`: a row's own system prompt, optional)."""
REQUIRED_COLUMNS = ("instruction", "output")
CONVERSATION_FIELDS = ("messages", "role", "content")
"""What `data.columns` may name for conversation rows: their column, and the role and text keys of each message."""
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAPPING_HINT = (
    "rows need `messages` (role/content), ShareGPT `conversations` (from/value) or instruction/output columns; map "
    "other names with data.columns, e.g. {instruction: question, output: answer} or {messages: dialog}"
)
BAD_ROW_EXAMPLES = 5  # bad rows quoted in data_stats.json when they are skipped


def load_conversations(
    paths: str | Sequence[str],
    columns: Mapping[str, str] | None = None,
    encoding: str = "utf-8",
    system_prompt: str | None = None,
    bad_rows: str = "error",
) -> tuple[list[Conversation], list[int], dict]:
    """Every usable conversation of every source, duplicates dropped across sources (the first stays), the number
    of the source each came from, and counts of what was read and dropped, so nothing disappears unreported.

    Args:
        paths: one source or several (see `load_table`).
        columns: our names -> the source's, e.g. {"instruction": "question", "output": "answer"} or
            {"messages": "dialog", "role": "speaker", "content": "text"}.
        encoding: text encoding of CSV and JSON files.
        system_prompt: the system prompt of rows that have none.
        bad_rows: "error": a bad row stops with a message naming its file, line and problem; "skip": it is counted.
    """
    paths = [paths] if isinstance(paths, str) else list(paths)
    stats = {"rows_read": 0, "empty_dropped": 0, "bad_rows_skipped": 0, "duplicates_dropped": 0}
    bad_examples: list[str] = []
    kept: dict[Conversation, int] = {}  # insertion-ordered: the first occurrence of each conversation stays
    for number, path in enumerate(paths):
        table = load_table(path, encoding)
        stats["rows_read"] += len(table)
        rows = table_conversations(table, columns, repr(path), skip_bad=bad_rows == "skip")
        for label, row in zip(row_labels(table), rows, strict=True):
            if isinstance(row, BadRow):
                if bad_rows == "error":
                    raise ConfigError(
                        f"{path!r}, {label}: {row}. Fix the row, or set data.bad_rows: skip to leave such rows out "
                        "(they are counted in data_stats.json)"
                    )
                stats["bad_rows_skipped"] += 1
                bad_examples += [f"{path}, {label}: {row}"][: BAD_ROW_EXAMPLES - len(bad_examples)]
            elif not row:
                stats["empty_dropped"] += 1
            elif (conversation := with_system(row, system_prompt)) in kept:
                stats["duplicates_dropped"] += 1
            else:
                kept[conversation] = number
    return list(kept), list(kept.values()), finish_stats(stats, list(kept), bad_examples)


def finish_stats(stats: dict, conversations: list[Conversation], bad_examples: list[str]) -> dict:
    if bad_examples:
        rank_zero_warn(f"skipped {stats['bad_rows_skipped']} bad rows (data.bad_rows: skip), e.g. {bad_examples[0]}")
        stats["bad_row_examples"] = bad_examples
    turns = [assistant_turns(conversation) for conversation in conversations]
    stats.update(rows_kept=len(conversations), turns=sum(turns), multi_turn_rows=sum(count > 1 for count in turns))
    if not conversations:
        raise ConfigError(
            f"no usable rows left after cleaning: of {stats['rows_read']} rows read, {stats['empty_dropped']} are "
            f"empty (no instruction, output or messages), {stats['bad_rows_skipped']} are bad rows skipped and "
            f"{stats['duplicates_dropped']} are duplicates"
        )
    return stats


def table_conversations(
    table: pd.DataFrame, columns: Mapping[str, str] | None = None, source: str = "data", skip_bad: bool = False
) -> list[Conversation | BadRow]:
    """Each row of one source as a conversation (empty: an empty row), or the BadRow saying why it is none.
    `skip_bad`: a field that is not text (a list, true/false) makes its row a BadRow too, instead of stopping here."""
    check_columns(columns)
    column = conversation_column(list(table.columns), columns)
    if column is None:
        text = select_columns(table, columns, source, skip_bad)
        rows = text[list(FIELDS)].itertuples(index=False, name=None)
        return [_koalpaca_row(row) for row in rows]
    system_column = (columns or {}).get("system")
    for name in (column, system_column):  # a mapped system column must be there, as for KoAlpaca rows
        if name is not None and name not in table.columns:
            raise ConfigError(
                f"{source} has no column {name!r}; its columns are {list(table.columns)} ({MAPPING_HINT})"
            )
    keys = (columns["role"], columns["content"]) if columns and "role" in columns else None
    system = _as_text(table, system_column or "system", source, skip_bad)
    return [
        own_system if isinstance(own_system, BadRow) else _parsed(value, keys, own_system)
        for value, own_system in zip(table[column].tolist(), system, strict=True)
    ]


def _koalpaca_row(fields: tuple) -> Conversation | BadRow:
    """instruction, input, output, system as a conversation; empty without an instruction or an output."""
    bad = next((field for field in fields if isinstance(field, BadRow)), None)
    if bad is not None:
        return bad
    return row_messages(*fields) if fields[0].strip() and fields[2].strip() else ()


def _parsed(value: object, keys: tuple[str, str] | None, system: str) -> Conversation | BadRow:
    try:
        return with_system(parse_messages(value, keys), system)
    except BadRow as bad:
        return bad


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
    # Arrow types kept: numpy's would turn integers in a column with a null into floats ("4" read as "4.0").
    return numbered(dataset.with_format("arrow")[:].to_pandas(types_mapper=pd.ArrowDtype), "row")


def numbered(table: pd.DataFrame, unit: str, numbers: Sequence[int] | None = None) -> pd.DataFrame:
    """The table with each row labelled by its place in the source (line, item or row, from 1), for messages."""
    table.index = pd.Index(range(1, len(table) + 1) if numbers is None else numbers, name=unit)
    return table


def read_file(path: Path, encoding: str = "utf-8") -> pd.DataFrame:
    """One local file as a table; broken lines and wrong encodings are reported with the file and line."""
    if path.stat().st_size == 0:
        raise ConfigError(f"data file {str(path)!r} is empty")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return numbered(pd.read_parquet(path, dtype_backend="pyarrow"), "row")  # Arrow types, as _from_dataset
    text = read_text(path, encoding)
    if not text.strip():
        raise ConfigError(f"data file {str(path)!r} is empty (only blank space)")
    if suffix == ".csv":
        return read_csv(path, text)
    if suffix == ".json":
        try:
            rows = parse_json(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": several top-level values, i.e. JSON lines in a .json file
                raise ConfigError(f"{str(path)!r}, line {err.lineno}: not valid JSON ({err.msg})") from err
        except DuplicateKey as err:
            raise ConfigError(f"{str(path)!r}: {err}") from err
        else:
            if isinstance(rows, dict):
                check_not_by_columns(rows, path)
                rows = [rows]
            check_items_are_objects(rows, path, text)
            return numbered(_records(rows, path), "item")
    elif text.lstrip().startswith("["):
        check_not_a_json_array(text, path)
    lines, rows = _json_lines(text, path)
    return numbered(_records(rows, path), "line", lines)


def read_text(path: Path, encoding: str) -> str:
    """The file's text. By default UTF-8, and a byte-order mark says otherwise: UTF-8's (Excel's "CSV UTF-8") is
    dropped, UTF-16's and UTF-32's (Windows' "Unicode text") choose that encoding."""
    if codecs.lookup(encoding).name == "utf-8":
        encoding = bom_encoding(path) or "utf-8-sig"
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise ConfigError(encoding_message(path, encoding, err)) from err
    if "\0" in text:  # ASCII in UTF-16 without a byte-order mark decodes as UTF-8, with a NUL after each letter
        raise ConfigError(f"data file {str(path)!r} is not {encoding.removesuffix('-sig')} text: {utf16_advice(path)}")
    return text


# UTF-32 LE's mark begins with UTF-16 LE's: the longer marks are tried first.
BYTE_ORDER_MARKS = {
    codecs.BOM_UTF32_LE: "utf-32",
    codecs.BOM_UTF32_BE: "utf-32",
    codecs.BOM_UTF16_LE: "utf-16",
    codecs.BOM_UTF16_BE: "utf-16",
}


def bom_encoding(path: Path) -> str | None:
    with open(path, "rb") as file:
        start = file.read(4)
    return next((encoding for bom, encoding in BYTE_ORDER_MARKS.items() if start.startswith(bom)), None)


def encoding_message(path: Path, encoding: str, err: UnicodeDecodeError) -> str:
    raw = path.read_bytes()
    problem = f"data file {str(path)!r} is not {encoding.removesuffix('-sig')} text"
    if b"\0" in raw:
        return f"{problem}: {utf16_advice(path)}"
    try:
        raw.decode("cp949")
        guess = " It reads as CP949 (EUC-KR), the encoding of Korean Excel exports."
    except UnicodeDecodeError:
        guess = ""
    return (
        f"{problem}: byte {err.object[err.start]:#04x} at offset {err.start} does not decode.{guess} Set the file's "
        f"encoding with `data.encoding` (e.g. --data.encoding cp949), or convert the file to UTF-8: "
        f"iconv -f cp949 -t utf-8 {path.name} > utf8_{path.name}"
    )


def utf16_advice(path: Path) -> str:
    """For a file with NUL bytes: text files have none, except UTF-16 ones (ASCII letters take two bytes)."""
    raw = path.read_bytes()
    order = "le" if raw[1::2].count(0) >= raw[0::2].count(0) else "be"
    return (
        f"it has NUL bytes, as UTF-16 text without a byte-order mark has (it reads as UTF-16-{order.upper()}). "
        f"Set --data.encoding utf-16-{order}, or convert the file to UTF-8: "
        f"iconv -f utf-16{order} -t utf-8 {path.name} > utf8_{path.name}"
    )


def read_csv(path: Path, text: str) -> pd.DataFrame:
    """Every value as text. Tabs, semicolons or bars as the separator (European Excel writes `;`) are found from the
    header; two columns of one name are refused (pandas would rename the second `name.1`, and it would be ignored)."""
    header = text.split("\n", 1)[0]
    try:
        delimiter = csv.Sniffer().sniff(header, delimiters=",\t;|").delimiter
    except csv.Error:  # one column, or no separator it knows
        delimiter = ","
    names = next(csv.reader(io.StringIO(text), delimiter=delimiter))
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(
            f"data file {str(path)!r} has more than one column named {twice} (its columns: {names}): "
            "only one could be read. Rename the others"
        )
    check_field_counts(path, text, delimiter, names)
    try:
        with warnings.catch_warnings():  # a trailing empty field, checked above, is all that index_col=False drops
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            # index_col=False: pandas would otherwise take the first column of rows one field longer than the header
            # as an index, shifting every value one column left.
            table = pd.read_csv(io.StringIO(text), sep=delimiter, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserError as err:
        raise ConfigError(f"data file {str(path)!r} is not valid CSV ({delimiter!r}-separated): {err}") from err
    return numbered(table, "row")


def check_field_counts(path: Path, text: str, delimiter: str, names: list[str]) -> None:
    """Every row has as many fields as the header (one more, empty, is a trailing delimiter): pandas would fill a
    short row with blanks and drop or shift the values of a long one, without a word."""
    records = csv.reader(io.StringIO(text), delimiter=delimiter)
    next(records)  # the header
    rows = (fields for fields in records if len(fields) > 1 or (fields and fields[0].strip()))  # pandas skips blanks
    wrong = [
        (number, records.line_num, len(fields))
        for number, fields in enumerate(rows, start=1)
        if len(fields) != len(names) and not (len(fields) == len(names) + 1 and fields[-1] == "")
    ]
    if wrong:
        number, line, count = wrong[0]
        more = f" ({len(wrong) - 1} more rows like it)" if len(wrong) > 1 else ""
        raise ConfigError(
            f"data file {str(path)!r}, row {number} (line {line}) has {count} fields but the header has "
            f"{len(names)} ({names}){more}: its values cannot be matched to the columns. Quote values that contain "
            f'the separator {delimiter!r} ("a{delimiter} b"), or give the row as many fields as the header'
        )


def check_not_by_columns(value: dict, path: Path) -> None:
    """One object of columns ({"instruction": {"0": ..., "1": ...}, ...}, pandas' to_json default) is no row."""
    if value and all(isinstance(column, (dict, list)) for column in value.values()):
        raise ConfigError(
            f"{str(path)!r} holds one JSON object whose values are all objects or lists (keys {list(value)[:5]}): "
            "a table by columns, as pandas' DataFrame.to_json() writes by default, not rows. Write it as rows: "
            "df.to_json(path, orient='records', force_ascii=False), or lines=True to a .jsonl file"
        )


def check_not_a_json_array(text: str, path: Path) -> None:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        return  # not one array: each line is read (and reported) on its own
    if isinstance(rows, list):
        raise ConfigError(
            f"{str(path)!r} is one JSON array, not JSON lines (one object per line, which .jsonl files hold): "
            f"rename it to {path.with_suffix('.json').name}"
        )


def _json_lines(text: str, path: Path) -> tuple[list[int], list]:
    """The rows of a JSON-lines text, with the line number of each."""
    lines, rows = [], []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside strings
        if line.strip():
            try:
                rows.append(parse_json(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{str(path)!r}, line {number}: not valid JSON ({err.msg}): {line[:80]!r}") from err
            except DuplicateKey as err:
                raise ConfigError(f"{str(path)!r}, line {number}: {err}") from err
            if not isinstance(rows[-1], dict):
                raise ConfigError(
                    f"{str(path)!r}, line {number}: not a JSON object ({{...}}), which each line must be: {line[:80]!r}"
                )
            lines.append(number)
    return lines, rows


def check_items_are_objects(rows: object, path: Path, text: str) -> None:
    """Each item of a JSON list is an object (a row); the first that is not is named, as the file writes it."""
    if not isinstance(rows, list):
        return  # one value that is no object or list: _records says so
    bad = [number for number, row in enumerate(rows, start=1) if not isinstance(row, dict)]
    if bad:
        value = json.loads(text)[bad[0] - 1]  # as written: parse_json keeps numbers as text
        more = f" ({len(bad) - 1} more items like it)" if len(bad) > 1 else ""
        raise ConfigError(
            f"{str(path)!r}, item {bad[0]}: {describe(value)} is not an object{more}; expected JSON objects ({{...}}), "
            "as a list or one per line"
        )


def _records(rows: object, path: Path) -> pd.DataFrame:
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"{str(path)!r}: expected JSON objects ({{...}}), as a list or one per line")
    return pd.DataFrame(
        rows, dtype=object
    )  # values as parsed: pandas would make numbers of a column with a null floats


def check_columns(columns: Mapping[str, str] | None) -> None:
    """Validate a `data.columns` mapping: keys are our field names, values the source's column (or key) names."""
    known = [*FIELDS, *CONVERSATION_FIELDS]
    for field, name in (columns or {}).items():
        if field not in known:
            raise ConfigError(f"data.columns maps {field!r}, which is not one of {known}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"data.columns.{field} must be a column name, got {name!r}")
    given = set(columns or {})
    if ("role" in given) != ("content" in given):
        raise ConfigError("data.columns names the messages' keys in pairs: give both role and content")
    if "messages" in given and given & {"instruction", "input", "output"}:
        raise ConfigError(
            "data.columns maps both a conversation column (messages) and instruction/input/output columns: a "
            "source's rows are one or the other"
        )


def select_columns(
    table: pd.DataFrame, columns: Mapping[str, str] | None = None, source: str = "data", skip_bad: bool = False
) -> pd.DataFrame:
    """instruction/input/output/system as text, taken from the source's columns named by `columns`; other columns
    dropped.

    A missing `input` or `system` is blank; a missing `instruction` or `output` (or any column named in `columns`) is
    an error.
    """
    check_columns(columns)
    names = {field: field for field in FIELDS} | dict(columns or {})
    needed = [names[field] for field in FIELDS if field in REQUIRED_COLUMNS or field in (columns or {})]
    missing = [name for name in needed if name not in table.columns]
    if missing:
        raise ConfigError(f"{source} has no column {missing}; its columns are {list(table.columns)} ({MAPPING_HINT})")
    return pd.DataFrame({field: _as_text(table, names[field], source, skip_bad) for field in FIELDS})


def _as_text(table: pd.DataFrame, column: str, source: str = "data", skip_bad: bool = False) -> pd.Series:
    """A column as text: strings as they are, numbers as written, missing values blank. Anything else (a list, an
    object, true/false, an infinite number) would become Python's rendering of it ("['a', 'b']", "True"), which no
    one meant as training text: refused, naming where; with `skip_bad`, a BadRow in its place (data.bad_rows: skip)."""
    if column not in table.columns:
        return pd.Series([""] * len(table), index=table.index, dtype=str)
    values = table[column].tolist()
    texts = [as_text(value) for value in values]
    bad = [position for position, text in enumerate(texts) if text is None]
    if bad and skip_bad:
        for position in bad:
            texts[position] = BadRow(f"{column!r} is {describe(values[position])}, not text")
    elif bad:
        first = bad[0]
        unit = table.index.name or "row"
        more = f" ({len(bad) - 1} more rows like it)" if len(bad) > 1 else ""
        raise ConfigError(
            f"{source}, {unit} {table.index[first]}: {column!r} is {describe(values[first])}, not text{more}. "
            "Text fields must be strings (numbers are taken as written): make it a string in the file, or map "
            "another column with data.columns"
        )
    return pd.Series(texts, index=table.index, dtype=object)


def as_text(value: object) -> str | None:
    """The training text of one value, or None when it has none."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, (numbers.Real, Decimal)) and math.isfinite(value):
        return str(value)  # a float column's value as Python (or Arrow's Decimal) writes it: 4.5, 1e+20
    return None


def describe(value: object) -> str:
    """A value as the file has it: JSON for what JSON reads (a list, an object, true, Infinity)."""
    shown = json.dumps(value, ensure_ascii=False, default=str)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    kind = {list: "a list ", dict: "an object ", bool: ""}.get(type(value), f"{type(value).__name__} ")
    return kind + shown


def source_fingerprint(path: str) -> list:
    """What identifies a source for caching: its name and, for local files and folders, their sizes and times."""
    local = Path(resolve_asset(path)).expanduser()
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    return [path] + [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.exists()]
