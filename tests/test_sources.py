import json

import datasets
import pandas as pd
import pytest

from qlora_lit.data.sources import clean_table, load_table
from qlora_lit.errors import ConfigError

ROWS = [
    {"instruction": "김치찌개 끓이는 법을 알려줘.", "output": "김치와 고기를 볶고 물을 부어 끓입니다.", "url": "u1"},
    {"instruction": "다음 문장을 요약해줘.", "input": "오늘은 비가 온다.", "output": "비가 옵니다.", "url": "u2"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", "folder"])
def test_each_local_format_loads_the_same_rows(tmp_path, suffix):
    table = pd.DataFrame(ROWS)
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in ROWS), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".csv":
        table.to_csv(path, index=False)
    elif suffix == ".parquet":
        table.to_parquet(path)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_pandas(table)}).save_to_disk(str(path))
    clean, stats = clean_table(load_table(str(path)))
    assert clean["instruction"].tolist() == [row["instruction"] for row in ROWS]
    assert clean["input"].tolist() == ["", "오늘은 비가 온다."]
    assert stats["rows_kept"] == 2


def test_shipped_sample_has_koalpaca_shape_and_duplicates_are_dropped():
    table = load_table("builtin:koalpaca_sample.jsonl")
    assert {"instruction", "output", "url"} <= set(table.columns)
    clean, stats = clean_table(table)
    assert stats["rows_read"] >= 200
    assert stats["duplicates_dropped"] == len(table) - len(table.drop_duplicates(["instruction", "input", "output"]))
    assert stats["duplicates_dropped"] > 0
    assert not clean.duplicated().any()


def test_empty_rows_are_counted_and_dropped():
    table = pd.DataFrame(ROWS + [{"instruction": " ", "output": "x"}, {"instruction": "y", "output": None}])
    clean, stats = clean_table(table)
    assert len(clean) == 2
    assert stats["empty_dropped"] == 2


def test_missing_column_names_it_and_lists_what_is_there():
    with pytest.raises(ConfigError, match=r"no column \['output'\].*'question', 'answer'"):
        clean_table(pd.DataFrame({"instruction": ["a"], "question": ["q"], "answer": ["b"]}))


def test_missing_file_and_unknown_builtin_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_table(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="not shipped with qlora_lit"):
        load_table("builtin:nope.jsonl")
    with pytest.raises(ConfigError, match="not one written by datasets' save_to_disk"):
        load_table(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="expected one of"):
        load_table(str(tmp_path / "notes.txt"))
