import json
import re

import datasets
import pandas as pd
import pytest

from qlora_lit.data.conversations import Message
from qlora_lit.data.sources import load_conversations, load_table, select_columns, table_conversations
from qlora_lit.errors import ConfigError

ROWS = [
    {"instruction": "김치찌개 끓이는 법을 알려줘.", "output": "김치와 고기를 볶고 물을 부어 끓입니다.", "url": "u1"},
    {"instruction": "다음 문장을 요약해줘.", "input": "오늘은 비가 온다.", "output": "비가 옵니다.", "url": "u2"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", "folder", ".JSONL", ".CSV"])
def test_each_local_format_loads_the_same_rows(tmp_path, suffix):
    table = pd.DataFrame(ROWS)
    path = tmp_path / f"data{suffix}"
    suffix = suffix.lower()  # file names in capitals (Windows exports) read as their format
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
    conversations, _, stats = load_conversations(str(path))
    assert [user.content for user, _ in conversations] == [row["instruction"] for row in ROWS]
    assert [user.input for user, _ in conversations] == [None, "오늘은 비가 온다."]
    assert [answer for _, answer in conversations] == [Message("assistant", row["output"]) for row in ROWS]
    assert stats["rows_kept"] == 2


def test_shipped_sample_has_koalpaca_shape_and_duplicates_are_dropped():
    table = load_table("builtin:koalpaca_sample.jsonl")
    assert {"instruction", "output", "url"} <= set(table.columns)
    conversations, _, stats = load_conversations("builtin:koalpaca_sample.jsonl")
    assert stats["rows_read"] >= 200
    assert stats["duplicates_dropped"] == len(table) - len(table.drop_duplicates(["instruction", "input", "output"]))
    assert stats["duplicates_dropped"] > 0
    assert len(set(conversations)) == len(conversations) == stats["rows_kept"] == stats["turns"]


def test_empty_rows_are_counted_and_dropped():
    table = pd.DataFrame(ROWS + [{"instruction": " ", "output": "x"}, {"instruction": "y", "output": None}])
    assert [len(conversation) for conversation in table_conversations(table)] == [2, 2, 0, 0]  # 0: empty


def test_missing_column_names_it_and_lists_what_is_there():
    with pytest.raises(ConfigError, match=r"no column \['output'\].*'question', 'answer'.*messages"):
        table_conversations(pd.DataFrame({"instruction": ["a"], "question": ["q"], "answer": ["b"]}))


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


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    return str(path)


def test_json_file_with_one_object_per_line_loads(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", ROWS)
    assert load_table(path)["instruction"].tolist() == [row["instruction"] for row in ROWS]


def test_a_list_of_sources_is_concatenated_and_deduplicated_across_files(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS)
    csv = tmp_path / "b.csv"
    pd.DataFrame([ROWS[1], {"instruction": "새 질문", "output": "새 답"}]).to_csv(csv, index=False)
    conversations, sources, stats = load_conversations([jsonl, str(csv)])
    assert stats["rows_read"] == 4
    assert stats["duplicates_dropped"] == 1  # ROWS[1] is in both files
    assert [user.content for user, _ in conversations] == [ROWS[0]["instruction"], ROWS[1]["instruction"], "새 질문"]
    assert sources == [0, 0, 1]  # each row keeps the source it was first read from


def test_a_question_and_answer_in_koalpaca_and_messages_rows_are_one_duplicate(tmp_path):
    """A KoAlpaca row's input "" (or " ") and a conversation's user turn (no input) made two rows of the same ids."""
    koalpaca = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "김치찌개에 뭘 넣어요?", "output": "김치와 돼지고기요.", "input": input}
            for input in ("", " ")
        ],
    )
    turns = [
        {"role": "user", "content": "김치찌개에 뭘 넣어요?"},
        {"role": "assistant", "content": "김치와 돼지고기요."},
    ]
    messages = write_jsonl(tmp_path / "b.jsonl", [{"messages": turns}])
    conversations, _, stats = load_conversations([koalpaca, messages])
    assert stats["duplicates_dropped"] == 2
    assert conversations == [(Message("user", "김치찌개에 뭘 넣어요?"), Message("assistant", "김치와 돼지고기요."))]


