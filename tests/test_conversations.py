"""Conversations as training data: both shapes recognised in every file format with no setting, data.columns for
other names, system prompts, bad rows (stopped or skipped and counted), over-long conversations losing whole earlier
turns, and batching (padded, packed, grouped by length) that trains every answer and nothing else."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
import torch
from conftest import TINY_MODEL, examples_run_alone

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.data.collate import IGNORE_INDEX, label_count, label_ids
from qlora_lit.data.conversations import Message, drop_earlier_turns, order_problem
from qlora_lit.data.inference import encode_prompts, read_prompts_file
from qlora_lit.data.packing import PackedDataset, PackingCollator
from qlora_lit.data.prompts import PromptFormat
from qlora_lit.data.sources import load_conversations
from qlora_lit.errors import ConfigError
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule

CHAT_DATA = "builtin:ko_chat_sample.jsonl"
MESSAGES = [
    [
        {"role": "system", "content": "짧게 답하세요."},
        {"role": "user", "content": "김치찌개에 뭘 넣어요?"},
        {"role": "assistant", "content": "김치와 돼지고기, 두부요."},
        {"role": "user", "content": "얼마나 끓여요?"},
        {"role": "assistant", "content": "20분쯤이요."},
    ],
    [
        {"role": "user", "content": "한글날은 언제예요?"},
        {"role": "assistant", "content": "10월 9일이에요."},
    ],
]
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
EXPECTED = [tuple(Message(message["role"], message["content"]) for message in messages) for messages in MESSAGES]


def sharegpt(messages: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT_ROLES[message["role"]], "value": message["content"]} for message in messages]


def write_rows(path, rows: list[dict]):
    """`rows` in the file format of `path`'s suffix (a folder: datasets' save_to_disk); conversations in a CSV file
    are JSON text, as CSV cells are text."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    elif suffix == ".csv":
        as_text = [{key: json.dumps(value, ensure_ascii=False) for key, value in row.items()} for row in rows]
        pd.DataFrame(as_text).to_csv(path, index=False)
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("shape", ["messages", "conversations"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", "folder"])
def test_both_shapes_are_recognised_in_every_file_format(tmp_path, shape, suffix):
    rows = [{shape: messages if shape == "messages" else sharegpt(messages), "id": 7} for messages in MESSAGES]
    conversations, _, stats = load_conversations(write_rows(tmp_path / f"chat{suffix}", rows))
    assert conversations == EXPECTED
    assert (stats["rows_kept"], stats["turns"], stats["multi_turn_rows"]) == (2, 3, 1)


@pytest.mark.parametrize("suffix", [".parquet", "folder"])
def test_a_column_mixing_openai_and_sharegpt_messages_reads_in_arrow_formats(tmp_path, suffix):
    """Arrow merges the two message structs: each ShareGPT message also had `role: None`, read as its role key."""
    rows = [{"conversations": sharegpt(MESSAGES[0])}, {"conversations": MESSAGES[1]}]
    conversations, _, _ = load_conversations(write_rows(tmp_path / f"mixed{suffix}", rows))
    assert conversations == EXPECTED


def test_hub_datasets_of_conversations_are_read_as_files_are(monkeypatch):
    """A hub dataset arrives through datasets.load_dataset, as a DatasetDict of Arrow lists of structs."""
    hub = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"conversations": sharegpt(m)} for m in MESSAGES])}
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda path: hub)
    assert load_conversations("someone/ko-sharegpt")[0] == EXPECTED


def test_other_names_are_mapped_with_data_columns(tmp_path):
    rows = [
        {"dialog": [{"speaker": m["role"], "text": m["content"]} for m in messages], "messages": "ignored"}
        for messages in MESSAGES
    ]
    path = write_rows(tmp_path / "dialogs.jsonl", rows)
    columns = {"messages": "dialog", "role": "speaker", "content": "text"}
    assert load_conversations(path, columns)[0] == EXPECTED
    with pytest.raises(ConfigError, match=r"dialogs.jsonl', line 1: message 1 has neither a 'role' nor a 'from' key"):
        load_conversations(path, {"messages": "dialog"})
    with pytest.raises(ConfigError, match=r"has no column 'talk'; its columns are \['dialog', 'messages'\]"):
        load_conversations(path, {"messages": "talk"})


