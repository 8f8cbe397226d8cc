"""Prompts to answer: the prompts file (and its errors), the training template, left padding, sharding over ranks."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from conftest import SAMPLE_DATA, TINY_MODEL

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.data.conversations import Message
from qlora_lit.data.inference import (
    PromptCollator,
    encode_prompts,
    format_prompt,
    left_pad,
    prompt_messages,
    read_prompts_file,
)
from qlora_lit.data.prompts import build_prompt
from qlora_lit.errors import ConfigError


def write_lines(path, *lines: str):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_prompts_file_keeps_extra_keys_and_skips_blank_lines(tmp_path):
    path = write_lines(
        tmp_path / "p.jsonl", '{"instruction": "안녕?"}', "", '{"instruction": "요약해줘.", "input": "긴 글", "id": 3}'
    )
    assert read_prompts_file(path) == [
        {"instruction": "안녕?"},
        {"instruction": "요약해줘.", "input": "긴 글", "id": 3},
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"instruction": "안녕?"', "not valid JSON"),
        ('["안녕?"]', "expected a JSON object"),
        ('{"question": "안녕?"}', "needs a non-empty \"instruction\" string; the keys are ['question']"),
        ('{"instruction": "  "}', 'needs a non-empty "instruction"'),
        ('{"instruction": "안녕?", "input": 3}', '"input" must be a string'),
        ('{"instruction": "안녕?", "system": ["짧게."]}', '"system" (the row\'s system prompt) must be a string'),
    ],
)
def test_bad_prompts_line_names_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "p.jsonl", '{"instruction": "좋아"}', bad_line)
    with pytest.raises(ConfigError, match="line 2") as error:
        read_prompts_file(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_missing_or_empty_prompts_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="holds no prompts"):
        read_prompts_file(write_lines(tmp_path / "empty.jsonl", "", "  "))


def test_prompts_file_is_read_as_training_data_is(tmp_path):
    """A byte-order mark was refused, U+2028 inside a string split the line, CP949 raised UnicodeDecodeError."""
    row = '{"instruction": "요약해줘.", "input": "첫 문장.\u2028둘째 문장."}\n'
    (tmp_path / "bom.jsonl").write_text(row, encoding="utf-8-sig")
    expected = [{"instruction": "요약해줘.", "input": "첫 문장.\u2028둘째 문장."}]
    assert read_prompts_file(tmp_path / "bom.jsonl") == expected
    (tmp_path / "cp949.jsonl").write_bytes('{"instruction": "김치찌개 끓이는 법"}\n'.encode("cp949"))
    with pytest.raises(ConfigError, match=r"cp949.jsonl' is not utf-8 text.*It reads as CP949.*--data.encoding cp949"):
        read_prompts_file(tmp_path / "cp949.jsonl")
    assert read_prompts_file(tmp_path / "cp949.jsonl", "cp949") == [{"instruction": "김치찌개 끓이는 법"}]
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, predict_path=str(tmp_path / "cp949.jsonl"), encoding="cp949")
    data.setup("predict")  # predict reads its prompts in data.encoding
    assert data.predict_rows == [{"instruction": "김치찌개 끓이는 법"}]


def test_koalpaca_prompts_are_encoded_as_in_training(tokenizer):
    rows = [{"instruction": "안녕?"}, {"instruction": "요약해줘.", "input": "서울은 한국의 수도이다."}]
    assert format_prompt(tokenizer, "요약해줘.", "서울은 한국의 수도이다.") == build_prompt(
        "요약해줘.", "서울은 한국의 수도이다."
    )
    expected = [tokenizer(build_prompt(row["instruction"], row.get("input")))["input_ids"] for row in rows]
    assert encode_prompts(tokenizer, rows) == expected  # with the BOS, as encode_example tokenizes the prompt


def test_chat_format_uses_the_tokenizers_chat_template(tokenizer):
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        format_prompt(tokenizer, "안녕?", prompt_format="chat")
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert format_prompt(chat, "요약해줘.", "긴 글", prompt_format="chat") == "<user>요약해줘.\n\n긴 글<assistant>"


def test_a_rows_own_system_prompt_is_used_as_training_uses_it(tokenizer):
    """Training rows' `system` column is their system prompt; prompt rows' was ignored for data.system_prompt."""
    rows = [
        {"instruction": "안녕?", "system": "짧게 답하세요."},
        {"instruction": "안녕?", "system": " "},  # blank: the configured one
        {"messages": [{"role": "user", "content": "안녕?"}], "system": "짧게 답하세요."},
    ]
    assert [prompt_messages(row, "친절하게.")[0] for row in rows] == [
        Message("system", "짧게 답하세요."),
        Message("system", "친절하게."),
        Message("system", "짧게 답하세요."),
    ]


def test_left_padding_ends_every_prompt_at_the_last_column(tokenizer):
    batch = left_pad(tokenizer, [[5, 6, 7], [8]])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tokenizer.pad_token_id] * 2 + [8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_predict_prompts_are_split_across_ranks_without_repeats(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", *[f'{{"instruction": "질문 {i}"}}' for i in range(5)])
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, batch_size=2, predict_path=str(path))
    data.setup("predict")
    assert not data.train_set  # predicting never reads the training data
    shares = []
    for rank in range(2):
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = data.predict_dataloader()
        assert isinstance(loader.collate_fn, PromptCollator)
        shares.append([index for batch in loader for index in batch["index"].tolist()])
    assert shares == [[0, 2, 4], [1, 3]]


def test_predict_needs_a_prompts_file():
    with pytest.raises(ConfigError, match="predict needs data.predict_path"):
        KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL).setup("predict")