def test_column_mapping_renames_and_ignores_extra_columns(tmp_path):
    rows = [{"question": "질문", "context": "배경", "answer": "답", "id": 7, "source": "web"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    [conversation], _, _ = load_conversations(path, {"instruction": "question", "output": "answer"})
    assert conversation == (Message("user", "질문"), Message("assistant", "답"))
    [mapped], _, _ = load_conversations(path, {"instruction": "question", "input": "context", "output": "answer"})
    assert mapped[0].input == "배경"


def test_mapped_column_that_is_missing_is_named(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "질문", "answer": "답"}])
    with pytest.raises(
        ConfigError, match=r"qa.jsonl' has no column \['reply'\]; its columns are \['question', 'answer'\]"
    ):
        load_conversations(path, {"instruction": "question", "output": "reply"})
    with pytest.raises(ConfigError, match=r"data.columns maps 'question', which is not one of \['instruction'"):
        load_conversations(path, {"question": "instruction"})


def test_a_mapped_system_column_that_is_missing_is_named_for_conversations_too(tmp_path):
    """KoAlpaca rows refused it; conversation rows ignored it and trained without the system prompts."""
    turns = [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "안녕하세요."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns, "persona": "요리사"}])
    with pytest.raises(ConfigError, match=r"chat.jsonl' has no column 'role_prompt'; its columns are \['messages', 'p"):
        load_conversations(path, {"system": "role_prompt"})
    [conversation], _, _ = load_conversations(path, {"system": "persona"})
    assert conversation[0] == Message("system", "요리사")


def test_broken_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken.jsonl', line 3: not valid JSON"):
        load_table(str(path))
    listed = tmp_path / "broken.json"
    listed.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(ConfigError, match=r"broken.json', line 3: not valid JSON"):
        load_table(str(listed))
    (tmp_path / "scalars.json").write_text('[{"instruction": "a", "output": "b"}, 1, 2]')
    with pytest.raises(ConfigError, match=r"scalars.json', item 2: int 1 is not an object \(1 more items like it\)"):
        load_table(str(tmp_path / "scalars.json"))
    (tmp_path / "lists.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n["c", "d"]\n')
    with pytest.raises(ConfigError, match=r"lists.jsonl', line 3: not a JSON object .*must be: '\[\"c\", \"d\"\]'"):
        load_table(str(tmp_path / "lists.jsonl"))


@pytest.mark.parametrize(("name", "content"), [("a.jsonl", ""), ("b.json", "  \n"), ("c.csv", ""), ("d.csv", "a,b\n")])
def test_empty_file_says_so(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=r"is empty|has no rows"):
        load_table(str(tmp_path / name))


def test_nothing_left_after_cleaning_says_so(tmp_path):
    path = write_jsonl(
        tmp_path / "empty.jsonl", [{"instruction": "", "output": "x"}, {"instruction": "y", "output": " "}]
    )
    with pytest.raises(ConfigError, match=r"no usable rows left after cleaning: of 2 rows read, 2 are empty"):
        load_conversations(path)


def test_cp949_csv_needs_its_encoding_and_the_message_says_how(tmp_path):
    path = tmp_path / "excel.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False, encoding="cp949")
    with pytest.raises(ConfigError) as error:
        load_table(str(path))
    message = str(error.value)
    assert "excel.csv' is not utf-8 text" in message and "It reads as CP949" in message
    assert "--data.encoding cp949" in message and "iconv -f cp949 -t utf-8" in message
    assert load_table(str(path), encoding="cp949")["instruction"].tolist() == [row["instruction"] for row in ROWS]


def test_excel_utf8_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "excel_utf8.csv"
    pd.DataFrame(ROWS).to_csv(path, index=False, encoding="utf-8-sig")
    assert list(load_table(str(path)).columns)[0] == "instruction"


def load_sources(path: str, encoding: str = "utf-8") -> pd.DataFrame:
    """A KoAlpaca-shaped source's instruction/input/output as the reader turns them into text (before cleaning)."""
    return select_columns(load_table(path, encoding), None, repr(path))[["instruction", "input", "output"]]


def read_rows(tmp_path, name: str, content: str | bytes) -> list[dict]:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return load_sources(str(path)).to_dict("records")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('["a", "b"]', 'a list ["a", "b"]'),
        ('{"k": "v"}', 'an object {"k": "v"}'),
        ("true", "true"),
        ("Infinity", "float Infinity"),
    ],  # fmt: skip
)
def test_a_text_field_that_is_no_text_is_refused_naming_file_line_and_value(tmp_path, value, shown):
    """Python's rendering of these ("['a', 'b']", "True", "inf") became training text before."""
    lines = f'{{"instruction": "a", "output": "x"}}\n\n{{"instruction": "b", "output": {value}}}\n'
    with pytest.raises(ConfigError, match=rf"bad.jsonl', line 3: 'output' is {re.escape(shown)}, not text\. Text"):
        read_rows(tmp_path, "bad.jsonl", lines)