def test_the_default_system_prompt_goes_where_a_row_has_none(tmp_path):
    chat = write_rows(tmp_path / "chat.json", [{"messages": messages} for messages in MESSAGES])
    rows = [
        {"instruction": "안녕?", "output": "안녕하세요."},
        {"instruction": "요약해줘.", "output": "네.", "system": "요약만 하세요."},
    ]
    instructions = write_rows(tmp_path / "instructions.jsonl", rows)
    conversations, _, _ = load_conversations([chat, instructions], system_prompt="친절하게 답하세요.")
    systems = [conversation[0].content for conversation in conversations]
    assert systems == ["짧게 답하세요.", "친절하게 답하세요.", "친절하게 답하세요.", "요약만 하세요."]
    assert [conversation[0].role for conversation in conversations] == ["system"] * 4


BAD = {
    "unknown role": ([{"role": "bot", "content": "안녕"}], r"message 1 has the role \"bot\" under 'role'; known"),
    "no answer": ([{"role": "user", "content": "안녕?"}], "it has no assistant turn to train on"),
    "empty": (
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "네"}],
        r"message 1 \(user\) is empty",
    ),
    "answer first": (
        [{"role": "assistant", "content": "네"}, {"role": "user", "content": "안녕?"}],
        "message 1 is the assistant's; the first turn must be the user's",
    ),
    "two users": (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
        "messages 1 and 2 are both user turns",
    ),
    "late system": (
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
        "message 2 is a system message; only the first message may be one",
    ),
    "unanswered end": (MESSAGES[1] + [{"role": "user", "content": "또요?"}], "it ends with a user turn, unanswered"),
    "not text": (
        [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}],
        r'message 1 \(user\) has \["a"\] under',
    ),
    "not a list": ({"role": "user", "content": "a"}, "it holds .* not a list of messages"),
}


@pytest.mark.parametrize("problem", BAD)
def test_a_bad_row_names_the_file_the_row_and_the_problem(tmp_path, problem):
    messages, message = BAD[problem]
    path = write_rows(
        tmp_path / "bad.jsonl", [{"messages": MESSAGES[0]}, {"messages": MESSAGES[1]}, {"messages": messages}]
    )
    with pytest.raises(ConfigError, match=rf"bad.jsonl', line 3: {message}.*data.bad_rows: skip"):
        load_conversations(path)
    conversations, _, stats = load_conversations(path, bad_rows="skip")
    assert conversations == EXPECTED and stats["bad_rows_skipped"] == 1
    assert len(stats["bad_row_examples"]) == 1 and "bad.jsonl, " in stats["bad_row_examples"][0]


def test_skipped_bad_rows_are_counted_in_the_runs_statistics(tmp_path):
    rows = [{"messages": messages} for messages in MESSAGES] + [{"messages": BAD[problem][0]} for problem in BAD]
    data = KoAlpacaDataModule(write_rows(tmp_path / "bad.jsonl", rows), TINY_MODEL, bad_rows="skip", val_size=1)
    data.setup()
    assert (data.stats["rows_read"], data.stats["bad_rows_skipped"], data.stats["rows_kept"]) == (11, 9, 2)
    assert len(data.stats["bad_row_examples"]) == 5  # the first few, each naming its file, row and problem
    with pytest.raises(ConfigError, match=r"bad.jsonl', line 3: message 1 has the role"):
        KoAlpacaDataModule(str(tmp_path / "bad.jsonl"), TINY_MODEL, val_size=1).setup()  # error, by default


def test_empty_system_messages_are_no_system_prompt_and_an_empty_cell_is_an_empty_row(tmp_path):
    rows = [{"messages": [{"role": "system", "content": ""}, *MESSAGES[1]]}, {"messages": []}, {"messages": None}]
    conversations, _, stats = load_conversations(write_rows(tmp_path / "chat.json", rows), system_prompt="기본.")
    assert conversations == [(Message("system", "기본."), *EXPECTED[1])] and stats["empty_dropped"] == 2


def test_prompts_files_take_conversations_ending_with_the_users_turn(tmp_path, tokenizer):
    rows = [{"messages": MESSAGES[0][:-1], "id": 1}, {"conversations": sharegpt(MESSAGES[1][:1])}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows), encoding="utf-8")
    assert read_prompts_file(path) == rows
    expected = [EXPECTED[0][:-1], (Message("system", "기본."), *EXPECTED[1][:1])]
    prompt_format = PromptFormat.named("koalpaca", tokenizer)
    assert encode_prompts(tokenizer, rows, system_prompt="기본.") == prompt_format.prompt_ids(expected)
    path.write_text(json.dumps({"messages": MESSAGES[1]}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(
        ConfigError, match=r"line 1: it ends with the assistant's turn; the last turn must be the user's"
    ):
        read_prompts_file(path)


def test_order_rules():
    assert order_problem(["system", "user", "assistant", "user", "assistant"]) is None
    assert order_problem(["user"], answered=False) is None
    assert order_problem(["user", "assistant", "user"], answered=False) is None
    assert order_problem([]) == "it has no user turn"
    assert drop_earlier_turns(EXPECTED[0], 1) == (EXPECTED[0][0], *EXPECTED[0][3:])


def long_conversation(turns: int) -> list[dict]:
    messages = [{"role": "system", "content": "짧게 답하세요."}]
    for turn in range(turns):
        messages += [
            {"role": "user", "content": f"{turn}번째 질문입니다. " * 3},
            {"role": "assistant", "content": f"{turn}번째 대답입니다. " * 3},
        ]
    return messages


@pytest.fixture
def long_data(tmp_path):
    rows = [{"messages": long_conversation(turns)} for turns in (1, 2, 4, 6)] + [{"messages": MESSAGES[1]}]
    return write_rows(tmp_path / "long.jsonl", rows)


def fitting(conversation, max_length: int, prompt_format):
    """The conversation's last turns, as many as fit in `max_length` tokens, and how many of its turns are left out."""
    turns = sum(message.role == "assistant" for message in conversation)
    for kept in range(turns, 0, -1):
        [tokens] = prompt_format.encode([drop_earlier_turns(conversation, kept)])
        if len(tokens.ids) <= max_length:
            return tokens, turns - kept
    return None, turns


def test_overlong_conversations_lose_whole_earlier_turns_and_keep_the_system_prompt(long_data, tokenizer):
    prompt_format = PromptFormat.named("koalpaca", tokenizer)
    conversations, _, _ = load_conversations(long_data)
    two_turns = len(prompt_format.encode([conversations[1]])[0].ids)  # the budget: longer rows keep two turns or so
    data = KoAlpacaDataModule(long_data, TINY_MODEL, max_length=two_turns, val_size=1, seed=0)
    data.setup()
    shortened = [fitting(conversation, two_turns, prompt_format) for conversation in conversations[2:4]]
    assert all(tokens is not None and 2 <= dropped < 5 for tokens, dropped in shortened)
    stats = data.stats
    assert (stats["overlong"], stats["turns_dropped_rows"], stats["truncated"]) == (2, 2, 0)
    assert stats["turns_dropped"] == sum(dropped for _, dropped in shortened)
    examples = data.train_set + data.val_set
    for tokens, _ in shortened:  # each whole, its answers trained, none cut
        assert {"input_ids": tokens.ids, "trained_spans": tokens.trained} in examples
    text = tokenizer.decode(shortened[1][0].ids)
    assert text.count("### 시스템:\n짧게 답하세요.") == 1 and "5번째 대답" in text and "0번째" not in text
    dropped = KoAlpacaDataModule(long_data, TINY_MODEL, max_length=two_turns, val_size=1, overlong="drop")
    dropped.setup()
    assert (dropped.stats["overlong_dropped"], dropped.stats["turns_dropped"]) == (2, 0)
    assert dropped.stats["train_rows"] + dropped.stats["val_rows"] == 3


def test_a_last_turn_too_long_alone_is_cut_and_a_prompt_that_fills_the_budget_is_dropped(long_data, tokenizer):
    prompt_format = PromptFormat.named("koalpaca", tokenizer)
    conversations, _, _ = load_conversations(long_data)
    last_turns = [prompt_format.encode([drop_earlier_turns(c, 1)])[0] for c in conversations[:4]]
    budget = max(tokens.trained[0][0] for tokens in last_turns) + 3  # every last prompt, 3 or more answer tokens
    data = KoAlpacaDataModule(long_data, TINY_MODEL, max_length=budget, val_size=1)
    data.setup()
    assert (data.stats["turns_dropped_rows"], data.stats["turns_dropped"], data.stats["truncated"]) == (3, 9, 4)
    examples = data.train_set + data.val_set
    assert all(len(example["input_ids"]) <= budget for example in examples)
    cut = [example for example in examples if example["input_ids"][-1] != tokenizer.eos_token_id]
    assert len(cut) == 4 and all(
        example["trained_spans"] == [(example["trained_spans"][0][0], budget)] for example in cut
    )
    short = KoAlpacaDataModule(long_data, TINY_MODEL, max_length=16, val_size=1)
    with pytest.raises(ConfigError, match="no rows left"):
        short.setup()
    assert short.stats["prompt_too_long_dropped"] == 5


@pytest.fixture(scope="module")
def chat_examples():
    data = KoAlpacaDataModule(CHAT_DATA, TINY_MODEL, max_length=256, val_size=4)
    data.setup()
    examples = [example for example in data.train_set if len(example["trained_spans"]) > 1]
    return examples[:5]


def test_packed_conversations_equal_the_conversations_run_separately(chat_examples):
    """Labels and logits: a packed row of multi-turn examples is those examples side by side."""
    rows = PackedDataset(chat_examples, [[0, 1, 2], [3, 4]])
    for row, indices in zip(rows, rows.rows, strict=True):
        expected = [label for i in indices for label in [IGNORE_INDEX, *label_ids(chat_examples[i])[1:]]]
        assert row["labels"] == expected
    assert rows.label_counts() == [sum(label_count(chat_examples[i]) for i in row) for row in rows.rows]
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(dropout=0))
    module.configure_model()
    module.eval()
    for lora_b in (p for name, p in module.named_parameters() if "lora_B" in name):
        torch.nn.init.normal_(lora_b, std=0.05)
    batch = PackingCollator(pad_id=1)(list(rows))
    with torch.no_grad():
        packed = module(**batch).logits
        for row, start, end, alone in examples_run_alone(module, chat_examples, rows.rows):
            torch.testing.assert_close(packed[row, start:end], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batching", [{}, {"group_by_length": True}, {"pack_length": 512}])
def test_every_answer_is_trained_once_per_epoch_however_conversations_are_batched(batching):
    data = KoAlpacaDataModule(CHAT_DATA, TINY_MODEL, max_length=256, val_size=4, batch_size=2, **batching)
    data.setup()
    labelled = sorted(
        token for batch in data.train_dataloader() for token in batch["labels"][:, 1:].flatten().tolist() if token >= 0
    )
    expected = sorted(
        token
        for example in data.train_set
        for token in label_ids(example)[1:]  # the first position is never predicted
        if token >= 0
    )
    assert labelled == expected and len(expected) == sum(label_count(example) for example in data.train_set)


def test_json_in_a_csv_cell_is_read_as_json_files_are(tmp_path):
    """A number as a message's text is taken as written, as in a JSON lines file (it was refused as "not text"), and a
    key given twice is named (JSON keeps only its last value)."""
    cell = '[{"role": "user", "content": 4}, {"role": "assistant", "content": 4.50}]'
    numbers = tmp_path / "numbers.csv"
    pd.DataFrame({"messages": [cell]}).to_csv(numbers, index=False)
    lines = tmp_path / "numbers.jsonl"
    lines.write_text('{"messages": ' + cell + "}\n", encoding="utf-8")
    expected = [(Message("user", "4"), Message("assistant", "4.50"))]
    assert load_conversations(str(numbers))[0] == load_conversations(str(lines))[0] == expected
    twice = tmp_path / "twice.csv"
    pd.DataFrame({"messages": ['[{"role": "user", "content": "a", "content": "b"}]']}).to_csv(twice, index=False)
    with pytest.raises(ConfigError, match=r"twice.csv', row 1: an object has the key \['content'\] more than once"):
        load_conversations(str(twice))