def test_numbers_in_text_fields_are_taken_as_written_and_nulls_are_blank(tmp_path):
    lines = '{"instruction": "a", "output": 4}\n{"instruction": "b", "output": null}\n'
    lines += '{"instruction": "c", "output": 4.50}\n{"instruction": "d", "output": NaN}\n'
    assert [row["output"] for row in read_rows(tmp_path, "numbers.jsonl", lines)] == ["4", "", "4.50", ""]
    # integers with a null in parquet and in save_to_disk folders stay integers (numpy types made them 4.0)
    table = pd.DataFrame({"instruction": ["a", "b"], "output": pd.array([4, None], dtype="Int64")})
    table.to_parquet(tmp_path / "numbers.parquet")
    datasets.Dataset.from_pandas(table).save_to_disk(str(tmp_path / "numbers"))
    for source in ("numbers.parquet", "numbers"):
        assert load_sources(str(tmp_path / source))["output"].tolist() == ["4", ""]
    pd.DataFrame({"instruction": ["a", "b"], "output": [["x"], ["y"]]}).to_parquet(tmp_path / "lists.parquet")
    with pytest.raises(ConfigError, match=r"lists.parquet', row 1: 'output' is a list \[\"x\"\], not text \(1 more"):
        load_sources(str(tmp_path / "lists.parquet"))


def test_bad_rows_skip_leaves_out_rows_whose_text_field_is_no_text_and_counts_them(tmp_path):
    """`data.bad_rows: skip` skipped conversation rows with a list as a message, yet a KoAlpaca row with a list as
    its output (or a true/false system) still stopped the run."""
    lines = '{"instruction": "a", "output": "x"}\n{"instruction": "b", "output": ["p", "q"]}\n'
    lines += '{"instruction": "c", "output": "z", "system": true}\n{"instruction": "d", "output": "w"}\n'
    (tmp_path / "mixed.jsonl").write_text(lines, encoding="utf-8")
    conversations, _, stats = load_conversations(str(tmp_path / "mixed.jsonl"), bad_rows="skip")
    assert [conversation[0].content for conversation in conversations] == ["a", "d"]
    assert (stats["rows_read"], stats["bad_rows_skipped"], stats["rows_kept"]) == (4, 2, 2)
    assert stats["bad_row_examples"][0].endswith('line 2: \'output\' is a list ["p", "q"], not text')
    with pytest.raises(ConfigError, match=r"mixed.jsonl', line 2: 'output' is a list .*, not text\. Text fields"):
        load_conversations(str(tmp_path / "mixed.jsonl"))  # error (the default): stops, naming the first and the rest
    messages = (
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "system": [1]}\n'
    )
    messages += '{"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}\n'
    (tmp_path / "chat.jsonl").write_text(messages, encoding="utf-8")
    conversations, _, stats = load_conversations(str(tmp_path / "chat.jsonl"), bad_rows="skip")
    assert len(conversations) == 1 and stats["bad_rows_skipped"] == 1


def test_other_columns_may_hold_anything(tmp_path):
    rows = read_rows(tmp_path, "meta.jsonl", '{"instruction": "a", "output": "b", "meta": {"tags": [1, true]}}\n')
    assert rows == [{"instruction": "a", "input": "", "output": "b"}]


def test_a_key_or_column_given_twice_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"twice.csv' has more than one column named \['output'\]"):
        read_rows(tmp_path, "twice.csv", "instruction,output,output\na,x,y\n")
    with pytest.raises(ConfigError, match=r"twice.jsonl', line 1: an object has the key \['output'\] more than once"):
        read_rows(tmp_path, "twice.jsonl", '{"instruction": "a", "output": "x", "output": "y"}\n')


@pytest.mark.parametrize("delimiter", ["\t", ";", "|"])
def test_a_csv_separated_by_tabs_semicolons_or_bars_reads_by_its_header(tmp_path, delimiter):
    table = pd.DataFrame([{"instruction": "김치, 찌개", "input": "", "output": "답; 입니다"}])
    rows = read_rows(tmp_path, "excel.csv", table.to_csv(sep=delimiter, index=False))
    assert rows == [{"instruction": "김치, 찌개", "input": "", "output": "답; 입니다"}]


def test_a_json_array_in_a_jsonl_file_says_to_rename_it(tmp_path):
    for indent in (None, 2):
        with pytest.raises(
            ConfigError, match=r"rows.jsonl' is one JSON array, not JSON lines .* rename it to rows.json"
        ):
            read_rows(tmp_path, "rows.jsonl", json.dumps(ROWS, indent=indent))


def test_a_json_table_by_columns_is_named_as_such(tmp_path):
    """pandas' to_json default: {"instruction": {"0": ..., "1": ...}, ...} was read as one row, too long to train."""
    pd.DataFrame(ROWS).to_json(tmp_path / "columns.json", force_ascii=False)
    with pytest.raises(ConfigError, match=r"a table by columns, as pandas' DataFrame.to_json\(\) writes.*orient='rec"):
        load_sources(str(tmp_path / "columns.json"))
    assert read_rows(tmp_path, "one.json", json.dumps(ROWS[0]))[0]["output"] == ROWS[0]["output"]  # one row is fine


def test_utf16_files_read_with_a_byte_order_mark_and_are_named_without(tmp_path):
    """Windows' "Unicode text": the message advised iconv -f cp949."""
    text = "\n".join(json.dumps(row, ensure_ascii=False) for row in ROWS)
    assert read_rows(tmp_path, "bom.jsonl", text.encode("utf-16"))[1]["input"] == "오늘은 비가 온다."
    for ascii_only in (False, True):  # Korean text fails to decode as UTF-8; ASCII decodes, with NULs
        content = (json.dumps(ROWS[0]) if ascii_only else text).encode("utf-16-le")
        with pytest.raises(ConfigError, match=r"as UTF-16 text without a byte-order mark has .*utf-16-le.*iconv -f u"):
            read_rows(tmp_path, "nobom.jsonl", content)
    assert load_sources(str(tmp_path / "nobom.jsonl"), encoding="utf-16-le")["instruction"].tolist() == [
        "김치찌개 끓이는 법을 알려줘."
    ]


def test_a_csv_row_with_a_trailing_separator_keeps_its_columns(tmp_path):
    """pandas took the first column of such rows as an index: each value moved one column left."""
    content = "instruction,output,category\n김치찌개 끓이는 법,볶고 끓여요,요리,\n지하철 노선 수,20개가 넘어요,교통,\n"
    rows = read_rows(tmp_path, "trailing.csv", content)
    assert [(row["instruction"], row["output"]) for row in rows] == [
        ("김치찌개 끓이는 법", "볶고 끓여요"),
        ("지하철 노선 수", "20개가 넘어요"),
    ]


@pytest.mark.parametrize(
    ("rows", "wrong"),
    [
        ("요약해줘,원문\n\n번역해줘,hello,안녕\n", "row 1 \\(line 2\\) has 2 fields"),  # filled with blanks before
        ('"a",b,c\n김치, 찌개,x,요리\n', "row 2 \\(line 3\\) has 4 fields"),  # an unquoted comma in a value
    ],
    ids=["short", "unquoted separator"],
)
def test_a_csv_row_whose_field_count_differs_from_the_header_is_refused(tmp_path, rows, wrong):
    with pytest.raises(ConfigError) as error:
        read_rows(tmp_path, "rows.csv", "instruction,input,output\n" + rows)
    assert re.search(
        rf"rows.csv', {wrong} but the header has 3 \(\['instruction', 'input', 'output'\]\)", str(error.value)
    )
    assert "Quote values that contain the separator ','" in str(error.value)
